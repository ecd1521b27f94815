"""One test per hook, named `test_hook_<name>`: each implements its hook in a plugin of its own and
asserts what the hook's contract in docs/hooks.md promises (when it is called, with what, and
what its answer does). `test_plugins.test_every_hook_has_a_named_test` checks they exist."""

import pytest
import torch

from pipellm_core import hookimpl
from pipellm_core.errors import PluginError
from pipellm_core.runtime import engine as engine_module
from pipellm_core.runtime.engine import Engine
from pipellm_core.runtime.request import Request
from pipellm_core.runtime.sampling import SamplingParams
from pipellm_core.runtime.step import Schedule


def run(path, extra=(), n=3, **kw):
    engine = Engine(path, extra_plugins=tuple(extra), progress=False, **kw)
    req = Request(engine.tokenizer.encode("Hello"), n, SamplingParams(temperature=0), ignore_eos=True)
    tokens = [t for _, t in engine.generate([req])]
    return tokens, engine


def test_hook_load(tiny_models):
    class HostPlan:
        @hookimpl
        def load(self, plan, config, engine):
            assert not hasattr(engine, "weights")  # before any weight moves
            plan.layers[1].resident = False

    _, engine = run(tiny_models["llama"], [HostPlan()])
    assert engine.weights.layers[1].host is not None and engine.weights.layers[0].host is None


def test_hook_check_plan(tiny_models, monkeypatch):
    seen = []

    class Refuses:
        @hookimpl
        def check_plan(self, plan, engine):
            seen.append(plan.layers[0].device)  # filled in by the core's load, which ran before
            raise PluginError("refused")

    def no_loading(*a, **k):
        raise AssertionError("weights loaded before check_plan refused the plan")

    monkeypatch.setattr(engine_module, "load_weights", no_loading)
    with pytest.raises(PluginError, match="refused"):
        Engine(tiny_models["llama"], extra_plugins=(Refuses(),), progress=False)
    assert seen == ["cpu"]


def test_hook_setup(tiny_models):
    calls = []

    class Late:  # registered last, so pluggy would call its hooks first
        @hookimpl
        def capture(self, engine):
            calls.append("capture")

    class Builds:
        @hookimpl
        def setup(self, engine):
            calls.append("setup")
            assert engine.weights is not None and engine.cache is not None
            engine.plugin_state["built"] = engine.platform.name

    engine = Engine(tiny_models["llama"], extra_plugins=(Builds(), Late()), progress=False)
    assert calls == ["setup", "capture"] and engine.plugin_state["built"] == "cpu"


def test_hook_capture(tiny_models):
    class Captures:
        @hookimpl
        def capture(self, engine):
            engine.plugin_state["captured"] = (engine.model is not None, engine.tokenizer is not None)

    engine = Engine(tiny_models["llama"], extra_plugins=(Captures(),), progress=False)
    assert engine.plugin_state["captured"] == (True, True)


def test_hook_begin_pass(tiny_models):
    passes, layers = [], []

    class Passes:
        @hookimpl
        def begin_pass(self, engine, layers):
            passes.append((layers, len(layers_seen)))

        @hookimpl
        def before_layer(self, engine, layer):
            layers_seen.append(layer)

    layers_seen = layers
    run(tiny_models["llama"], [Passes()], n=3)
    # a prefill and two decode steps, each over both layers, each signalled before its first layer
    assert passes == [(range(0, 2), 0), (range(0, 2), 2), (range(0, 2), 4)]
    assert layers == [0, 1] * 3


def test_hook_begin_pass_per_stage(tiny_models):
    """With a pipeline of two stages, each stage's decode step is a pass of its own layers."""
    passes = []

    class Passes:
        @hookimpl
        def begin_pass(self, engine, layers):
            passes.append(layers)

    run(tiny_models["llama"], [Passes()], n=2, sim="h100", sim_devices=2, plugins=["pipeline"])
    assert passes == [range(0, 2), range(0, 1), range(1, 2)]


def test_hook_before_layer(tiny_models):
    calls = []

    class Answers:  # an answer of before_layer is ignored
        @hookimpl
        def before_layer(self, engine, layer):
            calls.append(("a", layer))
            return engine.weights.layers[1 - layer]

    class Observes:
        @hookimpl
        def before_layer(self, engine, layer):
            calls.append(("b", layer))

    plain, _ = run(tiny_models["llama"])
    tokens, _ = run(tiny_models["llama"], [Answers(), Observes()])
    assert tokens == plain
    assert sorted(calls[:4]) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]  # every plugin, every layer
    assert len(calls) == 2 * 2 * 3


def test_hook_layer_weights(tiny_models):
    asked = []

    class Swaps:
        @hookimpl(tryfirst=True)
        def layer_weights(self, engine, layer):
            return engine.weights.layers[1 - layer]  # the other layer's weights: other tokens

    class Second:
        @hookimpl
        def layer_weights(self, engine, layer):
            asked.append(layer)

    plain, _ = run(tiny_models["llama"])
    swapped, _ = run(tiny_models["llama"], [Second(), Swaps()])
    assert swapped != plain
    assert asked == []  # first result wins


def test_hook_prefetch(tiny_models):
    """The deprecated alias: called for every plugin before each layer, after before_layer; an
    answer is used as the layer's weights, as before the rename."""
    order = []

    class Old:
        @hookimpl
        def prefetch(self, engine, layer):
            order.append(("prefetch", layer))
            return engine.weights.layers[1 - layer]

    class New:
        @hookimpl
        def before_layer(self, engine, layer):
            order.append(("before_layer", layer))

        @hookimpl
        def layer_weights(self, engine, layer):
            order.append(("layer_weights", layer))

    plain, _ = run(tiny_models["llama"])
    tokens, _ = run(tiny_models["llama"], [Old(), New()])
    assert tokens != plain
    assert order[:4] == [("before_layer", 0), ("prefetch", 0), ("before_layer", 1), ("prefetch", 1)]


def test_hook_schedule(tiny_models):
    decoded = []

    class Halves:
        @hookimpl
        def schedule(self, engine, batch):
            rows = [batch.select(slice(0, 1)), batch.select(slice(1, len(batch)))]
            return Schedule(rows, [[(0, 0)], [(0, 1)]])

        @hookimpl
        def decode(self, engine, stage, batch, hidden):
            decoded.append(len(batch))

    engine = Engine(tiny_models["llama"], extra_plugins=(Halves(),), progress=False, max_batch=2)
    reqs = [Request(engine.tokenizer.encode(p), 3, SamplingParams(temperature=0), ignore_eos=True)
            for p in ("Hello", "Hi there")]
    for _ in engine.generate(reqs):
        pass
    plain = Engine(tiny_models["llama"], progress=False, max_batch=2)
    again = [Request(r.prompt_tokens, 3, SamplingParams(temperature=0), ignore_eos=True) for r in reqs]
    for _ in plain.generate(again):
        pass
    assert [r.generated for r in reqs] == [r.generated for r in again]
    assert decoded == [1, 1, 1, 1]  # two decode steps, each as two micro-batches of one row


def test_hook_decode(tiny_models):
    class Token42:
        @hookimpl
        def decode(self, engine, stage, batch, hidden):
            logits = torch.full((len(batch), engine.config.vocab_size), -1e9)
            logits[:, 42] = 0
            return logits

    tokens, _ = run(tiny_models["llama"], [Token42()], n=4)
    assert tokens[1:] == [42, 42, 42]  # the first token comes from prefill, the rest from the hook
