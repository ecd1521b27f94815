"""The few stream operations the streamer needs, on CUDA and on the sim backend.

Both issue copies on a second stream, and order the two streams with events: a copy into a slot
waits until the compute stream is past the layer that last read the slot, and a layer waits until
its copy has landed. On CUDA these are `torch.cuda` streams and events (capturable: a graph of a
step records the copies and the waits too). On the sim the data moves on the CPU for real,
uncharged, and the virtual GPU is charged a copy of the same bytes over its host link.
"""

from __future__ import annotations

import torch


class CudaCopyStreams:
    def __init__(self, device: str):
        self.device = torch.device(device)
        self.copy_stream = torch.cuda.Stream(self.device)

    def event(self):
        return torch.cuda.Event()

    def mark_compute(self, event) -> None:
        """`event` completes when the work queued so far on the compute stream does."""
        event.record(torch.cuda.current_stream(self.device))

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after, ready, name: str, slot: int) -> None:
        """Copy host `src` into `dst` on the copy stream once `after` completes; `ready` marks the end."""
        s = self.copy_stream
        s.wait_event(after)
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)
        ready.record(s)

    def compute_waits(self, event, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def compute_done_with(self, slot: int) -> None:
        pass  # only the sim's hazard checks need to hear it


class SimCopyStreams:
    def __init__(self, engine):
        self.costing = engine.costing
        self.device = engine.sim.device(self.costing.device)
        self.copy_stream = self.device.stream("prefetch copies")

    def event(self):
        return self.device.runtime.event()

    def mark_compute(self, event) -> None:
        self.costing.record(self.costing.stream, event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after, ready, name: str, slot: int) -> None:
        with self.costing.uncharged():
            dst.copy_(src)
        c = self.costing
        c.wait(self.copy_stream, after)
        c.copy(self.copy_stream, name, src.numel() * src.element_size(), "h2d", src=("host", name),
               dst=("prefetch slot", slot))
        c.record(self.copy_stream, ready)

    def compute_waits(self, event, slot: int) -> None:
        self.costing.wait(self.costing.stream, event)
        self.costing.touch(self.costing.stream, reads=[("prefetch slot", slot)])

    def compute_done_with(self, slot: int) -> None:
        self.costing.touch(self.costing.stream, reads=[("prefetch slot", slot)])
