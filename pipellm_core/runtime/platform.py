"""What an engine runs on, behind one interface: the CPU, CUDA GPUs, or the sim's virtual GPUs.

Everything that differs between them is asked of the engine's `Platform` (`engine.platform`):
how many GPUs the pipeline stages may use and where a stage computes, free device memory,
buffers held on a device, the streams every forward pass runs on, side streams with events and
copies, graph capture and its memory pools, and the clock a step is timed with. The engine and
the plugins call these and never ask which platform they are on; the sim's implementation
(`pipellm_core.sim.platform.SimPlatform`) charges its virtual GPUs through the same calls.

The engine calls the platform at fixed points: `place` once the weights and the KV cache are
loaded, `running` around every forward pass, `enter_stage` before each stage's decode step (or
its capture; it hands the hidden state over to the stage's GPU) and `enter_layer` before each
layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable

import torch

from pipellm_core.errors import PipeLLMError
from pipellm_core.runtime.request import Timer


SPEED_REPEATS = 10  # products timed by `CudaPlatform.stage_speed`


class Platform:
    """The plain CPU: no GPU, nothing to order or capture. The base of the other platforms."""

    name = "cpu"

    def __init__(self, device: str):
        self.device = device  # the torch device of the engine's (first) GPU, or "cpu"
        self.engine = None

    # --- before the weights load: where things go -----------------------------------------

    @property
    def gpu_count(self) -> int:
        """GPUs that pipeline stages may use: the engine's and the ones after it (0: none)."""
        return 0

    def stage_placement(self, stage: int) -> str:
        """The torch device that computes the layers of pipeline stage `stage`."""
        return self.device

    def free_memory(self) -> int:
        """Bytes free on the engine's GPU now."""
        raise PipeLLMError("the CPU platform has no device memory to measure")

    def stage_speed(self, stage: int) -> float:
        """How fast the GPU of pipeline stage `stage` reads weights in a product, in bytes per
        second, measured where it can be (the pipeline's split gives faster GPUs more layers);
        1.0 on the CPU."""
        return 1.0

    # --- after the weights load -------------------------------------------------------------

    def place(self, engine) -> None:
        """The weights and the KV cache of `engine` are in place: set up what runs them."""
        self.engine = engine

    def kernel_charges(self):
        """None where the model runs its own kernels; on a simulated GPU, the context in which a
        decode layer's torch operations run uncharged while the kernels that compute it on CUDA
        are charged instead (`Transformer.charge_kernels`)."""
        return None

    def buffer(self, nbytes: int, tag: str, stage: int = 0) -> torch.Tensor:
        """A byte buffer on the GPU of pipeline stage `stage` (the engine's GPU without a
        pipeline) that a plugin holds for the engine's lifetime."""
        device = self.engine.stage_device(stage) if self.engine is not None else self.device
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host tensor that copies to and from the GPUs can overlap compute with (pinned on
        CUDA), zero-filled."""
        return torch.zeros(shape, dtype=dtype)

    # --- every forward pass -------------------------------------------------------------------

    def running(self):
        """Context of every forward pass (prefill, decode step, graph capture)."""
        return contextlib.nullcontext()

    def enter_stage(self, stage: int, hidden: torch.Tensor | None) -> torch.Tensor | None:
        """Before a stage's decode step or its capture, inside `running()`: the hidden state
        from the stage before (None at the first stage), as the stage reads it."""
        return hidden

    def enter_layer(self, layer: int, hidden: torch.Tensor) -> None:
        """Before layer `layer` runs on `hidden`, inside `running()`."""

    def step_timer(self):
        """A context that measures one prefill or decode step (`.seconds` after it)."""
        return Timer()

    def synchronize_stage(self, stage: int) -> None:
        """The host waits for the work queued so far on the GPU of `stage` (and nothing else)."""

    def stage_busy_seconds(self) -> list[float] | None:
        """Seconds each stage's GPU has computed so far, all added up, where the platform can
        tell; None on the CPU and on CUDA (a GPU's busy time needs a profiler there)."""
        return None

    # --- side streams, events, copies ---------------------------------------------------------

    def copy_queue(self, name: str, stage: int = 0) -> "CopyQueue":
        """A stream for copies from pinned host memory into the GPU of pipeline stage `stage`
        (the engine's GPU without a pipeline), beside that GPU's compute stream."""
        raise PipeLLMError("the CPU platform has no device to copy to")

    # --- graphs -------------------------------------------------------------------------------

    @property
    def can_capture_graphs(self) -> bool:
        return False

    def graph_pool(self, stage: int):
        """The memory pool shared by the graphs captured on the GPU of `stage`: `.gpu` (its
        index), `.nbytes` (device memory it holds)."""
        raise PipeLLMError("the CPU platform has no graphs")

    def graph(self, step: Callable[[], torch.Tensor], stage: int, pool):
        """A graph of `step` on the GPU of `stage`: `record()` captures it and returns its first
        output, `replay()` runs it again on the same buffers."""
        raise PipeLLMError("the CPU platform has no graphs")


class CopyQueue:
    """Copies on a side stream, ordered against the compute stream with events.

    `buffer` names the device buffer a copy writes and compute later reads (the sim checks
    those accesses for races; on CUDA it is only a label)."""

    def event(self):
        raise NotImplementedError

    def mark_compute(self, event) -> None:
        """`event` completes when the work queued so far on the compute stream does."""
        raise NotImplementedError

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after, ready, name: str, buffer: Hashable) -> None:
        """Copy host `src` into `dst` once `after` completes; `ready` completes when it lands."""
        raise NotImplementedError

    def compute_waits(self, event, buffer: Hashable) -> None:
        """Compute queued from now on waits for `event`, then reads `buffer`."""
        raise NotImplementedError

    def compute_done_with(self, buffer: Hashable) -> None:
        """Compute queued so far is the last to read `buffer` before it is refilled."""

    def compute_writes(self, buffer: Hashable) -> None:
        """Compute queued so far writes `buffer` (a copy reading it back must wait for it)."""

    def copy_back(self, dst: torch.Tensor, src: torch.Tensor, after, done, name: str, buffer: Hashable) -> None:
        """Copy device `src` (`buffer`) into host `dst` once `after` completes; `done` completes
        when it has landed."""
        raise NotImplementedError


class CudaPlatform(Platform):
    """CUDA GPUs: every forward pass on one compute stream per GPU the model uses, graph
    captures included (cuBLAS may pick another algorithm on another stream, and then a replay
    would not give the eager step's bits)."""

    name = "cuda"

    def __init__(self, device: str):
        super().__init__(device)
        self.compute_streams: dict[str, torch.cuda.Stream] = {}
        self.hand_over_streams: dict[str, torch.cuda.Stream] = {}  # per GPU: decode steps' hidden states between stages
        self._pools: dict[int, CudaGraphPool] = {}

    @property
    def _index(self) -> int:
        return torch.device(self.device).index or 0

    @property
    def gpu_count(self) -> int:
        return torch.cuda.device_count() - self._index

    def stage_placement(self, stage: int) -> str:
        return f"cuda:{self._index + stage}"

    def free_memory(self) -> int:
        free, _total = torch.cuda.mem_get_info(torch.device(self.device))
        return free

    def stage_speed(self, stage: int) -> float:
        """Bytes per second a matrix-vector product (bf16 [16384, 8192], 256 MiB) reads on the
        stage's GPU: a decode step's time follows the bytes it reads."""
        device = self.stage_placement(stage)
        with torch.cuda.device(device):
            w = torch.randn(16384, 8192, device=device, dtype=torch.bfloat16)
            x = torch.randn(8192, 1, device=device, dtype=torch.bfloat16)
            for _ in range(3):
                w @ x
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(SPEED_REPEATS):
                w @ x
            end.record()
            end.synchronize()
        return w.numel() * w.element_size() * SPEED_REPEATS / (start.elapsed_time(end) / 1e3)

    def place(self, engine) -> None:
        super().place(engine)
        gpus = {d for d in [str(x) for x in engine.weights.layer_devices] + [self.device] if d.startswith("cuda")}
        self.compute_streams = {d: torch.cuda.Stream(d) for d in sorted(gpus)}

    def compute_stream(self, device) -> torch.cuda.Stream:
        return self.compute_streams[str(torch.device(device))]

    @contextlib.contextmanager
    def running(self):
        with contextlib.ExitStack() as stack:
            # entering a stream makes its GPU current: the engine's own GPU last, so it stays current
            for device, stream in sorted(self.compute_streams.items(), key=lambda kv: kv[0] == self.device):
                stack.enter_context(_on_stream(stream))
            yield

    def enter_stage(self, stage: int, hidden: torch.Tensor | None) -> torch.Tensor | None:
        """A stage after the first receives the hidden state between the two GPUs' hand-over
        streams, ordered by events: the sending one waits for the sending compute stream, the
        receiving compute stream waits for the receiving one. The copy is a peer copy where the
        GPUs allow it; otherwise the CUDA driver stages it through host memory."""
        device = torch.device(self.engine.stage_device(stage))
        if hidden is None or hidden.device == device:
            return hidden
        sending, receiving = self._hand_over_stream(hidden.device), self._hand_over_stream(device)
        sending.wait_stream(self.compute_stream(hidden.device))
        # a copy between devices runs on the source's current stream, in a two-way barrier with
        # the destination's: both are hand-over streams, so neither compute stream is held up
        with torch.cuda.stream(sending), torch.cuda.stream(receiving):
            moved = hidden.to(device, non_blocking=True)
        hidden.record_stream(sending)
        moved.record_stream(self.compute_stream(device))
        self.compute_stream(device).wait_stream(receiving)
        return moved

    def _hand_over_stream(self, device) -> torch.cuda.Stream:
        key = str(torch.device(device))
        if key not in self.hand_over_streams:
            self.hand_over_streams[key] = torch.cuda.Stream(key)
        return self.hand_over_streams[key]

    def synchronize_stage(self, stage: int) -> None:
        self.compute_stream(self.engine.stage_device(stage)).synchronize()

    def copy_queue(self, name: str, stage: int = 0) -> "CopyQueue":
        return CudaCopyQueue(self.engine.stage_device(stage))

    def host_buffer(self, shape, dtype):
        return torch.zeros(shape, dtype=dtype, pin_memory=True)

    @property
    def can_capture_graphs(self) -> bool:
        return True

    def graph_pool(self, stage: int) -> "CudaGraphPool":
        index = torch.device(self.engine.stage_device(stage)).index
        if index not in self._pools:
            self._pools[index] = CudaGraphPool(torch.cuda.graph_pool_handle(), index)
        return self._pools[index]

    def graph(self, step, stage: int, pool):
        from pipellm_core.runtime.cuda_graph import CudaStepGraph
        return CudaStepGraph(step, pool, self.compute_stream(self.engine.stage_device(stage)))


@contextlib.contextmanager
def _on_stream(stream):
    caller = torch.cuda.current_stream(stream.device)
    if caller == stream:  # already on it (a capture inside a step)
        yield
        return
    stream.wait_stream(caller)
    with torch.cuda.stream(stream):
        yield
    caller.wait_stream(stream)


class CudaGraphPool:
    """A CUDA graph memory pool of GPU `gpu` and the bytes the graphs captured into it took."""

    def __init__(self, handle, gpu: int):
        self.handle, self.gpu, self.nbytes = handle, gpu, 0


class CudaCopyQueue(CopyQueue):
    def __init__(self, device: str):
        self.device = torch.device(device)
        self.copy_stream = torch.cuda.Stream(self.device)

    def event(self):
        return torch.cuda.Event()

    def mark_compute(self, event) -> None:
        event.record(torch.cuda.current_stream(self.device))

    def copy(self, dst, src, after, ready, name, buffer) -> None:
        s = self.copy_stream
        s.wait_event(after)
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)
        ready.record(s)

    def compute_waits(self, event, buffer) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def copy_back(self, dst, src, after, done, name, buffer) -> None:
        self.copy(dst, src, after, done, name, buffer)  # on CUDA the same copy; the sim checks it apart


def make_platform(device: str, sim=None, sim_devices: int = 1) -> Platform:
    """The platform of an engine on torch device `device`, or (computing on the CPU) on
    `sim_devices` virtual GPUs of the sim profile `sim`."""
    if sim is not None:
        from pipellm_core.sim.platform import SimPlatform
        return SimPlatform(sim, sim_devices)
    if device.startswith("cuda"):
        return CudaPlatform(device)
    return Platform(device)
