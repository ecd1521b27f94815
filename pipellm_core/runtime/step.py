"""What one decode step works on, passed through the `schedule` and `decode` hooks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepBatch:
    tokens: torch.Tensor  # [B] int64, the last token of each sequence
    positions: torch.Tensor  # [B] int64, the position each token is written at
    slots: torch.Tensor  # [B] int64, each sequence's KV-cache slot
    ctx_len: int  # cache positions attention reads (>= max(positions) + 1)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, index: slice) -> "StepBatch":
        return StepBatch(self.tokens[index], self.positions[index], self.slots[index], self.ctx_len)

    def write_into(self, out: "StepBatch", pad_slot: int) -> None:
        """Copy this batch into the first rows of `out`'s buffers; the rows after it become
        padding: token 0 at position 0, written to the scratch cache slot `pad_slot`."""
        n = len(self)
        out.tokens[:n].copy_(self.tokens)
        out.positions[:n].copy_(self.positions)
        out.slots[:n].copy_(self.slots)
        if n < len(out):
            out.tokens[n:].zero_()
            out.positions[n:].zero_()
            out.slots[n:].fill_(pad_slot)

    def padded(self, rows: int, ctx_len: int, pad_slot: int) -> "StepBatch":
        """This batch in a step of `rows` rows over `ctx_len` cache positions (`write_into`)."""
        if rows == len(self) and ctx_len == self.ctx_len:
            return self
        dev = self.tokens.device
        out = StepBatch(*(torch.empty(rows, dtype=torch.long, device=dev) for _ in range(3)), ctx_len)
        self.write_into(out, pad_slot)
        return out


@dataclass
class Schedule:
    """The answer of the `schedule` hook: micro-batches, and ticks of (stage, micro-batch index).

    Pairs within a tick may run at the same time; a micro-batch must pass stage s before s + 1.
    `groups` above 1 asks the engine to keep that many groups of sequences in flight across
    steps (`runtime.group_pipeline`): each group's step is then scheduled alone, as one
    micro-batch through the stages in order, and the steps of different groups overlap.
    """

    micro_batches: list[StepBatch]
    ticks: list[list[tuple[int, int]]]
    groups: int = 1
