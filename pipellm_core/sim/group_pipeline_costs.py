"""Tokens per second of groups in flight through pipeline stages, priced on virtual GPUs without
computing: each stage is `calibration.plain_stage_step` of a model's shape on the `meta` device,
recorded once as a `SimGraph` on its stage's virtual GPU and replayed in the engine's ring of
(stage, group) items (`runtime.group_pipeline.run_ring`). Crossing to the next stage waits for
the GPU before and pays a peer copy of the hidden state; each group step ends with the host
waiting for the last GPU, as the engine does before sampling. So a model too large for the CPU
can be compared as one GPU, today's layer split (one group) and p groups in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipellm_core.gguf.model_file import ModelConfig
from pipellm_core.runtime.group_pipeline import GroupStep, run_ring
from pipellm_core.sim.calibration import plain_stage_step
from pipellm_core.sim.graph import SimGraph
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

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


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
                 batch_per_group: int, ctx: int = 128, steps_per_group: int = 12) -> RingFigures:
    """Run `steps_per_group` decode steps of each of `n_groups` groups of `batch_per_group`
    sequences through `n_stages` virtual GPUs of `profile`, every stage a graph replay."""
    runtime = SimRuntime(profile, n_devices=n_stages, trace=False)
    costing = SimOpCosting(runtime, float_bytes=2, track_memory=False)
    graphs = []
    with costing:
        for s, layers in enumerate(stage_layers(config.n_layers, n_stages)):
            costing.device = s
            graph = SimGraph(costing, plain_stage_step(config, layers, batch_per_group, ctx))
            graph.record()
            graphs.append(graph)
        runtime.synchronize()
        start_time = runtime.elapsed()
        started = [0] * n_groups
        hidden_bytes = batch_per_group * config.n_embd * costing.float_bytes

        def start(group: int):
            if started[group] == steps_per_group:
                return None
            started[group] += 1
            return group

        def run_stage(stage: int, step: GroupStep):
            costing.device = stage
            if stage > 0:
                handed_over = runtime.event()
                runtime.device(stage - 1).default_stream.record_event(handed_over)
                stream = runtime.device(stage).default_stream
                stream.wait_event(handed_over)
                stream.copy("hidden state", hidden_bytes, "peer")
            return graphs[stage].replay(compute=False)

        def finish(step: GroupStep) -> None:
            runtime.synchronize(n_stages - 1)

        def more() -> bool:
            return any(n < steps_per_group for n in started)

        for _tick in run_ring(n_stages, n_groups, start, run_stage, finish, more):
            pass
        runtime.synchronize()
    seconds = runtime.elapsed() - start_time
    steps = n_groups * steps_per_group
    busy = [steps * g.device_seconds / seconds for g in graphs]
    return RingFigures(n_stages, n_groups, batch_per_group, seconds, steps * batch_per_group, busy)
