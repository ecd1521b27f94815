"""Residual add, RMSNorm and llama.cpp's 8-bit activation rounding as one Triton kernel.

Each layer of the transformer does, twice: h = h + delta (the float32 residual stream), then
x = fp16(rms_norm(h) * weight), then, before the quantized products, llama.cpp's rounding of x
to 8 bits per block of 32 (`activation_rounding._q8_blocks`). In torch that is about twenty
small kernels per norm; here one program per row reads h and delta once, writes the updated h
and the rounded x, with the torch expression's numerics: float32 throughout, x * (1 / sqrt(mean
of squares + eps)) * weight with correctly rounded division and square root, round to fp16,
then d = amax / 127, q = round-half-even(x * (1 / d)), value q * fp16(d). Only the order of the
sum of squares differs from torch's.

Why written here: the rounding is llama.cpp's own format, which no library offers for torch,
and fusing it with the norm is what removes the small kernels.
"""

from __future__ import annotations

import torch

from pipellm_core.model import activation_rounding
from pipellm_core.model.kernels import activation_q8, quant_matmul

try:
    import triton
    import triton.language as tl

    from pipellm_core.model.kernels.activation_q8 import q8_blocks, store_q8
except ImportError:  # pragma: no cover - the torch path serves
    triton = None

# A row up to this wide is held in registers by its program; wider rows are read in chunks
# of this size twice (once for the sum of squares, once to normalize).
MAX_TILE = 8192


def supports(h: torch.Tensor, round_q8: bool) -> bool:
    return (quant_matmul.ENABLED and h.dtype == torch.float32 and h.is_contiguous()
            and (h.is_cuda or quant_matmul.INTERPRETED) and (not round_q8 or h.shape[-1] % 32 == 0))


if triton is not None:
    @triton.jit
    def _normalize_and_store(x, offs, ok, inv_rms, w_ptr, out_ptr, q_ptr, d_ptr, s_ptr,
                             ROUND_Q8: tl.constexpr, Q8_OUT: tl.constexpr):
        """x [G, 32] (float32, h + delta) -> fp16 rms_norm(x) * weight, optionally q8-rounded
        (and its quants, block scales and sums stored)."""
        w = tl.load(w_ptr + offs, mask=ok, other=0.0)
        y = (x * inv_rms * w).to(tl.float16)
        if ROUND_Q8:
            q, d16 = q8_blocks(y.to(tl.float32))
            y = (q * d16[:, None]).to(tl.float16)
            if Q8_OUT:
                blk = tl.max(offs, axis=1) // 32
                store_q8(q, d16, offs, ok, blk, tl.max(ok.to(tl.int32), axis=1) > 0, q_ptr, d_ptr, s_ptr)
        tl.store(out_ptr + offs, y, mask=ok)

    @triton.jit
    def _add_rms_norm_kernel(h_ptr, delta_ptr, w_ptr, out_ptr, q_ptr, d_ptr, s_ptr, E, eps,
                             HAS_DELTA: tl.constexpr, ROUND_Q8: tl.constexpr, Q8_OUT: tl.constexpr,
                             TILE: tl.constexpr, ONE_TILE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        h_row, out_row = h_ptr + row * E, out_ptr + row * E
        d_row = delta_ptr + row * E
        q_row, qd_row, qs_row = q_ptr + row * E, d_ptr + row * (E // 32), s_ptr + row * (E // 32)
        # a tile as [blocks of 32, 32], so that the q8 blocks are reductions over axis 1
        tile = tl.arange(0, TILE // 32)[:, None] * 32 + tl.arange(0, 32)[None, :]
        if ONE_TILE:
            ok = tile < E
            x = tl.load(h_row + tile, mask=ok, other=0.0)
            if HAS_DELTA:
                x = x + tl.load(d_row + tile, mask=ok, other=0.0).to(tl.float32)
                tl.store(h_row + tile, x, mask=ok)
            ss = tl.sum(tl.sum(x * x, axis=1), axis=0)
            inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(ss, E.to(tl.float32)) + eps))
            _normalize_and_store(x, tile, ok, inv_rms, w_ptr, out_row, q_row, qd_row, qs_row, ROUND_Q8, Q8_OUT)
        else:
            acc = tl.zeros((TILE // 32, 32), tl.float32)
            for start in range(0, E, TILE):
                offs = start + tile
                ok = offs < E
                x = tl.load(h_row + offs, mask=ok, other=0.0)
                if HAS_DELTA:
                    x = x + tl.load(d_row + offs, mask=ok, other=0.0).to(tl.float32)
                acc += x * x
            ss = tl.sum(tl.sum(acc, axis=1), axis=0)
            inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(ss, E.to(tl.float32)) + eps))
            # h is read again, not re-read after being written, so no program reads its own stores
            for start in range(0, E, TILE):
                offs = start + tile
                ok = offs < E
                x = tl.load(h_row + offs, mask=ok, other=0.0)
                if HAS_DELTA:
                    x = x + tl.load(d_row + offs, mask=ok, other=0.0).to(tl.float32)
                    tl.store(h_row + offs, x, mask=ok)
                _normalize_and_store(x, offs, ok, inv_rms, w_ptr, out_row, q_row, qd_row, qs_row, ROUND_Q8, Q8_OUT)


def tile_for(E: int) -> tuple[int, int]:
    """(tile width, warps) for rows of E values: the whole row up to MAX_TILE, ~16 values a thread."""
    tile = min(MAX_TILE, max(32, triton.next_power_of_2(E)))
    return tile, min(8, max(1, tile // 512))


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 round_q8: bool, out: torch.Tensor | None = None,
                 q8_out: activation_q8.Q8Activations | None = None) -> torch.Tensor:
    """h [..., E] float32, updated in place to h + delta (delta fp16/fp32 of h's shape, or None:
    no add). Returns fp16 rms_norm(h) * weight (into `out` when given), then, when round_q8,
    rounded as llama.cpp rounds activations to 8 bits per block of 32 (E a multiple of 32);
    `q8_out` (with round_q8, rows of h by E) receives the rounding's quants and scales too."""
    E = h.shape[-1]
    if out is None:
        out = torch.empty(h.shape, dtype=torch.float16, device=h.device)
    assert q8_out is None or (round_q8 and q8_out.q.shape == (h.numel() // E, E))
    if not supports(h, round_q8):
        if delta is not None:
            h.add_(delta)
        y = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight).to(torch.float16)
        out.copy_(activation_rounding._q8_blocks(y, 32).to(torch.float16) if round_q8 else y)
        if q8_out is not None:
            activation_q8.quantize(y.reshape(-1, E), q8_out)
        return out
    assert out.dtype == torch.float16 and out.is_contiguous() and out.shape == h.shape
    assert weight.dtype == torch.float32 and weight.shape == (E,)
    if delta is not None:
        assert delta.shape == h.shape and delta.dtype in (torch.float16, torch.float32)
        delta = delta.contiguous()
    tile, warps = tile_for(E)
    rows = h.numel() // E
    q8 = (q8_out.q, q8_out.d, q8_out.s) if q8_out is not None else (out, out, out)
    with quant_matmul.on_device_of(h):
        # no fused multiply-adds: each product is rounded on its own, as in torch
        _add_rms_norm_kernel[(rows,)](h, delta if delta is not None else h, weight.contiguous(), out, *q8, E, eps,
                                      HAS_DELTA=delta is not None, ROUND_Q8=round_q8, Q8_OUT=q8_out is not None,
                                      TILE=tile, ONE_TILE=E <= tile, num_warps=warps, enable_fp_fusion=False)
    return out
