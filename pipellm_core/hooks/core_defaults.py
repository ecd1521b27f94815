"""The core's own answers to the hooks: one device, resident weights, eager forward, one stage,
one batch.

Registered before every other plugin and marked `trylast`, so any plugin's answer comes first;
with no plugin enabled these are the eager baseline of every ablation.
"""

from __future__ import annotations

import torch

from pipellm_core.hooks.specs import hookimpl
from pipellm_core.runtime.step import Schedule


@hookimpl(trylast=True)
def load(plan, config, engine):
    plan.fill_defaults(engine.device)


@hookimpl(trylast=True)
def layer_weights(engine, layer):
    """A layer left in host memory that no plugin streamed: copied to its device now, blocking
    (correct, and as slow as it sounds); None where it can be used as it is."""
    w = engine.weights.layers[layer]
    device = engine.plan.layers[layer].device
    if w.host is None or torch.device(device).type == "cpu":
        return None
    return w.host.view(w.host.buffer.to(device))


@hookimpl(trylast=True)
def schedule(engine, batch):
    stages = len(engine.plan.stages)
    return Schedule([batch], [[(s, 0)] for s in range(stages)])


@hookimpl(trylast=True)
def decode(engine, stage, batch, hidden):
    return engine.eager_stage_step(stage, batch, hidden)
