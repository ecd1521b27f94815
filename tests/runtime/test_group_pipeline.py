"""The ring of (stage, group) items that keeps groups of sequences in flight: its order, that
no step waits for the pipeline to drain, and the group a new sequence joins."""

import pytest

from pipellm_core.runtime.group_batching import fewest
from pipellm_core.runtime.group_pipeline import ring_items, run_ring


def test_stage_s_runs_group_g_while_stage_s_minus_1_runs_group_g_plus_1():
    assert ring_items(0, 2, 2) == [(0, 0)]
    assert ring_items(1, 2, 2) == [(1, 0), (0, 1)]
    assert ring_items(2, 2, 2) == [(1, 1), (0, 0)]
    assert ring_items(5, 3, 3) == [(2, 0), (1, 1), (0, 2)]
    assert ring_items(4, 2, 3) == [(1, 0), (0, 1)]


def trace_ring(n_stages, n_groups, steps_per_group):
    """Each tick's (stage, group, step number), and when each step was sampled."""
    started = [0] * n_groups
    ticks, sampled, now = [], [], [0]

    def start(group):
        if started[group] == steps_per_group:
            return None
        started[group] += 1
        return started[group]

    def run_stage(stage, step):
        ticks[-1].append((stage, step.group, step.work))
        assert step.hidden == (None if stage == 0 else ("out", stage - 1))
        return ("out", stage)

    def finish(step):
        assert step.hidden == ("out", n_stages - 1)
        sampled.append((now[0], step.group, step.work))

    def more():
        return any(n < steps_per_group for n in started)

    class Tick:
        def __enter__(self):
            ticks.append([])

        def __exit__(self, *exc):
            pass

    for tick in run_ring(n_stages, n_groups, start, run_stage, finish, more, Tick):
        now[0] = tick + 1
    return ticks, sampled


def test_no_step_drains_the_pipeline():
    ticks, sampled = trace_ring(2, 2, 3)
    # after the fill, both stages work in every tick; a group starts again right after sampling
    assert ticks == [[(0, 0, 1)], [(1, 0, 1), (0, 1, 1)], [(1, 1, 1), (0, 0, 2)],
                     [(1, 0, 2), (0, 1, 2)], [(1, 1, 2), (0, 0, 3)], [(1, 0, 3), (0, 1, 3)], [(1, 1, 3)]]
    assert sampled == [(1, 0, 1), (2, 1, 1), (3, 0, 2), (4, 1, 2), (5, 0, 3), (6, 1, 3)]  # (tick, group, step)


@pytest.mark.parametrize("n_stages, n_groups", [(3, 3), (2, 3), (3, 1), (3, 2), (1, 2)])
def test_every_step_passes_every_stage_in_order(n_stages, n_groups):
    ticks, sampled = trace_ring(n_stages, n_groups, 4)
    assert sorted((g, n) for _, g, n in sampled) == [(g, n) for g in range(n_groups) for n in range(1, 5)]
    seen = {}
    for t, items in enumerate(ticks):
        assert len({s for s, _, _ in items}) == len(items)  # one item per stage per tick
        for s, g, n in items:
            assert seen.get((g, n), -1) == s - 1  # stage s after stage s - 1 of the same step
            seen[(g, n)] = s
    # with at least as many groups as stages, a group's next step starts in the tick after sampling
    if n_groups >= n_stages:
        busy = [len(items) for items in ticks]
        assert busy[n_stages - 1: len(ticks) - n_stages + 1] == [n_stages] * (len(ticks) - 2 * n_stages + 2)


def test_sequences_join_the_group_with_the_fewest():
    assert fewest([[1, 2], [3], [4, 5]]) == 1
    assert fewest([[1], [2]]) == 0
    assert fewest([[], []]) == 0


def test_rows_written_back_in_runs():
    from pipellm_core.runtime.group_kv_offload import runs
    assert runs([0, 1, 2, 5, 7, 8]) == [(0, 2), (5, 5), (7, 8)]
    assert runs([3]) == [(3, 3)] and runs([]) == []
