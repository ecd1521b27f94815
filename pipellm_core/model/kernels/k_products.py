"""Matrix products by GGUF K-quant weights (Q4_K, Q5_K, Q6_K: the tensors of Q4_K_M and Q5_K_M
files), in integers on 8-bit activations, as llama.cpp's CUDA kernels compute them.

In a file, a 256-value super-block keeps its scales, its quants and its high bits side by side.
At load each row is regrouped, within the same bytes, into regions: the quant bytes of all the
row's super-blocks first (so that they make aligned int32 words), then the high bits, the packed
scales, and d (and dmin) as fp16 arrays of their own. Only the order of the fields changes;
`from_kernel_layout` gives the file's bytes back exactly.

Kernel layout of one row with `nb` super-blocks (byte offsets):

    Q4_K  quants 0 | scales 128nb (12 per super-block) | d 140nb | dmin 142nb
    Q5_K  quants 0 | high bits 128nb (32 per super-block) | scales 160nb | d 172nb | dmin 174nb
    Q6_K  low 4 bits 0 | top 2 bits 128nb (64 per super-block) | int8 scales 192nb | d 208nb

The quant bytes keep the file's order, which already suits byte-wise dot products. Word
8c + i of a Q4_K or Q5_K super-block holds values 64c + 4i .. 64c + 4i + 3 (sub-block 2c) in
its low nibbles and the same positions of sub-block 2c + 1 in its high nibbles. Masked apart,
each half is four bytes that meet one int32 word of the 8-bit activations in one dp4a
instruction. Q5_K's fifth bits and Q6_K's top two bits are moved into place with shifts and
masks of whole words; Q6_K's offset of 32 comes off through a second dp4a with ones.

Each block of 32 values then contributes
    d_x * (d * sc * sum(q_w * q_x) - dmin * mn * sum(q_x))
(Q6_K: d_x * d * sc * sum((q_w - 32) * q_x), with a scale per 16 values), the integer sums exact
and the scaling float32. The activations are `activation_q8.Q8Activations`, rounded per block
of 32 as llama.cpp rounds them for its CUDA products.

Kernels:
  - "gemv", up to GEMV_MAX_ROWS rows of x (a decode step): a matrix-vector kernel that reads
    each weight word once for all rows of the step, split over K where the matrix has few rows
    for its length (float32 partials added in a fixed order by a second kernel: no atomics);
  - "tiled", more rows (larger batches, prefill): unpacks one block of 32 values of each weight
    row at a time into an int8 tile in K order and multiplies it with `tl.dot`, split over K
    where its row tiles alone do not fill the GPU.
Which kernel and tiles serve a shape comes from `k_tiles.json` where it was measured for the GPU
model (`benchmarks/kernel_probe_k.py --sweep`; there a shape may take the tiled kernel at 8 rows
or fewer), else from the rules above.
With swiglu, both take the gate and up halves of one matrix and return silu(gate) * up.

Why written here: no maintained library multiplies by GGUF K-quant blocks in PyTorch on NVIDIA
GPUs. Triton's interpreter runs the same kernels on the CPU in the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.gguf.dequant import QK_K
from pipellm_core.gguf.dequant import dequantize as dequantize_file_blocks
from pipellm_core.model.kernels import activation_q8, q32_products, quant_matmul

try:
    import triton
    import triton.language as tl

    from pipellm_core.model.kernels.epilogues import store_sums, sum_splits
    from pipellm_core.model.kernels.q32_products import _load_words, dot4
except ImportError:  # pragma: no cover - only the layout and `dequantize` serve then
    triton = None

TYPES = frozenset({GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K})

BLOCK_BYTES = {GGMLType.Q4_K: 144, GGMLType.Q5_K: 176, GGMLType.Q6_K: 210}
# each type's fields as (offset, bytes) in a file's super-block, in the kernel layout's order
_FIELDS = {
    GGMLType.Q4_K: ((16, 128), (4, 12), (0, 2), (2, 2)),
    GGMLType.Q5_K: ((48, 128), (16, 32), (4, 12), (0, 2), (2, 2)),
    GGMLType.Q6_K: ((0, 128), (128, 64), (192, 16), (208, 2)),
}
_KERNEL_TYPE_ID = {GGMLType.Q4_K: 0, GGMLType.Q5_K: 1, GGMLType.Q6_K: 2}
GEMV_MAX_ROWS = 8
SMS = 132  # multiprocessors of the target GPU; sizes the split over K


def _blocks(raw: torch.Tensor, qtype) -> tuple[torch.Tensor, int]:
    if qtype not in TYPES:
        raise ValueError(f"not a K-quant type with kernels here: {qtype!r}")
    size = BLOCK_BYTES[qtype]
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] % size:
        raise ValueError(f"expected uint8 [rows, whole {qtype.name} blocks], got {raw.dtype} {tuple(raw.shape)}")
    nb = raw.shape[1] // size
    return raw.reshape(raw.shape[0], nb, size), nb


def to_kernel_layout(raw: torch.Tensor, qtype) -> torch.Tensor:
    """GGUF rows (uint8 [N, row bytes], super-blocks in file order) -> the kernel layout (uint8,
    same shape, same device): each field of every super-block gathered into a region."""
    b, _ = _blocks(raw, qtype)
    n = raw.shape[0]
    return torch.cat([b[:, :, start:start + size].reshape(n, -1) for start, size in _FIELDS[qtype]], dim=1)


def from_kernel_layout(kl: torch.Tensor, qtype) -> torch.Tensor:
    """The inverse of `to_kernel_layout`: the file's bytes, bit for bit."""
    _, nb = _blocks(kl, qtype)
    n = kl.shape[0]
    out = torch.empty(n, nb, BLOCK_BYTES[qtype], dtype=torch.uint8, device=kl.device)
    region = 0
    for start, size in _FIELDS[qtype]:
        out[:, :, start:start + size] = kl[:, region:region + size * nb].reshape(n, nb, size)
        region += size * nb
    return out.reshape(n, -1)


def dequantize(kl: torch.Tensor, qtype, k: int, dtype) -> torch.Tensor:
    """[N, k] weights decoded from the kernel layout (torch ops; the reference path), equal bit
    for bit to decoding the file's blocks."""
    _, nb = _blocks(kl, qtype)
    if nb * QK_K != k:
        raise ValueError(f"{nb} super-blocks per row do not make k={k}")
    return dequantize_file_blocks(from_kernel_layout(kl, qtype), qtype, k, dtype)


# ---- kernels ---------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _k4_scale_min(w8, base, s, ok):
        """Six-bit scale and min (int32) of sub-block s, from the 12 packed bytes at byte
        offsets `base` (ggml's get_scale_min_k4)."""
        low = s < 4
        a = tl.load(w8 + base + tl.where(low, s, s + 4), mask=ok, other=0).to(tl.int32)
        b = tl.load(w8 + base + tl.where(low, s + 4, s - 4), mask=ok, other=0).to(tl.int32)
        c = tl.load(w8 + base + s, mask=ok, other=0).to(tl.int32)
        sc = tl.where(low, a & 63, (a & 15) | ((b >> 6) << 4))
        mn = tl.where(low, b & 63, (a >> 4) | ((c >> 6) << 4))
        return sc, mn

    @triton.jit
    def _int8(byte):
        """A loaded uint8 read as a signed byte, in float32."""
        return ((byte.to(tl.int32) ^ 128) - 128).to(tl.float32)

    @triton.jit
    def _gemv_rows(xq32, xd, xs, w8, w32, w16, rows, row_ok, M, row_bytes, g_start, g_end,
                   QT: tl.constexpr, NB: tl.constexpr, ALIGNED: tl.constexpr, ASM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
        """[BLOCK_M, BLOCK_N] float32: W rows `rows` times the 8-bit activations over groups
        [g_start, g_end) of quant words. A group is 8 words (Q4_K, Q5_K: sub-blocks 2c and
        2c + 1) or 4 words (Q6_K: 16 values of each of two 32-value quarters). Tiles are
        [x rows, W rows, groups, words of a group]."""
        GW: tl.constexpr = 4 if QT == 2 else 8
        rm = tl.arange(0, BLOCK_M)
        m_ok = rm < M
        i = tl.arange(0, GW)
        x_rows = xq32 + rm[:, None, None].to(tl.int64) * (NB * 64)
        xb_rows = rm[:, None] * (NB * 8)
        starts = rows.to(tl.int64) * row_bytes
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_G), dtype=tl.float32)
        for g0 in range(g_start, g_end, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G)
            g_ok = g < g_end
            ok = row_ok[:, None] & g_ok[None, :]
            ok3 = ok[:, :, None]
            q = _load_words(w8, w32, starts[:, None, None], (g[:, None] * GW + i[None, :])[None, :, :], ok3, ALIGNED)
            x_ok = m_ok[:, None, None] & g_ok[None, :, None]
            b_ok = m_ok[:, None] & g_ok[None, :]
            zero = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_G, GW), dtype=tl.int32)
            lo = q & 0x0F0F0F0F
            hi = (q >> 4) & 0x0F0F0F0F
            if QT == 2:
                u = g // 8
                r = g % 8
                h = r // 4
                p = (r // 2) % 2
                t = r % 2
                high = _load_words(w8, w32, starts[:, None, None],
                                   (32 * NB + 16 * u + 8 * h + 4 * t)[None, :, None] + i[None, None, :], ok3, ALIGNED)
                lo = lo | (((high >> (2 * p)[None, :, None]) & 0x03030303) << 4)
                hi = hi | (((high >> (2 * p + 4)[None, :, None]) & 0x03030303) << 4)
                x_lo_words = (64 * u + 32 * h + 8 * p + 4 * t)[:, None] + i[None, :]
                x_hi_words = x_lo_words + 16
                blk_lo = 8 * u + 4 * h + p
                blk_hi = blk_lo + 2
            else:
                u = g // 4
                c = g % 4
                if QT == 1:
                    high = _load_words(w8, w32, starts[:, None, None], (32 * NB + 8 * u)[None, :, None] + i[None, None, :],
                                       ok3, ALIGNED)
                    lo = lo | (((high >> (2 * c)[None, :, None]) & 0x01010101) << 4)
                    hi = hi | (((high >> (2 * c + 1)[None, :, None]) & 0x01010101) << 4)
                x_lo_words = (16 * g)[:, None] + i[None, :]
                x_hi_words = x_lo_words + 8
                blk_lo = 2 * g
                blk_hi = blk_lo + 1
            x_lo = tl.load(x_rows + x_lo_words[None, :, :], mask=x_ok, other=0)[:, None, :, :]
            x_hi = tl.load(x_rows + x_hi_words[None, :, :], mask=x_ok, other=0)[:, None, :, :]
            dot_lo = tl.sum(dot4(lo[None, :, :, :], x_lo, zero, ASM), axis=3).to(tl.float32)
            dot_hi = tl.sum(dot4(hi[None, :, :, :], x_hi, zero, ASM), axis=3).to(tl.float32)
            dx_lo = tl.load(xd + xb_rows + blk_lo[None, :], mask=b_ok, other=0.0)[:, None, :]
            dx_hi = tl.load(xd + xb_rows + blk_hi[None, :], mask=b_ok, other=0.0)[:, None, :]
            row_halves = (starts // 2)[:, None]
            if QT == 2:
                ones = tl.full((1, 1, BLOCK_G, GW), 0x01010101, tl.int32)
                zero_x = tl.zeros((BLOCK_M, 1, BLOCK_G, GW), dtype=tl.int32)
                off_lo = tl.sum(dot4(ones, x_lo, zero_x, ASM), axis=3).to(tl.float32)
                off_hi = tl.sum(dot4(ones, x_hi, zero_x, ASM), axis=3).to(tl.float32)
                sc_at = starts[:, None] + 192 * NB + (16 * u + 8 * h + 2 * p + t)[None, :]
                sc_lo = _int8(tl.load(w8 + sc_at, mask=ok, other=0))
                sc_hi = _int8(tl.load(w8 + sc_at + 4, mask=ok, other=0))
                d = tl.load(w16 + row_halves + 104 * NB + u[None, :], mask=ok, other=0.0).to(tl.float32)
                acc += d[None, :, :] * (sc_lo[None, :, :] * dx_lo * (dot_lo - 32.0 * off_lo)
                                        + sc_hi[None, :, :] * dx_hi * (dot_hi - 32.0 * off_hi))
            else:
                SCALES: tl.constexpr = 128 * NB if QT == 0 else 160 * NB
                D: tl.constexpr = 70 * NB if QT == 0 else 86 * NB
                base = starts[:, None] + SCALES + (12 * u)[None, :]
                sc_lo, mn_lo = _k4_scale_min(w8, base, (2 * c)[None, :], ok)
                sc_hi, mn_hi = _k4_scale_min(w8, base, (2 * c + 1)[None, :], ok)
                d = tl.load(w16 + row_halves + D + u[None, :], mask=ok, other=0.0).to(tl.float32)
                dmin = tl.load(w16 + row_halves + D + NB + u[None, :], mask=ok, other=0.0).to(tl.float32)
                sx_lo = tl.load(xs + xb_rows + blk_lo[None, :], mask=b_ok, other=0.0)[:, None, :]
                sx_hi = tl.load(xs + xb_rows + blk_hi[None, :], mask=b_ok, other=0.0)[:, None, :]
                acc += d[None, :, :] * (sc_lo.to(tl.float32)[None, :, :] * dx_lo * dot_lo
                                        + sc_hi.to(tl.float32)[None, :, :] * dx_hi * dot_hi)
                acc -= dmin[None, :, :] * (mn_lo.to(tl.float32)[None, :, :] * dx_lo * sx_lo
                                           + mn_hi.to(tl.float32)[None, :, :] * dx_hi * sx_hi)
        return tl.sum(acc, axis=2)

    @triton.jit
    def _gemv_kernel(xq32, xd, xs, w8, w32, w16, out_ptr, M, N, row_bytes, groups_per_split, stride_os,
                     QT: tl.constexpr, NB: tl.constexpr, ALIGNED: tl.constexpr, ASM: tl.constexpr,
                     SWIGLU: tl.constexpr, SPLIT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
        """Programs (row tiles, K splits). SPLIT: out is float32 partials [splits, M, rows of W]
        (both halves when SWIGLU; the reduce kernel pairs them); else out is fp16 [M, N]."""
        NG: tl.constexpr = NB * 8 if QT == 2 else NB * 4
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        g_start = pid_s * groups_per_split
        g_end = tl.minimum(g_start + groups_per_split, NG)
        rm = tl.arange(0, BLOCK_M)
        o_ok = (rm < M)[:, None] & n_ok[None, :]
        acc = _gemv_rows(xq32, xd, xs, w8, w32, w16, rn, n_ok, M, row_bytes, g_start, g_end,
                         QT, NB, ALIGNED, ASM, BLOCK_M, BLOCK_N, BLOCK_G)
        up = acc
        if SWIGLU:
            up = _gemv_rows(xq32, xd, xs, w8, w32, w16, rn + N, n_ok, M, row_bytes, g_start, g_end,
                            QT, NB, ALIGNED, ASM, BLOCK_M, BLOCK_N, BLOCK_G)
        store_sums(out_ptr, acc, up, rm, rn, o_ok, N, pid_s, stride_os, SWIGLU, SPLIT)

    @triton.jit
    def _tiled_rows(xq, xd, xs, w8, w32, w16, rm, rows, row_ok, M, row_bytes, b_start, b_end,
                    QT: tl.constexpr, NB: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """[BLOCK_M, BLOCK_N] float32: x rows `rm` times W rows `rows` over blocks [b_start,
        b_end) of K, one block of 32 values at a time: its quants unpacked into an int8
        [32, BLOCK_N] tile in K order (value 4i + b from byte b of word i), multiplied with
        `tl.dot` into int32, then scaled."""
        m_ok = rm < M
        x_rows = xq + rm[:, None].to(tl.int64) * (NB * 256)
        starts = rows.to(tl.int64) * row_bytes
        i = tl.arange(0, 8)
        byte = tl.arange(0, 4)
        k32 = tl.arange(0, 32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for b in range(b_start, b_end):
            u = b // 8
            r = b % 8
            x = tl.load(x_rows + (b * 32 + k32)[None, :], mask=m_ok[:, None], other=0)
            dx = tl.load(xd + rm * (NB * 8) + b, mask=m_ok, other=0.0)
            if QT == 2:
                h = r // 4
                qr = r % 4
                words = _load_words(w8, w32, starts[None, :], (32 * u + 16 * h + 8 * (qr % 2) + i)[:, None],
                                    row_ok[None, :], ALIGNED)
                high = _load_words(w8, w32, starts[None, :], (32 * NB + 16 * u + 8 * h + i)[:, None],
                                   row_ok[None, :], ALIGNED)
                low4 = (words[:, None, :] >> (8 * byte + 4 * (qr // 2))[None, :, None]) & 15
                top2 = (high[:, None, :] >> (8 * byte + 2 * qr)[None, :, None]) & 3
                q = tl.reshape((low4 | (top2 << 4)) - 32, (32, BLOCK_N)).to(tl.int8)
                x_first = (k32 < 16)[None, :]
                sums_a = tl.dot(tl.where(x_first, x, 0), q, out_dtype=tl.int32).to(tl.float32)
                sums_b = tl.dot(tl.where(x_first, 0, x), q, out_dtype=tl.int32).to(tl.float32)
                sc_at = starts + 192 * NB + 16 * u + 8 * h + 2 * qr
                sc_a = _int8(tl.load(w8 + sc_at, mask=row_ok, other=0))
                sc_b = _int8(tl.load(w8 + sc_at + 1, mask=row_ok, other=0))
                d = tl.load(w16 + starts // 2 + 104 * NB + u, mask=row_ok, other=0.0).to(tl.float32)
                acc += dx[:, None] * d[None, :] * (sc_a[None, :] * sums_a + sc_b[None, :] * sums_b)
            else:
                words = _load_words(w8, w32, starts[None, :], (8 * (b // 2) + i)[:, None], row_ok[None, :], ALIGNED)
                v = (words[:, None, :] >> (8 * byte + 4 * (r % 2))[None, :, None]) & 15
                if QT == 1:
                    high = _load_words(w8, w32, starts[None, :], (32 * NB + 8 * u + i)[:, None], row_ok[None, :], ALIGNED)
                    v = v | (((high[:, None, :] >> (8 * byte + r)[None, :, None]) & 1) << 4)
                sums = tl.dot(x, tl.reshape(v, (32, BLOCK_N)).to(tl.int8), out_dtype=tl.int32).to(tl.float32)
                SCALES: tl.constexpr = 128 * NB if QT == 0 else 160 * NB
                D: tl.constexpr = 70 * NB if QT == 0 else 86 * NB
                sc, mn = _k4_scale_min(w8, starts + SCALES + 12 * u, r + tl.zeros_like(rows), row_ok)
                d = tl.load(w16 + starts // 2 + D + u, mask=row_ok, other=0.0).to(tl.float32)
                dmin = tl.load(w16 + starts // 2 + D + NB + u, mask=row_ok, other=0.0).to(tl.float32)
                sx = tl.load(xs + rm * (NB * 8) + b, mask=m_ok, other=0.0)
                acc += dx[:, None] * (d * sc.to(tl.float32))[None, :] * sums
                acc -= (dx * sx)[:, None] * (dmin * mn.to(tl.float32))[None, :]
        return acc

    @triton.jit
    def _tiled_kernel(xq, xd, xs, w8, w32, w16, out_ptr, M, N, row_bytes, blocks_per_split, stride_os,
                      QT: tl.constexpr, NB: tl.constexpr, ALIGNED: tl.constexpr, SWIGLU: tl.constexpr,
                      SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Programs (row tiles, x row tiles, K splits); SPLIT as in `_gemv_kernel`."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        b_start = pid_s * blocks_per_split
        b_end = tl.minimum(b_start + blocks_per_split, NB * 8)
        acc = _tiled_rows(xq, xd, xs, w8, w32, w16, rm, rn, n_ok, M, row_bytes, b_start, b_end,
                          QT, NB, ALIGNED, BLOCK_M, BLOCK_N)
        up = acc
        if SWIGLU:
            up = _tiled_rows(xq, xd, xs, w8, w32, w16, rm, rn + N, n_ok, M, row_bytes, b_start, b_end,
                             QT, NB, ALIGNED, BLOCK_M, BLOCK_N)
        store_sums(out_ptr, acc, up, rm, rn, (rm < M)[:, None] & n_ok[None, :], N, pid_s, stride_os, SWIGLU, SPLIT)


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def gemv_tiles(m: int, n_rows: int, groups: int, group_words: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_G, splits, num_warps) of the decode kernel for m rows of x, n_rows rows of
    W to compute (h for swiglu) and `groups` groups of `group_words` words per row. One row of x:
    two to four W rows a program and 128 words of each a step (as the tuned Q4_0 kernels); more:
    16 rows and 64 words. Then narrower row tiles and splits over K, until the programs fill
    the multiprocessors twice over."""
    if m == 1:
        num_warps, words, block_n = 4, 128, 2 if n_rows <= 8192 else 4
    else:
        num_warps, words, block_n = 8, 64, 16
    block_g = max(2, min(words // group_words, _pow2_at_least(groups)))
    while block_n > 2 and -(-n_rows // block_n) < 2 * SMS:
        block_n //= 2
    tiles = -(-n_rows // block_n)
    steps = -(-groups // block_g)
    splits = 1
    while tiles * splits < 2 * SMS and steps // (splits * 2) >= 2:
        splits *= 2
    return block_n, block_g, splits, num_warps


def tiled_tiles(m: int, n_rows: int, blocks: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, splits, num_warps) of the tiled kernel, for `blocks` blocks of 32 per
    row: row tiles of 64, narrowed to 16, then splits over K (16 blocks or more each) until the
    programs fill the multiprocessors twice over."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    m_tiles = -(-m // block_m)
    block_n = 64
    while block_n > 16 and -(-n_rows // block_n) * m_tiles < 2 * SMS:
        block_n //= 2
    tiles = -(-n_rows // block_n) * m_tiles
    splits = 1
    while tiles * splits < 2 * SMS and blocks // (splits * 2) >= 16:
        splits *= 2
    return block_m, block_n, splits, 4


# Tile choices measured per GPU model by `benchmarks/kernel_probe_k.py --sweep`, in the format of
# `q32_products.TILES_FILE` with keys "KERNEL TYPE M rows blocks swiglu" (KERNEL gemv or tiled,
# M a power of two); only the kernel that won for a shape has an entry.
# PIPELLM_K_TILES names another such file. Shapes not in it take the rules above.
TILES_FILE = Path(__file__).with_name("k_tiles.json")


def tiles_key(kernel: str, qtype, m: int, n_rows: int, blocks: int, swiglu: bool) -> str:
    return f"{kernel} {qtype.name} {_pow2_at_least(m)} {n_rows} {blocks} {int(swiglu)}"


def _plan(m: int, n_rows: int, nb: int, qtype, swiglu: bool, device: torch.device, kernel: str | None) -> tuple:
    """(kernel, tiles) for this product: the table's entry for this GPU model where it has one,
    else the rules: the decode kernel up to GEMV_MAX_ROWS rows, the tiled kernel above."""
    group_words = 4 if qtype == GGMLType.Q6_K else 8
    if device.type == "cuda":
        table = q32_products.tuned_tiles(device.index if device.index is not None else torch.cuda.current_device(),
                                         "PIPELLM_K_TILES", TILES_FILE)
        for name in ("tiled", "gemv") if kernel is None else (kernel,):
            hit = table.get(tiles_key(name, qtype, m, n_rows, nb * 8, swiglu))
            if hit:
                return name, tuple(hit)
    kernel = kernel or ("gemv" if m <= GEMV_MAX_ROWS else "tiled")
    if kernel == "gemv":
        return kernel, gemv_tiles(m, n_rows, 32 * nb // group_words, group_words)
    return kernel, tiled_tiles(m, n_rows, nb * 8)


def matmul(x, w: torch.Tensor, qtype, n: int, k: int, *, swiglu: bool = False,
           kernel: str | None = None) -> torch.Tensor:
    """x (fp16 [M, k], or its 8-bit blocks as `Q8Activations`) times the transpose of the [n, k]
    matrix whose kernel-layout rows are `w`: fp16 [M, n]. fp16 x is first rounded to 8 bits per
    block of 32 as llama.cpp rounds it. With swiglu, w's rows are the gate's h rows then the
    up's h rows (n = 2h) and the result is silu(gate) * up, fp16 [M, h]. `kernel` ("gemv" or
    "tiled") overrides the choice by M (tests and probes)."""
    if qtype not in TYPES:
        raise ValueError(f"no K-quant kernel for {qtype!r}")
    if k % QK_K:
        raise ValueError(f"k={k} is not a multiple of {QK_K}")
    if not isinstance(x, activation_q8.Q8Activations):
        if x.dtype != torch.float16 or x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"expected fp16 x [M, {k}], got {x.dtype} {tuple(x.shape)}")
        x = activation_q8.quantize(x)
    nb = k // QK_K
    rb = nb * BLOCK_BYTES[qtype]
    if w.dtype != torch.uint8 or tuple(w.shape) != (n, rb) or not w.is_contiguous():
        raise ValueError(f"expected contiguous uint8 w [{n}, {rb}], got {w.dtype} {tuple(w.shape)}")
    if swiglu and n % 2:
        raise ValueError("swiglu needs the gate and up rows joined: n = 2h")
    assert x.q.shape[1] == k and x.q.is_contiguous()
    m = x.q.shape[0]
    rows = n // 2 if swiglu else n
    out = torch.empty(m, rows, dtype=torch.float16, device=x.q.device)
    aligned = rb % 4 == 0 and w.storage_offset() % 4 == 0
    w32 = w.view(torch.int32) if aligned else w
    w16 = w.view(torch.float16)
    flags = dict(QT=_KERNEL_TYPE_ID[qtype], NB=nb, ALIGNED=aligned, SWIGLU=swiglu)
    kernel, tiles = _plan(m, rows, nb, qtype, swiglu, x.q.device, kernel)
    with quant_matmul.on_device_of(x.q):
        if kernel == "gemv":
            block_n, block_g, splits, num_warps = tiles
            groups = 32 * nb // (4 if qtype == GGMLType.Q6_K else 8)
            per_split = -(-groups // (splits * block_g)) * block_g
            splits = -(-groups // per_split)
            grid = (triton.cdiv(rows, block_n), splits)
        else:
            block_m, block_n, splits, num_warps = tiles
            per_split = -(-nb * 8 // splits)
            splits = -(-nb * 8 // per_split)
            grid = (triton.cdiv(rows, block_n), triton.cdiv(m, block_m), splits)
        if splits > 1:
            part = torch.empty(splits, m, n, dtype=torch.float32, device=x.q.device)
            target, stride_os = part, part.stride(0)
        else:
            target, stride_os = out, 0
        if kernel == "gemv":
            _gemv_kernel[grid](x.q.view(torch.int32), x.d, x.s, w, w32, w16, target, m, rows, rb, per_split,
                               stride_os, ASM=not quant_matmul.INTERPRETED, SPLIT=splits > 1,
                               BLOCK_M=_pow2_at_least(m), BLOCK_N=block_n, BLOCK_G=block_g,
                               num_warps=num_warps, **flags)
        else:
            _tiled_kernel[grid](x.q, x.d, x.s, w, w32, w16, target, m, rows, rb, per_split, stride_os,
                                SPLIT=splits > 1, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **flags)
        if splits > 1:
            sum_splits(part, out, swiglu)
    return out
