"""What the product kernels do after their float32 sums: SiLU(gate) * up, and the sum of the
partial results of a product split over K.

The split-K partials are float32 [splits, M, n] (n = 2h with SiLU: gate in columns 0..h-1, up
in h..2h-1); they are added in split order, so a product gives the same bits at every run (no
atomics), as CUDA-graph replays must.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch path serves
    triton = None

if triton is not None:
    @triton.jit
    def silu_times(gate, up):
        """silu(gate) * up in float32 (the exponent clamped so that it never overflows)."""
        return gate / (1.0 + tl.exp(tl.minimum(-gate, 80.0))) * up

    @triton.jit
    def store_sums(out_ptr, acc, up, rm, rn, ok, N, pid_s, stride_os, SWIGLU: tl.constexpr, SPLIT: tl.constexpr):
        """A product program's float32 sums for x rows `rm` and output columns `rn` (`up`: the up
        half's, where SWIGLU; else unused). SPLIT: into the partials [splits, M, n] at split
        `pid_s` (both halves, for `sum_splits` to pair); else silu(gate) * up or the sums, fp16,
        into out [M, N]."""
        rows = rm[:, None].to(tl.int64)
        if SPLIT:
            part = out_ptr + pid_s.to(tl.int64) * stride_os + rows * (N * 2 if SWIGLU else N) + rn[None, :]
            tl.store(part, acc, mask=ok)
            if SWIGLU:
                tl.store(part + N, up, mask=ok)
        else:
            if SWIGLU:
                acc = silu_times(acc, up)
            tl.store(out_ptr + rows * N + rn[None, :], acc.to(tl.float16), mask=ok)

    @triton.jit
    def _sum_splits_kernel(part_ptr, out_ptr, M, N_OUT, SPLITS, SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < M * N_OUT
        m = i // N_OUT
        c = i % N_OUT
        n_rows = N_OUT * 2 if SWIGLU else N_OUT
        gate = tl.zeros((BLOCK,), dtype=tl.float32)
        up = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(SPLITS):
            row = part_ptr + (s * M + m).to(tl.int64) * n_rows
            gate += tl.load(row + c, mask=ok, other=0.0)
            if SWIGLU:
                up += tl.load(row + N_OUT + c, mask=ok, other=0.0)
        if SWIGLU:
            gate = silu_times(gate, up)
        tl.store(out_ptr + i, gate.to(tl.float16), mask=ok)


def sum_splits(partial: torch.Tensor, out: torch.Tensor, swiglu: bool) -> None:
    """out fp16 [M, n_out] = the split-K partials float32 [splits, M, n] added in split order
    (then SiLU(gate) * up where `swiglu`)."""
    splits, m, _ = partial.shape
    n_out = out.shape[1]
    block = 256
    _sum_splits_kernel[(triton.cdiv(m * n_out, block),)](partial, out, m, n_out, splits,
                                                         SWIGLU=swiglu, BLOCK=block, num_warps=4)
