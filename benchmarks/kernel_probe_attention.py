"""Speed of `decode_attention` (keys and values read from the cache by slot) on a CUDA GPU, beside
the torch path it replaces (gather the rows' cache, then fused attention).

    python benchmarks/kernel_probe_attention.py [--json OUT.json]

For each (B, H, KV, D) and context length, every row attends the whole context (lengths =
ctx_len). Rows: median µs per call of the kernel (both passes) and of the gather + SDPA path,
the kernel's achieved GB/s over the bytes of K and V the rows attend, the split shape, and the
kernel's largest error relative to SDPA on the gathered tensors.
"""

import json
import math
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from pipellm_core.model.kernels import decode_attention as kernel

SHAPES = [(1, 32, 8, 128), (8, 32, 8, 128), (32, 32, 8, 128), (1, 9, 3, 64), (32, 9, 3, 64)]
CONTEXTS = [256, 1024, 4096]


def probe(B: int, H: int, KV: int, D: int, ctx_len: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(B * 7919 + ctx_len)
    S = B
    k_cache = torch.randn(S, KV, ctx_len, D, device="cuda", dtype=torch.float16, generator=g)
    v_cache = torch.randn(S, KV, ctx_len, D, device="cuda", dtype=torch.float16, generator=g)
    q = torch.randn(B, H, D, device="cuda", dtype=torch.float16, generator=g)
    slots = torch.randperm(S, device="cuda", generator=g)
    lengths = torch.full((B,), ctx_len, device="cuda", dtype=torch.int32)
    scale = 1 / math.sqrt(D)
    workspace = torch.empty(kernel.workspace_size(B, H, D, ctx_len), device="cuda", dtype=torch.float32)

    def ours():
        return kernel.decode_attention(q, k_cache, v_cache, slots, lengths, ctx_len, scale, workspace)

    def gathered():
        keys, values = k_cache[slots, :, :ctx_len], v_cache[slots, :, :ctx_len]
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, scale=scale, enable_gqa=KV != H)
        return out[:, :, 0]

    got, want = ours().float(), gathered().float()
    err = ((got - want).abs().max() / want.abs().max()).item()
    us = do_bench(ours, return_mode="median") * 1e3
    torch_us = do_bench(gathered, return_mode="median") * 1e3
    kv_bytes = 2 * B * KV * ctx_len * D * k_cache.element_size()
    split_len, n_splits = kernel.split_shape(B, H, ctx_len)
    return dict(B=B, H=H, KV=KV, D=D, ctx_len=ctx_len, split_len=split_len, n_splits=n_splits,
                programs=B * KV * n_splits, us=round(us, 2), gb_s=round(kv_bytes / us / 1e3, 1),
                torch_us=round(torch_us, 2), max_rel_err_vs_sdpa=err, ok=err < 5e-3)


def main():
    rows = []
    for B, H, KV, D in SHAPES:
        for ctx_len in CONTEXTS:
            row = probe(B, H, KV, D, ctx_len)
            rows.append(row)
            print(f"B {B:2d} H {H:2d} KV {KV} D {D:3d} ctx {ctx_len:4d}  splits {row['n_splits']:2d}x{row['split_len']:4d}"
                  f"  {row['us']:8.1f} µs  {row['gb_s']:7.1f} GB/s   gather+sdpa {row['torch_us']:8.1f} µs"
                  f"  err {row['max_rel_err_vs_sdpa']:.1e}{'' if row['ok'] else '  MISMATCH'}", flush=True)
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
