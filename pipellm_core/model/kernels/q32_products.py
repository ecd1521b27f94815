"""Matrix products by Q4_0, Q4_1 and Q8_0 weights re-laid out for wide loads, in Triton.

A GGUF row of these types is a run of 18-, 20- or 34-byte blocks: an fp16 scale (and for Q4_1
an fp16 min) in front of 32 packed quants. Blocks of 18 and 34 bytes put the quants at odd
2-byte offsets, so a kernel reading them in place loads bytes one at a time and stays far from
the memory's bandwidth. At load time each row is rearranged, within the same number of bytes,
into the quants of the whole row first (4-byte words along K, every block's bytes in file order)
and then the scales (and the mins) as arrays of their own. No bit of a quant or a scale changes,
and `from_kernel_layout` undoes it exactly.

Kernels:
  - up to GEMV_MAX_ROWS rows of x (a decode step): a matrix-vector kernel that reads each weight
    word once for all rows of the step, keeps per-word partial sums in registers and reduces
    them once at the end; where the matrix has few rows for its length, programs split K and
    write float32 partials that a second kernel sums in a fixed order (deterministic, no atomics);
  - more rows (larger batches, prefill): a tiled kernel that expands tiles to fp16 in registers
    and multiplies them with `tl.dot`, float32 accumulation.
With swiglu, the kernels take the gate and up halves of one matrix and return silu(gate) * up
from their float32 sums, so the [M, 2h] product never goes through memory.

How the decode kernel decodes a quant without an integer-to-float conversion (a slow
instruction): the 4 bits at bit 4p of a word, masked in place and or-ed into the bits of the
float 2^23, make the float 2^23 + q * 2^(4p) exactly (p < 4; the upper half-word is shifted down
first). Subtracting 2^23 leaves q * 2^(4p), and the matching activation is scaled by 2^-4p once
per tile, for all weight rows; both steps are exact. Q8_0 does the same with bytes, after an xor
that biases the signed bytes by 128. Block scales and the Q4_0 offset of 8 are applied per word
of 8 (or 4) values: d * (sum q*x - 8 * sum x). The sums are float32 throughout; only the order of
the roundings differs from decoding each weight first.

Why written here: no maintained library multiplies by GGUF blocks in PyTorch on NVIDIA GPUs.
"""

from __future__ import annotations

import contextlib

import torch
from gguf import GGMLQuantizationType as GGMLType

try:
    import triton
    import triton.language as tl

    from pipellm_core.model.kernels.epilogues import silu_times, sum_splits
except ImportError:  # pragma: no cover - only the layout and `dequantize` serve then
    triton = None

TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0})

# per type: (bytes per block, bytes of quants per block, number of fp16 fields per block)
_BLOCKS = {GGMLType.Q4_0: (18, 16, 1), GGMLType.Q4_1: (20, 16, 2), GGMLType.Q8_0: (34, 32, 1)}
GEMV_MAX_ROWS = 8
SMS = 132  # multiprocessors of the target GPU; sizes the split over K


def _fields(qtype, raw_blocks: torch.Tensor):
    """GGUF blocks [N, nb, block bytes] -> (quants [N, nb, quant bytes], [fp16 fields as bytes])."""
    size, quant_bytes, n_fields = _BLOCKS[qtype]
    head = size - quant_bytes
    return raw_blocks[:, :, head:], [raw_blocks[:, :, 2 * i:2 * i + 2] for i in range(n_fields)]


def to_kernel_layout(raw: torch.Tensor, qtype) -> torch.Tensor:
    """uint8 [N, row bytes] of GGUF blocks -> the same bytes per row as all quants, then the
    scales (then, Q4_1, the mins)."""
    size = _BLOCKS[qtype][0]
    n = raw.shape[0]
    quants, fields = _fields(qtype, raw.reshape(n, -1, size))
    return torch.cat([quants.reshape(n, -1)] + [f.reshape(n, -1) for f in fields], dim=1)


def from_kernel_layout(kl: torch.Tensor, qtype) -> torch.Tensor:
    """The inverse of `to_kernel_layout`: GGUF blocks in file order."""
    size, quant_bytes, n_fields = _BLOCKS[qtype]
    n, row = kl.shape
    nb = row // size
    quants = kl[:, :nb * quant_bytes].reshape(n, nb, quant_bytes)
    fields = [kl[:, nb * (quant_bytes + 2 * i):nb * (quant_bytes + 2 * i + 2)].reshape(n, nb, 2)
              for i in range(n_fields)]
    return torch.cat(fields + [quants], dim=2).reshape(n, row)


def _scales(kl: torch.Tensor, qtype, nb: int, field: int) -> torch.Tensor:
    start = nb * (_BLOCKS[qtype][1] + 2 * field)
    return kl[:, start:start + 2 * nb].contiguous().view(torch.float16).float()


def dequantize(kl: torch.Tensor, qtype, k: int, dtype) -> torch.Tensor:
    """[N, k] weights decoded from the kernel layout (torch ops; the reference path)."""
    n, nb = kl.shape[0], k // 32
    quant_bytes = _BLOCKS[qtype][1]
    q = kl[:, :nb * quant_bytes].reshape(n, nb, quant_bytes)
    d = _scales(kl, qtype, nb, 0)[:, :, None]
    if qtype == GGMLType.Q8_0:
        w = d * q.contiguous().view(torch.int8).float()
    else:
        values = torch.cat([q & 0x0F, q >> 4], dim=-1).float()  # values j and j + 16 share byte j
        w = d * (values - 8) if qtype == GGMLType.Q4_0 else d * values + _scales(kl, qtype, nb, 1)[:, :, None]
    return w.reshape(n, k).to(dtype)


if triton is not None:
    _F23 = tl.constexpr(8388608.0)  # 2^23: a float whose low mantissa bits are an integer's bits

    @triton.jit
    def _load_words(w8, w32, row_starts, words, ok, ALIGNED: tl.constexpr):
        """int32 quant words at byte offsets row_starts + 4 * words (tensors that broadcast). Rows
        start 4-byte aligned unless a row holds an odd number of 18- or 34-byte blocks; then four
        byte loads make each word."""
        if ALIGNED:
            return tl.load(w32 + (row_starts // 4 + words), mask=ok, other=0)
        else:
            base = w8 + (row_starts + 4 * words)
            b0 = tl.load(base, mask=ok, other=0).to(tl.int32)
            b1 = tl.load(base + 1, mask=ok, other=0).to(tl.int32)
            b2 = tl.load(base + 2, mask=ok, other=0).to(tl.int32)
            b3 = tl.load(base + 3, mask=ok, other=0).to(tl.int32)
            return b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)

    @triton.jit
    def _gemv_rows(x_ptr, w8, w32, w16, rows, row_ok, M, stride_xm, row_bytes, w_start, w_end,
                   NB: tl.constexpr, FOUR_BIT: tl.constexpr, HAS_MIN: tl.constexpr, ALIGNED: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        """[BLOCK_M, BLOCK_N] float32: rows `rows` of W times x over quant words [w_start, w_end)."""
        WPB: tl.constexpr = 4 if FOUR_BIT else 8  # words per block of 32 values
        QB: tl.constexpr = NB * WPB * 4  # bytes of quants in a row (scales follow)
        rm = tl.arange(0, BLOCK_M)
        x_rows = x_ptr + rm[:, None, None].to(tl.int64) * stride_xm
        m_ok = (rm < M)[:, None, None]
        rows64 = rows.to(tl.int64)
        scale_rows = w16 + rows64[:, None] * (row_bytes // 2) + QB // 2
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W), dtype=tl.float32)
        for w0 in range(w_start, w_end, BLOCK_W):
            words = w0 + tl.arange(0, BLOCK_W)
            w_ok = words < w_end
            ok = row_ok[:, None] & w_ok[None, :]
            q = _load_words(w8, w32, rows64[:, None] * row_bytes, words[None, :], ok, ALIGNED)
            blk = words // WPB
            d = tl.load(scale_rows + blk[None, :], mask=ok, other=0.0).to(tl.float32)
            # k of the first value of each word
            k0 = blk * 32 + (words % WPB) * 4
            x_ok = m_ok & w_ok[None, None, :]
            s_q = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W), dtype=tl.float32)
            s_x = tl.zeros((BLOCK_M, 1, BLOCK_W), dtype=tl.float32)
            if FOUR_BIT:
                q_hi = q >> 16
                for p in tl.static_range(8):
                    if p < 4:
                        bits = (q & (15 << (4 * p))) | 0x4B000000
                    else:
                        bits = (q_hi & (15 << (4 * (p - 4)))) | 0x4B000000
                    v = bits.to(tl.float32, bitcast=True) - _F23  # q * 2^(4 * (p % 4))
                    # bit 4p of a word is byte p // 2's low (p even) or high nibble: value
                    # p // 2 (+ 16) of the block
                    kk = k0 + (p // 2) + 16 * (p % 2)
                    xv = tl.load(x_rows + kk[None, None, :], mask=x_ok, other=0.0).to(tl.float32)
                    s_x += xv
                    s_q += v[None, :, :] * (xv * (1.0 / (1 << (4 * (p % 4)))))
                if HAS_MIN:
                    mn = tl.load(scale_rows + NB + blk[None, :], mask=ok, other=0.0).to(tl.float32)
                    acc += d[None, :, :] * s_q + mn[None, :, :] * s_x
                else:
                    acc += d[None, :, :] * (s_q - 8.0 * s_x)
            else:
                qb = q ^ -2139062144  # 0x80808080: each signed byte + 128, as an unsigned byte
                qb_hi = qb >> 16
                for p in tl.static_range(4):
                    if p < 2:
                        bits = (qb & (255 << (8 * p))) | 0x4B000000
                    else:
                        bits = (qb_hi & (255 << (8 * (p - 2)))) | 0x4B000000
                    # q * 2^(8 * (p % 2))
                    v = bits.to(tl.float32, bitcast=True) - (_F23 + 128.0 * (1 << (8 * (p % 2))))
                    xv = tl.load(x_rows + (k0 + p)[None, None, :], mask=x_ok, other=0.0).to(tl.float32)
                    s_q += v[None, :, :] * (xv * (1.0 / (1 << (8 * (p % 2)))))
                acc += d[None, :, :] * s_q
        return tl.sum(acc, axis=2)

    @triton.jit
    def _gemv_kernel(x_ptr, w8, w32, w16, out_ptr, M, N, stride_xm, row_bytes, words_per_split, stride_os,
                     NB: tl.constexpr, FOUR_BIT: tl.constexpr, HAS_MIN: tl.constexpr, ALIGNED: tl.constexpr,
                     SWIGLU: tl.constexpr, SPLIT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        """Programs (row tiles, K splits). SPLIT: out is float32 partials [splits, M, rows of W]
        (both halves when SWIGLU; the reduce kernel pairs them); else out is fp16 [M, N]."""
        WPB: tl.constexpr = 4 if FOUR_BIT else 8
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        w_start = pid_s * words_per_split
        w_end = tl.minimum(w_start + words_per_split, NB * WPB)
        rm = tl.arange(0, BLOCK_M)
        o_ok = (rm < M)[:, None] & n_ok[None, :]
        acc = _gemv_rows(x_ptr, w8, w32, w16, rn, n_ok, M, stride_xm, row_bytes, w_start, w_end,
                         NB, FOUR_BIT, HAS_MIN, ALIGNED, BLOCK_M, BLOCK_N, BLOCK_W)
        if SPLIT:
            rows_w = N * 2 if SWIGLU else N
            part = out_ptr + pid_s.to(tl.int64) * stride_os + rm[:, None] * rows_w + rn[None, :]
            tl.store(part, acc, mask=o_ok)
            if SWIGLU:
                up = _gemv_rows(x_ptr, w8, w32, w16, rn + N, n_ok, M, stride_xm, row_bytes, w_start, w_end,
                                NB, FOUR_BIT, HAS_MIN, ALIGNED, BLOCK_M, BLOCK_N, BLOCK_W)
                tl.store(part + N, up, mask=o_ok)
        else:
            if SWIGLU:
                up = _gemv_rows(x_ptr, w8, w32, w16, rn + N, n_ok, M, stride_xm, row_bytes, w_start, w_end,
                                NB, FOUR_BIT, HAS_MIN, ALIGNED, BLOCK_M, BLOCK_N, BLOCK_W)
                acc = silu_times(acc, up)
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.float16), mask=o_ok)

    @triton.jit
    def _tiled_rows(x_ptr, w8, w32, w16, rm, rows, row_ok, M, stride_xm, row_bytes,
                    NB: tl.constexpr, FOUR_BIT: tl.constexpr, HAS_MIN: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        """[BLOCK_M, BLOCK_N] float32: x rows `rm` times W rows `rows`, over all of K. Each bit
        position p of a word makes one [BLOCK_W, BLOCK_N] fp16 tile, multiplied by the x values
        that sit at that position (so K runs in the words' order, not the file's)."""
        WPB: tl.constexpr = 4 if FOUR_BIT else 8
        QB: tl.constexpr = NB * WPB * 4
        x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
        m_ok = (rm < M)[:, None]
        rows64 = rows.to(tl.int64)
        scale_rows = w16 + rows64[None, :] * (row_bytes // 2) + QB // 2
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for w0 in range(0, NB * WPB, BLOCK_W):
            words = w0 + tl.arange(0, BLOCK_W)
            w_ok = words < NB * WPB
            ok = w_ok[:, None] & row_ok[None, :]
            q = _load_words(w8, w32, rows64[None, :] * row_bytes, words[:, None], ok, ALIGNED)
            blk = words // WPB
            d = tl.load(scale_rows + blk[:, None], mask=ok, other=0.0).to(tl.float32)
            k0 = blk * 32 + (words % WPB) * 4
            x_ok = m_ok & w_ok[None, :]
            if FOUR_BIT:
                if HAS_MIN:
                    mn = tl.load(scale_rows + NB + blk[:, None], mask=ok, other=0.0).to(tl.float32)
                for p in tl.static_range(8):
                    nib = ((q >> (4 * p)) & 15) | 0x4B000000
                    if HAS_MIN:
                        w = d * (nib.to(tl.float32, bitcast=True) - _F23) + mn
                    else:
                        w = d * (nib.to(tl.float32, bitcast=True) - (_F23 + 8.0))
                    xv = tl.load(x_rows + (k0 + (p // 2) + 16 * (p % 2))[None, :], mask=x_ok, other=0.0)
                    acc += tl.dot(xv, w.to(tl.float16))
            else:
                for p in tl.static_range(4):
                    byte = ((q >> (8 * p)) & 255) ^ 128  # the signed byte + 128
                    v = (byte | 0x4B000000).to(tl.float32, bitcast=True) - (_F23 + 128.0)
                    xv = tl.load(x_rows + (k0 + p)[None, :], mask=x_ok, other=0.0)
                    acc += tl.dot(xv, (d * v).to(tl.float16))
        return acc

    @triton.jit
    def _tiled_kernel(x_ptr, w8, w32, w16, out_ptr, M, N, stride_xm, row_bytes,
                      NB: tl.constexpr, FOUR_BIT: tl.constexpr, HAS_MIN: tl.constexpr, ALIGNED: tl.constexpr,
                      SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        acc = _tiled_rows(x_ptr, w8, w32, w16, rm, rn, n_ok, M, stride_xm, row_bytes,
                          NB, FOUR_BIT, HAS_MIN, ALIGNED, BLOCK_M, BLOCK_N, BLOCK_W)
        if SWIGLU:
            up = _tiled_rows(x_ptr, w8, w32, w16, rm, rn + N, n_ok, M, stride_xm, row_bytes,
                             NB, FOUR_BIT, HAS_MIN, ALIGNED, BLOCK_M, BLOCK_N, BLOCK_W)
            acc = silu_times(acc, up)
        o_ok = (rm < M)[:, None] & n_ok[None, :]
        tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(tl.float16), mask=o_ok)


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def gemv_tiles(m: int, n_rows: int, words: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_W, splits, num_warps) of the decode kernel for m rows of x, n_rows rows
    of W to compute (h for swiglu) and `words` quant words per row. About 8 words a thread;
    narrower row tiles, then
    splits over K, until the programs fill the multiprocessors twice over. Measured on an H200
    at M = 1: (8, 128, 1, 4) best for 4096 x 4096 and 4096 x 14336, (4, 256, 1, 8) for
    1024 x 4096, among BLOCK_N 4..32, BLOCK_W 128/256, splits 1..8, 4 or 8 warps; at M = 8,
    (16, 128, 1, 8) for 4096 x 4096 and (16, 64, 1, 4) for 4096 x 14336 (earlier sweep)."""
    num_warps = 4 if m == 1 else 8
    block_w = min(128, max(32, _pow2_at_least(words)))
    words_per_thread = 8
    block_n = max(2, words_per_thread * 32 * num_warps // block_w)
    while block_n > 2 and -(-n_rows // block_n) < 2 * SMS:
        block_n //= 2
    tiles = -(-n_rows // block_n)
    steps = -(-words // block_w)
    splits = 1
    while tiles * splits < 2 * SMS and steps // (splits * 2) >= 2:
        splits *= 2
    return block_n, block_w, splits, num_warps


def tiled_tiles(m: int, n_rows: int, words: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_W, num_warps) of the tiled kernel."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64 if m <= 64 else 128
    block_w = 16 if words < 32 else 32
    return block_m, block_n, block_w, 4


def _on_device_of(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def matmul(x: torch.Tensor, w: torch.Tensor, qtype, n: int, k: int, *, swiglu: bool = False,
           kernel: str | None = None) -> torch.Tensor:
    """x fp16 [M, k] (contiguous) times the transpose of the [n, k] matrix whose kernel layout is
    `w` (uint8 [n, row bytes]): fp16 [M, n], float32 sums. With swiglu, rows 0..h-1 of W are the
    gate and rows h..2h-1 the up projection (n = 2h): fp16 [M, h] = silu(gate) * up.
    `kernel` ("gemv" or "tiled") overrides the choice by M (tests and probes)."""
    assert qtype in TYPES and k % 32 == 0 and x.dtype == torch.float16 and x.shape[1] == k
    assert w.dtype == torch.uint8 and w.is_contiguous() and x.stride(1) == 1
    size, quant_bytes, n_fields = _BLOCKS[qtype]
    nb = k // 32
    row_bytes = nb * size
    assert w.shape == (n, row_bytes), (w.shape, n, row_bytes)
    m = x.shape[0]
    rows = n // 2 if swiglu else n
    out = torch.empty(m, rows, dtype=torch.float16, device=x.device)
    aligned = row_bytes % 4 == 0 and w.storage_offset() % 4 == 0
    w32 = w.view(torch.int32) if aligned else w
    w16 = w.view(torch.float16)
    four_bit = qtype != GGMLType.Q8_0
    has_min = qtype == GGMLType.Q4_1
    words = nb * quant_bytes // 4
    kernel = kernel or ("gemv" if m <= GEMV_MAX_ROWS else "tiled")
    with _on_device_of(x):
        if kernel == "gemv":
            block_n, block_w, splits, num_warps = gemv_tiles(m, rows, words)
            words_per_split = -(-words // (splits * block_w)) * block_w
            splits = -(-words // words_per_split)
            if splits > 1:
                part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
                target, stride_os = part, part.stride(0)
            else:
                target, stride_os = out, 0
            grid = (triton.cdiv(rows, block_n), splits)
            _gemv_kernel[grid](x, w, w32, w16, target, m, rows, x.stride(0), row_bytes, words_per_split,
                               stride_os, NB=nb, FOUR_BIT=four_bit, HAS_MIN=has_min, ALIGNED=aligned,
                               SWIGLU=swiglu, SPLIT=splits > 1, BLOCK_M=_pow2_at_least(m), BLOCK_N=block_n,
                               BLOCK_W=block_w, num_warps=num_warps)
            if splits > 1:
                sum_splits(part, out, swiglu)
        else:
            block_m, block_n, block_w, num_warps = tiled_tiles(m, rows, words)
            grid = (triton.cdiv(rows, block_n), triton.cdiv(m, block_m))
            _tiled_kernel[grid](x, w, w32, w16, out, m, rows, x.stride(0), row_bytes,
                                NB=nb, FOUR_BIT=four_bit, HAS_MIN=has_min, ALIGNED=aligned, SWIGLU=swiglu,
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w, num_warps=num_warps)
    return out
