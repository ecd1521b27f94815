"""The sim backend as a `Platform`: the math runs on the CPU, the time and memory are charged to
`n_devices` virtual GPUs of a profile.

The layers of pipeline stage s are charged to virtual GPU s (modulo their number). A decode
step's hidden state moves to the next stage's GPU on that GPU's hand-over stream, ordered by
events (`hand_over`); within a prefill, which runs every layer in one pass, crossing to the next
GPU waits for the work queued so far on the previous one and copies on the compute stream, as a
plain copy between CUDA devices orders their current streams.
"""

from __future__ import annotations

import torch

from pipellm_core.model.kernels import quant_matmul
from pipellm_core.runtime.platform import CopyQueue, Platform
from pipellm_core.sim.graph import SimGraph, SimGraphPool
from pipellm_core.sim.hand_over import hand_over
from pipellm_core.sim.op_costs import SimOpCosting
from pipellm_core.sim.runtime import SimRuntime
from pipellm_core.sim.timer import VirtualTimer


class SimPlatform(Platform):
    name = "sim"

    def __init__(self, profile, n_devices: int = 1):
        super().__init__("cpu")
        self.runtime = SimRuntime(profile, n_devices=n_devices)
        self.costing = SimOpCosting(self.runtime)
        self.layer_gpu: list[int] = []  # the virtual GPU each layer is charged to
        self._pools: dict[int, SimGraphPool] = {}

    @property
    def gpu_count(self) -> int:
        return len(self.runtime.devices)

    def stage_placement(self, stage: int) -> str:
        return "cpu"  # where it computes; `place` charges the stage to its virtual GPU

    def free_memory(self) -> int:
        return self.runtime.device(0).free_bytes

    def stage_speed(self, stage: int) -> float:
        """The memory bandwidth of the stage's virtual GPU (all of one profile)."""
        return self.runtime.device(stage).profile.hbm_bytes_per_s

    def place(self, engine) -> None:
        """Charge each virtual GPU for what would live on it: resident weights and KV cache of
        its layers; the embedding on the first layer's GPU, the head on the last's."""
        super().place(engine)
        n = len(self.runtime.devices)
        self.layer_gpu = devices = [p.stage % n for p in engine.plan.layers]
        w, cache, sim = engine.weights, engine.cache, self.runtime
        first, last = sim.device(devices[0]), sim.device(devices[-1])
        for index in sorted(set(devices)):
            mine = [i for i, d in enumerate(devices) if d == index]
            resident = sum(w.layers[i].nbytes for i in mine if engine.plan.layers[i].resident)
            kv = sum(cache.k[i].numel() * cache.k[i].element_size() * 2 for i in mine)
            sim.device(index).allocate(resident, "weights")
            sim.device(index).allocate(kv, "kv cache")
        first.allocate(w.token_embd.nbytes, "embedding")
        if w.output is not w.token_embd or last is not first:
            last.allocate(w.output.nbytes, "output head")

    def kernel_charges(self):
        """The engine on CUDA runs its decode layers on the kernels (unless they are switched
        off): charge those, not the torch operations the CPU computes the same layer with."""
        return self.costing.as_kernels if quant_matmul.ENABLED else None

    def buffer(self, nbytes: int, tag: str, stage: int = 0):
        self.runtime.device(self._stage_gpu(stage)).allocate(nbytes, tag)
        return torch.empty(nbytes, dtype=torch.uint8)

    def running(self):
        """Every operation is charged, starting on the first layer's virtual GPU."""
        self.costing.device = self.layer_gpu[0]
        return self.costing

    def enter_stage(self, stage: int, hidden):
        """Its virtual GPU becomes the one charged; a stage after the first receives its
        micro-batch's hidden state from the stage before on its GPU's hand-over stream."""
        stages = self.engine.plan.stages
        index = self.layer_gpu[stages[stage][0]]
        if stage > 0 and hidden is not None:
            sender = self.layer_gpu[stages[stage - 1][-1]]
            if sender != index:
                hand_over(self.costing, sender, index, stage, hidden.numel() * self.costing.float_bytes)
        self.costing.device = index
        return hidden

    def enter_layer(self, layer: int, hidden) -> None:
        self._switch(self.layer_gpu[layer], hidden.numel())

    def _switch(self, index: int, hidden_numel: int) -> None:
        c = self.costing
        if index == c.device:
            return
        done = self.runtime.event()
        c.record(c.stream, done)
        c.device = index
        c.wait(c.stream, done)
        c.copy(c.stream, "hidden state", hidden_numel * c.float_bytes, "peer")

    def step_timer(self):
        return VirtualTimer(self.runtime, self.stage_busy_seconds)

    def stage_busy_seconds(self) -> list[float]:
        """Time queued so far on the compute stream of each stage's virtual GPU."""
        return [self.runtime.device(self.layer_gpu[layers[0]]).default_stream.busy_seconds
                for layers in self.engine.plan.stages]

    def synchronize_stage(self, stage: int) -> None:
        self.runtime.synchronize(self.layer_gpu[self.engine.plan.stages[stage][0]])

    def copy_queue(self, name: str, stage: int = 0) -> "SimCopyQueue":
        return SimCopyQueue(self.costing, self.runtime.device(self._stage_gpu(stage)), name)

    def _stage_gpu(self, stage: int) -> int:
        return self.layer_gpu[self.engine.plan.stages[stage][0]]

    @property
    def can_capture_graphs(self) -> bool:
        return True

    def graph_pool(self, stage: int) -> SimGraphPool:
        index = self.layer_gpu[self.engine.plan.stages[stage][0]]
        if index not in self._pools:
            self._pools[index] = SimGraphPool(self.runtime.device(index))
        return self._pools[index]

    def graph(self, step, stage: int, pool) -> SimGraph:
        return SimGraph(self.costing, step, pool)


class SimCopyQueue(CopyQueue):
    """Copies on a second stream of a virtual GPU, ordered against that GPU's compute stream:
    the data moves on the CPU for real, uncharged, and the virtual GPU is charged a copy of the
    same bytes over its host link."""

    def __init__(self, costing: SimOpCosting, device, name: str):
        self.costing = costing
        self.compute_stream = device.default_stream
        self.copy_stream = device.stream(name)
        self.runtime = device.runtime

    def event(self):
        return self.runtime.event()

    def mark_compute(self, event) -> None:
        self.costing.record(self.compute_stream, event)

    def copy(self, dst, src, after, ready, name, buffer) -> None:
        with self.costing.uncharged():
            dst.copy_(src)
        c = self.costing
        c.wait(self.copy_stream, after)
        c.copy(self.copy_stream, name, src.numel() * src.element_size(), "h2d", src=("host", name), dst=buffer)
        c.record(self.copy_stream, ready)

    def compute_waits(self, event, buffer) -> None:
        self.costing.wait(self.compute_stream, event)
        self.costing.touch(self.compute_stream, reads=[buffer])

    def compute_done_with(self, buffer) -> None:
        self.costing.touch(self.compute_stream, reads=[buffer])

    def compute_writes(self, buffer) -> None:
        self.costing.touch(self.compute_stream, writes=[buffer])

    def copy_back(self, dst, src, after, done, name, buffer) -> None:
        with self.costing.uncharged():
            dst.copy_(src)
        c = self.costing
        c.wait(self.copy_stream, after)
        c.copy(self.copy_stream, name, src.numel() * src.element_size(), "d2h", src=buffer, dst=("host", name))
        c.record(self.copy_stream, done)
