"""A decode step's layer on the GPU kernels: few launches, the KV cache read in place.

The torch path (`Transformer.layer`) is the reference and the CPU path. On CUDA (or Triton's
interpreter), a decode step (one new token per row) of a layer whose q/k/v and gate/up matrices
are stacked (`LayerWeights.join_for_kernels`) runs instead as:

    add_rms_norm        norm of the residual, with llama.cpp's 8-bit rounding of activations
    qkv product         one matrix-vector product for q, k and v
    rope_and_store      RoPE on q and k, k and v written into the cache at (slot, position)
    decode_attention    split over the context and merged, each slot's cache read where it lies
    output product
    add_rms_norm        residual add and the feed-forward norm, rounded
    gate/up product     SiLU(gate) * up in the product's epilogue
    down product
    residual add

Results agree with the torch path within float32 summation order and one fp16 rounding of the
attention output and of SiLU(gate) * up (tests/model/test_fused_decode.py states the bound).
"""

from __future__ import annotations

import math

import torch

from pipellm_core.model.activation_rounding import rounds_to_q8
from pipellm_core.model.kernels import products
from pipellm_core.model.linear import linear

ATTENTION_HEAD_DIMS = (32, 64, 96, 128)


def _kernels():
    from pipellm_core.model.kernels import decode_attention, norm, rope_kv
    return decode_attention, norm, rope_kv


def norm_applies(h: torch.Tensor, dtype: torch.dtype) -> bool:
    return products.runs_here(h.device) and dtype == torch.float16 and h.dtype == torch.float32


def applies(config, w, h: torch.Tensor) -> bool:
    """Whether `layer` computes this layer: a plain pre-norm SwiGLU block with global attention
    (q/k norms, post-norms, GELU, soft-capping, local windows and other query scales are left to
    the torch path)."""
    return (config.plain_block and w.wqkv is not None and w.w_gate_up is not None and h.dtype == torch.float32
            and products.runs_here(h.device) and config.head_dim in ATTENTION_HEAD_DIMS
            and w.wo.layout == w.wqkv.layout)


def layer(model, i: int, h: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, ctx_len: int, w):
    """`Transformer.layer` for h [B, 1, n_embd] (float32): the same block on the kernels."""
    attention_kernel, norm, rope_kv = _kernels()
    c = model.config
    B = h.shape[0]
    hidden = h.reshape(B, c.n_embd).clone()
    kind = h.device.type
    q8 = rounds_to_q8(w.wqkv.qtype, kind)
    x = norm.add_rms_norm(hidden, None, w.attn_norm, c.rms_eps, q8)
    qkv = linear(x, w.wqkv, w.bqkv, rounded=q8)
    cos, sin = model._rope[str(h.device)]
    kc, vc = model.cache.k[i], model.cache.v[i]
    pos = positions.reshape(B)
    q = rope_kv.rope_and_store(qkv, cos, sin, pos, slots, kc, vc, c.n_heads, c.n_kv_heads,
                               c.head_dim, c.rope_dim, c.rope_style)
    attn = attention_kernel.decode_attention(q, kc, vc, slots, pos + 1, ctx_len, 1.0 / math.sqrt(c.head_dim))
    out = linear(attn.reshape(B, -1), w.wo)
    q8 = rounds_to_q8(w.w_gate_up.qtype, kind)
    x = norm.add_rms_norm(hidden, out, w.ffn_norm, c.rms_eps, q8)
    act = linear(x, w.w_gate_up, rounded=q8, swiglu=True)
    hidden += linear(act, w.w_down)
    return hidden.reshape(B, 1, c.n_embd)


def head(model, h: torch.Tensor) -> torch.Tensor:
    """`Transformer.head` with the norm (and the output type's rounding) in one kernel."""
    _, norm, _ = _kernels()
    out = model.weights.output
    shape = h.shape
    h2 = h.reshape(-1, shape[-1]).contiguous()
    q8 = rounds_to_q8(out.qtype, h.device.type)
    x = norm.add_rms_norm(h2, None, model.weights.output_norm, model.config.rms_eps, q8)
    return linear(x, out, rounded=q8).float().reshape(*shape[:-1], -1)


def launches(config, w, batch: int, lengths: list[int]) -> list[tuple[str, int]]:
    """The kernels `layer` launches for `batch` rows whose attention reads `lengths` cache
    positions each, with the bytes each moves through device memory (read + written): what a
    simulated GPU charges for the same layer."""
    c, B = config, batch
    E, D, H, KV = c.n_embd, c.head_dim, c.n_heads, c.n_kv_heads
    qkv_cols = (H + 2 * KV) * D
    weights = {"qkv": w.wq.nbytes + w.wk.nbytes + w.wv.nbytes, "output": w.wo.nbytes,
               "gate_up": w.w_gate.nbytes + w.w_up.nbytes, "down": w.w_down.nbytes}
    f32, f16 = 4, 2
    return [
        ("add_rms_norm", B * E * (f32 + f16) + E * f32),
        ("qkv product", weights["qkv"] + B * (E + qkv_cols) * f16),
        ("rope_and_store", B * qkv_cols * f16 + B * (H + 2 * KV) * D * f16),
        ("decode_attention", sum(lengths) * 2 * KV * D * f16 + B * H * D * (f16 + f32)),
        ("attention merge", B * H * D * (f32 + f16)),
        ("q8 rounding", 2 * B * H * D * f16),
        ("output product", weights["output"] + B * (H * D + E) * f16),
        ("add_rms_norm", B * E * (2 * f32 + f16 + f16) + E * f32),
        ("gate_up product", weights["gate_up"] + B * (E + c.n_ff) * f16),
        ("q8 rounding", 2 * B * c.n_ff * f16),
        ("down product", weights["down"] + B * (c.n_ff + E) * f16),
        ("residual add", B * E * (2 * f32 + f16)),
    ]
