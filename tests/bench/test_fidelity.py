"""The fidelity figures: mean KL divergence and top-1 agreement of next-token distributions."""

import math

import numpy as np
import pytest
import torch

from pipellm_core.bench.fidelity import CHUNK, distance, format_comparison


def _reference_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, in float64, written out from the definition."""
    out = []
    for a, b in zip(p_logits.astype(np.float64), q_logits.astype(np.float64)):
        p = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
        q = np.exp(b - b.max()) / np.exp(b - b.max()).sum()
        out.append(float((p * (np.log(p) - np.log(q))).sum()))
    return np.array(out)


def test_identical_logits_are_at_distance_zero():
    x = torch.randn(7, 101)
    d = distance(x, x.clone())
    assert d.kl_mean == 0 and d.kl_max == 0 and d.top1 == 1.0 and d.positions == 7


@pytest.mark.parametrize("positions, vocab", [(1, 3), (13, 257), (CHUNK * 2 + 5, 1031)])
def test_against_float64_reference(positions, vocab):
    rng = np.random.default_rng(positions)
    ref = rng.standard_normal((positions, vocab)).astype(np.float32) * 4
    cand = ref + rng.standard_normal((positions, vocab)).astype(np.float32) * 0.3
    d = distance(torch.from_numpy(ref), torch.from_numpy(cand), "a", "b")
    kl = _reference_kl(ref, cand)
    assert math.isclose(d.kl_mean, kl.mean(), rel_tol=1e-9)
    assert math.isclose(d.kl_max, kl.max(), rel_tol=1e-9)
    assert d.top1 == float((ref.argmax(1) == cand.argmax(1)).mean())
    assert (d.reference, d.candidate, d.positions) == ("a", "b", positions)


def test_kl_is_of_the_reference_against_the_candidate():
    # p = (0.9, 0.1), q = (0.5, 0.5): KL(p||q) = 0.3681, KL(q||p) = 0.5108
    p = torch.tensor([[math.log(0.9), math.log(0.1)]], dtype=torch.float64)
    q = torch.zeros(1, 2, dtype=torch.float64)
    assert math.isclose(distance(p, q).kl_mean, 0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel_tol=1e-12)
    assert math.isclose(distance(q, p).kl_mean, 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5), rel_tol=1e-12)


def test_top1_counts_disagreements():
    ref = torch.eye(4) * 5
    cand = ref.clone()
    cand[1] = torch.tensor([0.0, 0.0, 9.0, 0.0])
    assert distance(ref, cand).top1 == 0.75


def test_shapes_must_match():
    with pytest.raises(ValueError, match="shapes"):
        distance(torch.zeros(3, 5), torch.zeros(4, 5))


def test_format():
    pair = {"reference": "llama.cpp cpu", "candidate": "pipellm torch cpu", "kl_mean": 3.6e-3,
            "kl_max": 2e-2, "top1": 0.948, "positions": 212}
    text = format_comparison({"tokens": 212, "pairs": [pair, {**pair, "candidate": "x"}], "kl_ratio": 1.06})
    assert "3.60e-03" in text and "94.8%" in text and "1.06x" in text
