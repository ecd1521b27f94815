"""Speed and error of the K-quant matrix products (`pipellm_core.model.kernels.k_products.matmul`)
on a CUDA GPU, at Llama-8B shapes, against the device's copy bandwidth measured in the same run.

    python benchmarks/kernel_probe_k.py --json OUT.json [--types Q4_K,Q5_K,Q6_K] [--m 1,2,4,8,16,32]

For each type, (n, k) and M: the median time of one product (triton.testing.do_bench; each call
takes the next of several copies of the weights, so the L2 cache does not serve them), the bytes
moved (weights + x + output) over that time in GB/s and as a fraction of the copy bandwidth, the
tile plan, and the relative L2 error against a float32 product by the decoded weights and the
activations rounded to 8 bits per block of 32 (what the kernels multiply).
"""

import argparse
import itertools
import json

import torch
import triton
import triton.testing
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.model.activation_rounding import _q8_blocks
from pipellm_core.model.kernels import k_products

SHAPES = [(4096, 4096, False), (1024, 4096, False), (28672, 4096, True), (4096, 14336, False),
          (49152, 4096, False)]
ROTATED_BYTES = 512 << 20  # weight copies cycled through per shape: ten times the 50 MB L2
# byte offsets of the fp16 d (and dmin) fields of a file block, set to sane scales
SCALE_FIELDS = {GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,)}


def copy_bandwidth() -> float:
    """GB/s of a 2 GB device-to-device copy: bytes read plus bytes written over the time."""
    src = torch.empty(1 << 30, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    del src, dst
    return 2 * (2 << 30) / (ms * 1e-3) / 1e9


def random_weights(qtype, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random file blocks of `qtype` on the device (scales about 0.002, as real weights have),
    in the kernel layout."""
    size = k_products.BLOCK_BYTES[qtype]
    raw = torch.randint(0, 256, (n, k // 256, size), dtype=torch.uint8, device="cuda", generator=gen)
    for off in SCALE_FIELDS[qtype]:
        d = (torch.rand(n, k // 256, 1, device="cuda", generator=gen) + 0.5) * 0.002
        raw[:, :, off:off + 2] = d.half().view(torch.uint8)
    return k_products.to_kernel_layout(raw.reshape(n, -1), qtype)


def reference(x: torch.Tensor, w_decoded: torch.Tensor, swiglu: bool) -> torch.Tensor:
    y = _q8_blocks(x.float(), 32) @ w_decoded.t()
    if swiglu:
        h = y.shape[1] // 2
        return torch.nn.functional.silu(y[:, :h]) * y[:, h:]
    return y


def plan_of(m: int, n_out: int, k: int, qtype) -> dict:
    """The tiles `k_products.matmul` picks for this shape."""
    if m > k_products.GEMV_MAX_ROWS:
        return dict(zip(("kernel", "block_m", "block_n", "num_warps"), ("tiled", *k_products.tiled_tiles(m))))
    group_words = 4 if qtype == GGMLType.Q6_K else 8
    tiles = k_products.gemv_tiles(m, n_out, 32 * (k // 256) // group_words, group_words)
    return dict(zip(("kernel", "block_n", "block_g", "splits", "num_warps"), ("gemv", *tiles)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--types", default="Q4_K,Q5_K,Q6_K")
    ap.add_argument("--m", default="1,2,4,8,16,32")
    args = ap.parse_args()
    ms_list = [int(m) for m in args.m.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)

    copy_gbs = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {copy_gbs:.0f} GB/s (2 GB copy, read + write)",
          flush=True)
    rows = []
    for name in args.types.split(","):
        qtype = GGMLType[name]
        for n, k, swiglu in SHAPES:
            w = random_weights(qtype, n, k, gen)
            w_decoded = k_products.dequantize(w, qtype, k, torch.float32)
            copies = [w] + [w.clone() for _ in range(max(1, ROTATED_BYTES // w.numel()) - 1)]
            n_out = n // 2 if swiglu else n
            for m in ms_list:
                x = (torch.randn(m, k, device="cuda", generator=gen)).half()
                got = k_products.matmul(x, w, qtype, n, k, swiglu=swiglu).float()
                want = reference(x, w_decoded, swiglu)
                err = ((got - want).norm() / want.norm()).item()
                cycle = itertools.cycle(copies)
                ms = triton.testing.do_bench(lambda: k_products.matmul(x, next(cycle), qtype, n, k, swiglu=swiglu),
                                             return_mode="median")
                moved = w.numel() + x.numel() * 2 + m * n_out * 2
                gbs = moved / (ms * 1e-3) / 1e9
                plan = plan_of(m, n_out, k, qtype)
                row = dict(type=name, n=n, k=k, swiglu=swiglu, m=m, us=ms * 1e3, gb_s=gbs,
                           of_copy=gbs / copy_gbs, rel_err=err, weight_bytes=w.numel(), copies=len(copies),
                           tiles=plan)
                rows.append(row)
                print(f"{name} n={n:6d} k={k:6d}{' swiglu' if swiglu else '       '} M={m:3d}  "
                      f"{ms * 1e3:9.1f} us  {gbs:7.0f} GB/s  {gbs / copy_gbs:6.1%} of copy  err {err:.1e}  "
                      f"{plan}", flush=True)
            del copies, w, w_decoded
            torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), triton=triton.__version__, torch=torch.__version__,
                       copy_gb_s=copy_gbs, rows=rows), f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
