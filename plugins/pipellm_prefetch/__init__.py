"""prefetch: weights beyond a VRAM budget live in pinned host memory and stream to the GPU.

At load time the plugin works out how many layers fit on the GPU next to the embedding, the
output head, the KV cache, a workspace and a few staging slots, and leaves the other layers in
host memory, each packed into one pinned buffer and spread evenly over the model. Before each
layer runs, the copies of the next streamed layers go out on a second stream into free slots,
overlapped with the compute of the layers before them (`streamer.LayerStreamer`).

Options (`Engine(plugin_options=...)`, or `-O prefetch.KEY=VALUE`):
  prefetch.vram_budget      GPU memory the model may use, e.g. 6GiB (`--vram-budget`); default:
                            the GPU's free memory (the sim: its profile's)
  prefetch.resident_layers  keep exactly this many layers on the GPU instead (like llama.cpp's
                            --n-gpu-layers)
  prefetch.slots            staging slots on the GPU (default 2)
  prefetch.workspace        room kept for activations and graphs (default: 256MiB plus the
                            activations of a prefill filling every cache slot, batch × context)
It composes with `graphs`: a step's copies and waits are captured into its graph. With
`pipeline`, each stage streams what exceeds its own budget (`stages.plan_stages`) into slots on
its own GPU, on that GPU's copy stream. On a CPU without the sim every layer is already in host
memory; the plugin says so and does nothing.
"""

from __future__ import annotations

import sys
import warnings

from pipellm_core import hookimpl
from pipellm_core.errors import PluginError
from pipellm_core.hooks.options import PluginOptions
from pipellm_core.model.weights import packed_layer_bytes

from .budget import DEFAULT_WORKSPACE, StreamPlan, parse_size, plan_streaming
from .stages import describe_stages, plan_stages
from .streamer import LayerStreamer
from .weights_size import fixed_gpu_bytes, prefill_activation_bytes


def plan_of(engine, stage: int = 0) -> StreamPlan | None:
    """The streaming plan of a stage (None when the plugin is not running on the engine)."""
    plans = engine.plugin_state.get("prefetch.plans")
    return plans[stage] if plans else None


def streamer_of(engine, stage: int = 0) -> LayerStreamer | None:
    """The streamer of a stage (None when none of its layers streams)."""
    return engine.plugin_state.get("prefetch.streamers", {}).get(stage)


def streamer_of_layer(engine, layer: int) -> LayerStreamer | None:
    return streamer_of(engine, engine.plan.layers[layer].stage)


OPTIONS = ("vram_budget", "resident_layers", "slots", "workspace")


@hookimpl(trylast=True)  # after the pipeline's load, which assigns the stages
def load(plan, config, engine):
    if engine.platform.gpu_count == 0:
        warnings.warn("prefetch: streaming weights needs --device cuda (or the sim backend); on the "
                      "CPU every layer is already in host memory", stacklevel=2)
        return
    opts = PluginOptions(engine, "prefetch", OPTIONS)
    resident = opts.integer("resident_layers")
    slots = opts.integer("slots", 2)
    budget = opts.get("vram_budget")
    budget = parse_size(budget) if budget is not None else (None if resident is not None else engine.platform.free_memory())
    workspace = opts.get("workspace")
    workspace = parse_size(workspace) if workspace is not None else DEFAULT_WORKSPACE + prefill_activation_bytes(engine)
    tensors = engine.file.tensors
    stages = plan.stages
    if len(stages) > 1:
        if resident is not None:
            raise PluginError("prefetch: resident_layers counts layers of one GPU; with pipeline stages "
                              "give each stage a budget (--vram-budget A,B,...)")
        plans = plan_stages(engine, stages, gpu_budget=budget, workspace=workspace, slots=slots)
        description = describe_stages(plans, stages)
    else:
        plans = [plan_streaming([packed_layer_bytes(tensors, i) for i in range(config.n_layers)],
                                fixed_gpu_bytes(engine, tensors) + workspace, budget=budget,
                                resident_layers=resident, slots=slots)]
        description = plans[0].describe()
    for sp in plans:
        for i in sp.streamed:
            plan.layers[i].resident = False
    engine.plugin_state["prefetch.plans"] = plans
    if engine.progress:
        print(description, file=sys.stderr)


@hookimpl
def setup(engine):
    streamers = {}
    for stage, sp in enumerate(engine.plugin_state.get("prefetch.plans") or []):
        if sp.streamed:
            streamers[stage] = LayerStreamer(engine, sp.streamed, sp.slots,
                                             engine.platform.copy_queue("prefetch copies", stage), stage)
    engine.plugin_state["prefetch.streamers"] = streamers


@hookimpl
def begin_pass(engine, layers):
    for streamer in engine.plugin_state.get("prefetch.streamers", {}).values():
        if any(i in layers for i in streamer.streamed):  # a pass of its stage
            streamer.begin_pass(layers)


@hookimpl
def before_layer(engine, layer):
    streamer = streamer_of_layer(engine, layer)
    if streamer is not None:
        streamer.issue_copies(layer)


@hookimpl
def layer_weights(engine, layer):
    streamer = streamer_of_layer(engine, layer)
    return streamer.weights(layer) if streamer is not None else None
