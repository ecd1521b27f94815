"""The K-quant kernel layout (Q4_K, Q5_K, Q6_K) and its matrix products: the layout gives the
file's bytes back bit for bit and decodes to the same weights; the kernels' products (Triton's
interpreter on the CPU, in a subprocess; the marked test on a GPU) are within 2e-3 relative L2
of a float64 product by the decoded weights, outputs filled with NaN before the kernels run."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.gguf.dequant import dequantize as decode_file_blocks
from pipellm_core.gguf.synthetic import random_blocks
from pipellm_core.model.kernels import k_products
from tests.model.test_kernels import run_in_interpreter

pytest.importorskip("triton")


@pytest.mark.parametrize("qtype", [GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K])
@pytest.mark.parametrize("rows, blocks_per_row", [(5, 1), (3, 3), (7, 2)])
def test_layout_round_trip_and_decoding_are_bit_exact(qtype, rows, blocks_per_row):
    rng = np.random.default_rng(rows * 10 + blocks_per_row)
    raw = torch.from_numpy(random_blocks(qtype, rows * blocks_per_row, rng, 0.01).reshape(rows, -1))
    kl = k_products.to_kernel_layout(raw, qtype)
    assert kl.dtype == torch.uint8 and kl.shape == raw.shape
    assert not torch.equal(kl, raw)
    assert torch.equal(k_products.from_kernel_layout(kl, qtype), raw)
    k = blocks_per_row * 256
    for dtype in (torch.float32, torch.float16):
        got = k_products.dequantize(kl, qtype, k, dtype)
        want = decode_file_blocks(raw, qtype, k, dtype)
        assert got.dtype == dtype and got.shape == (rows, k)
        assert torch.equal(got.view(torch.int16 if dtype == torch.float16 else torch.int32),
                           want.view(torch.int16 if dtype == torch.float16 else torch.int32))


def test_nibble_s_of_word_j_holds_value_32s_plus_j():
    """Q4_K with d = 1, dmin = 0 and all scales 1 decodes to the quants themselves; word j of the
    kernel's quants holds value 32s + j of the super-block in bits 4s..4s+3."""
    raw = torch.from_numpy(random_blocks(GGMLType.Q4_K, 1, np.random.default_rng(1))).reshape(1, -1)
    raw[0, 0:2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    raw[0, 2:4] = 0
    raw[0, 4:16] = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.uint8)
    values = decode_file_blocks(raw, GGMLType.Q4_K, 256).reshape(8, 32).to(torch.int32)
    words = k_products.to_kernel_layout(raw, GGMLType.Q4_K)[0, :128].view(torch.int32)
    for s in range(8):
        assert torch.equal((words >> (4 * s)) & 15, values[s])


CHECK = r"""
import numpy as np, torch
from gguf import GGMLQuantizationType as GGMLType
from pipellm_core.gguf.dequant import dequantize
from pipellm_core.gguf.synthetic import random_blocks
from pipellm_core.model.kernels import k_products

dev = "{device}"
BOUND = 2e-3
k_products._empty = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
rng = np.random.default_rng(0)
CASES = @CASES@
for target in @TARGETS@:
    k_products.TARGET_PROGRAMS = target  # small targets: several units per K slice, or no split
    for qtype in (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K):
        for m, n, k, swiglu in CASES:
            raw = torch.from_numpy(random_blocks(qtype, n * k // 256, rng, 0.002).reshape(n, -1)).to(dev)
            w = k_products.to_kernel_layout(raw, qtype)
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + n + k)).half().to(dev)
            if swiglu:  # keeps silu(gate) * up of Q6_K's larger random weights inside fp16's range
                x = x * 0.125
            y = x.double() @ dequantize(raw, qtype, k, torch.float64).t()
            if swiglu:
                gate, up = y[:, :n // 2], y[:, n // 2:]
                y = gate * torch.sigmoid(gate) * up
            got = k_products.matmul(x, w, qtype, n, k, swiglu=swiglu)
            assert got.dtype == torch.float16 and got.shape == y.shape, (got.shape, y.shape)
            assert not got.isnan().any(), (qtype.name, m, n, k, swiglu, "unwritten outputs")
            err = ((got.double() - y).norm() / y.norm()).item()
            assert err < BOUND, (qtype.name, m, n, k, swiglu, target, err)
            print(qtype.name, m, n, k, swiglu, target, f"{{err:.2e}}")
print("ok")
"""

def check(cases, targets) -> str:
    return CHECK.replace("@CASES@", repr(cases)).replace("@TARGETS@", repr(targets))


SMALL_CASES = [(1, 40, 256, False), (1, 33, 512, False), (3, 40, 512, True), (8, 33, 256, False),
               (8, 40, 512, True), (9, 33, 512, False), (17, 40, 256, True), (2, 33, 768, False)]


def test_matmul_matches_float64_in_the_interpreter():
    run_in_interpreter(check(SMALL_CASES, (528,)))


def test_matmul_with_long_k_slices_in_the_interpreter():
    cases = [(1, 40, 768, False), (9, 40, 768, True), (2, 33, 1024, False)]
    run_in_interpreter(check(cases, (1, 4)))


@pytest.mark.gpu
def test_matmul_matches_float64_on_cuda():
    real = [(m, n, 4096, False) for m in (1, 8, 32) for n in (4096, 1024)]
    real += [(1, 2048, 4096, True), (8, 2048, 4096, True)]
    exec(check(SMALL_CASES + real, (528,)).format(device="cuda"), {})
