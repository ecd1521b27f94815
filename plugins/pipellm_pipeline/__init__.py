"""pipeline: the layers split over several GPUs, kept busy with micro-batches.

At load time the layers are split into contiguous stages of about equal bytes, stage s on GPU s
(its weights and its KV cache there); the embedding goes with the first stage, the output head
with the last. Each decode step splits its batch into micro-batches that flow through the stages
in a fill-and-drain pipeline (`split.pipeline_schedule`), so while GPU 1 runs micro-batch 0,
GPU 0 already runs micro-batch 1 (with one micro-batch, the default, the GPUs take turns).
Prefill runs the stages one after another.

Options (`-O pipeline.KEY=VALUE`):
  pipeline.stages        number of stages (default: every visible GPU; on the sim, every
                         virtual GPU: `--sim-devices`)
  pipeline.micro_batches micro-batches per decode step (default 1: a plain layer split; more
                         measured slower for decode on 2 H200s, see docs/pipeline.md)
With `graphs`, each stage's step is captured on its own GPU, one graph per (stage, shape).
With `prefetch`, streaming needs every streamed layer on one GPU: that combination is refused.
"""

from __future__ import annotations

import sys
import warnings

from pipellm_core import hookimpl
from pipellm_core.errors import PluginError
from pipellm_core.hooks.options import PluginOptions
from pipellm_core.model.weights import packed_layer_bytes

from .split import pipeline_schedule, split_layers



OPTIONS = ("stages", "micro_batches")


@hookimpl
def load(plan, config, engine):
    available = engine.platform.gpu_count  # the engine's GPU and the ones after it
    if available == 0:
        warnings.warn("pipeline: stages need GPUs (--device cuda, or the sim backend with "
                      "--sim-devices); the model runs in one piece", stacklevel=2)
        return
    opts = PluginOptions(engine, "pipeline", OPTIONS)
    stages = opts.integer("stages", available)
    if stages < 1 or stages > available:
        raise PluginError(f"pipeline: {stages} stages asked for, but {available} GPU(s) are there "
                          f"from the engine's device on")
    if stages > config.n_layers:
        raise PluginError(f"pipeline: {stages} stages for a model of {config.n_layers} layers")
    tensors = engine.file.tensors
    of_layer = split_layers([packed_layer_bytes(tensors, i) for i in range(config.n_layers)], stages)
    for i, p in enumerate(plan.layers):
        p.stage = of_layer[i]
        p.device = engine.platform.stage_placement(of_layer[i])
    plan.embedding_device, plan.head_device = plan.layers[0].device, plan.layers[-1].device
    engine.plugin_state["pipeline"] = (stages, opts.integer("micro_batches", 1))
    if engine.progress:
        spans = [[i for i, s in enumerate(of_layer) if s == k] for k in range(stages)]
        print("pipeline: " + ", ".join(f"stage {k}: layers {a[0]}-{a[-1]}" for k, a in enumerate(spans)),
              file=sys.stderr)


@hookimpl
def schedule(engine, batch):
    stages, micro = engine.plugin_state.get("pipeline", (1, 1))
    if stages == 1:
        return None
    return pipeline_schedule(batch, stages, micro)
