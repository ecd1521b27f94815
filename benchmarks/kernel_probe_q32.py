"""Speed and error of the Q4_0 / Q4_1 / Q8_0 products on re-laid-out weights
(pipellm_core.model.kernels.q32_products), on one CUDA GPU.

    python benchmarks/kernel_probe_q32.py --json OUT.json [--types Q4_0,Q8_0] [--rows 1,8,32]
                                          [--sweep]

For each type, matrix shape (n, k; swiglu rows hold gate and up) and number of rows M of x:
the median time of `matmul` (replays of a CUDA graph of products timed with
triton.testing.do_bench, rotating between weight copies so that the L2 cache does not serve them), the bandwidth it reached (weight bytes + x + output over the
time), and the relative L2 error against a float32 torch product of the dequantized weights.
The device-to-device copy bandwidth of the same GPU (a 2 GB buffer, bytes read + written) is
measured first as the ceiling. --sweep also times the decode kernel's other tile choices and
prints the best per shape (for tuning `gemv_tiles`).
"""

import argparse
import json

import numpy as np
import torch
import triton
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.gguf.synthetic import random_blocks
from pipellm_core.model.kernels import q32_products as q32

SHAPES = [(4096, 4096, False), (1024, 4096, False), (28672, 4096, True), (4096, 14336, False),
          (49152, 576, False), (576, 576, False), (3072, 576, True), (576, 1536, False)]
ROWS = [1, 2, 4, 8, 16, 32]
ROTATE_BYTES = 512 << 20  # weight copies per shape: at least this much, several times the L2


def words_per_row(qtype, k):
    return k // 32 * (8 if qtype == GGMLType.Q8_0 else 4)


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    del a, b
    return 2 * (2 << 30) / (ms * 1e-3) / 1e9


def weights(qtype, n, k, rng):
    raw = torch.from_numpy(random_blocks(qtype, n * k // 32, rng, 0.002).reshape(n, -1))
    kl = q32.to_kernel_layout(raw, qtype).cuda()
    copies = max(2, min(16, -(-ROTATE_BYTES // kl.numel())))
    return [kl] + [kl.clone() for _ in range(copies - 1)]


def reference(x, kl, qtype, k, swiglu):
    y = x.float() @ q32.dequantize(kl, qtype, k, torch.float32).t()
    if swiglu:
        h = y.shape[1] // 2
        y = torch.nn.functional.silu(y[:, :h]) * y[:, h:]
    return y


def time_matmul(x, ws, qtype, n, k, swiglu, kernel=None):
    """Median µs of one product: a CUDA graph of several products (one per weight copy, in turn)
    replayed and timed with events, so that launch overhead on the host stays out."""
    calls = max(len(ws), 16)
    run = lambda: [q32.matmul(x, ws[i % len(ws)], qtype, n, k, swiglu=swiglu, kernel=kernel) for i in range(calls)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
    return ms / calls


def sweep_gemv(x, ws, qtype, n, k, swiglu):
    """(best ms, tiles) over decode-kernel tile choices, by patching gemv_tiles."""
    chosen = q32.gemv_tiles
    words = words_per_row(qtype, k)
    best = (float("inf"), None)
    try:
        for block_w in (128, 256):
            if block_w > max(128, triton.next_power_of_2(words)):
                continue
            for block_n in (4, 8, 16, 32):
                for splits in (1, 2, 4, 8):
                    if splits * block_w > words:
                        continue
                    for warps in (4, 8):
                        # registers: per-thread words times rows of x
                        if block_n * block_w * triton.next_power_of_2(x.shape[0]) > 64 * 32 * warps:
                            continue
                        q32.gemv_tiles = lambda m, r, w, t=(block_n, block_w, splits, warps): t
                        try:
                            ms = time_matmul(x, ws, qtype, n, k, swiglu, kernel="gemv")
                        except Exception:  # out of resources for this tile
                            continue
                        best = min(best, (ms, (block_n, block_w, splits, warps)), key=lambda b: b[0])
    finally:
        q32.gemv_tiles = chosen
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--types", default="Q4_0,Q4_1,Q8_0")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--shapes", default="all", help="indices into SHAPES, comma-separated, or all")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    result = {"device": torch.cuda.get_device_name(), "copy_GBps": copy_bandwidth(), "rows": []}
    print(f"{result['device']}: device-to-device copy {result['copy_GBps']:.0f} GB/s", flush=True)
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    print(f"{'type':5s} {'n':>6s} {'k':>6s} {'swiglu':6s} {'M':>3s} {'us':>9s} {'GB/s':>7s} {'err':>9s}"
          + ("  sweep: best us, (BLOCK_N, BLOCK_W, splits, warps)" if args.sweep else ""))
    for name in args.types.split(","):
        qtype = GGMLType[name]
        for n, k, swiglu in shapes:
            ws = weights(qtype, n, k, rng)
            w_bytes = ws[0].numel()
            for m in map(int, args.rows.split(",")):
                x = torch.randn(m, k, device="cuda").half()
                rows = n // 2 if swiglu else n
                got = q32.matmul(x, ws[0], qtype, n, k, swiglu=swiglu).float()
                want = reference(x, ws[0], qtype, k, swiglu)
                err = ((got - want).norm() / want.norm()).item()
                ms = time_matmul(x, ws, qtype, n, k, swiglu)
                moved = w_bytes + x.numel() * 2 + m * rows * 2
                row = dict(type=name, n=n, k=k, swiglu=swiglu, M=m, us=ms * 1e3, GBps=moved / (ms * 1e-3) / 1e9,
                           rel_err=err, tiles=list(q32.gemv_tiles(m, rows, words_per_row(qtype, k)))
                           if m <= q32.GEMV_MAX_ROWS else None)
                line = (f"{name:5s} {n:6d} {k:6d} {str(swiglu):6s} {m:3d} {row['us']:9.1f} {row['GBps']:7.0f} "
                        f"{err:9.2e}")
                if args.sweep and m <= q32.GEMV_MAX_ROWS:
                    best_ms, tiles = sweep_gemv(x, ws, qtype, n, k, swiglu)
                    row.update(sweep_us=best_ms * 1e3, sweep_tiles=tiles)
                    line += f"  {best_ms * 1e3:9.1f} {tiles}"
                print(line, flush=True)
                result["rows"].append(row)
            del ws
            torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
