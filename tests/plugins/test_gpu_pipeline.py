"""The pipeline plugin on two real GPUs: layers split over them, micro-batches through the
stages, alone and with CUDA graphs captured per stage, give the one-GPU tokens. Skipped without
two GPUs."""

import warnings

import pytest
import torch
from gguf import GGMLQuantizationType as GGMLType

import pipellm_graphs
from pipellm_core.runtime.engine import Engine
from pipellm_core.runtime.request import Request
from pipellm_core.runtime.sampling import SamplingParams
from pipellm_core.gguf.synthetic import Shape, write_random_gguf

from tests.conftest import IdTokenizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

EIGHT_LAYERS = Shape("llama", 8, 1024, 2816, 16, 4, 2048)


@pytest.fixture(scope="module")
def model(tmp_path_factory, vocab_path):
    path = tmp_path_factory.mktemp("pp") / "eight-layers-q4.gguf"
    return write_random_gguf(str(path), EIGHT_LAYERS, GGMLType.Q4_0, tokenizer_from=vocab_path, std=0.05, seed=13)


def generate(path, **kw):
    engine = Engine(path, device="cuda", max_batch=8, ctx_size=1024, progress=False,
                    tokenizer=IdTokenizer(), **kw)
    reqs = [Request(list(range(100 + 7 * k, 140 + 7 * k)), 12 - k, SamplingParams(temperature=0), ignore_eos=True)
            for k in range(8)]
    for _ in engine.generate(reqs):
        pass
    torch.cuda.synchronize()
    return [r.generated for r in reqs], engine


def test_two_gpu_pipeline_gives_the_one_gpu_tokens(model):
    one, _ = generate(model)
    two, engine = generate(model, plugins=["pipeline"], plugin_options={"pipeline.micro_batches": 2})
    assert {str(d) for d in engine.weights.layer_devices} == {"cuda:0", "cuda:1"}
    assert engine.cache.k[-1].device == torch.device("cuda:1")
    assert two == one


def test_per_stage_graphs_on_each_gpu(model):
    one, _ = generate(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture or validation would warn
        both, engine = generate(model, plugins=["pipeline", "graphs"],
                                plugin_options={"pipeline.micro_batches": 2})
    runner = pipellm_graphs.runner_of(engine)
    assert {k[0] for k, g in runner.graphs.items() if g is not None} == {0, 1}
    assert runner.replays > 10 and runner.eager_fallbacks == 0
    assert both == one
