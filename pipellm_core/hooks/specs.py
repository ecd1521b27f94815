"""The five hooks through which plugins change how a model is loaded and run.

Plugins implement them with `@pipellm_core.hookimpl`; the core's own behaviour is itself a plugin
(`pipellm_core.hooks.core_defaults`), registered so that every other implementation runs before it.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("pipellm")
hookimpl = pluggy.HookimplMarker("pipellm")


@hookspec
def load(plan, config, engine) -> None:
    """Annotate where each part of the model lives, before any weight moves.

    Called once, for every plugin, after the GGUF header is read.

    :param plan: the `LoadPlan` to edit in place: per layer a device, whether the weights stay
        resident on it or stream from pinned host memory, and a pipeline stage; the devices of
        the embedding and of the output head.
    :param config: the model's `ModelConfig`.
    :param engine: the `Engine` being built (its options; weights are not loaded yet).

    The core's implementation runs last and puts whatever is still unplaced on the engine's device.
    """


@hookspec
def capture(engine) -> None:
    """Build fast runners for the step shapes the engine will see (for example CUDA graphs).

    Called for every plugin once after the weights and the KV cache are in place.

    :param engine: the loaded `Engine`.
    """


@hookspec
def prefetch(engine, layer: int):
    """Bring what layer `layer` needs to where it will compute, ahead of its compute.

    Called for every plugin before each layer of every forward pass (prefill, decode, graph
    captures), in layer order.

    :param engine: the running `Engine`.
    :param layer: index of the layer about to run.
    :return: a `LayerWeights` to use for this layer instead of the resident one (a streamed
        copy), or None. The first non-None answer is used. When none answers, a layer left in
        host memory (`LayerWeights.host`) is copied to its device by the engine, blocking.
    """


@hookspec(firstresult=True)
def schedule(engine, batch):
    """Decide which sequences run on which stage in this decode step. First result wins.

    :param engine: the running `Engine`.
    :param batch: the `StepBatch` of every active sequence (tokens, positions, cache slots); on
        CUDA and the sim padded to its step shape (padding rows use slot `engine.pad_slot`).
    :return: a `Schedule`: the micro-batches, and ticks of (stage, micro-batch index) pairs
        that may run at the same time. The core's answer: one micro-batch (the whole batch)
        going through every stage in order.
    """


@hookspec(firstresult=True)
def decode(engine, stage: int, batch, hidden):
    """Run one decode step of `stage` for `batch`. First result wins.

    :param engine: the running `Engine`.
    :param stage: the pipeline stage to run (its layers are `engine.plan.stages[stage]`).
    :param batch: the `StepBatch` (tokens, positions, slots, ctx_len) of this micro-batch.
    :param hidden: the hidden state (float32) coming from the previous stage, or None for stage 0.
    :return: logits [B, vocab] when the stage ends the model, else the hidden state [B, 1, n_embd];
        None lets the next implementation answer.
        The core's answer is the eager forward.
    """
