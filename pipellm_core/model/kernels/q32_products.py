"""Matrix products by Q4_0, Q4_1 and Q8_0 weights re-laid out for wide loads, in Triton.

A GGUF row of these types is a run of 18-, 20- or 34-byte blocks: an fp16 scale (and for Q4_1
an fp16 min) in front of 32 packed quants. Blocks of 18 and 34 bytes put the quants at odd
2-byte offsets, so a kernel reading them in place loads bytes one at a time and stays far from
the memory's bandwidth. At load time each row is rearranged, within the same number of bytes,
into the quants of the whole row first (4-byte words along K, every block's bytes in file order)
and then the scales (and the mins) as arrays of their own. No bit of a quant or a scale changes,
and `from_kernel_layout` undoes it exactly.

Products are in integers, as llama.cpp's CUDA kernels compute them: the activations are first
rounded to 8 bits per block of 32 (`activation_q8.quantize`, or the norm kernel that makes them),
so that each block's products of quants are one exact int32 sum, which the weight's and the
activation's block scales then scale in float32. Q4_0 subtracts its offset of 8 through the
activations' sum of quants: d_w * d_x * (sum q_w q_x - 8 * sum q_x); Q4_1 adds its min as
m_w * d_x * sum q_x.

Kernels:
  - up to GEMV_MAX_ROWS rows of x (a decode step): a matrix-vector kernel that reads each weight
    word once for all rows of the step. Word i of a Q4 block holds values 4i..4i+3 in its low
    nibbles and 4i+16..4i+19 in its high nibbles, so two masks make two words of four bytes that
    meet two contiguous words of the 8-bit activations in one dp4a instruction each (four
    multiply-adds of bytes). Where the matrix has few rows for its length, programs split K and
    write float32 partials that a second kernel sums in a fixed order (deterministic, no atomics);
  - more rows (larger batches, prefill): a tiled kernel that unpacks one block of each weight row
    at a time into an int8 tile in K order and multiplies it with `tl.dot` into int32.
With swiglu, the kernels take the gate and up halves of one matrix and return silu(gate) * up
from their float32 sums, so the [M, 2h] product never goes through memory.

Why written here: no maintained library multiplies by GGUF blocks in PyTorch on NVIDIA GPUs.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.model.kernels import activation_q8, quant_matmul

try:
    import triton
    import triton.language as tl

    from pipellm_core.model.kernels.epilogues import silu_times, store_sums, sum_splits
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
    @triton.jit
    def dot4(a, b, c, ASM: tl.constexpr):
        """c + the dot product of the four signed bytes of a and of b (int32 words): one dp4a
        instruction on the GPU, byte by byte in Triton's interpreter."""
        if ASM:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            for i in tl.static_range(4):
                c += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
            return c

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
    def _gemv_rows(xq32, xd, xs, w8, w32, w16, rows, row_ok, M, row_bytes, b_start, b_end,
                   NB: tl.constexpr, FOUR_BIT: tl.constexpr, HAS_MIN: tl.constexpr, ALIGNED: tl.constexpr,
                   ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
        """[BLOCK_M, BLOCK_N] float32: rows `rows` of W times the 8-bit activations, over blocks
        [b_start, b_end). Tiles are [x rows, W rows, blocks, words of a block]."""
        WPB: tl.constexpr = 4 if FOUR_BIT else 8  # quant words per block of 32 values
        QB: tl.constexpr = NB * WPB * 4  # bytes of quants in a row (scales follow)
        rm = tl.arange(0, BLOCK_M)
        m_ok = rm < M
        j = tl.arange(0, WPB)
        x_rows = xq32 + rm[:, None, None].to(tl.int64) * (NB * 8)
        rows64 = rows.to(tl.int64)
        scale_rows = w16 + rows64[:, None] * (row_bytes // 2) + QB // 2
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_B), dtype=tl.float32)
        for b0 in range(b_start, b_end, BLOCK_B):
            blk = b0 + tl.arange(0, BLOCK_B)
            b_ok = blk < b_end
            ok = row_ok[:, None] & b_ok[None, :]
            q = _load_words(w8, w32, rows64[:, None, None] * row_bytes, (blk[:, None] * WPB + j[None, :])[None, :, :],
                            ok[:, :, None], ALIGNED)
            d = tl.load(scale_rows + blk[None, :], mask=ok, other=0.0).to(tl.float32)
            x_ok = m_ok[:, None, None] & b_ok[None, :, None]
            # x word i of a block holds values 4i..4i+3; W word i of a Q4 block holds values
            # 4i..4i+3 in its low nibbles and 4i+16..4i+19 in its high nibbles
            xw = x_rows + (blk[:, None] * 8 + j[None, :])[None, :, :]
            zero = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_B, WPB), dtype=tl.int32)
            if FOUR_BIT:
                lo = (q & 0x0F0F0F0F)[None, :, :, :]
                hi = ((q >> 4) & 0x0F0F0F0F)[None, :, :, :]
                x_lo = tl.load(xw, mask=x_ok, other=0)[:, None, :, :]
                x_hi = tl.load(xw + 4, mask=x_ok, other=0)[:, None, :, :]
                sums = tl.sum(dot4(hi, x_hi, dot4(lo, x_lo, zero, ASM), ASM), axis=3)
            else:
                x_all = tl.load(xw, mask=x_ok, other=0)[:, None, :, :]
                sums = tl.sum(dot4(q[None, :, :, :], x_all, zero, ASM), axis=3)
            dx = tl.load(xd + rm[:, None] * NB + blk[None, :], mask=m_ok[:, None] & b_ok[None, :], other=0.0)
            if FOUR_BIT and not HAS_MIN:
                sx = tl.load(xs + rm[:, None] * NB + blk[None, :], mask=m_ok[:, None] & b_ok[None, :], other=0.0)
                acc += d[None, :, :] * (dx[:, None, :] * (sums.to(tl.float32) - 8.0 * sx[:, None, :]))
            else:
                acc += d[None, :, :] * (dx[:, None, :] * sums.to(tl.float32))
            if HAS_MIN:
                sx = tl.load(xs + rm[:, None] * NB + blk[None, :], mask=m_ok[:, None] & b_ok[None, :], other=0.0)
                mn = tl.load(scale_rows + NB + blk[None, :], mask=ok, other=0.0).to(tl.float32)
                acc += mn[None, :, :] * (dx * sx)[:, None, :]
        return tl.sum(acc, axis=2)

    @triton.jit
    def _gemv_kernel(xq32, xd, xs, w8, w32, w16, out_ptr, M, N, row_bytes, blocks_per_split, stride_os,
                     NB: tl.constexpr, FOUR_BIT: tl.constexpr, HAS_MIN: tl.constexpr, ALIGNED: tl.constexpr,
                     ASM: tl.constexpr, SWIGLU: tl.constexpr, SPLIT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
        """Programs (row tiles, K splits). SPLIT: out is float32 partials [splits, M, rows of W]
        (both halves when SWIGLU; the reduce kernel pairs them); else out is fp16 [M, N]."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        b_start = pid_s * blocks_per_split
        b_end = tl.minimum(b_start + blocks_per_split, NB)
        rm = tl.arange(0, BLOCK_M)
        o_ok = (rm < M)[:, None] & n_ok[None, :]
        acc = _gemv_rows(xq32, xd, xs, w8, w32, w16, rn, n_ok, M, row_bytes, b_start, b_end,
                         NB, FOUR_BIT, HAS_MIN, ALIGNED, ASM, BLOCK_M, BLOCK_N, BLOCK_B)
        up = acc
        if SWIGLU:
            up = _gemv_rows(xq32, xd, xs, w8, w32, w16, rn + N, n_ok, M, row_bytes, b_start, b_end,
                            NB, FOUR_BIT, HAS_MIN, ALIGNED, ASM, BLOCK_M, BLOCK_N, BLOCK_B)
        store_sums(out_ptr, acc, up, rm, rn, o_ok, N, pid_s, stride_os, SWIGLU, SPLIT)

    @triton.jit
    def _tiled_rows(xq, xd, xs, w8, w32, w16, rm, rows, row_ok, M, row_bytes,
                    NB: tl.constexpr, FOUR_BIT: tl.constexpr, HAS_MIN: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """[BLOCK_M, BLOCK_N] float32: x rows `rm` times W rows `rows`, over all of K, one block
        of 32 values at a time: the block's quants unpacked to an int8 [32, BLOCK_N] tile in K
        order and multiplied with `tl.dot` into int32, then scaled."""
        WPB: tl.constexpr = 4 if FOUR_BIT else 8
        QB: tl.constexpr = NB * WPB * 4
        m_ok = rm < M
        x_rows = xq + rm[:, None].to(tl.int64) * (NB * 32)
        rows64 = rows.to(tl.int64)
        scale_rows = w16 + rows64 * (row_bytes // 2) + QB // 2
        k32 = tl.arange(0, 32)
        j = tl.arange(0, WPB)
        byte = tl.arange(0, 4)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for b in range(0, NB):
            q = _load_words(w8, w32, rows64[None, :] * row_bytes, (b * WPB + j)[:, None], row_ok[None, :], ALIGNED)
            if FOUR_BIT:
                # value 16h + 4i + c of the block is nibble h of byte c of word i
                half = tl.arange(0, 2)
                shift = 4 * half[:, None, None, None] + 8 * byte[None, None, :, None]
                v = (q[None, :, None, :] >> shift) & 15
                w = tl.reshape(v, (32, BLOCK_N))
                if not HAS_MIN:
                    w = w - 8
            else:
                v = (q[:, None, :] >> (8 * byte)[None, :, None])
                w = tl.reshape(v, (32, BLOCK_N))
            x = tl.load(x_rows + (b * 32 + k32)[None, :], mask=m_ok[:, None], other=0)
            sums = tl.dot(x, w.to(tl.int8), out_dtype=tl.int32)
            d = tl.load(scale_rows + b, mask=row_ok, other=0.0).to(tl.float32)
            dx = tl.load(xd + rm * NB + b, mask=m_ok, other=0.0)
            acc += dx[:, None] * d[None, :] * sums.to(tl.float32)
            if HAS_MIN:
                sx = tl.load(xs + rm * NB + b, mask=m_ok, other=0.0)
                mn = tl.load(scale_rows + NB + b, mask=row_ok, other=0.0).to(tl.float32)
                acc += (dx * sx)[:, None] * mn[None, :]
        return acc

    @triton.jit
    def _tiled_kernel(xq, xd, xs, w8, w32, w16, out_ptr, M, N, row_bytes,
                      NB: tl.constexpr, FOUR_BIT: tl.constexpr, HAS_MIN: tl.constexpr, ALIGNED: tl.constexpr,
                      SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        acc = _tiled_rows(xq, xd, xs, w8, w32, w16, rm, rn, n_ok, M, row_bytes,
                          NB, FOUR_BIT, HAS_MIN, ALIGNED, BLOCK_M, BLOCK_N)
        if SWIGLU:
            up = _tiled_rows(xq, xd, xs, w8, w32, w16, rm, rn + N, n_ok, M, row_bytes,
                             NB, FOUR_BIT, HAS_MIN, ALIGNED, BLOCK_M, BLOCK_N)
            acc = silu_times(acc, up)
        o_ok = (rm < M)[:, None] & n_ok[None, :]
        tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(tl.float16), mask=o_ok)


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def gemv_tiles(m: int, n_rows: int, blocks: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_B, splits, num_warps) of the decode kernel for m rows of x, n_rows rows
    of W to compute (h for swiglu) and `blocks` blocks of 32 per row: about four blocks of words
    a thread; narrower row tiles, then splits over K, until the programs fill the
    multiprocessors twice over."""
    num_warps = 4
    block_b = min(32, max(4, _pow2_at_least(blocks)))
    block_n = max(2, 4 * 32 * num_warps // block_b)
    while block_n > 2 and -(-n_rows // block_n) < 2 * SMS:
        block_n //= 2
    tiles = -(-n_rows // block_n)
    steps = -(-blocks // block_b)
    splits = 1
    while tiles * splits < 2 * SMS and steps // (splits * 2) >= 2:
        splits *= 2
    return block_n, block_b, splits, num_warps


def tiled_tiles(m: int, n_rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the tiled kernel."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    return block_m, 64, 4


# Tile choices measured per GPU model by `benchmarks/kernel_probe_q32.py --sweep`, which writes
# this file's format: {device name: {"gemv|tiled M rows blocks swiglu": tiles}} (M a power of
# two). PIPELLM_Q32_TILES names another such file. Shapes not in it take the rules above.
TILES_FILE = Path(__file__).with_name("q32_tiles.json")


@functools.cache
def tuned_tiles(device_index: int, env: str = "PIPELLM_Q32_TILES", default: Path = TILES_FILE) -> dict[str, list]:
    """The table of measured tiles for this GPU model: the file named by `env`, else `default`."""
    path = Path(os.environ.get(env) or default)
    table = json.loads(path.read_text()) if path.is_file() else {}
    return table.get(torch.cuda.get_device_name(device_index), {})


def tiles_key(kernel: str, m: int, n_rows: int, blocks: int, swiglu: bool) -> str:
    return f"{kernel} {_pow2_at_least(m)} {n_rows} {blocks} {int(swiglu)}"


def _tiles(kernel: str, m: int, n_rows: int, blocks: int, swiglu: bool, device: torch.device) -> tuple:
    """The tiles measured best for this shape on this GPU model (or on the nearest measured
    batch above m, for the decode kernel), else the rules of `gemv_tiles` / `tiled_tiles`."""
    if device.type == "cuda":
        table = tuned_tiles(device.index if device.index is not None else torch.cuda.current_device())
        bucket = _pow2_at_least(m)
        buckets = [b for b in (1, 2, 4, 8) if b >= bucket] if kernel == "gemv" else [bucket]
        for b in buckets:
            hit = table.get(tiles_key(kernel, b, n_rows, blocks, swiglu))
            if hit:
                return tuple(hit)
    return gemv_tiles(m, n_rows, blocks) if kernel == "gemv" else tiled_tiles(m, n_rows)


def matmul(x, w: torch.Tensor, qtype, n: int, k: int, *, swiglu: bool = False,
           kernel: str | None = None) -> torch.Tensor:
    """x (fp16 [M, k], or its 8-bit blocks as `Q8Activations`) times the transpose of the
    [n, k] matrix whose kernel layout is `w` (uint8 [n, row bytes]): fp16 [M, n]. fp16 x is
    first rounded to 8 bits per block of 32 as llama.cpp rounds it; the products of quants are
    exact integers and the scaled sums float32. With swiglu, rows 0..h-1 of W are the gate and
    rows h..2h-1 the up projection (n = 2h): fp16 [M, h] = silu(gate) * up. `kernel` ("gemv" or
    "tiled") overrides the choice by M (tests and probes)."""
    assert qtype in TYPES and k % 32 == 0
    if not isinstance(x, activation_q8.Q8Activations):
        assert x.dtype == torch.float16 and x.shape[1] == k
        x = activation_q8.quantize(x)
    assert x.q.shape[1] == k and x.q.is_contiguous()
    assert w.dtype == torch.uint8 and w.is_contiguous()
    size, quant_bytes, n_fields = _BLOCKS[qtype]
    nb = k // 32
    row_bytes = nb * size
    assert w.shape == (n, row_bytes), (w.shape, n, row_bytes)
    m = x.q.shape[0]
    rows = n // 2 if swiglu else n
    out = torch.empty(m, rows, dtype=torch.float16, device=x.q.device)
    aligned = row_bytes % 4 == 0 and w.storage_offset() % 4 == 0
    w32 = w.view(torch.int32) if aligned else w
    w16 = w.view(torch.float16)
    four_bit = qtype != GGMLType.Q8_0
    has_min = qtype == GGMLType.Q4_1
    kernel = kernel or ("gemv" if m <= GEMV_MAX_ROWS else "tiled")
    flags = dict(NB=nb, FOUR_BIT=four_bit, HAS_MIN=has_min, ALIGNED=aligned, SWIGLU=swiglu)
    with quant_matmul.on_device_of(x.q):
        if kernel == "gemv":
            block_n, block_b, splits, num_warps = _tiles("gemv", m, rows, nb, swiglu, x.q.device)
            blocks_per_split = -(-nb // (splits * block_b)) * block_b
            splits = -(-nb // blocks_per_split)
            if splits > 1:
                part = torch.empty(splits, m, n, dtype=torch.float32, device=x.q.device)
                target, stride_os = part, part.stride(0)
            else:
                target, stride_os = out, 0
            grid = (triton.cdiv(rows, block_n), splits)
            _gemv_kernel[grid](x.q.view(torch.int32), x.d, x.s, w, w32, w16, target, m, rows, row_bytes,
                               blocks_per_split, stride_os, ASM=not quant_matmul.INTERPRETED, SPLIT=splits > 1,
                               BLOCK_M=_pow2_at_least(m), BLOCK_N=block_n, BLOCK_B=block_b,
                               num_warps=num_warps, **flags)
            if splits > 1:
                sum_splits(part, out, swiglu)
        else:
            block_m, block_n, num_warps = _tiles("tiled", m, rows, nb, swiglu, x.q.device)
            grid = (triton.cdiv(rows, block_n), triton.cdiv(m, block_m))
            _tiled_kernel[grid](x.q, x.d, x.s, w, w32, w16, out, m, rows, row_bytes,
                                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **flags)
    return out
