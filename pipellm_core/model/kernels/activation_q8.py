"""llama.cpp's 8-bit rounding of activations (blocks of 32, fp16 scale) as one Triton kernel.

The torch expression of the same rounding (`activation_rounding._q8_blocks`) issues about a dozen
small kernels per matrix product; in a decode step of a small model they cost more than the
products themselves. This kernel reads each activation once and writes its rounded value, with
the torch expression's numerics: d = amax / 127 in float32, q = round-half-even(x * (1 / d)),
value q * fp16(d), cast to the input's dtype.

Why written here: the rounding is llama.cpp's own format, which no library offers for torch.
"""

from __future__ import annotations

import torch

from pipellm_core.model.kernels import quant_matmul

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch path serves
    triton = None

BLOCKS_PER_PROGRAM = 8


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
    def _q8_round_kernel(x_ptr, out_ptr, n_blocks, G: tl.constexpr):
        pid = tl.program_id(0)
        blk = pid * G + tl.arange(0, G)
        j = tl.arange(0, 32)
        offs = blk[:, None].to(tl.int64) * 32 + j[None, :]
        ok = (blk < n_blocks)[:, None]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        # correctly rounded divisions, as torch's (Triton's `/` may be approximate on the GPU)
        d = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 127.0)
        inv = tl.where(d > 0, tl.math.div_rn(1.0, tl.where(d > 0, d, 1.0)), 0.0)
        q = round_half_even(x * inv[:, None])
        d16 = d.to(tl.float16).to(tl.float32)
        tl.store(out_ptr + offs, (q * d16[:, None]).to(out_ptr.dtype.element_ty), mask=ok)


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
