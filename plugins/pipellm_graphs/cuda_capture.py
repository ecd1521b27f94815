"""Capturing one decode step as a `torch.cuda.CUDAGraph`, following PyTorch's recipe: warm-up on
a side stream (so lazy initialisation happens outside the capture), then capture into a memory
pool that every graph of the engine shares (steps run one after another, never at once)."""

from __future__ import annotations

from typing import Callable

import torch

WARMUP_RUNS = 2


class CudaStepGraph:
    def __init__(self, step: Callable[[], torch.Tensor], pool, device: str):
        self.step, self.pool, self.device = step, pool, torch.device(device)
        self.graph = torch.cuda.CUDAGraph()
        self.output: torch.Tensor | None = None
        self.memory_bytes = 0

    def record(self) -> torch.Tensor:
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self.step()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.empty_cache()  # as the capture itself does first: its pool's growth is then measurable
            before = torch.cuda.memory_reserved()
            with torch.cuda.graph(self.graph, pool=self.pool):
                self.output = self.step()
            self.memory_bytes = torch.cuda.memory_reserved() - before  # what the pool took
        self.graph.replay()
        return self.output

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output
