"""Continuous batching over groups of sequences kept in flight through the pipeline stages.

The engine's sequences are split into groups, each with its own cache slots (those of its
sequences). Each group's decode step runs through the stages as one micro-batch, in the ring of
`group_pipeline.run_ring`: while the last stage runs group g, the stage before already runs
group g + 1, and group g's next step starts at stage 0 once its tokens are sampled. A new
sequence joins the group with the fewest sequences; a finished one leaves its group when the
group's step is sampled. Prefill still runs all stages for the admitted prompts together.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import torch

from pipellm_core.runtime.group_kv_offload import GroupKVOffload
from pipellm_core.runtime.group_pipeline import GroupStep, run_ring
from pipellm_core.runtime.request import Request


def fewest(groups: list[list[Request]]) -> int:
    """The group with the fewest sequences (the first of those on a tie)."""
    return min(range(len(groups)), key=lambda g: len(groups[g]))


def generate_in_groups(engine, requests: Iterable[Request], n_groups: int) -> Iterator[tuple[Request, int]]:
    """`ContinuousBatcher.generate` for an engine whose pipeline keeps `n_groups` groups in
    flight: yields (request, token) as tokens come."""
    n_stages = len(engine.plan.stages)
    pending = deque(requests)
    for req in pending:
        engine.check_fits(req)
    capacity = engine.group_kv_offload
    offload = GroupKVOffload(engine, n_groups, capacity) if capacity else None
    # free cache slots: any of them, or under KV offload each group's own home rows
    free = {None: list(range(engine.max_batch))} if offload is None else \
        {g: list(range(g * capacity, (g + 1) * capacity)) for g in range(n_groups)}
    groups: list[list[Request]] = [[] for _ in range(n_groups)]
    clock = {"tick": 0}
    outbox: list[tuple[Request, int]] = []
    stats = engine.stats
    prefill_seconds = 0.0
    prefill_busy: list[float] | None = None

    def slots_of(group: int | None) -> list[int]:
        return free[None if offload is None else group]

    def release(req: Request) -> None:
        engine.release_slot(req.slot)
        rows = slots_of(None if offload is None else req.slot // capacity)
        rows.append(req.slot)
        rows.sort()

    def joining() -> int | None:
        """The group a new sequence joins: the one with the fewest sequences (that has a free
        home row, under KV offload); None when no slot is free."""
        room = [g for g in range(n_groups) if slots_of(g)]
        return room[fewest([groups[g] for g in room])] if room else None

    def prefill_logits(admitted: list[Request]):
        if offload is None:
            return engine.prefill_logits(admitted)
        logits = [None] * len(admitted)
        for group in sorted({r.slot // capacity for r in admitted}):  # one prefill per group
            mine = [i for i, r in enumerate(admitted) if r.slot // capacity == group]
            out = offload.admit([admitted[i].prompt_tokens for i in mine], [admitted[i].slot for i in mine])
            for i, row in zip(mine, out):
                logits[i] = row
        return torch.stack(logits)

    def admit() -> None:
        nonlocal prefill_seconds, prefill_busy
        admitted = []
        while pending and (group := joining()) is not None:
            req = pending.popleft()
            req.slot = slots_of(group).pop(0)
            groups[group].append(req)
            admitted.append(req)
        if not admitted:
            return
        with engine.step_timer() as t:
            logits = prefill_logits(admitted)
            picks = engine.pick_tokens(admitted, logits)
        stats.prefill_tokens += sum(len(r.prompt_tokens) for r in admitted)
        stats.prefill_seconds += t.seconds
        prefill_seconds += t.seconds
        if t.busy is not None:
            prefill_busy = [a + b for a, b in zip(prefill_busy or [0.0] * len(t.busy), t.busy)]
        for req, tok in zip(admitted, picks):
            if req.max_tokens <= 0:
                req.finish_reason = "length"
            elif engine.accept_token(req, tok):
                outbox.append((req, tok))
        for req in admitted:
            if req.finished:  # done at its first token: never part of a step
                groups[next(g for g, members in enumerate(groups) if req in members)].remove(req)
                release(req)

    def start(group: int):
        for req in [r for r in groups[group] if r.finished]:  # ended by the consumer (stop string)
            groups[group].remove(req)
            release(req)
        if not groups[group]:
            return None
        reqs = list(groups[group])
        batch = engine.group_step_batch(reqs)
        kv_set = clock["tick"] % 2  # under KV offload: the GPU rows of the steps entering at even or odd ticks
        return reqs, batch if offload is None else offload.step_batch(batch, len(reqs), kv_set), kv_set

    def run_stage(stage: int, step: GroupStep):
        reqs, batch, kv_set = step.work
        if offload is not None and stage == 0:
            offload.bring_in(0, step.group, kv_set)
        out = engine.decode_stage(stage, batch, step.hidden)
        if offload is not None:
            offload.write_back(stage, step.group, kv_set, [r.slot for r in reqs])
            if stage + 1 < n_stages:  # the next stage's rows, while it computes the group before
                offload.bring_in(stage + 1, step.group, kv_set)
        return out

    def finish(step: GroupStep) -> None:
        reqs, _batch, _kv_set = step.work
        engine.platform.synchronize_stage(n_stages - 1)  # the host's one wait per group step
        picks = engine.pick_tokens(reqs, step.hidden.to(engine.device)[: len(reqs)])
        stats.decode_tokens += len(reqs)
        stats.decode_steps += 1
        for req, tok in zip(reqs, picks):
            if not req.finished and engine.accept_token(req, tok):
                outbox.append((req, tok))
        for req in reqs:
            if req.finished:
                groups[step.group].remove(req)
                release(req)

    def more() -> bool:
        return bool(pending) or any(groups)

    with engine.step_timer() as total:
        admit()
        for tick in run_ring(n_stages, n_groups, start, run_stage, finish, more, engine.running):
            clock["tick"] = tick + 1
            while outbox:
                yield outbox.pop(0)
            admit()  # between ticks, outside the forward passes: a prefill runs every stage
        while outbox:
            yield outbox.pop(0)
    stats.decode_seconds += total.seconds - prefill_seconds
    if total.busy is not None:
        stats.add_stage_busy([a - b for a, b in zip(total.busy, prefill_busy or [0.0] * len(total.busy))])
