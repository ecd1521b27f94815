"""Matrix products straight from GGUF blocks on the GPU, in Triton.

The torch path expands a quantized matrix to fp16 in memory and then multiplies, moving about
eight times the bytes the blocks take. These kernels read the blocks (Q4_0, Q4_1, Q8_0: the
types of llama.cpp's common files) and expand them in registers, tile by tile, so a decode step
reads each weight once, as llama.cpp's kernels do.

`dense_matmul` multiplies by plain fp16 weights (F16 files, and dequantized types without a block
kernel) for the few rows of a decode step, in place of cuBLAS, whose algorithm choice differs
between a CUDA-graph capture and an eager run.

Numerics equal the torch path's: each weight is decoded in float32 (exact for these formats) and
rounded once to fp16, products accumulate in float32, the output is fp16. Only the order of the
float32 sums differs.

Why written here: no maintained library multiplies by GGUF blocks in PyTorch on NVIDIA GPUs.
Kernels are used only where Triton and CUDA are present (PIPELLM_KERNELS=torch turns them off);
everywhere else the torch path runs, and tests compare both (Triton's interpreter runs these on
the CPU).
"""

from __future__ import annotations

import contextlib
import os

import torch
from gguf import GGMLQuantizationType as T

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch path serves
    triton = None

# block layout of each 32-value type: (bytes per block, offset of the quants, 4-bit?, has a min)
LAYOUTS = {T.Q4_0: (18, 2, True, False), T.Q4_1: (20, 4, True, True), T.Q8_0: (34, 2, False, False)}
BLOCKS_PER_STEP = 8  # 256 values of K per loop iteration
SUPPORTED = set(LAYOUTS) | {T.Q6_K}
# read once: `supports` runs before every matrix product
ENABLED = triton is not None and os.environ.get("PIPELLM_KERNELS", "triton") != "torch"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)


def on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (several GPUs)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def supports(x: torch.Tensor, qtype) -> bool:
    """Whether `x @ W.T` for blocks of `qtype` runs in a kernel here."""
    return ENABLED and qtype in SUPPORTED and x.dtype == torch.float16 and (x.is_cuda or INTERPRETED)


# Up to this many rows (a decode step's batch), products with fp16 weights (F16 files, and the
# types without a block kernel, dequantized) run in `dense_matmul` rather than cuBLAS: cuBLAS
# picks other algorithms while a CUDA graph is captured than when it runs eagerly, so a graph's
# logits would differ from the eager step's in the last bits (and near-ties would flip).
DENSE_MAX_ROWS = 64


def supports_dense(x: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1]
    return ENABLED and x.dtype == torch.float16 and (x.is_cuda or INTERPRETED) and rows <= DENSE_MAX_ROWS


if triton is not None:
    @triton.jit
    def _fp16_at(ptr, mask):
        """The little-endian fp16 at byte address `ptr` (blocks are not 2-byte aligned)."""
        lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _block_matmul_kernel(x_ptr, w_ptr, out_ptr, M, N, stride_xm, stride_wn, stride_om,
                             n_blocks: tl.constexpr,
                             BLOCK_BYTES: tl.constexpr, QS_OFFSET: tl.constexpr, FOUR_BIT: tl.constexpr,
                             HAS_MIN: tl.constexpr, KB: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
        x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FOUR_BIT:
            # byte j of a block's quants holds value j (low nibble) and value j + 16 (high)
            i = tl.arange(0, KB * 16)
            blk_in_step = i // 16
            j = i % 16
            for b0 in range(0, n_blocks, KB):
                blk = b0 + blk_in_step
                ok = n_ok[:, None] & (blk < n_blocks)[None, :]
                base = w_rows + (blk * BLOCK_BYTES)[None, :]
                d = _fp16_at(base, ok)
                q = tl.load(base + QS_OFFSET + j[None, :], mask=ok, other=0)
                lo = (q & 15).to(tl.float32)
                hi = (q >> 4).to(tl.float32)
                if HAS_MIN:
                    mn = _fp16_at(base + 2, ok)
                    w_lo = d * lo + mn
                    w_hi = d * hi + mn
                else:
                    w_lo = d * (lo - 8.0)
                    w_hi = d * (hi - 8.0)
                w_lo = tl.where(ok, w_lo, 0.0).to(tl.float16)
                w_hi = tl.where(ok, w_hi, 0.0).to(tl.float16)
                k = blk * 32 + j
                xk_ok = m_ok[:, None] & (blk < n_blocks)[None, :]
                x_lo = tl.load(x_rows + k[None, :], mask=xk_ok, other=0.0)
                x_hi = tl.load(x_rows + (k + 16)[None, :], mask=xk_ok, other=0.0)
                acc += tl.dot(x_lo, tl.trans(w_lo))
                acc += tl.dot(x_hi, tl.trans(w_hi))
        else:
            i = tl.arange(0, KB * 32)
            blk_in_step = i // 32
            j = i % 32
            for b0 in range(0, n_blocks, KB):
                blk = b0 + blk_in_step
                ok = n_ok[:, None] & (blk < n_blocks)[None, :]
                base = w_rows + (blk * BLOCK_BYTES)[None, :]
                d = _fp16_at(base, ok)
                q = tl.load(base + QS_OFFSET + j[None, :], mask=ok, other=0).to(tl.int8, bitcast=True)
                w = tl.where(ok, d * q.to(tl.float32), 0.0).to(tl.float16)
                k = blk * 32 + j
                xk_ok = m_ok[:, None] & (blk < n_blocks)[None, :]
                xv = tl.load(x_rows + k[None, :], mask=xk_ok, other=0.0)
                acc += tl.dot(xv, tl.trans(w))
        out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(out, acc.to(tl.float16), mask=m_ok[:, None] & n_ok[None, :])


    @triton.jit
    def _q6_k_matmul_kernel(x_ptr, w_ptr, out_ptr, M, N, stride_xm, stride_wn, stride_om,
                            n_blocks: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Blocks of 256 values in 210 bytes: ql[128], qh[64], 16 int8 scales, fp16 d.
        Value i of a block (i = half*128 + quarter*32 + l) takes its low 4 bits from
        ql[64*half + 32*(quarter & 1) + l] (high nibble for quarters 2, 3), its top 2 bits from
        qh[32*half + l] >> 2*quarter, and scale 8*half + 2*quarter + l // 16 (ggml's layout)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
        x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
        i = tl.arange(0, 256)
        half = i // 128
        quarter = (i % 128) // 32
        l = i % 32
        ql_off = (64 * half + 32 * (quarter & 1) + l)[None, :]
        nib_shift = (4 * (quarter >> 1)).to(tl.uint8)[None, :]
        qh_off = (128 + 32 * half + l)[None, :]
        qh_shift = (2 * quarter).to(tl.uint8)[None, :]
        sc_off = (192 + 8 * half + 2 * quarter + l // 16)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for blk in range(0, n_blocks):
            base = w_rows + blk * 210
            ok = n_ok[:, None]
            ql = tl.load(base + ql_off, mask=ok, other=0)
            qh = tl.load(base + qh_off, mask=ok, other=0)
            sc = tl.load(base + sc_off, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            q = (((ql >> nib_shift) & 15) | (((qh >> qh_shift) & 3) << 4)).to(tl.float32) - 32.0
            d = _fp16_at(base + 208, ok)
            w = tl.where(ok, (d * sc) * q, 0.0).to(tl.float16)
            xv = tl.load(x_rows + (blk * 256 + i)[None, :], mask=m_ok[:, None], other=0.0)
            acc += tl.dot(xv, tl.trans(w))
        out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(out, acc.to(tl.float16), mask=m_ok[:, None] & n_ok[None, :])


if triton is not None:
    @triton.jit
    def _dense_matmul_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
        w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + rk) < K
            xv = tl.load(x_rows + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wv = tl.load(w_rows + (k0 + rk)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(xv, tl.trans(wv))
        out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(out, acc.to(tl.float16), mask=m_ok[:, None] & n_ok[None, :])


def dense_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., k] (fp16, at most DENSE_MAX_ROWS rows) times the transpose of w [n, k] (fp16):
    [..., n] in fp16, float32 sums."""
    shape, (n, k) = x.shape, w.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=torch.float16, device=x.device)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    grid = (triton.cdiv(n, 32), triton.cdiv(m, block_m))
    with on_device_of(x):
        _dense_matmul_kernel[grid](x2, w, out, m, n, k, x2.stride(0), w.stride(0), out.stride(0),
                                   BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=128, num_warps=4)
    return out.reshape(*shape[:-1], n)


def block_matmul(x: torch.Tensor, raw: torch.Tensor, qtype, n: int, k: int) -> torch.Tensor:
    """x [..., k] (fp16) times the transpose of the [n, k] matrix whose GGUF blocks are `raw`
    (uint8 [n, bytes per row]): [..., n] in fp16."""
    shape = x.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=torch.float16, device=x.device)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 32 if m <= 32 else 64
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    with on_device_of(x):
        if qtype == T.Q6_K:
            _q6_k_matmul_kernel[grid](x2, raw, out, m, n, x2.stride(0), raw.stride(0), out.stride(0), k // 256,
                                      BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
        else:
            block_bytes, qs_offset, four_bit, has_min = LAYOUTS[qtype]
            _block_matmul_kernel[grid](x2, raw, out, m, n, x2.stride(0), raw.stride(0), out.stride(0), k // 32,
                                       BLOCK_BYTES=block_bytes, QS_OFFSET=qs_offset, FOUR_BIT=four_bit,
                                       HAS_MIN=has_min, KB=BLOCKS_PER_STEP, BLOCK_M=block_m, BLOCK_N=block_n,
                                       num_warps=4)
    return out.reshape(*shape[:-1], n)
