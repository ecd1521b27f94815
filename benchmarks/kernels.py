"""Every matrix product of the benchmark models' decode step, timed alone on the GPU.

For each model shape, product (q/k/v stacked, output, gate/up stacked with SiLU, down, head) and
batch, the median time of the kernel the engine would run and the bandwidth it reaches (weight
bytes + activations in and out, over the time), beside the device-to-device copy bandwidth
measured in the same run. Weights are random blocks in the kernels' layout; several copies are
rotated so that the 60 MB L2 does not serve them. Times are of CUDA-graph replays (as the
engine runs a step with the graphs plugin), so that host launch overhead stays out. Products
that multiply 8-bit activations get them made beforehand, as the norm kernel makes them in a
step (before commit a49508f they rounded fp16 activations themselves, one more small launch).

    python benchmarks/kernels.py --json out.json [--batches 1,8,32]
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import torch
import triton.testing
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as GGMLType

from pipellm_core.gguf.synthetic import SHAPES, q4_k_m_mix, random_blocks
from pipellm_core.model.kernels import activation_q8, decode_attention, products, quant_matmul

# model name -> (shape, type of each product, head type)
MODELS = {
    "smollm2-135m-q4_1": ("smollm2-135m", lambda name: GGMLType.Q4_1, GGMLType.Q8_0),
    "llama-8b-q4_0": ("llama-8b", lambda name: GGMLType.Q4_0, GGMLType.Q6_K),
    "llama-8b-q4_k_m": ("llama-8b", lambda name: q4_k_m_mix(name, 0, 32) or GGMLType.Q4_K, GGMLType.Q6_K),
    "llama-8b-f16": ("llama-8b", lambda name: GGMLType.F16, GGMLType.F16),
}


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GB: bytes read + written per second."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def weight_copies(qtype, n: int, k: int, copies: int, rng):
    """`copies` random [n, k] matrices of `qtype` on the GPU, in the layout the engine uses."""
    out = []
    for _ in range(copies):
        if qtype == GGMLType.F16:
            out.append((torch.randn(n, k, device="cuda") * 0.02).half())
            continue
        block = GGML_QUANT_SIZES[qtype][0]
        raw = torch.from_numpy(random_blocks(qtype, n * k // block, rng, 0.002).reshape(n, -1)).cuda()
        out.append(products.to_kernel_layout(raw, qtype))
    return out


def product(qtype, x, w, n, k, swiglu):
    if qtype == GGMLType.F16:
        y = quant_matmul.dense_matmul(x, w)
        if swiglu:
            g, u = y.chunk(2, dim=-1)
            y = torch.nn.functional.silu(g) * u
        return y
    return products.matmul(x, w, qtype, n, k, swiglu=swiglu)


def graph_time(fn, calls: int) -> float:
    """Median ms of one `fn()`: a CUDA graph of `calls` calls, its replays timed with events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(calls):
            fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median") / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    copy_bw = copy_bandwidth()
    rows = []
    print(f"device copy bandwidth: {copy_bw / 1e12:.2f} TB/s")
    print(f"{'model':20} {'product':10} {'type':6} {'n x k':>13} {'B':>3} {'us':>8} {'GB/s':>7} {'of copy':>7}")
    for model in args.models.split(","):
        shape_name, type_of, head_type = MODELS[model]
        s = SHAPES[shape_name]
        hd = s.n_embd // s.n_heads
        prods = [("qkv", type_of("attn_q"), (s.n_heads + 2 * s.n_kv_heads) * hd, s.n_embd, False),
                 ("output", type_of("attn_output"), s.n_embd, s.n_embd, False),
                 ("gate_up", type_of("ffn_gate"), 2 * s.n_ff, s.n_embd, True),
                 ("down", type_of("ffn_down"), s.n_embd, s.n_ff, False),
                 ("head", head_type, s.vocab_size, s.n_embd, False)]
        for name, qtype, n, k, swiglu in prods:
            if qtype == GGMLType.F16:
                wbytes = n * k * 2
            else:
                block, size = GGML_QUANT_SIZES[qtype]
                wbytes = n * k // block * size
            copies = max(2, min(8, int(3 * 60e6 // wbytes) + 1))
            ws = weight_copies(qtype, n, k, copies, rng)
            for B in batches:
                x = torch.randn(B, k, device="cuda").half()
                if products.reads_q8(qtype):  # in a step, the norm kernel writes the 8-bit quants
                    x = activation_q8.quantize(x)
                state = {"i": 0}

                def run():
                    state["i"] = (state["i"] + 1) % copies
                    return product(qtype, x, ws[state["i"]], n, k, swiglu)
                ms = graph_time(run, max(16, copies))
                out_cols = n // 2 if swiglu else n
                moved = wbytes + B * k * 2 + B * out_cols * 2
                bw = moved / (ms * 1e-3)
                rows.append(dict(model=model, product=name, type=qtype.name, n=n, k=k, batch=B,
                                 us=ms * 1e3, gbps=bw / 1e9, fraction_of_copy=bw / copy_bw))
                print(f"{model:20} {name:10} {qtype.name:6} {f'{n}x{k}':>13} {B:>3} {ms * 1e3:8.1f} "
                      f"{bw / 1e9:7.0f} {bw / copy_bw:7.0%}", flush=True)
            del ws
    attn = []
    for B, H, KV, D in ((1, 32, 8, 128), (8, 32, 8, 128), (32, 32, 8, 128), (1, 9, 3, 64), (32, 9, 3, 64)):
        for ctx in (256, 1024, 4096):
            S = B + 1
            kc = torch.randn(S, KV, ctx, D, device="cuda").half()
            vc = torch.randn_like(kc)
            q = torch.randn(B, H, D, device="cuda").half()
            slots = torch.arange(B, device="cuda")
            lengths = torch.full((B,), ctx, device="cuda")
            ms = graph_time(lambda: decode_attention.decode_attention(q, kc, vc, slots, lengths, ctx, D ** -0.5), 16)
            moved = 2 * B * KV * ctx * D * 2
            attn.append(dict(batch=B, heads=H, kv_heads=KV, head_dim=D, ctx=ctx, us=ms * 1e3,
                             gbps=moved / (ms * 1e-3) / 1e9))
            print(f"attention B={B:2} H={H:2} KV={KV} D={D:3} ctx={ctx:4}: {ms * 1e3:7.1f} us "
                  f"{moved / (ms * 1e-3) / 1e9:6.0f} GB/s", flush=True)
    with open(args.json, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=triton.__version__, host=platform.node(), copy_bandwidth=copy_bw,
                       products=rows, attention=attn), f, indent=1)


if __name__ == "__main__":
    main()
