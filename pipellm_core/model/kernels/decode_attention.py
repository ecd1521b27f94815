"""Decode-step attention that reads the key/value cache where it lies, by slot, in Triton.

The torch path gathers each row's keys and values out of the cache (`kc[slots, :, :ctx_len]`)
into new tensors and then runs a masked attention over them: at 8B and batch 32 a step copies
about 2 GB before it computes anything. Here each row's slot and length are read on the device
and the cache is read once, in place, as split-KV flash-decoding:

- pass 1, grid (B, KV, n_splits): a program takes one row, one key/value head and one stretch of
  positions ("split"); all G query heads of that key/value head are one [G, D] tile (padded to
  16 rows for the tensor cores), so each key and value is read once for the whole group. It keeps
  a running maximum and sum in float32 and writes its partial (max, sum, unnormalized output)
  to a float32 workspace. Splits that start at or past the row's length exit without work.
- pass 2, grid (B, H): merges a row's valid splits into the output, in fixed order.

The grid and the workspace depend only on (B, H, ctx_len), never on the lengths, so a step can
be captured in a CUDA graph per context bucket. There are no atomics: results are the same bit
for bit from run to run.

Numerics: q.k in float32 from fp16 inputs; softmax and all sums in float32; the probabilities
enter the product with V as fp16 (as FlashAttention does), accumulated in float32; the output is
rounded once to fp16.

Why written here: PyTorch's fused attention takes dense [B, heads, ctx, D] keys and values, so
reading the cache by slot needs its own kernel.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - callers keep the torch path
    triton = None

LOG2_E = 1.4426950408889634
BLOCK_N = 64  # positions per loop iteration of pass 1; splits are whole multiples of it
MIN_SPLIT = 128  # fewest positions a split holds, so the merge stays small next to the reads
# Splits are added until B * H * n_splits reaches this (about 2 programs per SM of an H200 at
# 4 query heads per key/value head), or splits reach MIN_SPLIT positions.
TARGET_HEAD_SPLITS = 2048
MERGE_CHUNK = 16  # splits merged per iteration of pass 2
HEAD_DIMS = (32, 64, 96, 128, 256)


def split_shape(B: int, H: int, ctx_len: int) -> tuple[int, int]:
    """(positions per split, number of splits) for a step of B rows, H query heads, ctx_len."""
    n = max(1, min(triton.cdiv(ctx_len, MIN_SPLIT), triton.cdiv(TARGET_HEAD_SPLITS, B * H)))
    split_len = triton.cdiv(triton.cdiv(ctx_len, n), BLOCK_N) * BLOCK_N
    return split_len, triton.cdiv(ctx_len, split_len)


def workspace_size(B: int, H: int, D: int, ctx_len: int) -> int:
    """Float32 elements of the workspace `decode_attention` needs for this shape."""
    _, n_splits = split_shape(B, H, ctx_len)
    return B * H * n_splits * (D + 2)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slots: torch.Tensor, lengths: torch.Tensor, ctx_len: int, scale: float,
                     workspace: torch.Tensor | None = None, window: int = 0,
                     softcap: float = 0.0) -> torch.Tensor:
    """Attention of one new query per row over that row's cached positions.

    q: fp16 [B, H, D]; k_cache, v_cache: fp16 [S, KV, C, D] with H a multiple of KV and D in
    {32, 64, 96, 128, 256}; slots: integer [B], the cache slot of each row; lengths: integer [B], row b
    attends positions 0 .. lengths[b] - 1 (read on the device, clamped to ctx_len; a row of length
    0 gives zeros); ctx_len: static bound on the lengths, at most C; workspace: float32, at least
    `workspace_size(B, H, D, ctx_len)` elements (allocated here when None); window: where set, a
    row attends only its last `window` positions (a sliding-window layer), and the positions
    before them are not read: the splits that hold none of them exit without work; softcap:
    where set, the scores are softcap * tanh(q k^T * scale / softcap) (Gemma 2).
    Returns fp16 [B, H, D] = softmax(scores) v over the attended positions.
    """
    B, H, D = q.shape
    S, KV, C, Dk = k_cache.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype == torch.float16, "fp16 query and cache"
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()
    assert Dk == D and D in HEAD_DIMS and H % KV == 0 and 0 < ctx_len <= C
    assert q.stride(2) == 1 and k_cache.stride(3) == 1
    assert slots.shape == (B,) and lengths.shape == (B,) and window >= 0 and softcap >= 0
    G = H // KV
    split_len, n_splits = split_shape(B, H, ctx_len)
    need = B * H * n_splits * (D + 2)
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.float32, device=q.device)
    assert workspace.dtype == torch.float32 and workspace.is_contiguous() and workspace.numel() >= need
    out = torch.empty(B, H, D, dtype=torch.float16, device=q.device)
    m_offset = B * H * n_splits * D
    l_offset = m_offset + B * H * n_splits
    D_PAD = triton.next_power_of_2(D)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _attend_split[(B, KV, n_splits)](
            q, k_cache, v_cache, slots, lengths, workspace,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            ctx_len, split_len, n_splits, H, m_offset, l_offset, scale * LOG2_E, window,
            scale / softcap if softcap else 0.0, softcap * LOG2_E, SOFTCAP=softcap > 0,
            G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, D_PAD=D_PAD, BLOCK_N=BLOCK_N,
            num_warps=4, num_stages=2)
        _merge_splits[(B, H)](
            workspace, out, lengths, out.stride(0), out.stride(1),
            ctx_len, split_len, n_splits, H, m_offset, l_offset, window,
            D=D, D_PAD=D_PAD, CHUNK=MERGE_CHUNK, num_warps=4)
    return out


if triton is not None:
    @triton.jit
    def _attend_split(q_ptr, k_ptr, v_ptr, slots_ptr, lengths_ptr, ws_ptr,
                      stride_qb, stride_qh, stride_cs, stride_ch, stride_cp,
                      ctx_len, split_len, n_splits, H, m_offset, l_offset, qk_scale, window,
                      cap_in, cap_out, SOFTCAP: tl.constexpr,
                      G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                      BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.minimum(tl.load(lengths_ptr + b).to(tl.int32), ctx_len)
        first = tl.where(window > 0, tl.maximum(length - window, 0), 0)  # first attended position
        start = tl.maximum(split * split_len, first)
        end = tl.minimum(split * split_len + split_len, length)
        # a split outside the row's attended positions loads and stores nothing: no query rows are live
        live_heads = tl.where(start < end, G, 0)

        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        head = kv_head * G + g
        d_ok = d < D
        q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + d[None, :],
                    mask=(g[:, None] < live_heads) & d_ok[None, :], other=0.0)
        slot = tl.load(slots_ptr + b).to(tl.int64)
        base = slot * stride_cs + kv_head * stride_ch

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid = n < end
            offsets = base + n[:, None].to(tl.int64) * stride_cp + d[None, :]
            tile_ok = valid[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + offsets, mask=tile_ok, other=0.0)
            s = tl.dot(q, tl.trans(k))
            if SOFTCAP:  # cap * tanh(s * scale / cap), tanh(x) = 1 - 2 / (exp(2x) + 1)
                s = cap_out * (1.0 - 2.0 / (tl.exp(2.0 * s * cap_in) + 1.0))  # log2 domain
            else:
                s = s * qk_scale  # log2 domain
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + offsets, mask=tile_ok, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
            m_i = m_new

        row = (b * H + head) * n_splits + split
        keep = g < live_heads
        tl.store(ws_ptr + row[:, None] * D + d[None, :], acc, mask=keep[:, None] & d_ok[None, :])
        tl.store(ws_ptr + m_offset + row, m_i, mask=keep)
        tl.store(ws_ptr + l_offset + row, l_i, mask=keep)

    @triton.jit
    def _merge_splits(ws_ptr, out_ptr, lengths_ptr, stride_ob, stride_oh,
                      ctx_len, split_len, n_splits, H, m_offset, l_offset, window,
                      D: tl.constexpr, D_PAD: tl.constexpr, CHUNK: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        length = tl.minimum(tl.load(lengths_ptr + b).to(tl.int32), ctx_len)
        n_valid = (length + split_len - 1) // split_len  # splits pass 1 wrote for this row: from
        first_valid = tl.where(window > 0, tl.maximum(length - window, 0), 0) // split_len
        first = (b * H + h) * n_splits
        c = tl.arange(0, CHUNK)
        d = tl.arange(0, D_PAD)
        d_ok = d < D

        m_run = tl.max(tl.full([CHUNK], float("-inf"), tl.float32), 0)
        l_run = tl.sum(tl.zeros([CHUNK], tl.float32), 0)
        acc = tl.zeros([D_PAD], tl.float32)
        for c0 in range(first_valid, n_valid, CHUNK):
            split = c0 + c
            ok = split < n_valid
            m = tl.load(ws_ptr + m_offset + first + split, mask=ok, other=float("-inf"))
            l = tl.load(ws_ptr + l_offset + first + split, mask=ok, other=0.0)
            part = tl.load(ws_ptr + (first + split)[:, None] * D + d[None, :],
                           mask=ok[:, None] & d_ok[None, :], other=0.0)
            m_new = tl.maximum(m_run, tl.max(m, 0))
            alpha = tl.exp2(m_run - m_new)
            w = tl.exp2(m - m_new)
            l_run = l_run * alpha + tl.sum(w * l, 0)
            acc = acc * alpha + tl.sum(w[:, None] * part, 0)
            m_run = m_new

        out = tl.where(l_run > 0, acc / l_run, 0.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(tl.float16), mask=d_ok)
