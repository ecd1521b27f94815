"""The new architectures (qwen3, gemma2, gemma3, phi3) across the engine: on the sim backend
with and without the graphs, prefetch and pipeline plugins (the same greedy tokens as the plain
CPU run in the same step shapes), through `pipellm bench`'s ablation, and the GPU decode layer
stepping aside for them."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core import ablate
from pipellm_core.gguf.synthetic import SHAPES, write_random_gguf
from pipellm_core.model import fused_decode
from pipellm_core.runtime.engine import Engine
from pipellm_core.runtime.request import Request
from pipellm_core.runtime.sampling import SamplingParams


NEW_ARCHS = ("qwen3", "gemma2", "gemma3", "phi3")


@pytest.fixture(scope="module", params=NEW_ARCHS)
def arch_q8(request, tmp_path_factory, vocab_path):
    """Each new architecture, small, every optional tensor and key present (Gemma's local and
    global layers, phi3's fused matrices and RoPE factors), quantized: rounding and
    dequantization in every step."""
    arch = request.param
    path = tmp_path_factory.mktemp("arch-engines") / f"{arch}.gguf"
    return write_random_gguf(str(path), f"tiny-{arch}", GGMLType.Q8_0, tokenizer_from=vocab_path, std=0.3, seed=5)


def generate(path, **engine_kw):
    """Two sequences past the local window of 8, one ending early."""
    engine = Engine(path, max_batch=2, ctx_size=256, progress=False, **engine_kw)
    reqs = [Request(list(range(100, 100 + n)), m, SamplingParams(temperature=0), ignore_eos=True)
            for n, m in ((20, 24), (5, 10))]
    for _ in engine.generate(reqs):
        pass
    return [r.generated for r in reqs]


def test_sim_and_plugins_give_the_cpu_tokens(arch_q8):
    cpu = generate(arch_q8, pad_steps=True)
    assert generate(arch_q8, sim="h100") == cpu
    assert generate(arch_q8, sim="h100", plugins=["graphs"]) == cpu
    assert generate(arch_q8, sim="h100", plugins=["prefetch"], plugin_options={"prefetch.resident_layers": 2}) == cpu
    assert generate(arch_q8, sim="h100", sim_devices=2, plugins=["pipeline"]) == cpu
    assert generate(arch_q8, sim="h100", sim_devices=2, plugins=["pipeline", "graphs"],
                    plugin_options={"pipeline.groups": 2}) == cpu


def test_bench_ablation_on_the_sim(arch_q8):
    rows = ablate(arch_q8, [[], ["graphs"]], backend="sim", batch=2, prompt_tokens=12,
                  n_predict=6, repeats=1, progress=False)
    assert [r["plugins"] for r in rows] == [[], ["graphs"]]
    assert rows[1]["same_tokens"] is True and all(r["ms_per_step"] > 0 for r in rows)


@pytest.mark.parametrize("arch, plain", [("qwen3", False), ("gemma2", False), ("gemma3", False),
                                         ("phi3", True), ("llama", True)])
def test_gpu_decode_layer_steps_aside(monkeypatch, arch, plain):
    """The kernels' decode layer has no q/k norms, post-norms, GELU, soft-capping or windows:
    it must decline those layers even where it would otherwise run."""
    config = SHAPES[f"tiny-{arch}"].config()
    monkeypatch.setattr(fused_decode.products, "runs_here", lambda device: True)

    matrix = SimpleNamespace(layout="kernels")
    stacked = SimpleNamespace(wqkv=matrix, w_gate_up=matrix, wo=matrix)
    config = replace(config, head_dim=64)
    assert fused_decode.applies(config, stacked, torch.zeros(1, 1, config.n_embd)) is plain
