"""The fused rotary embedding + cache write of a decode step, against the transformer's
`apply_rope` and cache scatter, in Triton's interpreter on the CPU (a subprocess: the interpreter
is chosen when the kernels are defined). On a GPU, the marked test runs the same check.

The caches start as NaN, so a write to the wrong place (or a missing one) shows; `torch.empty`
hands out NaN-filled memory, so an unwritten output element shows. In the interpreter the
rotation is bit-exact to `apply_rope` (same float32 operations); compiled, a fused multiply-add
may move an element by one fp16 step, so the GPU bound is one fp16 ulp."""

import pytest
import torch

from tests.model.test_kernels import run_in_interpreter

pytest.importorskip("triton")

CHECK = r"""
import torch
from pipellm_core.model.kernels.rope_kv import rope_and_store
from pipellm_core.model.transformer import apply_rope

dev = "{device}"
exact = dev == "cpu"
_empty = torch.empty
def poisoned_empty(*args, **kwargs):
    t = _empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t
torch.empty = poisoned_empty

def close(got, want):
    if exact:
        return torch.equal(got, want)
    return bool(((got.float() - want.float()).abs() <= want.float().abs() * 2.0 ** -10 + 2.0 ** -24).all())

cases = [(1, 4, 4, 64, 64), (3, 9, 3, 64, 32), (2, 8, 2, 128, 128), (3, 6, 2, 96, 64), (2, 4, 1, 32, 16)]
for i, (B, H, KV, D, R) in enumerate(cases):
    for style in ("pairs", "halves"):
        g = torch.Generator().manual_seed(i)
        S, C = 5, 40
        qkv = torch.randn(B, (H + 2 * KV) * D, generator=g).half().to(dev)
        theta = torch.rand(C, R // 2, generator=g, dtype=torch.float64) * 50
        cos, sin = torch.cos(theta).float().to(dev), torch.sin(theta).float().to(dev)
        positions = torch.randint(0, C, (B,), generator=g).to(dev)
        slots = torch.randperm(S, generator=g)[:B].to(dev)
        kc = torch.full((S, KV, C, D), float("nan"), dtype=torch.float16, device=dev)
        vc = torch.full((S, KV, C, D), float("nan"), dtype=torch.float16, device=dev)
        q = rope_and_store(qkv, cos, sin, positions, slots, kc, vc, H, KV, D, R, style)

        x = qkv.view(B, 1, H + 2 * KV, D)
        c, s = cos[positions][:, None], sin[positions][:, None]
        want_q = apply_rope(x[:, :, :H], c, s, style, R)[:, 0]
        want_k = apply_rope(x[:, :, H:H + KV], c, s, style, R)[:, 0]
        want_v = x[:, 0, H + KV:]
        case = (B, H, KV, D, R, style)
        assert q.shape == (B, H, D) and q.dtype == torch.float16 and close(q, want_q), case
        assert close(kc[slots, :, positions], want_k) and torch.equal(vc[slots, :, positions], want_v), case
        written = torch.zeros(S, C, dtype=torch.bool, device=dev)
        written[slots, positions] = True
        assert kc.permute(0, 2, 1, 3)[~written].isnan().all() and vc.permute(0, 2, 1, 3)[~written].isnan().all(), case
        print(case)
print("ok")
"""


def test_rope_and_store_matches_apply_rope_in_the_interpreter():
    run_in_interpreter(CHECK)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rope_and_store_matches_apply_rope_on_cuda():
    empty = torch.empty  # the check poisons torch.empty for this process: put it back after
    try:
        exec(CHECK.format(device="cuda"), {})
    finally:
        torch.empty = empty
