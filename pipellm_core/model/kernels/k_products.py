"""Matrix products by GGUF K-quant weights (Q4_K, Q5_K, Q6_K: the tensors of Q4_K_M and Q5_K_M
files), from a per-row re-layout of the blocks made once at load.

In a file, a 256-value super-block keeps its scales, its quants and its high bits side by side,
in an order made for ggml's CPU loops. Here each row is rearranged so that a kernel reads wide
words: all the row's quants first (int32 words of eight 4-bit values), then the high bits, then
the packed scale bytes, then d (and dmin) as fp16 arrays of their own. Only the order of bits
changes; the row keeps its size, and `from_kernel_layout` gives the file's bytes back exactly.

Kernel layout of one row with `nb` super-blocks (byte offsets):

    Q4_K  quants 0 | scales 128nb (12 per super-block, as in the file) | d 140nb | dmin 142nb
    Q5_K  quants 0 | high bits 128nb | scales 160nb | d 172nb | dmin 174nb
    Q6_K  quants 0 | high bits 128nb | int8 scales 192nb | d 208nb

The quants come in units of G words (G = 32 for Q4_K and Q5_K, one super-block per unit and one
scale per 32 values; G = 16 for Q6_K, half a super-block per unit and one scale per 16 values).
Nibble s (bits 4s..4s+3) of word j of unit u holds the low 4 bits of value 8*G*u + G*s + j of
the row. So for each s, the G words of a unit give G consecutive values, which all share one
scale: a kernel loads a unit's words once and takes them apart with shifts, eight times.
High bits: Q5_K keeps the file's 32 qh bytes per super-block, whose byte j bit s is the fifth
bit of value 32s + j (the same value as word j, nibble s). Q6_K stores one uint16 per word,
whose bits 2s..2s+1 are the top two bits of the value in nibble s.

`matmul` runs one Triton kernel: a grid of (rows of the output, tiles of the input rows, slices
of K). For a decode step (few input rows) it reads each weight once for all rows of the step;
where the output is narrow for the chip, K is split into slices whose float32 partial sums a
second small kernel adds in a fixed order (deterministic: no atomics). Products accumulate in
float32, either on CUDA cores (one or two rows) or through `tl.dot` on fp16 weight tiles
decoded in registers.

Why written here: no maintained library multiplies by GGUF K-quant blocks in PyTorch on NVIDIA
GPUs. Triton's interpreter runs the same kernels on the CPU in the tests.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.gguf.dequant import QK_K, _k4_scales_mins

try:
    import triton
    import triton.language as tl

    from pipellm_core.model.kernels.epilogues import silu_times, sum_splits
except ImportError:  # pragma: no cover - only the torch functions are usable
    triton = None

TYPES = frozenset({GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K})

BLOCK_BYTES = {GGMLType.Q4_K: 144, GGMLType.Q5_K: 176, GGMLType.Q6_K: 210}
UNIT_WORDS = {GGMLType.Q4_K: 32, GGMLType.Q5_K: 32, GGMLType.Q6_K: 16}
_KERNEL_TYPE_ID = {GGMLType.Q4_K: 0, GGMLType.Q5_K: 1, GGMLType.Q6_K: 2}


# ---- values of a super-block, in row order, from the file's blocks and back -----------------

def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """Bytes [..., n] -> nibbles [..., 2n]: low nibble of byte t at 2t, high nibble at 2t + 1."""
    return torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _k4_low_bits(qs: torch.Tensor) -> torch.Tensor:
    """The file's 128 qs bytes [.., nb, 128] -> low 4 bits of the 256 values [.., nb, 256]:
    byte 32c + l holds value 64c + l (low nibble) and value 64c + 32 + l (high nibble)."""
    qs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=-2).flatten(-3)


def _k4_file_qs(low: torch.Tensor) -> torch.Tensor:
    v = low.reshape(*low.shape[:-1], 4, 2, 32)
    return (v[..., 0, :] | (v[..., 1, :] << 4)).flatten(-2)


def _q6_low_high(ql: torch.Tensor, qh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The file's ql [.., nb, 128] and qh [.., nb, 64] -> low 4 and top 2 bits of the 256 values.
    Value 128h + 32q + l: low bits in ql[64h + 32(q & 1) + l] (high nibble when q >= 2), top bits
    in qh[32h + l] >> 2q."""
    lead = ql.shape[:-1]
    ql = ql.reshape(*lead, 2, 1, 2, 32)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=-3).reshape(*lead, QK_K)
    qh = qh.reshape(*lead, 2, 1, 32)
    high = torch.cat([(qh >> (2 * q)) & 3 for q in range(4)], dim=-2).reshape(*lead, QK_K)
    return low, high


def _q6_file_bits(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lead = low.shape[:-1]
    v = low.reshape(*lead, 2, 2, 2, 32)  # half, nibble, part, l
    ql = (v[..., 0, :, :] | (v[..., 1, :, :] << 4)).reshape(*lead, 128)
    h = high.reshape(*lead, 2, 4, 32)
    qh = (h[..., 0, :] | (h[..., 1, :] << 2) | (h[..., 2, :] << 4) | (h[..., 3, :] << 6)).reshape(*lead, 64)
    return ql, qh


# ---- the kernel layout of the quants and high bits --------------------------------------------

def _to_words(values: torch.Tensor, g: int) -> torch.Tensor:
    """Low 4 bits of [.., nb, 256] values -> the kernel's quant bytes [.., nb, 128]: unit u, word
    j, nibble s <- value 8*g*u + g*s + j."""
    lead = values.shape[:-1]
    v = values.reshape(*lead, QK_K // (8 * g), 8, g).transpose(-1, -2)  # [.., unit, j, s]
    return _pack_nibbles(v).reshape(*lead, 128)


def _from_words(b: torch.Tensor, g: int) -> torch.Tensor:
    lead = b.shape[:-1]
    v = _nibbles(b).reshape(*lead, QK_K // (8 * g), g, 8).transpose(-1, -2)
    return v.reshape(*lead, QK_K)


def _q6_high_to_kernel(high: torch.Tensor) -> torch.Tensor:
    """Top 2 bits [.., nb, 256] -> one uint16 per quant word (bits 2s.. of word j of unit h hold
    value 128h + 16s + j), as bytes [.., nb, 64]."""
    lead = high.shape[:-1]
    v = high.reshape(*lead, 2, 8, 16).transpose(-1, -2).reshape(*lead, 2, 16, 2, 4)
    b = v[..., 0] | (v[..., 1] << 2) | (v[..., 2] << 4) | (v[..., 3] << 6)
    return b.reshape(*lead, 64)


def _q6_high_from_kernel(b: torch.Tensor) -> torch.Tensor:
    lead = b.shape[:-1]
    b = b.reshape(*lead, 2, 16, 2, 1)
    v = torch.cat([(b >> (2 * i)) & 3 for i in range(4)], dim=-1)  # [.., h, j, byte, 4]
    return v.reshape(*lead, 2, 16, 8).transpose(-1, -2).reshape(*lead, QK_K)


def _blocks(raw: torch.Tensor, qtype) -> tuple[torch.Tensor, int]:
    if qtype not in TYPES:
        raise ValueError(f"not a K-quant type with kernels here: {qtype!r}")
    size = BLOCK_BYTES[qtype]
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] % size:
        raise ValueError(f"expected uint8 [rows, whole {qtype.name} blocks], got {raw.dtype} {tuple(raw.shape)}")
    nb = raw.shape[1] // size
    return raw.reshape(raw.shape[0], nb, size), nb


def _regions(kl: torch.Tensor, nb: int, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Consecutive per-row regions of `sizes` bytes per super-block, each as [rows, nb, size]."""
    out, start = [], 0
    for size in sizes:
        out.append(kl[:, start * nb:(start + size) * nb].reshape(kl.shape[0], nb, size))
        start += size
    return out


def to_kernel_layout(raw: torch.Tensor, qtype) -> torch.Tensor:
    """GGUF rows (uint8 [N, row bytes], super-blocks in file order) -> the kernel layout (uint8,
    same shape, same device): the same bits, rearranged per row as the module docstring says."""
    b, nb = _blocks(raw, qtype)
    n = raw.shape[0]
    if qtype == GGMLType.Q6_K:
        low, high = _q6_low_high(b[..., 0:128], b[..., 128:192])
        parts = [_to_words(low, 16), _q6_high_to_kernel(high), b[..., 192:208], b[..., 208:210]]
    else:
        qs = b[..., 16:144] if qtype == GGMLType.Q4_K else b[..., 48:176]
        parts = [_to_words(_k4_low_bits(qs), 32)]
        if qtype == GGMLType.Q5_K:
            parts.append(b[..., 16:48])
        parts += [b[..., 4:16], b[..., 0:2], b[..., 2:4]]
    return torch.cat([p.reshape(n, -1) for p in parts], dim=1)


def from_kernel_layout(kl: torch.Tensor, qtype) -> torch.Tensor:
    """The inverse of `to_kernel_layout`: the file's bytes, bit for bit."""
    _, nb = _blocks(kl, qtype)
    n = kl.shape[0]
    if qtype == GGMLType.Q6_K:
        words, high, scales, d = _regions(kl, nb, (128, 64, 16, 2))
        ql, qh = _q6_file_bits(_from_words(words, 16), _q6_high_from_kernel(high))
        blocks = [ql, qh, scales, d]
    else:
        sizes = (128, 12, 2, 2) if qtype == GGMLType.Q4_K else (128, 32, 12, 2, 2)
        words, *rest = _regions(kl, nb, sizes)
        *qh, scales, d, dmin = rest
        blocks = [d, dmin, scales, *qh, _k4_file_qs(_from_words(words, 32))]
    return torch.cat(blocks, dim=2).reshape(n, -1)


def dequantize(kl: torch.Tensor, qtype, k: int, dtype) -> torch.Tensor:
    """[N, k] weights decoded from the kernel layout in torch (a reference path, and the way to
    expand a matrix where no kernel runs); equal bit for bit to decoding the file's blocks."""
    _, nb = _blocks(kl, qtype)
    if nb * QK_K != k:
        raise ValueError(f"{nb} super-blocks per row do not make k={k}")
    n = kl.shape[0]

    def f16(region):
        return region.contiguous().view(torch.float16).float()  # [n, nb, 1]

    if qtype == GGMLType.Q6_K:
        words, high, scales, d = _regions(kl, nb, (128, 64, 16, 2))
        q = (_from_words(words, 16) | (_q6_high_from_kernel(high) << 4)).to(torch.int32) - 32
        sc = scales.contiguous().view(torch.int8).float()
        w = f16(d).unsqueeze(-1) * sc.unsqueeze(-1) * q.reshape(n, nb, 16, 16).float()
    else:
        if qtype == GGMLType.Q4_K:
            words, scales, d, dmin = _regions(kl, nb, (128, 12, 2, 2))
            q = _from_words(words, 32)
        else:
            words, qh, scales, d, dmin = _regions(kl, nb, (128, 32, 12, 2, 2))
            fifth = torch.cat([(qh >> s) & 1 for s in range(8)], dim=-1)  # value 32s + j at 32s + j
            q = _from_words(words, 32) | (fifth << 4)
        sc, mn = _k4_scales_mins(scales.reshape(n * nb, 12))
        sc, mn = sc.reshape(n, nb, 8, 1), mn.reshape(n, nb, 8, 1)
        q = q.reshape(n, nb, 8, 32).float()
        w = f16(d).unsqueeze(-1) * sc * q - f16(dmin).unsqueeze(-1) * mn
    return w.reshape(n, k).to(dtype)


# ---- kernels ---------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _unit_products(acc, x_rows, m_ok, j, rows, n_ok, u,
                       w_u8, w_i8, w_i16, w_f16, w_words,
                       QT: tl.constexpr, NB: tl.constexpr, RB: tl.constexpr, G: tl.constexpr,
                       HALVES: tl.constexpr, DOT: tl.constexpr):
        """Adds the products of unit u of weight rows `rows` to acc [BM, BN]. Weight tiles are
        [G, BN]: word j of the unit down, rows across."""
        r = rows.to(tl.int64)[None, :]
        ok = n_ok[None, :]
        wj = (u * G + j)[:, None]
        if HALVES:  # rows not 4-byte aligned (Q6_K with an odd count of super-blocks)
            lo = tl.load(w_words + r * (RB // 2) + 2 * wj, mask=ok, other=0).to(tl.int32) & 0xFFFF
            hi = tl.load(w_words + r * (RB // 2) + 2 * wj + 1, mask=ok, other=0).to(tl.int32)
            words = lo | (hi << 16)
        else:
            words = tl.load(w_words + r * (RB // 4) + wj, mask=ok, other=0)
        rr = rows.to(tl.int64)
        if QT == 2:
            high = tl.load(w_i16 + r * (RB // 2) + 64 * NB + 16 * u + j[:, None], mask=ok, other=0).to(tl.int32)
            d = tl.load(w_f16 + rr * (RB // 2) + 104 * NB + u // 2, mask=n_ok, other=0.0).to(tl.float32)
        else:
            if QT == 0:
                sc_word, d_half = 32 * NB, 70 * NB
            else:
                sc_word, d_half = 40 * NB, 86 * NB
                high = tl.load(w_u8 + r * RB + 128 * NB + 32 * u + j[:, None], mask=ok, other=0).to(tl.int32)
            # the 12 packed scale bytes of the super-block as three little-endian words
            s0 = tl.load(w_words + rr * (RB // 4) + sc_word + 3 * u, mask=n_ok, other=0)
            s1 = tl.load(w_words + rr * (RB // 4) + sc_word + 3 * u + 1, mask=n_ok, other=0)
            s2 = tl.load(w_words + rr * (RB // 4) + sc_word + 3 * u + 2, mask=n_ok, other=0)
            d = tl.load(w_f16 + rr * (RB // 2) + d_half + u, mask=n_ok, other=0.0).to(tl.float32)
            dmin = tl.load(w_f16 + rr * (RB // 2) + d_half + NB + u, mask=n_ok, other=0.0).to(tl.float32)
        for s in tl.static_range(8):
            q = (words >> (4 * s)) & 15
            if QT == 2:
                sc = tl.load(w_i8 + rr * RB + 192 * NB + 8 * u + s, mask=n_ok, other=0).to(tl.float32)
                q = q | (((high >> (2 * s)) & 3) << 4)
                a = d * sc
                b = 32.0 * a
            else:
                if QT == 1:
                    q = q | (((high >> s) & 1) << 4)
                if s < 4:
                    sc = (s0 >> (8 * s)) & 63
                    mn = (s1 >> (8 * s)) & 63
                else:
                    sc = ((s2 >> (8 * (s - 4))) & 15) | (((s0 >> (8 * (s - 4) + 6)) & 3) << 4)
                    mn = ((s2 >> (8 * (s - 4) + 4)) & 15) | (((s1 >> (8 * (s - 4) + 6)) & 3) << 4)
                a = d * sc.to(tl.float32)
                b = dmin * mn.to(tl.float32)
            w = q.to(tl.float32) * a[None, :] - b[None, :]
            xs = tl.load(x_rows + (u * 8 * G + s * G + j)[None, :], mask=m_ok[:, None], other=0.0)
            if DOT:
                acc += tl.dot(xs, w.to(tl.float16))
            else:
                acc += tl.sum(xs.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
        return acc

    @triton.jit
    def _k_matmul_kernel(x_ptr, w_u8, w_i8, w_i16, w_f16, w_words, out_ptr, part_ptr,
                         M, N_OUT, H, stride_xm, UNITS_PER_SLICE,
                         QT: tl.constexpr, NB: tl.constexpr, RB: tl.constexpr, G: tl.constexpr,
                         HALVES: tl.constexpr, DOT: tl.constexpr, SWIGLU: tl.constexpr,
                         PARTIAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        m_ok = rm < M
        n_ok = rn < N_OUT
        j = tl.arange(0, G)
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        u_start = pid_k * UNITS_PER_SLICE
        u_end = tl.minimum(u_start + UNITS_PER_SLICE, NB * (256 // (8 * G)))
        for u in range(u_start, u_end):
            acc = _unit_products(acc, x_rows, m_ok, j, rn, n_ok, u, w_u8, w_i8, w_i16, w_f16, w_words,
                                 QT, NB, RB, G, HALVES, DOT)
            if SWIGLU:
                acc_up = _unit_products(acc_up, x_rows, m_ok, j, rn + H, n_ok, u, w_u8, w_i8, w_i16, w_f16,
                                        w_words, QT, NB, RB, G, HALVES, DOT)
        gate = acc
        up = acc_up
        ok = m_ok[:, None] & n_ok[None, :]
        if PARTIAL:
            n_rows = N_OUT * 2 if SWIGLU else N_OUT
            p = part_ptr + (pid_k * M + rm[:, None]).to(tl.int64) * n_rows + rn[None, :]
            tl.store(p, gate, mask=ok)
            if SWIGLU:
                tl.store(p + H, up, mask=ok)
        else:
            if SWIGLU:
                gate = silu_times(gate, up)
            o = out_ptr + rm.to(tl.int64)[:, None] * N_OUT + rn[None, :]
            tl.store(o, gate.to(tl.float16), mask=ok)


# Programs wanted in flight: 132 SMs, a few programs each, so that weight loads overlap.
TARGET_PROGRAMS = 4 * 132


@dataclass(frozen=True)
class Tiles:
    dot: bool  # tl.dot on fp16 weight tiles; else float32 products on CUDA cores
    block_m: int
    block_n: int
    slices: int  # K split in this many slices (1: no partial buffer)
    units_per_slice: int
    num_warps: int = 8
    num_stages: int = 2


def tiles(m: int, n_out: int, k: int, qtype, swiglu: bool = False) -> Tiles:
    """Tile sizes for an [m, k] x [k, n_out] product (n_out = h for swiglu)."""
    units = k // (8 * UNIT_WORDS[qtype])
    dot = m > 2
    if dot:
        block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
        block_n = 64
    else:
        block_m = m
        block_n = 64 if m == 1 else 32
    if swiglu:
        block_n //= 2
    m_tiles = triton.cdiv(m, block_m)
    while block_n > 16 and triton.cdiv(n_out, block_n) * m_tiles * units < TARGET_PROGRAMS:
        block_n //= 2
    tiles_mn = triton.cdiv(n_out, block_n) * m_tiles
    slices = max(1, min(units, triton.cdiv(TARGET_PROGRAMS, tiles_mn)))
    per_slice = triton.cdiv(units, slices)
    return Tiles(dot, block_m, block_n, triton.cdiv(units, per_slice), per_slice)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output and partial-sum buffers (the tests fill them with NaN instead)."""
    return torch.empty(shape, dtype=dtype, device=device)


def matmul(x: torch.Tensor, w: torch.Tensor, qtype, n: int, k: int, *, swiglu: bool = False) -> torch.Tensor:
    """x (fp16 [M, k]) times the transpose of the [n, k] matrix whose kernel-layout rows are `w`:
    fp16 [M, n], float32 sums. With swiglu, w's rows are the gate's h rows then the up's h rows
    (n = 2h) and the result is silu(gate) * up, fp16 [M, h]."""
    if qtype not in TYPES:
        raise ValueError(f"no K-quant kernel for {qtype!r}")
    if k % QK_K or x.dtype != torch.float16 or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"expected fp16 x [M, {k}] with k a multiple of {QK_K}, got {x.dtype} {tuple(x.shape)}")
    nb = k // QK_K
    rb = nb * BLOCK_BYTES[qtype]
    if w.dtype != torch.uint8 or tuple(w.shape) != (n, rb) or not w.is_contiguous():
        raise ValueError(f"expected contiguous uint8 w [{n}, {rb}], got {w.dtype} {tuple(w.shape)}")
    if swiglu and n % 2:
        raise ValueError("swiglu needs the gate and up rows joined: n = 2h")
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    n_out = n // 2 if swiglu else n
    t = tiles(m, n_out, k, qtype, swiglu)
    halves = rb % 4 != 0 or w.data_ptr() % 4 != 0
    w_words = w.view(torch.int16) if halves else w.view(torch.int32)
    out = _empty((m, n_out), torch.float16, x.device)
    partial = _empty((t.slices, m, n), torch.float32, x.device) if t.slices > 1 else out
    grid = (triton.cdiv(n_out, t.block_n), triton.cdiv(m, t.block_m), t.slices)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _k_matmul_kernel[grid](x, w, w.view(torch.int8), w.view(torch.int16), w.view(torch.float16), w_words,
                               out, partial, m, n_out, n_out, x.stride(0), t.units_per_slice,
                               QT=_KERNEL_TYPE_ID[qtype], NB=nb, RB=rb, G=UNIT_WORDS[qtype], HALVES=halves,
                               DOT=t.dot, SWIGLU=swiglu, PARTIAL=t.slices > 1, BM=t.block_m, BN=t.block_n,
                               num_warps=t.num_warps, num_stages=t.num_stages)
        if t.slices > 1:
            sum_splits(partial, out, swiglu)
    return out
