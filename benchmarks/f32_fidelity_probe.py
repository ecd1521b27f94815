"""Why our CUDA engine on float32 models sits further from llama.cpp's CUDA build than its CPU
build does: the teacher-forced distance (bench/fidelity.py) of several settings of our float32
path to llama.cpp CUDA, on the random-weight F32 models of the GPU tests.

Settings, each a guess at what llama.cpp's CUDA build does differently:
- `fp32`: float32 products in cuBLAS, float32 attention (the engine before its TF32 rule,
  which every setting here switches off);
- `tf32`: products in TF32, as llama.cpp's cuBLAS handles and its F32 tensor-core kernel
  (`mmf`) compute F32 weights by more than 3 columns;
- `attn32`: attention as two float32 products and a softmax instead of PyTorch's fused kernel;
- `attn16`: the same with queries and probabilities rounded to fp16, as llama.cpp's attention
  takes them (flash attention on CUDA, the F16 products of its CPU build);
- `tf32+attn16`: both.

    python benchmarks/f32_fidelity_probe.py --vocab VOCAB.gguf [--json OUT.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile

import torch

from gguf import GGMLQuantizationType

from pipellm_core.bench.fidelity import distance, engine_logits, llamacpp_logits, tokenize
from pipellm_core.bench.fidelity_text import DEFAULT_TEXT
from pipellm_core.gguf.synthetic import write_random_gguf
from pipellm_core.model import linear, transformer


def attention_products(q, keys, values, mask, scale=None, softcap=0.0, rounded=False):
    """`transformer.attention` as float32 products, q and the probabilities rounded to fp16
    where `rounded`."""
    B, T, H, D = q.shape
    kv = keys.shape[1]
    qg = (q.half().float() if rounded else q.float()).reshape(B, T, kv, H // kv, D).permute(0, 2, 3, 1, 4)
    scores = torch.matmul(qg, keys.float()[:, :, None].transpose(-1, -2)) * (scale or D ** -0.5)
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p = p.half().float() if rounded else p
    out = torch.matmul(p, values.float()[:, :, None])
    return out.permute(0, 3, 1, 2, 4).reshape(B, T, H, D).to(q.dtype)


@contextlib.contextmanager
def setting(name: str):
    tf32, attention, rule = torch.backends.cuda.matmul.allow_tf32, transformer.attention, linear.f32_in_tf32
    torch.backends.cuda.matmul.allow_tf32 = "tf32" in name
    linear.f32_in_tf32 = lambda *args: False  # the engine's own rule (TF32 beyond 3 rows) off
    if "attn" in name:
        rounded = "attn16" in name
        transformer.attention = lambda *a, **k: attention_products(*a, **k, rounded=rounded)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, transformer.attention, linear.f32_in_tf32 = tf32, attention, rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", required=True, help="a GGUF whose tokenizer the random models take")
    parser.add_argument("--json", help="write the distances here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for arch in ("qwen2", "llama"):
            path = write_random_gguf(f"{d}/{arch}.gguf", f"tiny-{arch}", GGMLQuantizationType.F32,
                                     tokenizer_from=args.vocab, std=0.3, seed=7)
            tokens = tokenize(path, DEFAULT_TEXT)
            reference = llamacpp_logits(path, tokens, device="cuda")
            others = {"llama.cpp CPU": llamacpp_logits(path, tokens, device="cpu"),
                      "llama.cpp CUDA, flash attention off": llamacpp_logits(path, tokens, device="cuda",
                                                                             flash_attn=False),
                      "pipellm CPU": engine_logits(path, tokens, device="cpu", dtype=torch.float32)}
            for name in ("fp32", "tf32", "attn32", "attn16", "tf32+attn16"):
                with setting(name):
                    others[f"pipellm CUDA {name}"] = engine_logits(path, tokens, device="cuda", dtype=torch.float32)
            for name, logits in others.items():
                dist = distance(reference, logits, "llama.cpp CUDA", name)
                rows.append(dict(arch=arch, **dist.as_dict()))
                print(f"{arch:6} {name:38} KL {dist.kl_mean:.3e} max {dist.kl_max:.3e} top-1 {dist.top1:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
