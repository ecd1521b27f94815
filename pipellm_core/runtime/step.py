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


@dataclass
class Schedule:
    """The answer of the `schedule` hook: micro-batches, and ticks of (stage, micro-batch index).

    Pairs within a tick may run at the same time; a micro-batch must pass stage s before s + 1.
    """

    micro_batches: list[StepBatch]
    ticks: list[list[tuple[int, int]]]
