"""The prefetch plugin on a real GPU: layers streamed from pinned host memory on a second stream,
alone and captured into CUDA graphs, give the tokens of the all-resident engine and hold less
GPU memory. Skipped without a GPU."""

import warnings

import pytest
import torch
from gguf import GGMLQuantizationType as T

import pipellm_graphs
import pipellm_prefetch
from pipellm_core import hookimpl
from pipellm_core.engine import Engine
from pipellm_core.request import Request
from pipellm_core.sampling import SamplingParams
from pipellm_core.synthetic import Shape, write_random_gguf

pytestmark = pytest.mark.gpu

EIGHT_LAYERS = Shape("llama", 8, 1024, 2816, 16, 4, 2048)


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_path):
    path = tmp_path_factory.mktemp("p") / "eight-layers-q4.gguf"
    return write_random_gguf(str(path), EIGHT_LAYERS, T.Q4_0, tokenizer_from=smollm2_path, std=0.05, seed=11)


def generate(path, **kw):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = Engine(path, device="cuda", max_batch=4, ctx_size=1024, progress=False, **kw)
    reqs = [Request(list(range(100, 100 + n)), m, SamplingParams(temperature=0), ignore_eos=True)
            for n, m in ((500, 24), (20, 6), (300, 12))]
    for _ in engine.generate(reqs):
        pass
    torch.cuda.synchronize()
    return [r.generated for r in reqs], engine, torch.cuda.max_memory_allocated()


def test_streamed_layers_give_the_resident_tokens(model):
    resident, _, resident_peak = generate(model)
    streamed, engine, streamed_peak = generate(model, plugins=["prefetch"],
                                               plugin_options={"prefetch.resident_layers": 2})
    s = pipellm_prefetch.streamer_of(engine)
    assert len(s.streamed) == 6 and s.copies >= 6 * 24
    assert engine.weights.layers[s.streamed[0]].host.buffer.is_pinned()
    print(f"peak GPU memory: resident {resident_peak / 2**20:.0f} MiB, streamed {streamed_peak / 2**20:.0f} MiB")
    assert streamed == resident
    saved = (len(s.streamed) - len(s.slots)) * s.slot_bytes
    assert streamed_peak < resident_peak - 0.8 * saved


def test_streamed_layers_captured_in_graphs(model):
    resident, _, _ = generate(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a graph that fails validation or capture would warn
        both, engine, _ = generate(model, plugins=["graphs", "prefetch"],
                                   plugin_options={"prefetch.resident_layers": 3})
    runner = pipellm_graphs.runner_of(engine)
    assert runner.replays > 20 and all(g is not None for g in runner.graphs.values())
    assert both == resident


def test_core_copies_layers_no_plugin_streams(model):
    class HostPlan:
        @hookimpl
        def load(self, plan, config, engine):
            for p in plan.layers[1::2]:
                p.resident = False

    resident, _, _ = generate(model)
    hosted, engine, _ = generate(model, extra_plugins=(HostPlan(),))
    assert engine.weights.layers[1].host is not None
    assert hosted == resident
