"""The graphs plugin with real CUDA graphs. Skipped without a GPU."""

import os
import warnings

import pytest
import torch
from gguf import GGMLQuantizationType as GGMLType

import pipellm_graphs
from pipellm_core.runtime.engine import Engine
from pipellm_core.runtime.request import Request
from pipellm_core.runtime.sampling import SamplingParams
from pipellm_core.gguf.synthetic import write_random_gguf

pytestmark = pytest.mark.gpu


def generate(path, **kw):
    """Three sequences: one grows past 512, two finish early (the batch shrinks 3 -> 2 -> 1)."""
    engine = Engine(path, device="cuda", max_batch=4, ctx_size=1024, progress=False, **kw)
    reqs = [Request(list(range(100, 100 + n)), m, SamplingParams(temperature=0), ignore_eos=True)
            for n, m in ((500, 30), (20, 6), (300, 16))]
    for _ in engine.generate(reqs):
        pass
    return [r.generated for r in reqs], engine


@pytest.fixture(scope="module", params=["tiny-q4_0", "smollm2"])
def model(request, tmp_path_factory, smollm2_path):
    if request.param == "smollm2":
        return os.environ.get("PIPELLM_GPU_MODEL", smollm2_path)
    path = tmp_path_factory.mktemp("g") / "tiny-q4.gguf"
    return write_random_gguf(str(path), "tiny-llama", GGMLType.Q4_0, tokenizer_from=smollm2_path, std=0.3, seed=3)


def test_cuda_graphs_give_the_eager_tokens(model):
    eager, _ = generate(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a graph that fails validation would warn
        graphs, engine = generate(model, plugins=["graphs"])
    runner = pipellm_graphs.runner_of(engine)
    print("graphs:", sorted(runner.graphs), "replays:", runner.replays,
          "pool MiB:", runner.memory_bytes / 2**20)
    assert graphs == eager
    assert {(0, 4, 512), (0, 2, 512), (0, 2, 1024), (0, 1, 1024)} <= set(runner.graphs)
    assert all(g is not None for g in runner.graphs.values())
    assert runner.replays >= 25 and runner.memory_bytes > 0


def test_cuda_capture_all(model):
    engine = Engine(model, device="cuda", max_batch=2, ctx_size=600, progress=False,
                    plugins=["graphs"], plugin_options={"graphs.capture": "all"})
    runner = pipellm_graphs.runner_of(engine)
    assert set(runner.graphs) == {(0, b, c) for b in (1, 2) for c in (512, 600)}
    assert all(g is not None for g in runner.graphs.values())
    torch.cuda.synchronize()
