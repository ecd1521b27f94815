"""The fp16 matrix product of decode steps in Triton, and the switches every kernel reads.

`dense_matmul` multiplies by plain fp16 weights (F16 files, and dequantized types without a
kernel of their own) for the few rows of a decode step, in place of cuBLAS, whose algorithm
choice differs between a CUDA-graph capture and an eager run: a graph would then not give the
eager step's bits. Products accumulate in float32; the output is fp16.

Kernels are used only where Triton and CUDA are present (PIPELLM_KERNELS=torch turns them off);
everywhere else the torch path runs, and tests compare both (Triton's interpreter runs them on
the CPU). The quantized types' kernels are in `q32_products` and `k_products`.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch path serves
    triton = None

# read once, at import: every product asks
ENABLED = triton is not None and os.environ.get("PIPELLM_KERNELS", "triton") != "torch"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)


def on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (several GPUs)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# Up to this many rows (a decode step's batch), products with fp16 weights (F16 files, and the
# types without a kernel of their own, dequantized) run in `dense_matmul` rather than cuBLAS: cuBLAS
# picks other algorithms while a CUDA graph is captured than when it runs eagerly, so a graph's
# logits would differ from the eager step's in the last bits (and near-ties would flip).
DENSE_MAX_ROWS = 64


def supports_dense(x: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1]
    return ENABLED and x.dtype == torch.float16 and (x.is_cuda or INTERPRETED) and rows <= DENSE_MAX_ROWS


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
