"""Speed and error of the Q4_0 / Q4_1 / Q8_0 products on re-laid-out weights
(pipellm_core.model.kernels.q32_products), on one CUDA GPU.

    python benchmarks/kernel_probe_q32.py --json OUT.json [--models llama-8b-q4_0] [--rows 1,8,32]
                                          [--sweep --tiles TILES.json]

For each type, matrix shape (n, k; swiglu rows hold gate and up) and number of rows M of x:
the median time of `matmul` (replays of a CUDA graph of products timed with
triton.testing.do_bench, rotating between weight copies so that the L2 cache does not serve them), the bandwidth it reached (weight bytes + x + output over the
time), and the relative L2 error against a float32 torch product of the dequantized weights.
The device-to-device copy bandwidth of the same GPU (a 2 GB buffer, bytes read + written) is
measured first as the ceiling. --sweep also times the kernels' other tile choices (the decode
kernel up to GEMV_MAX_ROWS rows, the tiled kernel above) and writes the best per shape to
--tiles, in the format of `q32_products.TILES_FILE`.
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import triton
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.gguf.synthetic import random_blocks
from pipellm_core.model.activation_rounding import _q8_blocks
from pipellm_core.model.kernels import q32_products as q32

# model -> its decode step's products of these types: (type, n, k, swiglu)
MODELS = {
    "llama-8b-q4_0": [("Q4_0", 6144, 4096, False), ("Q4_0", 4096, 4096, False),
                      ("Q4_0", 28672, 4096, True), ("Q4_0", 4096, 14336, False)],
    "smollm2-135m-q4_1": [("Q4_1", 960, 576, False), ("Q4_1", 576, 576, False), ("Q4_1", 3072, 576, True),
                          ("Q4_1", 576, 1536, False), ("Q8_0", 49152, 576, False)],
}
ROWS = [1, 2, 4, 8, 16, 32]
ROTATE_BYTES = 512 << 20  # weight copies per shape: at least this much, several times the L2


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
    y = _q8_blocks(x.float(), 32) @ q32.dequantize(kl, qtype, k, torch.float32).t()
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
    ms = triton.testing.do_bench(graph.replay, warmup=5, rep=40, return_mode="median")
    return ms / calls


def gemv_choices(m, rows, blocks):
    for block_b in (4, 8, 16, 32):
        if block_b > max(4, triton.next_power_of_2(blocks)):
            continue
        for block_n in (2, 4, 8, 16, 32):
            for warps in (2, 4, 8):
                held = triton.next_power_of_2(m) * block_n * block_b * 4  # int32 words of a tile
                if not 32 * warps <= held <= 64 * 32 * warps:
                    continue
                for splits in (1, 2, 4):
                    tiles = -(-rows // block_n)
                    if splits > 1 and (tiles * splits > 4 * q32.SMS or blocks < splits * block_b):
                        continue
                    yield block_n, block_b, splits, warps


def tiled_choices(m, rows, blocks):
    for block_m in sorted({min(64, max(16, triton.next_power_of_2(m))), 16}):
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                yield block_m, block_n, warps


def sweep(x, ws, qtype, n, k, swiglu, kernel, budget_s):
    """(best ms, tiles) over the kernel's tile choices, by patching the tile rules (and keeping
    any tuned table out)."""
    rules, tuned = (q32.gemv_tiles, q32.tiled_tiles), q32.tuned_tiles
    m, rows, blocks = x.shape[0], (n // 2 if swiglu else n), k // 32
    rule = q32.gemv_tiles(m, rows, blocks) if kernel == "gemv" else q32.tiled_tiles(m, rows)
    choices = gemv_choices if kernel == "gemv" else tiled_choices
    # nearest the rule's choice first, so that the time budget goes to the likeliest tiles
    near = lambda t: sum(abs(math.log2(a) - math.log2(b)) for a, b in zip(t, rule))  # noqa: E731
    best = (float("inf"), None)
    q32.tuned_tiles = lambda index: {}
    start = time.perf_counter()
    try:
        for t in sorted(choices(m, rows, blocks), key=near):
            if time.perf_counter() - start > budget_s:
                break
            q32.gemv_tiles = q32.tiled_tiles = lambda *a, t=t: t
            try:
                ms = time_matmul(x, ws, qtype, n, k, swiglu, kernel=kernel)
            except Exception:  # out of resources for this tile
                continue
            best = min(best, (ms, t), key=lambda b: b[0])
    finally:
        (q32.gemv_tiles, q32.tiled_tiles), q32.tuned_tiles = rules, tuned
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--tiles", help="with --sweep: write the best tiles here (merged into what is there)")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of sweeping per shape and M")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    device = torch.cuda.get_device_name()
    result = {"device": device, "copy_GBps": copy_bandwidth(), "rows": []}
    table = {}
    if args.tiles and os.path.exists(args.tiles):
        with open(args.tiles) as f:
            table = json.load(f)
    print(f"{device}: device-to-device copy {result['copy_GBps']:.0f} GB/s", flush=True)
    print(f"{'type':5s} {'n':>6s} {'k':>6s} {'swiglu':6s} {'M':>3s} {'us':>9s} {'GB/s':>7s} {'err':>9s}"
          + ("  sweep: best us, GB/s, tiles" if args.sweep else ""))
    for model in args.models.split(","):
        for name, n, k, swiglu in MODELS[model]:
            qtype = GGMLType[name]
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
                row = dict(model=model, type=name, n=n, k=k, swiglu=swiglu, M=m, us=ms * 1e3,
                           GBps=moved / (ms * 1e-3) / 1e9, rel_err=err)
                line = (f"{name:5s} {n:6d} {k:6d} {str(swiglu):6s} {m:3d} {row['us']:9.1f} {row['GBps']:7.0f} "
                        f"{err:9.2e}")
                if args.sweep:
                    kernel = "gemv" if m <= q32.GEMV_MAX_ROWS else "tiled"
                    best_ms, tiles = sweep(x, ws, qtype, n, k, swiglu, kernel, args.budget)
                    row.update(sweep_us=best_ms * 1e3, sweep_tiles=tiles)
                    line += f"  {best_ms * 1e3:9.1f} {moved / (best_ms * 1e-3) / 1e9:7.0f} {tiles}"
                    if tiles is not None:
                        key = q32.tiles_key(kernel, m, rows, k // 32, swiglu)
                        table.setdefault(device, {})[key] = list(tiles)
                print(line, flush=True)
                result["rows"].append(row)
            del ws
            torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    if args.sweep and args.tiles:
        with open(args.tiles, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
