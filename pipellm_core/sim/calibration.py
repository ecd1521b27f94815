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
from pipellm_core.sim.profiles import get_profile
from pipellm_core.sim.runtime import SimRuntime


def _rms_norm(x, w, eps):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return w * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def plain_decode_step(c: ModelConfig, batch: int, ctx: int, device="meta", dtype=torch.bfloat16):
    """A callable running one decode step of a dense model of config `c` (random weights)."""
    return plain_stage_step(c, range(c.n_layers), batch, ctx, device, dtype)


def plain_stage_step(c: ModelConfig, layers: range, batch: int, ctx: int, device="meta",
                     dtype=torch.bfloat16):
    """`plain_decode_step` of pipeline stage holding `layers`: the embedding when they start at
    layer 0, the output norm and head when they end at the last layer, and otherwise a hidden
    state [batch, 1, n_embd] coming in or going out."""
    e, hd = c.n_embd, c.head_dim
    make = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)  # noqa: E731
    first, last = layers.start == 0, layers.stop == c.n_layers
    weights = [dict(attn_norm=make(e), wq=make(c.n_heads * hd, e), wk=make(c.n_kv_heads * hd, e),
                    wv=make(c.n_kv_heads * hd, e), wo=make(e, c.n_heads * hd), ffn_norm=make(e),
                    gate=make(c.n_ff, e), up=make(c.n_ff, e), down=make(e, c.n_ff))
               for _ in layers]
    embd = make(c.vocab_size, e) if first else None
    norm, head = (make(e), make(c.vocab_size, e)) if last else (None, None)
    cache = [(make(batch, c.n_kv_heads, ctx - 1, hd), make(batch, c.n_kv_heads, ctx - 1, hd))
             for _ in layers]
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
    hidden_in = None if first else make(batch, 1, e)
    cos = make(batch, 1, 1, hd)
    sin = make(batch, 1, 1, hd)

    def step():
        h = F.embedding(tokens, embd) if first else hidden_in
        for w, (kc, vc) in zip(weights, cache):
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
        return F.linear(_rms_norm(h, norm, c.rms_eps), head).float() if last else h
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


def kernel_step_seconds(c: ModelConfig, profile, batch: int, attended_per_row: int, type_of,
                        head_type) -> float:
    """A decode step of pipellm's kernel path as the sim charges it inside a CUDA graph: every
    layer's launches (`fused_decode.launches`) and the head's, each at the profile's launch
    time plus its per-node cost. `type_of(name, layer)` gives each layer matrix's GGML type
    ("attn_q", "ffn_down", ...); no weights are made, only their sizes."""
    kernels = kernel_launches(c, range(c.n_layers), batch, attended_per_row, type_of, head_type)
    p = get_profile(profile) if isinstance(profile, str) else profile
    return sum(p.launch_seconds(kind, nbytes, rows) + p.graph_node_s for _, kind, nbytes, rows in kernels)


def kernel_launches(c: ModelConfig, layers: range, batch: int, attended_per_row: int, type_of,
                    head_type) -> list[tuple[str, str, int, int]]:
    """The launches of `layers` on the kernel path (`fused_decode.launches`), and the head's when
    they end at the last layer."""
    from types import SimpleNamespace

    from gguf import GGML_QUANT_SIZES

    from pipellm_core.model import fused_decode
    from pipellm_core.model.weights import QuantizedMatrix

    def matrix(rows, cols, qtype):
        block, size = GGML_QUANT_SIZES[qtype]
        raw = torch.empty(rows, cols // block * size, dtype=torch.uint8, device="meta")
        return QuantizedMatrix(raw, qtype, rows, cols)

    e, hd, kv = c.n_embd, c.head_dim, c.n_kv_heads * c.head_dim
    kernels = []
    for i in layers:
        t = lambda name: type_of(name, i)  # noqa: E731
        layer = SimpleNamespace(
            wq=matrix(c.n_heads * hd, e, t("attn_q")), wk=matrix(kv, e, t("attn_k")),
            wv=matrix(kv, e, t("attn_v")), wo=matrix(e, c.n_heads * hd, t("attn_output")),
            w_gate=matrix(c.n_ff, e, t("ffn_gate")), w_up=matrix(c.n_ff, e, t("ffn_up")),
            w_down=matrix(e, c.n_ff, t("ffn_down")))
        kernels += fused_decode.launches(c, layer, batch, batch * attended_per_row)
    if layers.stop == c.n_layers:
        kernels += fused_decode.head_launches(c, matrix(c.vocab_size, e, head_type), batch)
    return kernels


def kernel_stage_step(costing, c: ModelConfig, layers: range, batch: int, ctx: int, qtype):
    """A callable charging one decode step of pipeline stage `layers` on the kernel path, every
    matrix (the head's too) of GGML type `qtype`, each row attending `ctx` positions: for
    `SimGraph`s of models too large to compute."""
    kernels = kernel_launches(c, layers, batch, ctx, lambda name, layer: qtype, qtype)

    def step():
        with costing.as_kernels(lambda: kernels):
            pass
    return step
