"""Matrices dequantized once for CPU products: the same bits as expanding per product, kept
within the budget, never while a dispatch mode charges operations (the sim)."""

import gc

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGMLType
from torch.utils._python_dispatch import TorchDispatchMode

from pipellm_core.errors import PipeLLMError
from pipellm_core.gguf.synthetic import random_blocks
from pipellm_core.model import cpu_weights
from pipellm_core.model.transformer import linear
from pipellm_core.model.weights import QuantizedMatrix


def _matrix(qtype, rows, cols, seed=0):
    blocks = random_blocks(qtype, rows * cols // 32 if qtype != GGMLType.Q6_K else rows * cols // 256,
                           np.random.default_rng(seed), 0.01)
    return QuantizedMatrix(torch.from_numpy(blocks.reshape(rows, -1)), qtype, rows, cols)


@pytest.mark.parametrize("qtype, rows, cols, batch", [(GGMLType.Q4_1, 67, 96, 1), (GGMLType.Q8_0, 33, 160, 5),
                                                     (GGMLType.Q6_K, 19, 512, 3)])
def test_kept_copy_gives_the_same_bits(monkeypatch, qtype, rows, cols, batch):
    x = torch.randn(batch, cols)
    monkeypatch.setenv(cpu_weights.BUDGET_ENV, "0")
    w = _matrix(qtype, rows, cols)
    per_product = linear(x, w)
    assert w.dense is None
    monkeypatch.setenv(cpu_weights.BUDGET_ENV, "1GiB")
    before = cpu_weights.bytes_in_use()
    first, again = linear(x, w), linear(x, w)
    assert w.dense is not None and w.dense.shape == (rows, cols) and w.dense.dtype == torch.float32
    assert cpu_weights.bytes_in_use() == before + rows * cols * 4
    assert torch.equal(first, per_product) and torch.equal(again, per_product)
    del w
    gc.collect()
    assert cpu_weights.bytes_in_use() == before  # released with the matrix


def test_budget_limits_what_is_kept(monkeypatch):
    monkeypatch.setenv(cpu_weights.BUDGET_ENV, str(cpu_weights.bytes_in_use() + 64 * 64 * 4))
    a, b = _matrix(GGMLType.Q4_0, 64, 64, 1), _matrix(GGMLType.Q4_0, 64, 64, 2)
    x = torch.randn(2, 64)
    linear(x, a)
    linear(x, b)
    assert a.dense is not None and b.dense is None  # the second did not fit


def test_nothing_kept_while_operations_are_charged(monkeypatch):
    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv(cpu_weights.BUDGET_ENV, "1GiB")
    w = _matrix(GGMLType.Q4_1, 32, 64)
    with Counting():
        linear(torch.randn(1, 64), w)
    assert w.dense is None


def test_budget_sizes(monkeypatch):
    assert cpu_weights.parse_size("4GiB") == 4 * 2**30
    assert cpu_weights.parse_size("500MB") == 500 * 10**6
    assert cpu_weights.parse_size("123") == 123
    with pytest.raises(PipeLLMError, match="PIPELLM_CPU_DENSE_BUDGET"):
        cpu_weights.parse_size("lots")
    monkeypatch.delenv(cpu_weights.BUDGET_ENV, raising=False)
    assert cpu_weights.budget_bytes() > 0  # half the machine's memory


def test_smollm2_greedy_tokens_unchanged(monkeypatch, smollm2_path):
    """The default model decodes to the same tokens with its matrices kept as with them
    expanded at every product."""
    from pipellm_core.runtime.engine import Engine
    from pipellm_core.runtime.request import Request
    from pipellm_core.runtime.sampling import SamplingParams

    def tokens(budget):
        monkeypatch.setenv(cpu_weights.BUDGET_ENV, budget)
        engine = Engine(smollm2_path, max_batch=2, ctx_size=128, progress=False)
        reqs = [Request(engine.tokenizer.encode(p), 8, SamplingParams(temperature=0))
                for p in ("The capital of France is", "def fibonacci(n):\n    ")]
        for _ in engine.generate(reqs):
            pass
        kept = engine.weights.layers[0].wq.dense is not None
        return [r.generated for r in reqs], kept

    expanded, kept_before = tokens("0")
    kept_tokens, kept_after = tokens("4GiB")
    assert (kept_before, kept_after) == (False, True)
    assert kept_tokens == expanded
