"""Streaming plans for the stages of a pipeline: each stage streams what exceeds its own budget.

With `pipeline.budgets` (`--vram-budget 24GiB,16GiB`) a stage's budget is for its weights, as the
pipeline plugin reads it: the stage's layers, the embedding on the first stage, the head on the
last, and the staging slots. Otherwise each stage's GPU takes `prefetch.vram_budget` (or its free
memory), and the stage's share of the KV cache and a workspace count too, as they do on one GPU.
"""

from __future__ import annotations

from pipellm_core import sizes
from pipellm_core.errors import PluginError
from pipellm_core.model.weights import packed_bytes, packed_layer_bytes

from .budget import StreamPlan, plan_streaming


def end_bytes(tensors: dict) -> tuple[int, int]:
    """Bytes of the embedding (first stage) and of the output norm and head (last stage; the
    tied embedding where there is no output matrix)."""
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    norm = packed_bytes(tensors["output_norm.weight"]) if "output_norm.weight" in tensors else 0
    return packed_bytes(tensors["token_embd.weight"]), packed_bytes(head) + norm


def weight_budgets(engine, n_stages: int) -> list[int] | None:
    """The pipeline's per-stage weight budgets, if given (one per stage)."""
    text = engine.plugin_options.get("pipeline.budgets")
    if text is None:
        return None
    try:
        budgets = [sizes.parse_size(part) for part in str(text).split(",")]
    except ValueError as e:
        raise PluginError(f"prefetch: pipeline.budgets: {e}") from None
    if len(budgets) != n_stages:
        raise PluginError(f"prefetch: {len(budgets)} budgets ({text}) for {n_stages} stages")
    return budgets


def plan_stages(engine, stages: list[list[int]], *, gpu_budget: int | None, workspace: int,
                slots: int) -> list[StreamPlan]:
    """One plan per stage over its own layers; the `streamed` of each are model layer indices."""
    tensors = engine.file.tensors
    first, last = end_bytes(tensors)
    budgets = weight_budgets(engine, len(stages))
    kv_per_layer = engine.kv_cache_bytes // engine.config.n_layers
    plans = []
    for k, layers in enumerate(stages):
        fixed = (first if k == 0 else 0) + (last if k == len(stages) - 1 else 0)
        if budgets is None:
            fixed += kv_per_layer * len(layers) + workspace
        budget = budgets[k] if budgets is not None else gpu_budget
        try:
            local = plan_streaming([packed_layer_bytes(tensors, i) for i in layers], fixed,
                                   budget=budget, slots=slots)
        except PluginError as e:
            raise PluginError(f"prefetch: stage {k}: {str(e).removeprefix('prefetch: ')}") from None
        plans.append(StreamPlan([layers[j] for j in local.streamed],
                                [packed_layer_bytes(tensors, i) if i in layers else 0
                                 for i in range(engine.config.n_layers)],
                                fixed, local.slots, budget))
    return plans


def describe_stages(plans: list[StreamPlan], stages: list[list[int]]) -> str:
    parts = []
    for k, (p, layers) in enumerate(zip(plans, stages)):
        if not p.streamed:
            parts.append(f"stage {k}: all {len(layers)} layers resident")
        else:
            parts.append(f"stage {k}: {len(p.streamed)} of {len(layers)} layers stream through "
                         f"{min(p.slots, len(p.streamed))} slots of {sizes.format_size(p.slot_bytes)}")
    return "prefetch: " + "; ".join(parts)
