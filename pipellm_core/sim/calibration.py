"""The reference step the sim's GPU profiles are calibrated on.

DESIGN.md gives measured H100 step times of a plain PyTorch bf16 decode step (batch 1): 25.2 ms
eager and 2.37 ms as one CUDA graph on the SmolLM2-135M shape, 34.8 / 7.98 ms on Llama-8B.
`plain_decode_step` is such a step, written the way a plain PyTorch Llama is (dense bf16
weights, rotate-half RoPE, a growing KV cache, SDPA), run on the `meta` device: every operation
is seen with its shapes, so the sim charges it, and no memory or math is spent, whatever the
model's size. `simulated_step_seconds` returns the eager and graph times the sim gives it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipellm_core.gguf.model_file import ModelConfig
from pipellm_core.sim.graph import SimGraph
from pipellm_core.sim.op_costs import SimOpCosting
from pipellm_core.sim.runtime import SimRuntime


def _rms_norm(x, w, eps):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return w * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def plain_decode_step(c: ModelConfig, batch: int, ctx: int, device="meta", dtype=torch.bfloat16):
    """A callable running one decode step of a dense model of config `c` (random weights)."""
    e, hd = c.n_embd, c.head_dim
    make = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)  # noqa: E731
    layers = [dict(attn_norm=make(e), wq=make(c.n_heads * hd, e), wk=make(c.n_kv_heads * hd, e),
                   wv=make(c.n_kv_heads * hd, e), wo=make(e, c.n_heads * hd), ffn_norm=make(e),
                   gate=make(c.n_ff, e), up=make(c.n_ff, e), down=make(e, c.n_ff))
              for _ in range(c.n_layers)]
    embd, norm, head = make(c.vocab_size, e), make(e), make(c.vocab_size, e)
    cache = [(make(batch, c.n_kv_heads, ctx - 1, hd), make(batch, c.n_kv_heads, ctx - 1, hd))
             for _ in range(c.n_layers)]
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
    cos = make(batch, 1, 1, hd)
    sin = make(batch, 1, 1, hd)

    def step():
        h = F.embedding(tokens, embd)
        for w, (kc, vc) in zip(layers, cache):
            x = _rms_norm(h, w["attn_norm"], c.rms_eps)
            q = F.linear(x, w["wq"]).view(batch, 1, c.n_heads, hd).transpose(1, 2)
            k = F.linear(x, w["wk"]).view(batch, 1, c.n_kv_heads, hd).transpose(1, 2)
            v = F.linear(x, w["wv"]).view(batch, 1, c.n_kv_heads, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2)
            a = F.scaled_dot_product_attention(q, keys, values, enable_gqa=c.n_heads != c.n_kv_heads)
            h = h + F.linear(a.transpose(1, 2).reshape(batch, 1, -1), w["wo"])
            x = _rms_norm(h, w["ffn_norm"], c.rms_eps)
            h = h + F.linear(F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"])
        return F.linear(_rms_norm(h, norm, c.rms_eps), head).float()
    return step


def simulated_step_seconds(c: ModelConfig, profile: str = "h100", batch: int = 1, ctx: int = 256):
    """(eager seconds, graph seconds) of `plain_decode_step` on a virtual GPU of `profile`."""
    step = plain_decode_step(c, batch, ctx)
    times = []
    for as_graph in (False, True):
        runtime = SimRuntime(profile, trace=False)
        costing = SimOpCosting(runtime, float_bytes=2, track_memory=False)
        with costing:
            graph = SimGraph(costing, step) if as_graph else None
            if graph is not None:
                graph.record()
            runtime.synchronize()
            start = runtime.elapsed()
            graph.replay() if graph is not None else step()
            runtime.synchronize()
            times.append(runtime.elapsed() - start)
    return times[0], times[1]
