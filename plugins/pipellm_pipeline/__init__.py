"""pipeline: the layers split over several GPUs, kept busy with micro-batches.

At load time the layers are split into contiguous stages whose steps take about equal time,
stage s on GPU s (its weights and its KV cache there): each stage's share of the bytes a step
reads follows its GPU's speed (measured, or `pipeline.speeds`); the embedding goes with the first
stage and counts for nothing there (a lookup), the output head with the last, where its product
counts. With per-GPU budgets (`--vram-budget 24GiB,16GiB`), where that split leaves a stage
over its budget, the shares follow the budgets instead (by bytes held, the embedding's
included), and a stage whose weights still exceed its budget is an error, unless `prefetch`
streams the excess (each stage streams what exceeds its own budget). The partition is printed
on stderr. Each decode step splits its batch into micro-batches that flow through the stages
in a fill-and-drain pipeline (`split.pipeline_schedule`), so while GPU 1 runs micro-batch 0,
GPU 0 already runs micro-batch 1 (with one micro-batch, the default, the GPUs take turns).
With `pipeline.groups=N` the engine instead keeps N groups of sequences in flight across steps
(`split.group_schedule`): the steps of different groups overlap, and none drains the pipeline.
Prefill runs the stages one after another.
Under torchrun (`engine.stage_group`) each process is one stage, split the same way: it loads
only its stage's layers (rank 0 also the embedding, the last rank also the head) and the rest
of the model stays on the meta device, unloaded (docs/pipeline.md, "Several processes").

Options (`-O pipeline.KEY=VALUE`):
  pipeline.stages        number of stages (default: every visible GPU; on the sim, every
                         virtual GPU: `--sim-devices`)
  pipeline.micro_batches micro-batches per decode step (default 1: a plain layer split; more
                         measured slower for decode on 2 H200s, see docs/pipeline.md)
  pipeline.groups        groups of sequences kept in flight across steps (default 1): with as
                         many groups as stages, stage s runs group g while stage s-1 runs
                         group g+1, and no step drains the pipeline (`runtime.group_batching`)
  pipeline.budgets       GPU memory for each stage's weights, comma-separated, one per stage
                         (`--vram-budget` with a list sets it): limits of the split, and its
                         shares where the split by speed exceeds them
  pipeline.speeds        each stage's GPU speed, comma-separated (e.g. 1,0.6; default: measured
                         as the bytes per second a product reads on each GPU; under
                         torchrun, equal; speeds within 10% of the fastest count as equal)
  pipeline.split         time (default: steps of about equal time, as above) or bytes (about
                         equal bytes held on each GPU, the embedding's included)
  pipeline.kv_offload    1: with groups in flight, every group's KV cache lives in host memory
                         and comes to each stage's GPU for the group's turn, which holds the
                         rows of three groups instead of every sequence's (`runtime.group_kv_offload`)
With `graphs`, each stage's step is captured on its own GPU, one graph per (stage, shape).
With `prefetch`, each stage streams the layers that exceed its own budget into slots on its GPU.
"""

from __future__ import annotations

import math
import sys
import warnings

from pipellm_core import hookimpl
from pipellm_core.errors import PluginError
from pipellm_core.hooks.options import PluginOptions
from pipellm_core.model.weights import packed_layer_bytes
from pipellm_core.sizes import format_size, parse_size

from .split import end_bytes, group_schedule, pipeline_schedule, split_layers, stage_bytes



OPTIONS = ("stages", "micro_batches", "groups", "budgets", "speeds", "split", "kv_offload")
SPEED_TOLERANCE = 0.1


@hookimpl
def load(plan, config, engine):
    if engine.stage_group:
        return load_one_stage(plan, config, engine, engine.stage_group)
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
    of_layer = partition(engine, config, opts, stages)
    for i, p in enumerate(plan.layers):
        p.stage = of_layer[i]
        p.device = engine.platform.stage_placement(of_layer[i])
    plan.embedding_device, plan.head_device = plan.layers[0].device, plan.layers[-1].device
    micro, groups = opts.integer("micro_batches", 1), opts.integer("groups", 1)
    if groups < 1:
        raise PluginError(f"pipeline: groups must be at least 1, got {groups}")
    if groups > 1 and micro > 1:
        raise PluginError("pipeline: groups in flight run each group's step as one micro-batch; "
                          "leave pipeline.micro_batches at 1")
    if opts.integer("kv_offload", 0):
        if groups < 2:
            raise PluginError("pipeline: kv_offload keeps the KV caches of waiting groups in host memory; "
                              "it needs pipeline.groups of 2 or more")
        engine.group_kv_offload = -(-engine.max_batch // groups)  # sequences per group
    engine.plugin_state["pipeline"] = (stages, micro, groups)


def load_one_stage(plan, config, engine, group):
    """This process's stage of a torchrun job: its layers on its device, the others on the meta
    device (shapes only, nothing loaded: other processes compute them)."""
    opts = PluginOptions(engine, "pipeline", OPTIONS)
    if opts.integer("stages", group.size) != group.size:
        raise PluginError(f"pipeline: under torchrun the stages are the {group.size} processes; "
                          f"leave pipeline.stages out")
    if opts.integer("micro_batches", 1) != 1 or opts.integer("groups", 1) != 1:
        raise PluginError("pipeline: micro-batches and groups in flight do not run across "
                          "processes yet; leave pipeline.micro_batches and pipeline.groups at 1")
    if group.size > config.n_layers:
        raise PluginError(f"pipeline: {group.size} processes for a model of {config.n_layers} layers")
    of_layer = partition(engine, config, opts, group.size)
    here = lambda stage: group.device if stage == group.rank else "meta"  # noqa: E731
    for i, p in enumerate(plan.layers):
        p.stage, p.device = of_layer[i], here(of_layer[i])
    plan.embedding_device, plan.head_device = here(0), here(group.size - 1)
    engine.plugin_state["pipeline"] = (group.size, 1, 1)


def partition(engine, config, opts: PluginOptions, stages: int) -> list[int]:
    """The stage of each layer. By time (the default): the stages' steps take about equal time,
    each stage's share of the bytes a step reads (the head's included, not the embedding's: a
    lookup) in proportion to its GPU's speed. By bytes: each stage holds about equal bytes, the
    embedding's included. Where budgets are given, the split by bytes follows their shares, and
    so does the split by time where it leaves a stage over its budget. Printed on stderr (rank 0
    only, under torchrun) where the engine shows progress."""
    tensors = engine.file.tensors
    layer_bytes = [packed_layer_bytes(tensors, i) for i in range(config.n_layers)]
    first, last = end_bytes(tensors)
    budgets = stage_budgets(opts, stages)
    by = opts.get("split", "time")
    if by not in ("time", "bytes"):
        raise PluginError(f"pipeline.split: 'time' or 'bytes', got {by!r}")
    speeds = stage_speeds(engine, opts, stages) if by == "time" else [1.0] * stages
    of_layer = (split_layers(layer_bytes, stages, speeds, 0, last) if by == "time"
                else split_layers(layer_bytes, stages, None, first, last))
    held = stage_bytes(of_layer, layer_bytes, first, last)
    if budgets and (by == "bytes" or any(b > limit for b, limit in zip(held, budgets))):
        of_layer = split_layers(layer_bytes, stages, budgets, first, last)
        held = stage_bytes(of_layer, layer_bytes, first, last)
        speeds = [1.0] * stages  # not what this split followed: not printed
    if engine.progress and (engine.stage_group is None or engine.stage_group.first):
        print_split(of_layer, held, budgets, speeds)
    engine.plugin_state["pipeline.budgets"] = budgets
    return of_layer


def stage_speeds(engine, opts: PluginOptions, stages: int) -> list[float]:
    """Each stage's GPU speed relative to the fastest: `pipeline.speeds` where given, else
    measured by the platform (the bytes per second a product reads; one process: under
    torchrun the stages count as equal). Speeds within SPEED_TOLERANCE of the fastest, given or
    measured, count as equal, so that timing noise between like GPUs does not move layers from
    one load to the next."""
    text = opts.get("speeds")
    if text is not None:
        try:
            speeds = [float(part) for part in str(text).split(",")]
        except ValueError:
            raise PluginError(f"pipeline.speeds: numbers separated by commas, got {text!r}") from None
        if len(speeds) != stages or not all(math.isfinite(v) and v > 0 for v in speeds):
            raise PluginError(f"pipeline: {text!r} for {stages} stages; give one speed above zero per stage")
    elif engine.stage_group is None and stages > 1:
        speeds = [engine.platform.stage_speed(s) for s in range(stages)]
    else:
        speeds = [1.0] * stages
    fastest = max(speeds)
    return [1.0 if v >= (1 - SPEED_TOLERANCE) * fastest else v / fastest for v in speeds]


@hookimpl
def check_plan(plan, engine):
    """Each stage's weights on its GPU within its budget: the resident layers count (with
    `prefetch`, a stage streams what exceeds its budget), and the embedding and head."""
    budgets = engine.plugin_state.get("pipeline.budgets")
    if not budgets:
        return
    tensors = engine.file.tensors
    first, last = end_bytes(tensors)
    resident = [packed_layer_bytes(tensors, i) if p.resident else 0 for i, p in enumerate(plan.layers)]
    held = stage_bytes([p.stage for p in plan.layers], resident, first, last)
    for k, (b, limit) in enumerate(zip(held, budgets)):
        if b > limit:
            raise PluginError(f"pipeline: stage {k} holds {format_size(b)} of weights, over its budget of "
                              f"{format_size(limit)} (budgets {engine.plugin_options.get('pipeline.budgets')}; "
                              f"with --plugins prefetch the excess streams)")


def stage_budgets(opts: PluginOptions, stages: int) -> list[int] | None:
    text = opts.get("budgets")
    if text is None:
        return None
    try:
        budgets = [parse_size(part) for part in str(text).split(",")]
    except ValueError as e:
        raise PluginError(f"pipeline.budgets: {e}") from None
    if len(budgets) != stages:
        raise PluginError(f"pipeline: {len(budgets)} budgets ({text}) for {stages} stages; give one per stage")
    if min(budgets) <= 0:
        raise PluginError(f"pipeline: every stage needs a budget above zero, got {text}")
    return budgets


def print_split(of_layer: list[int], held: list[int], budgets: list[int] | None, speeds: list[float]) -> None:
    spans = [[i for i, s in enumerate(of_layer) if s == k] for k in range(len(held))]
    parts = []
    for k, a in enumerate(spans):
        ends = (" + embedding" if k == 0 else "") + (" + head" if k == len(held) - 1 else "")
        limit = f" of {format_size(budgets[k])}" if budgets else ""
        speed = f", speed {speeds[k]:.2f}" if min(speeds) < 1.0 else ""
        parts.append(f"stage {k}: layers {a[0]}-{a[-1]}{ends}, {format_size(held[k])}{limit}{speed}")
    print("pipeline: " + "; ".join(parts), file=sys.stderr)


@hookimpl
def schedule(engine, batch):
    stages, micro, groups = engine.plugin_state.get("pipeline", (1, 1, 1))
    if groups > 1:
        return group_schedule(batch, stages, groups)
    if stages == 1:
        return None
    return pipeline_schedule(batch, stages, micro)
