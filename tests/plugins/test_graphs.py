"""The graphs plugin on the sim backend: bucket choice, the same greedy tokens as eager across
bucket boundaries, batch changes and sequences finishing, and validation of new graphs."""

import warnings

import pytest
import torch
from gguf import GGMLQuantizationType as GGMLType

import pipellm_graphs
from pipellm_core import ablate
from pipellm_core.runtime.engine import Engine
from pipellm_core.errors import PipeLLMError, PluginError
from pipellm_core.runtime.request import Request
from pipellm_core.runtime.sampling import SamplingParams
from pipellm_core.runtime.step_shapes import StepShapes
from pipellm_core.gguf.synthetic import write_random_gguf
from pipellm_graphs import runner as runner_module


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory, smollm2_path):
    """A tiny llama with Q4_0 matrices: dequantization and activation rounding in every step."""
    path = tmp_path_factory.mktemp("graphs") / "tiny-q4.gguf"
    return write_random_gguf(str(path), "tiny-llama", GGMLType.Q4_0, tokenizer_from=smollm2_path, std=0.3, seed=3)


def generate(path, **engine_kw):
    """Three sequences of different lengths: one grows past 512, two finish early."""
    engine = Engine(path, max_batch=4, ctx_size=1024, progress=False, **engine_kw)
    reqs = [Request(list(range(100, 100 + n)), m, SamplingParams(temperature=0), ignore_eos=True)
            for n, m in ((500, 30), (20, 6), (300, 16))]
    for _ in engine.generate(reqs):
        pass
    return [r.generated for r in reqs], engine


def test_bucket_policy():
    p = StepShapes.for_engine(max_batch=12, ctx_size=3000)
    assert p.batch_buckets == (1, 2, 4, 8, 12)
    assert p.ctx_buckets == (512, 1024, 2048, 3000)
    assert p.pick(1, 1) == (1, 512)
    assert p.pick(3, 512) == (4, 512)
    assert p.pick(3, 513) == (4, 1024)
    assert p.pick(9, 2049) == (12, 3000)
    assert p.pick(13, 10) is None and p.pick(1, 3001) is None
    assert StepShapes.for_engine(4, 256).ctx_buckets == (256,)
    custom = StepShapes.for_engine(64, 4096, batch_buckets="1,3,64", ctx_buckets="100,4096")
    assert custom.batch_buckets == (1, 3, 64) and custom.ctx_buckets == (100, 4096)
    with pytest.raises(PipeLLMError, match="comma-separated"):
        StepShapes.for_engine(4, 512, batch_buckets="1,x")


def test_same_tokens_across_buckets_batch_changes_and_finishing(q4_model):
    eager, _ = generate(q4_model, sim="h100")
    graphs, engine = generate(q4_model, sim="h100", plugins=["graphs"])
    assert graphs == eager
    runner = pipellm_graphs.runner_of(engine)
    shapes = set(runner.graphs)
    # batch 3 -> bucket 4, then 2 after one sequence ends, then 1; the long one crosses 512
    assert {(0, 4, 512), (0, 2, 512), (0, 2, 1024), (0, 1, 1024)} <= shapes
    assert all(g is not None for g in runner.graphs.values())
    assert runner.replays >= 25 and runner.eager_fallbacks == 0
    # and the sim's tokens are the torch CPU backend's (in the same step shapes)
    cpu, _ = generate(q4_model, pad_steps=True)
    assert cpu == eager


def test_graph_replay_is_cheaper_on_the_sim(q4_model):
    rows = ablate(q4_model, [[], ["graphs"]], backend="sim", batch=2, prompt_tokens=16,
                  n_predict=8, repeats=1, progress=False)
    eager, graphs = rows
    assert graphs["plugins"] == ["graphs"] and graphs["same_tokens"] is True
    assert graphs["ms_per_step"] < eager["ms_per_step"] / 3  # host launch overhead is gone
    assert graphs["device"] == "sim-h100" and graphs["peak_memory"]["sim:0"] > 0


class CorruptGraph:
    """Wraps a real graph and perturbs what it returns: a planted capture bug."""

    def __init__(self, graph):
        self.graph = graph

    def record(self):
        return self.graph.record() + 1.0

    def replay(self):
        return self.graph.replay() + 1.0


def test_mismatching_graph_is_disabled_with_a_warning(q4_model, monkeypatch):
    real = runner_module.capture_graph
    monkeypatch.setattr(runner_module, "capture_graph", lambda *a: CorruptGraph(real(*a)))
    eager, _ = generate(q4_model, sim="h100")
    with pytest.warns(UserWarning, match="differs from the eager step"):
        graphs, engine = generate(q4_model, sim="h100", plugins=["graphs"])
    assert graphs == eager
    runner = pipellm_graphs.runner_of(engine)
    assert runner.graphs and all(g is None for g in runner.graphs.values())
    assert runner.replays == 0 and runner.eager_fallbacks > 0


def test_capture_all_up_front(q4_model):
    engine = Engine(q4_model, max_batch=2, ctx_size=600, progress=False, sim="h100",
                    plugins=["graphs"], plugin_options={"graphs.capture": "all"})
    runner = pipellm_graphs.runner_of(engine)
    assert set(runner.graphs) == {(0, b, c) for b in (1, 2) for c in (512, 600)}
    assert all(g is not None for g in runner.graphs.values())
    assert runner.memory_bytes > 0


def test_custom_context_buckets(q4_model):
    """Positions 30 to 33 do not fit the 16 bucket: the steps run in the cache's 64."""
    engine = Engine(q4_model, max_batch=2, ctx_size=64, progress=False, sim="h100",
                    plugins=["graphs"], ctx_buckets="16")
    reqs = [Request(list(range(100, 130)), 4, SamplingParams(temperature=0), ignore_eos=True)]
    for _ in engine.generate(reqs):
        pass
    runner = pipellm_graphs.runner_of(engine)
    assert runner.policy.ctx_buckets == (16, 64)
    assert set(runner.graphs) == {(0, 1, 64)}


def test_graphs_on_a_plain_cpu_says_so_and_stays_eager(q4_model):
    with pytest.warns(UserWarning, match="need --device cuda"):
        engine = Engine(q4_model, max_batch=1, ctx_size=64, progress=False, plugins=["graphs"])
    assert pipellm_graphs.runner_of(engine) is None


def test_bad_capture_mode_is_an_error(q4_model):
    with pytest.raises(PluginError, match="capture mode"):
        Engine(q4_model, max_batch=1, ctx_size=64, progress=False, sim="h100", plugins=["graphs"],
               plugin_options={"graphs.capture": "sometimes"})


def test_off_means_nothing_of_it_runs(q4_model, monkeypatch):
    calls = []
    monkeypatch.setattr(runner_module.GraphRunner, "run", lambda *a: calls.append(a))
    generate(q4_model, sim="h100")
    assert calls == []
