"""The K-quant kernel layout (Q4_K, Q5_K, Q6_K) and its matrix products: the layout gives the
file's bytes back bit for bit and decodes to the same weights; the kernels (Triton's
interpreter on the CPU, in a subprocess; the marked test on a GPU) equal a float64 product of
the decoded weights and of the activations rounded as llama.cpp rounds them for its CUDA
products (8 bits per block of 32), within 2e-3 relative L2 (exact integer sums, float32
scaling, fp16 output), outputs filled with NaN before the kernels run."""

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
    if blocks_per_row > 1:  # (one Q6_K super-block per row keeps its fields in the file's order)
        assert not torch.equal(kl, raw)
    assert torch.equal(torch.bincount(kl.flatten(), minlength=256), torch.bincount(raw.flatten(), minlength=256))
    assert torch.equal(k_products.from_kernel_layout(kl, qtype), raw)
    k = blocks_per_row * 256
    for dtype in (torch.float32, torch.float16):
        got = k_products.dequantize(kl, qtype, k, dtype)
        want = decode_file_blocks(raw, qtype, k, dtype)
        assert got.dtype == dtype and got.shape == (rows, k)
        assert torch.equal(got.view(torch.int16 if dtype == torch.float16 else torch.int32),
                           want.view(torch.int16 if dtype == torch.float16 else torch.int32))


def test_word_8c_plus_i_holds_four_values_of_two_sub_blocks():
    """Q4_K with d = 1, dmin = 0 and all scales 1 decodes to the quants themselves; byte b of
    quant word 8c + i holds value 64c + 4i + b in its low nibble and value 64c + 32 + 4i + b in
    its high nibble, which lets a dp4a meet four consecutive activations."""
    raw = torch.from_numpy(random_blocks(GGMLType.Q4_K, 2, np.random.default_rng(1))).reshape(1, -1)
    for blk in (0, 144):
        raw[0, blk:blk + 2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
        raw[0, blk + 2:blk + 4] = 0
        raw[0, blk + 4:blk + 16] = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.uint8)
    values = decode_file_blocks(raw, GGMLType.Q4_K, 512).reshape(2, 4, 2, 8, 4).to(torch.int32)
    words = k_products.to_kernel_layout(raw, GGMLType.Q4_K)[0, :256].view(torch.int32).reshape(2, 4, 8, 1)
    byte_shift = 8 * torch.arange(4)
    assert torch.equal((words >> byte_shift) & 15, values[:, :, 0])
    assert torch.equal((words >> (byte_shift + 4)) & 15, values[:, :, 1])


CHECK = r"""
import numpy as np, torch
from gguf import GGMLQuantizationType as GGMLType
from pipellm_core.gguf.dequant import dequantize
from pipellm_core.gguf.synthetic import random_blocks
from pipellm_core.model.activation_rounding import _q8_blocks
from pipellm_core.model.kernels import k_products

dev = "{device}"
BOUND = 2e-3
rng = np.random.default_rng(0)
CASES = @CASES@
for sms in @SMS@:
    k_products.SMS = sms  # few multiprocessors: splits over K, else none
    for qtype in (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K):
        for m, n, k, swiglu, kernel in CASES:
            raw = torch.from_numpy(random_blocks(qtype, n * k // 256, rng, 0.002).reshape(n, -1)).to(dev)
            w = k_products.to_kernel_layout(raw, qtype)
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + n + k)).half()
            if swiglu:  # keeps silu(gate) * up of Q6_K's larger random weights inside fp16's range
                x = x * 0.125
            y = _q8_blocks(x.double(), 32).double() @ dequantize(raw.cpu(), qtype, k, torch.float64).t()
            if swiglu:
                gate, up = y[:, :n // 2], y[:, n // 2:]
                y = gate * torch.sigmoid(gate) * up
            got = k_products.matmul(x.to(dev), w, qtype, n, k, swiglu=swiglu, kernel=kernel).cpu()
            assert got.dtype == torch.float16 and got.shape == y.shape, (got.shape, y.shape)
            assert not got.isnan().any(), (qtype.name, m, n, k, swiglu, "unwritten outputs")
            err = ((got.double() - y).norm() / y.norm()).item()
            assert err < BOUND, (qtype.name, m, n, k, swiglu, kernel, sms, err)
            print(qtype.name, m, n, k, swiglu, kernel, sms, f"{{err:.2e}}")
print("ok")
"""


def check(cases, sms) -> str:
    return CHECK.replace("@CASES@", repr(cases)).replace("@SMS@", repr(sms))


# (x rows, W rows, k, swiglu, kernel or None for the choice by rows); 33 W rows of Q6_K with an
# odd count of super-blocks are rows that do not start 4-byte aligned
SMALL_CASES = [(1, 40, 256, False, None), (1, 33, 768, False, None), (3, 40, 512, True, None),
               (8, 33, 256, False, None), (17, 40, 256, True, None), (9, 33, 512, False, "tiled"),
               (2, 33, 512, False, "tiled"), (12, 40, 512, True, "gemv"), (5, 40, 512, True, "tiled")]


def test_matmul_matches_float64_in_the_interpreter():
    run_in_interpreter(check(SMALL_CASES, (132,)))


def test_decode_tiles_fill_the_gpu_narrowing_rows_first_then_splitting_k(monkeypatch):
    monkeypatch.setattr(k_products, "SMS", 132)
    for rows, groups, words in ((1024, 64, 8), (4096, 224, 8), (4096, 448, 4), (128256, 64, 8)):
        block_n, block_g, splits, _ = k_products.gemv_tiles(1, rows, groups, words)
        assert -(-rows // block_n) * splits >= 2 * 132
        assert splits == 1 or block_n == 2  # K is split only where the row tiles are at their narrowest
    assert k_products.gemv_tiles(1, 256, 64, 8)[2] > 1
    assert k_products.gemv_tiles(1, 128256, 64, 8)[:3] == (4, 16, 1)
    for m, rows, blocks in ((32, 4096, 128), (32, 256, 448), (16, 49152, 128)):
        block_m, block_n, splits, _ = k_products.tiled_tiles(m, rows, blocks)
        assert -(-rows // block_n) * -(-m // block_m) * splits >= 2 * 132 or blocks // splits < 32
    assert k_products.tiled_tiles(32, 256, 448)[2] > 1


def test_matmul_split_over_k_in_the_interpreter():
    # 1000 multiprocessors: these small products split K in 2 to 4
    run_in_interpreter(check([(1, 40, 2048, False, None), (2, 24, 2048, True, None),
                              (12, 24, 2048, True, "tiled")], (1000,)))


@pytest.mark.gpu
def test_matmul_matches_float64_on_cuda():
    real = [(m, n, 4096, False, None) for m in (1, 8, 32) for n in (4096, 1024)]
    real += [(1, 2048, 4096, True, None), (8, 2048, 4096, True, None), (1, 4096, 14336, False, None)]
    exec(check(SMALL_CASES + real, (132,)).format(device="cuda"), {})
