"""The fused residual add + RMSNorm + q8 rounding kernel against the transformer's torch
expression and a float64 reference, in Triton's interpreter (a subprocess) and, marked, on CUDA.

Bounds (the kernel sums the squares in another order than torch, nothing else differs):
- h after the call equals h + delta exactly;
- against the torch expression: without q8 rounding, each element within one fp16 ulp; with
  it, within 1.25 quantization steps of its block (amax / 127: a value near a rounding boundary
  may go the other way, or a block's amax may move by one fp16 ulp); over all cases at least
  99.5% of the elements are bit-identical (measured in the interpreter over 40 seeds: all with
  q8 rounding; without it, 48 of 947,200 differ, each by one fp16 ulp);
- against rms_norm in float64 (unrounded): without q8 rounding, within fp16's half ulp (2^-11
  relative) plus 2^-20 relative for float32; with it, within half a step plus 2^-9 of the
  block's amax (the fp16 value, the fp16 scale and the fp16 result each round by 2^-11).
"""

import pytest
import torch

from tests.model.test_kernels import run_in_interpreter

pytest.importorskip("triton")

CHECK = r"""
import torch
from pipellm_core.model.activation_rounding import _q8_blocks
from pipellm_core.model.kernels import norm
from pipellm_core.model.kernels.activation_q8 import Q8Activations

dev = "{device}"
seed = torch.seed() % 2**31
print("seed", seed)
g = torch.Generator().manual_seed(seed)
widths = (64, 576, 4096, 8192 + 96) if dev == "cpu" else (576, 2048, 4096, 8192, 16384 + 64)
batches = (1, 5) if dev == "cpu" else (1, 8, 67)


def torch_expression(h, weight, eps, round_q8):
    # the transformer's rms_norm, then round_like_llamacpp's torch path
    y = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight).to(torch.float16)
    return _q8_blocks(y, 32).to(torch.float16) if round_q8 else y


def float64_reference(h, weight, eps, round_q8):
    # rms_norm in float64, and how far from it the kernel may be
    x = h.double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    if not round_q8:
        return y, (2.0**-11 + 2.0**-20) * y.abs() + 2.0**-25
    yb = y.reshape(*y.shape[:-1], -1, 32)
    step = yb.abs().amax(-1, keepdim=True) / 127
    # q8 rounding moves a value by half a step at most; fp16 scales and values add the rest
    return y, (0.5 * step + 127 * step * 2.0**-9).expand_as(yb).reshape(y.shape) + 2.0**-25


def check(M, E, delta_dtype, round_q8, ours, theirs):
    eps = 1e-5 if E % 3 else 1e-6
    h0 = (torch.randn(M, E, generator=g) * torch.rand(M, 1, generator=g) * 8).to(dev)
    h0[:, 3] = 60.0  # an outlier, as real residual streams have
    delta = None if delta_dtype is None else (torch.randn(M, E, generator=g) * 2).to(delta_dtype).to(dev)
    weight = (torch.rand(E, generator=g) * 3 - 0.5).to(dev)
    h = h0.clone()
    out = torch.full((M, E), float("nan"), dtype=torch.float16, device=dev)
    got = norm.add_rms_norm(h, delta, weight, eps, round_q8, out)
    assert norm.supports(h, round_q8) and got.data_ptr() == out.data_ptr() and got.dtype == torch.float16
    hs = h0 + delta if delta is not None else h0
    assert torch.equal(h, hs), "h not updated to h + delta"
    assert not got.isnan().any()
    for ref_dev in dict.fromkeys(("cpu", dev)):  # torch on CUDA rounds rsqrt its own way
        want = torch_expression(hs.to(ref_dev), weight.to(ref_dev), eps, round_q8).to(dev)
        diff = (got.float() - want.float()).abs()
        if round_q8:
            step = want.float().reshape(M, -1, 32).abs().amax(-1, keepdim=True) / 127
            bound = (1.25 * step).expand(M, E // 32, 32).reshape(M, E)
        else:
            bound = torch.where(want == 0, 2.0**-24, want.float().abs() * 2.0**-10)  # one fp16 ulp, at most
        assert (diff <= bound).all(), (seed, M, E, delta_dtype, round_q8, ref_dev, diff.max().item())
        (ours if ref_dev == "cpu" else theirs).append(((diff == 0).sum().item(), diff.numel()))
    if round_q8:  # the same rounding as 8-bit quants, block scales and sums of quants
        acts = Q8Activations.empty(M, E, dev)
        h2 = h0.clone()
        again = norm.add_rms_norm(h2, delta, weight, eps, True, q8_out=acts)
        assert torch.equal(h2, h)
        assert torch.equal(acts.values().half(), again), "quants and scales are not the rounded values"
        assert torch.equal(acts.s, acts.q.float().reshape(M, -1, 32).sum(-1))
        # compiled on its own, this variant may add the squares in another order (seen on an
        # H200): a value may then round to the neighbouring quant
        step = got.float().reshape(M, -1, 32).abs().amax(-1, keepdim=True) / 127
        assert ((again.float() - got.float()).abs() <= (1.25 * step).expand(M, E // 32, 32).reshape(M, E)).all()
    ref, tol = float64_reference(hs, weight, eps, round_q8)
    err = (got.double() - ref).abs()
    assert (err <= tol).all(), (seed, M, E, delta_dtype, round_q8, "float64", (err / tol).max().item())


same_cpu, same_dev = [], []
for E in widths:
    for M in batches:
        for delta_dtype in (None, torch.float16, torch.float32):
            for round_q8 in (True, False):
                check(M, E, delta_dtype, round_q8, same_cpu, same_dev)
# rows wider than the tile, read in chunks (here small chunks, to keep the interpreter fast)
norm.MAX_TILE = 256
for E in (576, 1000 if dev == "cpu" else 4096):
    for round_q8 in ((True, False) if E % 32 == 0 else (False,)):
        check(3, E, torch.float16, round_q8, same_cpu, same_dev)
norm.MAX_TILE = 8192
for name, same in (("torch on cpu", same_cpu), ("torch on " + dev, same_dev)):
    if same:
        frac = sum(s for s, _ in same) / sum(n for _, n in same)
        print(name, "bit-identical fraction", frac)
        assert frac >= 0.995, (name, frac)
print("ok")
"""


def test_add_rms_norm_matches_the_torch_expression_in_the_interpreter():
    run_in_interpreter(CHECK)


@pytest.mark.gpu
def test_add_rms_norm_matches_the_torch_expression_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    exec(CHECK.format(device="cuda"), {})


def test_torch_path_equals_the_expression():
    """Where no kernel applies (CPU without the interpreter), the same call in torch."""
    from pipellm_core.model.activation_rounding import _q8_blocks
    from pipellm_core.model.kernels import norm
    g = torch.Generator().manual_seed(3)
    h0, w = torch.randn(2, 96, generator=g), torch.rand(96, generator=g)
    delta = torch.randn(2, 96, generator=g).half()
    h = h0.clone()
    got = norm.add_rms_norm(h, delta, w, 1e-6, True)
    hs = h0 + delta
    y = (hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + 1e-6) * w).to(torch.float16)
    assert torch.equal(h, hs) and torch.equal(got, _q8_blocks(y, 32).to(torch.float16))
