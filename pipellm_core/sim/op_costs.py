"""Every torch operation of a step, run for real on the CPU and charged to a virtual GPU.

A `TorchDispatchMode` sees each aten operation the engine issues. The operation runs on the CPU
(so tokens are real), and the sim runtime is told what it would have cost on the virtual device:
host time to issue it, and a kernel whose duration is the larger of its memory traffic over the
device's bandwidth and its FLOPs over the device's peak. Floating-point tensors are costed at the
size they have on the GPU (fp16), not at the float32 the CPU computes in.

While a graph is being recorded (`recording`), operations are collected as graph nodes instead of
being charged one by one; while a recorded graph replays (`silent`), the math runs uncharged
because the replay is charged as a whole.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten

# operations that read only the rows they return (the input may be a whole KV cache)
_GATHERS = {aten.index.Tensor, aten.index_select.default, aten.gather.default, aten.embedding.default}
_SCATTERS = {aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
# operations that make no kernel: allocation without initialisation, metadata
_NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
              aten.detach.default, aten.lift_fresh.default, aten.alias.default,
              aten._local_scalar_dense.default, aten._unsafe_view.default}


def _element_bytes(t: torch.Tensor, float_bytes: int) -> int:
    return float_bytes if t.is_floating_point() else t.element_size()


def _bytes(t: torch.Tensor, float_bytes: int) -> int:
    return t.numel() * _element_bytes(t, float_bytes)


@dataclass
class GraphNode:
    """A kernel on the compute stream (`run` None), or another stream operation (a copy, an
    event recorded or waited on) that `run()` issues again at each replay."""

    name: str
    seconds: float
    run: Callable[[], object] | None = None
    stream: object = None  # the stream a kernel was issued to


class SimOpCosting(TorchDispatchMode):
    """Charges each operation to `runtime.device(device)`'s current stream (see module doc)."""

    def __init__(self, runtime, device: int = 0, float_bytes: int = 2, track_memory: bool = True):
        super().__init__()
        self.runtime, self.device, self.float_bytes = runtime, device, float_bytes
        self.track_memory = track_memory
        self.recording: list[GraphNode] | None = None
        self.silent = False
        self.ops = 0

    @property
    def stream(self):
        return self.runtime.device(self.device).default_stream

    # --- stream operations that are not torch operations (copies on a side stream, events) ----
    # Each is issued now, or kept as a graph node while a graph records, or skipped during a
    # replay (the replay issues the recorded node instead).

    def _issue(self, name: str, action: Callable[[float | None], object]) -> None:
        if self.silent:
            return
        if self.recording is not None:
            self.recording.append(GraphNode(name, 0.0, lambda: action(0.0)))
        else:
            action(None)

    def copy(self, stream, name: str, nbytes: int, kind: str, *, src: Hashable | None = None,
             dst: Hashable | None = None) -> None:
        """A copy of `nbytes` from pinned memory (kind 'h2d', 'd2h', 'd2d' or 'peer') on `stream`."""
        self._issue(name, lambda host: stream.copy(name, nbytes, kind, src=src, dst=dst, host_cost=host))

    def record(self, stream, event) -> None:
        self._issue("record event", lambda host: stream.record_event(event))

    def wait(self, stream, event) -> None:
        self._issue("wait event", lambda host: stream.wait_event(event))

    def touch(self, stream, reads: Iterable[Hashable] = (), writes: Iterable[Hashable] = ()) -> None:
        """A zero-time mark that the work queued on `stream` so far reads or writes these buffers
        (for the hazard checks: a kernel's own reads are not named)."""
        reads, writes = tuple(reads), tuple(writes)
        self._issue("access", lambda host: stream.launch("access", 0.0, host_cost=0.0, reads=reads, writes=writes))

    @contextlib.contextmanager
    def uncharged(self):
        """Torch operations here run on the CPU but cost nothing (data moved by a charged copy)."""
        saved, self.silent = self.silent, True
        try:
            yield
        finally:
            self.silent = saved

    @contextlib.contextmanager
    def as_kernels(self, launches: Callable[[], list]):
        """The torch operations inside run on the CPU uncharged; the GPU kernels that compute the
        same thing (`launches()`: (name, kind, bytes, rows) each, as `fused_decode.launches`
        gives them) are charged instead."""
        with self.uncharged():
            kernels = launches()
        if not self.silent:
            profile = self.runtime.device(self.device).profile
            for name, kind, nbytes, rows in kernels:
                seconds = profile.launch_seconds(kind, nbytes, rows)
                if self.recording is not None:
                    self.recording.append(GraphNode(name, seconds, stream=self.stream))
                else:
                    self.stream.launch(name, seconds)
        with self.uncharged():
            yield

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.silent:
            return out
        self.ops += 1
        profile = self.runtime.device(self.device).profile
        if func is aten._local_scalar_dense.default:  # .item(): the host waits for the device
            self.runtime.synchronize(self.device)
        if func.is_view or func in _NO_KERNEL:
            if self.recording is None:
                self.runtime.host_work(profile.view_op_host_s)
            return out
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        seconds = profile.kernel_seconds(self._traffic(func, inputs, outputs), self._flops(func, args, kwargs, out))
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        if self.recording is not None:
            self.recording.append(GraphNode(name, seconds, stream=self.stream))
        else:
            self.stream.launch(name, seconds)
        if self.track_memory:
            self._account(inputs, outputs)
        return out

    def _traffic(self, func, inputs, outputs) -> int:
        fb = self.float_bytes
        written = sum(_bytes(o, fb) for o in outputs)
        if func in _GATHERS:
            return 2 * written + sum(_bytes(t, fb) for t in inputs[1:] if not t.is_floating_point())
        if func in _SCATTERS:
            values = inputs[-1]
            return 2 * _bytes(values, fb)
        return written + sum(_bytes(t, fb) for t in inputs)

    @staticmethod
    def _flops(func, args, kwargs, out) -> float:
        count = flop_registry.get(func._overloadpacket)
        if count is None:
            return 0.0
        try:
            return float(count(*args, **kwargs, out_val=out))
        except Exception:  # a formula that does not cover this overload's arguments
            return 0.0

    def _account(self, inputs, outputs) -> None:
        """Give each new output tensor device memory until it is garbage-collected."""
        held = {t.untyped_storage().data_ptr() for t in inputs}
        dev = self.runtime.device(self.device)
        for o in outputs:
            if o.untyped_storage().data_ptr() in held or o.numel() == 0:
                continue  # in place, or an alias of an input
            alloc = dev.allocate(_bytes(o, self.float_bytes), "activation")
            weakref.finalize(o, dev.free, alloc)
