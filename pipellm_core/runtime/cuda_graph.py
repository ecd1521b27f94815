"""Capturing one decode step as a `torch.cuda.CUDAGraph`, following PyTorch's recipe: warm-up on
a side stream (so lazy initialisation happens outside the capture), then capture into a memory
pool that the graphs of one GPU share (steps run one after another, never at once). The
side stream is the engine's compute stream, where its eager steps run too, so that the captured
kernels are the ones the eager step uses."""

from __future__ import annotations

from typing import Callable

import torch

from pipellm_core.runtime.platform import CudaGraphPool

WARMUP_RUNS = 2


class CudaStepGraph:
    def __init__(self, step: Callable[[], torch.Tensor], pool: CudaGraphPool, stream: torch.cuda.Stream):
        self.step, self.pool, self.stream = step, pool, stream
        self.graph = torch.cuda.CUDAGraph()
        self.output: torch.Tensor | None = None
        self.memory_bytes = 0

    def record(self) -> torch.Tensor:
        with torch.cuda.device(self.stream.device):
            caller = torch.cuda.current_stream()
            self.stream.wait_stream(caller)
            with torch.cuda.stream(self.stream):
                for _ in range(WARMUP_RUNS):
                    self.step()
            caller.wait_stream(self.stream)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # as the capture itself does first: its pool's growth is then measurable
            before = torch.cuda.memory_reserved()
            with torch.cuda.graph(self.graph, pool=self.pool.handle, stream=self.stream):
                self.output = self.step()
            self.memory_bytes = torch.cuda.memory_reserved() - before  # what the pool took
            self.pool.nbytes += self.memory_bytes
        with torch.cuda.stream(self.stream):
            self.graph.replay()
        return self.output

    def replay(self) -> torch.Tensor:
        with torch.cuda.device(self.stream.device):  # launched on that GPU's current (compute) stream
            self.graph.replay()
        return self.output
