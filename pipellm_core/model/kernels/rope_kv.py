"""Rotary position embedding and the key/value cache write of a decode step, in one Triton kernel.

The torch path splits the joined q/k/v projection, rotates q and k in several elementwise kernels
(each a float32 temporary), and scatters k and v into the cache with two more. Here one launch
reads each row of the projection once, rotates q and k, writes k and v into the cache at the
row's (slot, position), and returns the rotated q.

Numerics equal `apply_rope` in the transformer: inputs in float32, each rotated element
x[j] * cos + partner * (-/+ sin) in float32, rounded once to fp16; dimensions past rope_dim pass
through unchanged. (Compiled for a GPU, the multiply-add may be fused, which can move a result by
one fp16 step from the torch path's.)

Why written here: the rotation and the cache write by slot and position are specific to this
engine's cache layout; no library kernel does both on a joined projection.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - callers keep the torch path
    triton = None

STYLES = ("pairs", "halves")


def rope_and_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int,
                   n_kv_heads: int, head_dim: int, rope_dim: int, style: str) -> torch.Tensor:
    """Rotate q and k of a decode step, store k and v in the cache, return the rotated q.

    qkv: fp16 [B, (n_heads + 2 * n_kv_heads) * head_dim], the q heads, then k, then v; cos, sin:
    float32 [C, rope_dim / 2], the tables by position; positions, slots: integer [B]; k_cache,
    v_cache: fp16 [S, n_kv_heads, C, head_dim]. Style 'pairs' rotates (x[2i], x[2i+1]), 'halves'
    rotates (x[i], x[i + rope_dim/2]); dimensions from rope_dim on pass through.
    Writes k_cache[slots[b], :, positions[b]] and v_cache likewise; returns fp16 [B, n_heads, head_dim].
    """
    B = qkv.shape[0]
    H, KV, D, R = n_heads, n_kv_heads, head_dim, rope_dim
    assert style in STYLES and R % 2 == 0 and 0 < R <= D
    assert qkv.dtype == k_cache.dtype == v_cache.dtype == torch.float16, "fp16 projection and cache"
    assert qkv.shape == (B, (H + 2 * KV) * D) and qkv.stride(1) == 1
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[1] == KV and k_cache.shape[3] == D and k_cache.stride(3) == 1
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape and cos.shape[1] == R // 2
    assert cos.stride() == sin.stride() and cos.stride(1) == 1
    assert positions.shape == (B,) and slots.shape == (B,)
    q = torch.empty(B, H, D, dtype=torch.float16, device=qkv.device)
    with torch.cuda.device(qkv.device) if qkv.is_cuda else contextlib.nullcontext():
        _rope_and_store[(B, H + 2 * KV)](
            qkv, cos, sin, positions, slots, k_cache, v_cache, q,
            qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            q.stride(0), q.stride(1),
            H=H, KV=KV, D=D, D_PAD=triton.next_power_of_2(D), R=R, PAIRS=style == "pairs",
            num_warps=1)
    return q


if triton is not None:
    @triton.jit
    def _rope_and_store(qkv_ptr, cos_ptr, sin_ptr, positions_ptr, slots_ptr, k_ptr, v_ptr, q_ptr,
                        stride_row, stride_table, stride_cs, stride_ch, stride_cp, stride_qb, stride_qh,
                        H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                        R: tl.constexpr, PAIRS: tl.constexpr):
        b = tl.program_id(0)
        head = tl.program_id(1)  # q heads, then k heads, then v heads, as in the projection
        position = tl.load(positions_ptr + b).to(tl.int64)
        slot = tl.load(slots_ptr + b).to(tl.int64)
        j = tl.arange(0, D_PAD)
        in_head = j < D
        rotated = j < tl.where(head < H + KV, R, 0)  # v is not rotated
        if PAIRS:
            partner = j ^ 1
            angle = j // 2
            sign = tl.where(j % 2 == 0, -1.0, 1.0)
        else:
            partner = tl.where(j < R // 2, j + R // 2, j - R // 2)
            angle = j % (R // 2)
            sign = tl.where(j < R // 2, -1.0, 1.0)
        row = qkv_ptr + b * stride_row + head * D
        x = tl.load(row + j, mask=in_head, other=0.0).to(tl.float32)
        other = tl.load(row + partner, mask=rotated, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + position * stride_table + angle, mask=rotated, other=1.0)
        s = tl.load(sin_ptr + position * stride_table + angle, mask=rotated, other=0.0)
        out = tl.where(rotated, x * c + (sign * other) * s, x).to(tl.float16)

        # one destination per program; the scalar role becomes a bound on j (a live width)
        q_width = tl.where(head < H, D, 0)
        k_width = tl.where((head >= H) & (head < H + KV), D, 0)
        v_width = tl.where(head >= H + KV, D, 0)
        kv_head = tl.where(head < H + KV, head - H, head - H - KV)
        cache_at = slot * stride_cs + kv_head.to(tl.int64) * stride_ch + position * stride_cp + j
        tl.store(q_ptr + b * stride_qb + head * stride_qh + j, out, mask=j < q_width)
        tl.store(k_ptr + cache_at, out, mask=j < k_width)
        tl.store(v_ptr + cache_at, out, mask=j < v_width)
