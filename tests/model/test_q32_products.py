"""The kernel layout of Q4_0 / Q4_1 / Q8_0 weights and the products that read it
(pipellm_core.model.kernels.q32_products): the layout is a bit-exact rearrangement, its decode
equals the GGUF decode bit for bit, and the kernels equal a float64 product of the decoded
weights and of the activations rounded as llama.cpp rounds them (8 bits per block of 32), within
2e-3 relative L2 (exact integer sums, float32 scaling, fp16 output). Kernels run in Triton's
interpreter on the CPU (a subprocess); the marked test runs them on a GPU at real sizes."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.gguf.dequant import dequantize as dequantize_gguf
from pipellm_core.gguf.synthetic import random_blocks
from pipellm_core.model.kernels import q32_products as q32

TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_layout_round_trip_is_bit_identical_and_decodes_as_gguf(qtype):
    rng = np.random.default_rng(qtype.value)
    for n, k in ((5, 32), (7, 96), (33, 576)):
        raw = torch.from_numpy(random_blocks(qtype, n * k // 32, rng, 0.01).reshape(n, -1))
        kl = q32.to_kernel_layout(raw, qtype)
        assert kl.dtype == torch.uint8 and kl.shape == raw.shape
        assert torch.equal(q32.from_kernel_layout(kl, qtype), raw)
        # the same bytes, moved: as many of each value
        assert torch.equal(torch.bincount(kl.flatten(), minlength=256), torch.bincount(raw.flatten(), minlength=256))
        for dtype in (torch.float32, torch.float16):
            assert torch.equal(q32.dequantize(kl, qtype, k, dtype), dequantize_gguf(raw, qtype, k, dtype))


CHECK = r"""
import numpy as np, torch
from gguf import GGMLQuantizationType as GGMLType
from pipellm_core.gguf.synthetic import random_blocks
from pipellm_core.model.activation_rounding import _q8_blocks
from pipellm_core.model.kernels import activation_q8 as q8, q32_products as q32

dev = "{device}"
SHAPES = {shapes}
rng = np.random.default_rng({seed})
gen = torch.Generator().manual_seed({seed})


def check(qtype, m, n, k, swiglu, **kw):
    raw = torch.from_numpy(random_blocks(qtype, n * k // 32, rng, 0.01).reshape(n, -1))
    kl = q32.to_kernel_layout(raw, qtype)
    w64 = q32.dequantize(kl, qtype, k, torch.float64)
    x = torch.randn(m, k, generator=gen).half()
    acts = q8.quantize(x.to(dev))
    assert torch.equal(acts.values().cpu().double(), _q8_blocks(x.double(), 32).double())
    assert torch.equal(acts.s, acts.q.float().reshape(m, -1, 32).sum(-1))
    want = _q8_blocks(x.double(), 32).double() @ w64.t()
    if swiglu:
        g, u = want[:, :n // 2], want[:, n // 2:]
        want = g * torch.sigmoid(g) * u
    got = q32.matmul(x.to(dev), kl.to(dev), qtype, n, k, swiglu=swiglu, **kw).cpu()
    assert got.dtype == torch.float16 and got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got).all(), "unwritten or non-finite outputs"
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 2e-3, (qtype.name, m, n, k, swiglu, kw, err)
    return err


# empty() hands back recycled memory: fill the pool with NaN so unwritten outputs show
real_empty = torch.empty
def poisoned_empty(*shape, **kw):
    t = real_empty(*shape, **kw)
    return t.fill_(float("nan")) if t.is_floating_point() else t
torch.empty = poisoned_empty

for qtype in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0):
    for m, n, k, swiglu in SHAPES:
        err = check(qtype, m, n, k, swiglu)
        print(qtype.name, m, n, k, swiglu, f"{{err:.2e}}")
{extra}
print("ok")
"""

# the decode kernel split over K (forced tiles: the small shapes would not split), and the
# tiled kernel at a decode batch
FORCED = r"""
chosen = q32.gemv_tiles
for tiles in ((4, 4, 3, 4), (2, 8, 2, 4)):
    q32.gemv_tiles = lambda m, r, w, t=tiles: t
    for qtype in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0):
        for m, n, k, swiglu in ((1, 33, 320, False), (3, 40, 576, True), (8, 33, 576, False)):
            check(qtype, m, n, k, swiglu)
q32.gemv_tiles = chosen
for qtype in (GGMLType.Q4_0, GGMLType.Q8_0):
    check(qtype, 3, 33, 320, False, kernel="tiled")
    check(qtype, 9, 40, 96, True, kernel="gemv")
"""

INTERPRETER_SHAPES = [(m, n, k, swiglu) for m, n, k in ((1, 40, 64), (3, 33, 576), (8, 40, 320),
                                                       (9, 33, 64), (17, 40, 576), (3, 34, 96))
                      for swiglu in (False, True) if not (swiglu and n % 2)]


def test_products_match_float64_in_the_interpreter():
    from tests.model.test_kernels import run_in_interpreter
    script = CHECK.format(device="{device}", shapes=INTERPRETER_SHAPES, seed=1, extra=FORCED)
    # run_in_interpreter formats the script once more, for the device
    run_in_interpreter(script.replace("{", "{{").replace("}", "}}").replace("{{device}}", "{device}"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_products_match_float64_on_cuda():
    shapes = [(m, n, 4096, swiglu) for n in (4096, 1024) for m in (1, 8, 32) for swiglu in (False, True)]
    exec(CHECK.format(device="cuda", shapes=shapes, seed=2, extra=""), {})
