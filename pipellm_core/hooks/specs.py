"""The hooks through which plugins change how a model is loaded and run (docs/hooks.md).

Plugins implement them with `@pipellm_core.hookimpl`; the core's own behaviour is itself a plugin
(`pipellm_core.hooks.core_defaults`), registered so that every other implementation runs before it.
Phases: loading (`load`, `check_plan`, then `setup`, `capture`), each forward pass (`begin_pass`,
then per layer `before_layer`, the deprecated `prefetch`, `layer_weights`), each decode step
(`schedule`, `decode`).
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
def check_plan(plan, engine) -> None:
    """Refuse a plan this plugin cannot serve: raise `PluginError`.

    Called for every plugin once, after every `load` and before any weight moves.

    :param plan: the finished `LoadPlan` (read it, do not edit it).
    :param engine: the `Engine` being built (its options; weights are not loaded yet).
    """


@hookspec
def setup(engine) -> None:
    """Build what the plugin needs on the complete engine (buffers, streams, helpers).

    Called for every plugin once, after the weights and the KV cache are in place and before
    any `capture`.

    :param engine: the loaded `Engine`.
    """


@hookspec
def capture(engine) -> None:
    """Build fast runners for the step shapes the engine will see (for example CUDA graphs).

    Called for every plugin once, after every `setup`.

    :param engine: the loaded `Engine`.
    """


@hookspec
def begin_pass(engine, layers: range) -> None:
    """A forward pass begins: a prefill, a stage's decode step, a graph capture or its check.

    Called for every plugin before the pass's first layer.

    :param engine: the running `Engine`.
    :param layers: the layer indices the pass runs, in order.
    """


@hookspec
def before_layer(engine, layer: int) -> None:
    """Layer `layer` is about to run: observe it, or issue work ahead of it.

    Called for every plugin before each layer of every forward pass, in layer order; what it
    returns is ignored.

    :param engine: the running `Engine`.
    :param layer: index of the layer about to run.
    """


@hookspec(firstresult=True)
def layer_weights(engine, layer: int):
    """The weights layer `layer` computes with. First result wins; called after `before_layer`.

    :param engine: the running `Engine`.
    :param layer: index of the layer about to run.
    :return: a `LayerWeights` (for example views into a slot a streamed copy landed in), or None
        to let the next implementation answer. The core answers a blocking copy for a layer left
        in host memory (`LayerWeights.host`), else None: the resident weights.
    """


@hookspec
def prefetch(engine, layer: int):
    """Deprecated alias of `before_layer`, for one release.

    Called for every plugin before each layer, after `before_layer`.

    :param engine: the running `Engine`.
    :param layer: index of the layer about to run.
    :return: None, or a `LayerWeights`: as before the rename, the first answer that is not None
        is used for the layer (and `layer_weights` is not called).
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
