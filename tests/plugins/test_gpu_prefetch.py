"""The prefetch plugin on a real GPU: layers streamed from pinned host memory on a second stream,
alone and captured into CUDA graphs, give the tokens of the all-resident engine and hold less
GPU memory. Skipped without a GPU."""

import gc
import warnings

import pytest
import torch
from gguf import GGMLQuantizationType as GGMLType

import pipellm_graphs
import pipellm_prefetch
from pipellm_core import hookimpl
from pipellm_core.runtime.engine import Engine
from pipellm_core.runtime.request import Request
from pipellm_core.runtime.sampling import SamplingParams
from pipellm_core.gguf.synthetic import Shape, write_random_gguf

from tests.conftest import IdTokenizer

pytestmark = pytest.mark.gpu

EIGHT_LAYERS = Shape("llama", 8, 1024, 2816, 16, 4, 2048)


@pytest.fixture(scope="module")
def model(tmp_path_factory, vocab_path):
    path = tmp_path_factory.mktemp("p") / "eight-layers-q4.gguf"
    return write_random_gguf(str(path), EIGHT_LAYERS, GGMLType.Q4_0, tokenizer_from=vocab_path, std=0.05, seed=11)


def run(path, inspect=lambda engine: None, **kw):
    """Greedy tokens of three sequences, the peak GPU memory of the run, and what `inspect`
    read from the engine (which is gone before the next run starts)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = Engine(path, device="cuda", max_batch=4, ctx_size=1024, progress=False,
                    tokenizer=IdTokenizer(), **kw)
    reqs = [Request(list(range(100, 100 + n)), m, SamplingParams(temperature=0), ignore_eos=True)
            for n, m in ((500, 24), (20, 6), (300, 12))]
    for _ in engine.generate(reqs):
        pass
    torch.cuda.synchronize()
    seen = inspect(engine)
    del engine
    return [r.generated for r in reqs], torch.cuda.max_memory_allocated(), seen


def test_streamed_layers_give_the_resident_tokens(model):
    resident, resident_peak, _ = run(model)

    def streamer(engine):
        s = pipellm_prefetch.streamer_of(engine)
        pinned = engine.weights.layers[s.streamed[0]].host.buffer.is_pinned()
        return len(s.streamed), len(s.slots), s.slot_bytes, s.copies, pinned

    streamed, streamed_peak, (n_streamed, n_slots, slot_bytes, copies, pinned) = run(
        model, streamer, plugins=["prefetch"], plugin_options={"prefetch.resident_layers": 2})
    print(f"peak GPU memory: resident {resident_peak / 2**20:.0f} MiB, streamed {streamed_peak / 2**20:.0f} MiB")
    assert streamed == resident
    assert n_streamed == 6 and copies >= 6 * 24 and pinned
    saved = (n_streamed - n_slots) * slot_bytes
    assert streamed_peak < resident_peak - 0.8 * saved


def test_streamed_layers_captured_in_graphs(model):
    resident, _, _ = run(model)

    def graphs(engine):
        runner = pipellm_graphs.runner_of(engine)
        return runner.replays, [g is not None for g in runner.graphs.values()]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a graph that fails validation or capture would warn
        both, _, (replays, kept) = run(model, graphs, plugins=["graphs", "prefetch"],
                                       plugin_options={"prefetch.resident_layers": 3})
    assert both == resident
    assert replays > 10 and all(kept)


def test_core_copies_layers_no_plugin_streams(model):
    class HostPlan:
        @hookimpl
        def load(self, plan, config, engine):
            for p in plan.layers[1::2]:
                p.resident = False

    resident, _, _ = run(model)
    hosted, _, host = run(model, lambda e: e.weights.layers[1].host, extra_plugins=(HostPlan(),))
    assert host is not None
    assert hosted == resident
