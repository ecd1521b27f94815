"""Tokens per second of groups in flight through pipeline stages, priced on virtual GPUs without
computing: each stage is `calibration.plain_stage_step` of a model's shape on the `meta` device
(dense bf16), or with `qtype` the launches of pipellm's kernel path for matrices of that GGML
type (`calibration.kernel_stage_step`), recorded once as a `SimGraph` on its stage's virtual GPU
and replayed in the engine's ring of (stage, group) items (`runtime.group_pipeline.run_ring`).
The hidden state crosses to the next stage on the receiving GPU's hand-over stream, as in the
engine (`sim.hand_over`); each group step ends with the host waiting for the last GPU, as the
engine does before sampling. So a model too large for the CPU can be compared as one GPU,
today's layer split (one group) and p groups in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipellm_core.gguf.model_file import ModelConfig
from pipellm_core.runtime.group_pipeline import GroupStep, run_ring
from pipellm_core.sim.calibration import kernel_stage_step, plain_stage_step
from pipellm_core.sim.graph import SimGraph
from pipellm_core.sim.hand_over import hand_over
from pipellm_core.sim.kv_offload_costs import KVOffloadCharges
from pipellm_core.sim.op_costs import SimOpCosting
from pipellm_core.sim.runtime import SimRuntime


@dataclass
class RingFigures:
    stages: int
    groups: int
    batch_per_group: int
    seconds: float  # virtual time of the run, from the first step issued to the last sampled
    tokens: int
    stage_busy: list[float]  # fraction of `seconds` each stage's GPU runs its graphs
    runtime: SimRuntime  # the run's virtual GPUs (their trace, when asked for)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def bubble(self) -> float:
        """The share of the stages' time they sit idle: 1 - their mean busy fraction."""
        return 1.0 - sum(self.stage_busy) / len(self.stage_busy)


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Equal contiguous runs of layers (the first ones a layer longer when they do not divide)."""
    size, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        stop = start + size + (1 if s < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def ring_figures(config: ModelConfig, profile: str, n_stages: int, n_groups: int,
                 batch_per_group: int, ctx: int = 128, steps_per_group: int = 12, qtype=None,
                 trace: bool = False, kv_offload: bool = False) -> RingFigures:
    """Run `steps_per_group` decode steps of each of `n_groups` groups of `batch_per_group`
    sequences through `n_stages` virtual GPUs of `profile`, every stage a graph replay: of a
    dense bf16 step, or of the kernel path for matrices of GGML type `qtype`. With `kv_offload`,
    the groups' KV caches (fp16, `ctx` positions a row) come and go as the engine's
    `pipeline.kv_offload` moves them (`sim.kv_offload_costs`)."""
    runtime = SimRuntime(profile, n_devices=n_stages, trace=trace)
    costing = SimOpCosting(runtime, float_bytes=2, track_memory=False)
    graphs = []
    with costing:
        for s, layers in enumerate(stage_layers(config.n_layers, n_stages)):
            costing.device = s
            step = (plain_stage_step(config, layers, batch_per_group, ctx) if qtype is None
                    else kernel_stage_step(costing, config, layers, batch_per_group, ctx, qtype))
            graph = SimGraph(costing, step)
            graph.record()
            graphs.append(graph)
        runtime.synchronize()
        start_time = runtime.elapsed()
        started = [0] * n_groups
        hidden_bytes = batch_per_group * config.n_embd * costing.float_bytes
        row_bytes = config.n_kv_heads * ctx * config.head_dim * 2
        offload = KVOffloadCharges(runtime, stage_layers(config.n_layers, n_stages), row_bytes,
                                   batch_per_group) if kv_offload else None
        clock = {"tick": 0}

        def start(group: int):
            if started[group] == steps_per_group:
                return None
            started[group] += 1
            return clock["tick"] % 2  # the GPU rows of its KV cache under offload

        def run_stage(stage: int, step: GroupStep):
            if stage > 0:
                hand_over(costing, stage - 1, stage, stage, hidden_bytes)
            if offload is not None and stage == 0:
                offload.bring_in(0, step.group, step.work)
            costing.device = stage
            out = graphs[stage].replay(compute=False)
            if offload is not None:
                offload.write_back(stage, step.group, step.work)
                if stage + 1 < n_stages:
                    offload.bring_in(stage + 1, step.group, step.work)
            return out

        def finish(step: GroupStep) -> None:
            runtime.synchronize(n_stages - 1)

        def more() -> bool:
            return any(n < steps_per_group for n in started)

        for tick in run_ring(n_stages, n_groups, start, run_stage, finish, more):
            clock["tick"] = tick + 1
        runtime.synchronize()
    seconds = runtime.elapsed() - start_time
    steps = n_groups * steps_per_group
    busy = [steps * g.device_seconds / seconds for g in graphs]
    return RingFigures(n_stages, n_groups, batch_per_group, seconds, steps * batch_per_group, busy, runtime)
