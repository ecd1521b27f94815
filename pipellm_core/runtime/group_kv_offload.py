"""The KV caches of groups in flight kept in host memory, brought to each stage's GPU for the
group's turn and written back after.

Each group of `capacity` sequences has a home in host memory: rows group × capacity onwards of
every layer's keys and values, whatever its members (a sequence's `slot` is its home row). On
the GPUs the cache holds three sets of `capacity` rows: sets 0 and 1 take the group steps in
turn (a step entering the pipeline at tick t uses set t mod 2 on every stage), set 2 takes
admissions' prefills. Per stage, one copy stream brings a group's rows of the stage's layers
into the step's set (for stage s + 1 as soon as the step has been issued on stage s, so while
stage s + 1 still computes the group before, in the other set), after the set's last write-back
and the group's; the compute stream waits for the copy. After the stage's step, the rows of
its sequences go back home on a second copy stream once the compute is done. Whole rows move,
the full context of every row of the group's home: simple, and more bytes than the used
positions need.
"""

from __future__ import annotations

from itertools import count

import torch

from pipellm_core.runtime.step import StepBatch

ADMISSION_SET = 2


class GroupKVOffload:
    """The host homes of `n_groups` groups of `capacity` sequences and the copies to and from
    the GPUs' sets, on each stage's copy queues."""

    def __init__(self, engine, n_groups: int, capacity: int):
        self.engine, self.capacity = engine, capacity
        cache = engine.cache
        shape = (n_groups * capacity, *cache.k[0].shape[1:])
        self.home_k = [engine.platform.host_buffer(shape, cache.k[0].dtype) for _ in cache.k]
        self.home_v = [engine.platform.host_buffer(shape, cache.v[0].dtype) for _ in cache.v]
        stages = engine.plan.stages
        # per stage: one stream brings rows in, another writes them back, so that bringing in
        # the next step's rows does not queue behind the write-back that waits for this step
        self.bringing = [engine.platform.copy_queue("kv in", s) for s in range(len(stages))]
        self.writing = [engine.platform.copy_queue("kv out", s) for s in range(len(stages))]
        # per stage, by set and by group: (issue number, event) of the last write-back from the
        # set (then it may be refilled) and of the group's rows (then its home is current)
        self.set_written = [{} for _ in stages]
        self.home_written = [{} for _ in stages]
        self._issued = count()

    def home_rows(self, group: int) -> slice:
        return slice(group * self.capacity, (group + 1) * self.capacity)

    def set_rows(self, kv_set: int) -> slice:
        return slice(kv_set * self.capacity, (kv_set + 1) * self.capacity)

    def step_batch(self, batch: StepBatch, n_sequences: int, kv_set: int) -> StepBatch:
        """`batch` of home rows on the rows of `kv_set`; its rows past `n_sequences` are padding
        and stay on the pad slot."""
        rows = batch.slots.clone()
        rows[:n_sequences] = kv_set * self.capacity + rows[:n_sequences] % self.capacity
        return StepBatch(batch.tokens, batch.positions, rows, batch.ctx_len)

    def bring_in(self, stage: int, group: int, kv_set: int) -> None:
        """The group's rows of the stage's layers into `kv_set`; the stage's compute waits."""
        q, buffer = self.bringing[stage], ("kv set", stage, kv_set)
        # both events are on the write-back stream, in order: the later one covers the other
        written = [w for w in (self.set_written[stage].get(kv_set), self.home_written[stage].get(group)) if w]
        after = max(written, key=lambda w: w[0])[1] if written else q.event()
        ready = q.event()
        home, rows = self.home_rows(group), self.set_rows(kv_set)
        cache = self.engine.cache
        for layer in self.engine.plan.stages[stage]:
            q.copy(cache.k[layer][rows], self.home_k[layer][home], after, ready, home_name(stage, group), buffer)
            q.copy(cache.v[layer][rows], self.home_v[layer][home], after, ready, home_name(stage, group), buffer)
        q.compute_waits(ready, buffer)

    def write_back(self, stage: int, group: int, kv_set: int, homes: list[int]) -> None:
        """After the stage's step (queued so far): the rows of the step's sequences (`homes`)
        back home. Only theirs: a sequence that joined the group meanwhile has its rows home
        already, newer than the set's copy."""
        base = kv_set * self.capacity
        moves = [(slice(base + a % self.capacity, base + b % self.capacity + 1), slice(a, b + 1))
                 for a, b in runs(sorted(homes))]
        self._write_back(stage, kv_set, group, moves)

    def admit(self, prompts: list[list[int]], homes: list[int]) -> torch.Tensor:
        """Prefill new sequences (of one group) into the admission set, then write their rows
        home on every stage; the logits of each prompt's last token."""
        engine, base = self.engine, ADMISSION_SET * self.capacity
        rows = [base + home % self.capacity for home in homes]
        group = homes[0] // self.capacity
        with engine.running():  # the compute streams wait for the set's last write-back
            for stage, q in enumerate(self.writing):
                if ADMISSION_SET in self.set_written[stage]:
                    q.compute_waits(self.set_written[stage][ADMISSION_SET][1], ("kv set", stage, ADMISSION_SET))
        logits = engine.prefill(prompts, rows)
        with engine.running():
            for stage in range(len(self.writing)):
                self._write_back(stage, ADMISSION_SET, group,
                                 [(slice(r, r + 1), slice(h, h + 1)) for r, h in zip(rows, homes)])
        return logits

    def _write_back(self, stage: int, kv_set: int, group: int, moves: list[tuple[slice, slice]]) -> None:
        q, buffer = self.writing[stage], ("kv set", stage, kv_set)
        q.compute_writes(buffer)
        computed, done = q.event(), q.event()
        q.mark_compute(computed)
        cache = self.engine.cache
        for layer in self.engine.plan.stages[stage]:
            for rows, home in moves:
                q.copy_back(self.home_k[layer][home], cache.k[layer][rows], computed, done, home_name(stage, group), buffer)
                q.copy_back(self.home_v[layer][home], cache.v[layer][rows], computed, done, home_name(stage, group), buffer)
        self.set_written[stage][kv_set] = self.home_written[stage][group] = (next(self._issued), done)


def home_name(stage: int, group: int) -> str:
    """The copies' name, and their host buffer's for the sim's hazard checks: a group's home
    rows of a stage's layers."""
    return f"kv of group {group}, stage {stage}"


def runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted rows as (first, last) of each run of consecutive ones."""
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and r == out[-1][1] + 1:
            out[-1] = (out[-1][0], r)
        else:
            out.append((r, r))
    return out
