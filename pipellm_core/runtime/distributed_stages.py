"""Pipeline stages in several processes, one stage each, launched by `torchrun`.

Process (rank) r holds and computes stage r's layers; rank 0 also holds the embedding and owns
the requests, the batching and the sampling, the last rank also holds the output head. For each
forward pass rank 0 broadcasts the pass's metadata (`StagePass`), then the hidden state goes
rank to rank with `torch.distributed` send/recv and the last rank sends the logits back to rank
0. Ranks above 0 wait for passes until rank 0 stops them (`next_pass` answers None).

Transport is torch.distributed's own: gloo between CPU processes, NCCL between GPUs. torchrun
sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous (MASTER_ADDR, MASTER_PORT) read here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipellm_core.errors import PipeLLMError


def launched_processes() -> int:
    """Processes of the job torchrun started this one in (1: not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched_rank() -> int:
    """This process's rank in its torchrun job (0 when not under torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


@dataclass
class StagePass:
    """What every stage needs of a forward pass besides the hidden state: positions [B, T] and
    cache slots [B] (on the CPU, as sent), the context length attention reads, and the position
    of each row the head runs on (None: every position)."""

    positions: torch.Tensor
    slots: torch.Tensor
    ctx_len: int
    logits_index: torch.Tensor | None = None

    def on(self, device: str) -> "StagePass":
        index = None if self.logits_index is None else self.logits_index.to(device)
        return StagePass(self.positions.to(device), self.slots.to(device), self.ctx_len, index)

    def hidden_shape(self, n_embd: int) -> tuple[int, int, int]:
        rows, length = self.positions.shape
        return rows, length, n_embd

    def logits_shape(self, vocab: int) -> tuple[int, int, int]:
        rows, length = self.positions.shape
        return rows, 1 if self.logits_index is not None else length, vocab


class StageGroup:
    """This process's place among the stage processes, and the messages between them."""

    def __init__(self, rank: int, size: int, device: str):
        self.rank, self.size, self.device = rank, size, device
        self.in_pass = False  # rank 0: a pass announced whose logits have not come back

    @classmethod
    def join(cls, device: str) -> "StageGroup | None":
        """Join the torchrun job this process runs in (None when it runs alone). `device` is the
        one asked for: "cpu" gives gloo on the CPU, "cuda" NCCL on GPU LOCAL_RANK."""
        size = launched_processes()
        if size <= 1:
            return None
        kind = torch.device(device).type
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise PipeLLMError("--device cuda asked for, but this torch sees no CUDA GPU")
            index = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(index)
            device, backend = f"cuda:{index}", "nccl"
        elif kind == "cpu":
            device, backend = "cpu", "gloo"
        else:
            raise PipeLLMError(f"unsupported device {device!r} under torchrun (supported: cpu, cuda)")
        if not dist.is_initialized():
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    # --- control: rank 0 to every rank --------------------------------------------------------

    def begin(self, p: StagePass) -> None:
        """Rank 0: announce a forward pass to every stage."""
        self.in_pass = True
        self._broadcast(StagePass(p.positions.cpu(), p.slots.cpu(), p.ctx_len,
                                  None if p.logits_index is None else p.logits_index.cpu()))

    def next_pass(self) -> StagePass | None:
        """Ranks above 0: the next pass rank 0 announces, or None once it stops the stages."""
        return self._broadcast(None)

    def stop(self) -> None:
        """Rank 0: no more passes; the other ranks' `next_pass` answers None. Not in the middle of
        a pass (rank 0 failed in it): the other ranks wait for its data, not for a message, and
        torchrun ends them when rank 0 exits with its error."""
        if not self.in_pass:
            self._broadcast(None)

    def _broadcast(self, message):
        box = [message]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device != "cpu" else None)
        return box[0]

    # --- data: along the stages, and back to rank 0 ---------------------------------------------

    def receive_hidden(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """The hidden state the stage before computed."""
        hidden = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(hidden, src=self.rank - 1)
        return hidden

    def pass_on(self, out: torch.Tensor) -> None:
        """The stage's output: the hidden state to the next stage, or the logits to rank 0."""
        if self.last:
            dist.send(out.float().contiguous(), dst=0)
        else:
            dist.send(out.contiguous(), dst=self.rank + 1)

    def receive_logits(self, shape) -> torch.Tensor:
        """Rank 0: the logits (float32) the last stage computed."""
        logits = torch.empty(shape, dtype=torch.float32, device=self.device)
        dist.recv(logits, src=self.size - 1)
        self.in_pass = False
        return logits

    def leave(self) -> None:
        """Leave the job's process group (after the last pass)."""
        if dist.is_initialized():
            dist.destroy_process_group()
