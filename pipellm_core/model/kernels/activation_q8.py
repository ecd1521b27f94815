"""llama.cpp's 8-bit rounding of activations (blocks of 32, fp16 scale) as one Triton kernel.

The torch expression of the same rounding (`activation_rounding._q8_blocks`) issues about a dozen
small kernels per matrix product; in a decode step of a small model they cost more than the
products themselves. These kernels read each activation once, with the torch expression's
numerics: d = amax / 127 in float32, q = round-half-even(x * (1 / d)), value q * fp16(d).
`round_q8_blocks` writes the values, cast to the input's dtype; `quantize` writes the 8-bit
quants themselves with their block scales (`Q8Activations`), which the integer products of
`q32_products` read as llama.cpp's CUDA kernels read its q8_1 blocks.

Why written here: the rounding is llama.cpp's own format, which no library offers for torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipellm_core.model.kernels import quant_matmul

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch path serves
    triton = None

BLOCKS_PER_PROGRAM = 8


@dataclass
class Q8Activations:
    """Activations [M, K] rounded to 8 bits per block of 32: the quants q (int8 [M, K]), each
    block's scale d (fp16(amax / 127), as float32 [M, K / 32]) and the sum of its quants s
    (float32 [M, K / 32], an integer). Value k of row m is q[m, k] * d[m, k // 32]."""
    q: torch.Tensor
    d: torch.Tensor
    s: torch.Tensor

    @classmethod
    def empty(cls, m: int, k: int, device) -> "Q8Activations":
        blocks = torch.empty(2, m, k // 32, dtype=torch.float32, device=device)
        return cls(torch.empty(m, k, dtype=torch.int8, device=device), blocks[0], blocks[1])

    def values(self) -> torch.Tensor:
        """The rounded activations, float32 [M, K] (exact)."""
        m, k = self.q.shape
        return (self.q.float().reshape(m, -1, 32) * self.d[:, :, None]).reshape(m, k)


def supports(x: torch.Tensor) -> bool:
    return (quant_matmul.ENABLED and x.dtype in (torch.float16, torch.float32)
            and (x.is_cuda or quant_matmul.INTERPRETED) and x.shape[-1] % 32 == 0)


if triton is not None:
    @triton.jit
    def round_half_even(v):
        """Round to nearest, ties to even, as torch.round does."""
        r = tl.floor(v + 0.5)
        tie = (r - v) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def q8_blocks(x):
        """x [G, 32] float32 -> (quants [G, 32] as float32 integers, block scales fp16(d) [G] as
        float32). Correctly rounded divisions, as torch's (Triton's `/` may be approximate on
        the GPU)."""
        d = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 127.0)
        inv = tl.where(d > 0, tl.math.div_rn(1.0, tl.where(d > 0, d, 1.0)), 0.0)
        return round_half_even(x * inv[:, None]), d.to(tl.float16).to(tl.float32)

    @triton.jit
    def store_q8(q, d16, offs, ok, blk, blk_ok, q_ptr, d_ptr, s_ptr):
        """Store a `q8_blocks` result: quants at `offs`, scales and sums of quants at `blk`."""
        tl.store(q_ptr + offs, q.to(tl.int8), mask=ok)
        tl.store(d_ptr + blk, d16, mask=blk_ok)
        tl.store(s_ptr + blk, tl.sum(q, axis=1), mask=blk_ok)

    @triton.jit
    def _q8_round_kernel(x_ptr, out_ptr, n_blocks, G: tl.constexpr):
        pid = tl.program_id(0)
        blk = pid * G + tl.arange(0, G)
        j = tl.arange(0, 32)
        offs = blk[:, None].to(tl.int64) * 32 + j[None, :]
        ok = (blk < n_blocks)[:, None]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        q, d16 = q8_blocks(x)
        tl.store(out_ptr + offs, (q * d16[:, None]).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _quantize_kernel(x_ptr, q_ptr, d_ptr, s_ptr, n_blocks, G: tl.constexpr):
        blk = tl.program_id(0) * G + tl.arange(0, G)
        offs = blk[:, None].to(tl.int64) * 32 + tl.arange(0, 32)[None, :]
        blk_ok = blk < n_blocks
        ok = blk_ok[:, None]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        q, d16 = q8_blocks(x)
        store_q8(q, d16, offs, ok, blk, blk_ok, q_ptr, d_ptr, s_ptr)


def round_q8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] (K a multiple of 32) rounded to 8 bits per block of 32, in x's dtype."""
    xc = x.contiguous()
    out = torch.empty_like(xc)
    n_blocks = xc.numel() // 32
    grid = (triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)
    # no fused multiply-adds: x * (1 / d) is rounded before the rounding to an integer, as in torch
    with quant_matmul.on_device_of(xc):
        _q8_round_kernel[grid](xc, out, n_blocks, G=BLOCKS_PER_PROGRAM, num_warps=1, enable_fp_fusion=False)
    return out


def quantize(x: torch.Tensor, out: Q8Activations | None = None) -> Q8Activations:
    """x [M, K] (K a multiple of 32) as 8-bit quants and block scales, the rounding of
    `round_q8_blocks` (an x that is rounded already keeps its quants: the rounding is idempotent
    up to the fp16 rounding of its values, far below half a quant step)."""
    xc = x.contiguous()
    m, k = xc.shape
    out = out or Q8Activations.empty(m, k, xc.device)
    n_blocks = m * k // 32
    with quant_matmul.on_device_of(xc):
        _quantize_kernel[(triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)](
            xc, out.q, out.d, out.s, n_blocks, G=BLOCKS_PER_PROGRAM, num_warps=1, enable_fp_fusion=False)
    return out
