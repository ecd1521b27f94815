"""Speed and error of the K-quant matrix products (`pipellm_core.model.kernels.k_products.matmul`)
on a CUDA GPU, at Llama-8B shapes, against the device's copy bandwidth measured in the same run.

    python benchmarks/kernel_probe_k.py --json OUT.json [--types Q4_K,Q5_K,Q6_K] [--m 1,2,4,8,16,32]
    python benchmarks/kernel_probe_k.py --sweep --tiles k_tiles.json [--budget 5]

The sweep times, by CUDA-graph replays, candidate tiles of both kernels for the products of a
Llama-8B Q4_K_M-mix step at 1 to 32 rows, and writes per shape the winning kernel's tiles (one
entry, the other kernel's removed) into --tiles, in the format of `k_products.TILES_FILE`
(merged into what the file holds, written after each shape). Without --sweep the products are
timed eagerly on fp16 activations (the rounding launch included).

For each type, (n, k) and M: the median time of one product (triton.testing.do_bench; each call
takes the next of several copies of the weights, so the L2 cache does not serve them), the bytes
moved (weights + x + output) over that time in GB/s and as a fraction of the copy bandwidth, the
tile plan, and the relative L2 error against a float32 product by the decoded weights and the
activations rounded to 8 bits per block of 32 (what the kernels multiply).
"""

import argparse
import os
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


def plan_of(m: int, n_out: int, k: int, qtype, swiglu: bool) -> dict:
    """The tiles `k_products.matmul` picks for this shape."""
    kernel, tiles = k_products._plan(m, n_out, k // 256, qtype, swiglu, torch.device("cuda"), None)
    names = ("block_n", "block_g", "splits", "num_warps") if kernel == "gemv" else \
        ("block_m", "block_n", "splits", "num_warps")
    return dict(kernel=kernel, **dict(zip(names, tiles)))


# (type, rows, k, swiglu) of a Llama-8B Q4_K_M-mix step: q/k/v stacked where v is Q4_K, q, k,
# output, gate/up and the Q4_K layers' down (Q4_K); v, the other layers' down and the head (Q6_K)
SWEEP_SHAPES = [("Q4_K", 6144, 4096, False), ("Q4_K", 4096, 4096, False), ("Q4_K", 1024, 4096, False), ("Q4_K", 28672, 4096, True),
                ("Q4_K", 4096, 14336, False), ("Q6_K", 1024, 4096, False), ("Q6_K", 4096, 14336, False),
                ("Q6_K", 49152, 4096, False)]
SWEEP_ROWS = tuple(int(m) for m in os.environ.get("SWEEP_ROWS", "1,2,4,8,16,32").split(","))


def candidates(m: int, n_out: int, k: int, qtype):
    """(kernel, tiles) to try, the rules' choice first."""
    nb = k // 256
    group_words = 4 if qtype == GGMLType.Q6_K else 8
    groups = 32 * nb // group_words
    gemv, tiled = [], []
    if m <= k_products.GEMV_MAX_ROWS:
        for block_n, words, warps in ((2, 128, 4), (4, 128, 4), (4, 64, 4), (8, 64, 4), (16, 64, 8), (8, 128, 8)):
            for splits in (1, 2, 4):
                if groups // (words // group_words) >= 2 * splits or splits == 1:
                    gemv.append(("gemv", (block_n, max(2, words // group_words), splits, warps)))
    if m >= 2:
        for splits in (1, 2, 4, 8):
            for block_n in (16, 32, 64):
                if nb * 8 // splits >= 16:
                    tiled.append(("tiled", (16 if m <= 16 else 32, block_n, splits, 4)))
    out = [k_products._plan(m, n_out, nb, qtype, False, torch.device("cpu"), None)]
    for i in range(max(len(gemv), len(tiled))):  # both kernels get tried within the budget
        out += gemv[i:i + 1] + tiled[i:i + 1]
    seen = []
    return [c for c in out if not (c in seen or seen.append(c))]


def sweep(tiles_path: str, budget: float) -> None:
    import time
    from pathlib import Path
    from kernels import graph_time  # benchmarks/kernels.py
    from pipellm_core.model.kernels import activation_q8

    gen = torch.Generator(device="cuda").manual_seed(0)
    device = torch.cuda.get_device_name()
    path = Path(tiles_path)
    table = json.loads(path.read_text()) if path.is_file() else {}
    best = table.setdefault(device, {})
    plan = k_products._plan
    for name, n, k, swiglu in SWEEP_SHAPES:
        qtype = GGMLType[name]
        w = random_weights(qtype, n, k, gen)
        copies = [w] + [w.clone() for _ in range(max(1, ROTATED_BYTES // 4 // w.numel()) - 1)]
        n_out = n // 2 if swiglu else n
        for m in SWEEP_ROWS:
            x = activation_q8.quantize(torch.randn(m, k, device="cuda", generator=gen).half())
            start, results = time.monotonic(), []
            for kernel, tiles in candidates(m, n_out, k, qtype):
                if time.monotonic() - start > budget and results:
                    break
                k_products._plan = lambda *a, kernel=kernel, tiles=tiles: (kernel, tiles)
                state = {"i": 0}

                def run():
                    state["i"] = (state["i"] + 1) % len(copies)
                    return k_products.matmul(x, copies[state["i"]], qtype, n, k, swiglu=swiglu)
                try:
                    results.append((graph_time(run, max(16, len(copies))), kernel, tiles))
                except Exception as e:  # a tile the compiler refuses (resources): skip it
                    print(f"  {kernel} {tiles}: {type(e).__name__}", flush=True)
                finally:
                    k_products._plan = plan
            if not results:
                continue
            results.sort()
            ms, kernel, tiles = results[0]
            rule_ms = next((r[0] for r in results if (r[1], r[2]) == candidates(m, n_out, k, qtype)[0]),
                           float("nan"))
            for other in ("gemv", "tiled"):  # one entry per shape: the winner's
                best.pop(k_products.tiles_key(other, qtype, m, n_out, k // 32, swiglu), None)
            best[k_products.tiles_key(kernel, qtype, m, n_out, k // 32, swiglu)] = list(tiles)
            moved = w.numel() + m * k + m * n_out * 2
            print(f"{name} {n:6d}x{k:5d}{' swiglu' if swiglu else '       '} M={m:2d}: best {kernel} {tiles} "
                  f"{ms * 1e3:7.1f} us {moved / ms / 1e6:6.0f} GB/s (rules {rule_ms * 1e3:7.1f} us, "
                  f"{len(results)} tried)", flush=True)
            path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        del copies, w
        torch.cuda.empty_cache()
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--tiles", default="k_tiles.json")
    ap.add_argument("--budget", type=float, default=5.0, help="seconds per shape and row count in the sweep")
    ap.add_argument("--types", default="Q4_K,Q5_K,Q6_K")
    ap.add_argument("--m", default="1,2,4,8,16,32")
    args = ap.parse_args()
    if not args.sweep and not args.json:
        ap.error("--json is required without --sweep")
    if args.sweep:
        return sweep(args.tiles, args.budget)
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
                plan = plan_of(m, n_out, k, qtype, swiglu)
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
