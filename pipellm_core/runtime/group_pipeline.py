"""Groups of sequences in flight through pipeline stages, across decode steps.

With p stages and G >= p groups, the work is a ring of (stage, group) items: at tick t, stage s
runs group (t - s) mod G. So stage s works on group g while stage s - 1 already works on group
g + 1, and a group enters stage 0 again as soon as its previous step has left the last stage
and been sampled: no step drains the pipeline. Within a tick later stages are issued first, so
that a stage's hand-over to the next GPU waits only for the work that stage queued in the tick
before (the group it hands over), not for the next group it queues now.

`run_ring` drives the ring for any executor: the engine's (`group_batching`), which runs the
stages of real steps, and the sim's pricing of a model's stages (`sim.group_pipeline_costs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


def ring_items(tick: int, n_stages: int, n_groups: int) -> list[tuple[int, int]]:
    """The (stage, group) items of tick `tick`, last stage first."""
    return [(s, (tick - s) % n_groups) for s in reversed(range(n_stages)) if tick - s >= 0]


@dataclass
class GroupStep:
    """One group's decode step on its way through the stages."""

    group: int
    work: Any  # what the executor runs: the engine's StepBatch and requests, or a priced step
    next_stage: int = 0
    hidden: Any = None  # the last stage's output so far: hidden state, then logits


def run_ring(n_stages: int, n_groups: int,
             start: Callable[[int], Any | None],
             run_stage: Callable[[int, GroupStep], Any],
             finish: Callable[[GroupStep], None],
             more: Callable[[], bool],
             tick_context: Callable[[], Any] | None = None) -> Iterator[int]:
    """Run ticks of the ring while `more()` says there is work, yielding each tick's number
    once its finished steps are handled.

    At a group's stage-0 item, `start(group)` gives its next step's work, or None when the group
    has nothing to run (then stage 0 idles that tick). `run_stage(stage, step)` runs a stage and
    returns its output, passed on as `step.hidden`. Once a tick's items are issued, each step
    that left the last stage goes to `finish(step)` (sampling: the host's one wait per group
    step). `tick_context()`, if given, wraps the issuing of each tick.
    """
    in_flight: dict[int, GroupStep] = {}
    tick = idle = 0
    while in_flight or more():
        if idle > n_groups:
            raise RuntimeError("group pipeline: work is left, but no group starts a step")
        context = tick_context() if tick_context is not None else None
        if context is not None:
            context.__enter__()
        ran = False
        try:
            for stage, group in ring_items(tick, n_stages, n_groups):
                step = in_flight.get(group)
                if stage == 0 and step is None:
                    work = start(group)
                    if work is None:
                        continue
                    step = in_flight[group] = GroupStep(group, work)
                if step is None or step.next_stage != stage:
                    continue  # the group is not at this stage (fewer groups than stages, or idle)
                step.hidden = run_stage(stage, step)
                step.next_stage += 1
                ran = True
        finally:
            if context is not None:
                context.__exit__(None, None, None)
        for group in [g for g, s in in_flight.items() if s.next_stage == n_stages]:
            finish(in_flight.pop(group))
        idle = 0 if ran else idle + 1
        yield tick
        tick += 1
