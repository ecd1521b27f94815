"""The text `pipellm compare` measures over when given none: a few paragraphs of plain English,
a list and a little code, so that the next-token distributions cover prose, facts and syntax."""

DEFAULT_TEXT = """The lighthouse on the northern cape was built in 1874 from granite quarried a few miles
inland. For most of its life a keeper lived at its foot with his family, trimming the wick at
dusk, winding the clockwork that turned the lens, and writing the weather into a log every four
hours. When the light was electrified in 1952 the keepers left, and the cottage became a small
museum that opens on summer weekends.

Visitors usually ask three questions. How far can the light be seen? About twenty nautical
miles on a clear night. Why is the tower painted in red and white bands? So that ships can
recognise it by day. And what happened during the great storm of 1913? The log says only that
the sea broke over the gallery twice and that the light never went out.

A simple recipe for bread needs four things: flour, water, salt and yeast. Mix them, knead the
dough for ten minutes, let it rise until it has doubled in size, shape it, let it rise again,
and bake it in a hot oven for about forty minutes.

def mean(values):
    total = 0.0
    for v in values:
        total += v
    return total / len(values)

print(mean([3, 5, 7, 9]))

In the morning the fog lifted slowly from the harbour, and the fishing boats went out one after
another, their engines loud in the still air."""
