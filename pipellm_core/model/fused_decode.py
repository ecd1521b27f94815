"""A decode step's layer on the GPU kernels: few launches, the KV cache read in place.

The torch path (`Transformer.layer`) is the reference and the CPU path. On CUDA (or Triton's
interpreter), a decode step (one new token per row) of a layer whose q/k/v and gate/up matrices
are stacked (`LayerWeights.join_for_kernels`) runs instead as:

    add_rms_norm        norm of the residual, with llama.cpp's 8-bit rounding of activations
                        (its quants and scales written too where the product multiplies those)
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
from pipellm_core.model.kernels.activation_q8 import Q8Activations
from pipellm_core.model.linear import linear

ATTENTION_HEAD_DIMS = (32, 64, 96, 128, 256)


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
    acts = _q8_out(w.wqkv, B, c.n_embd, h.device)
    q8 = acts is not None or rounds_to_q8(w.wqkv.qtype, kind)
    x = norm.add_rms_norm(hidden, None, w.attn_norm, c.rms_eps, q8, q8_out=acts)
    qkv = linear(x, w.wqkv, w.bqkv, rounded=q8, q8=acts)
    cos, sin = model._rope[str(h.device)]
    kc, vc = model.cache.k[i], model.cache.v[i]
    pos = positions.reshape(B)
    q = rope_kv.rope_and_store(qkv, cos, sin, pos, slots, kc, vc, c.n_heads, c.n_kv_heads,
                               c.head_dim, c.rope_dim, c.rope_style)
    attn = attention_kernel.decode_attention(q, kc, vc, slots, pos + 1, ctx_len, 1.0 / math.sqrt(c.head_dim))
    out = linear(attn.reshape(B, -1), w.wo)
    acts = _q8_out(w.w_gate_up, B, c.n_embd, h.device)
    q8 = acts is not None or rounds_to_q8(w.w_gate_up.qtype, kind)
    x = norm.add_rms_norm(hidden, out, w.ffn_norm, c.rms_eps, q8, q8_out=acts)
    act = linear(x, w.w_gate_up, rounded=q8, swiglu=True, q8=acts)
    hidden += linear(act, w.w_down)
    return hidden.reshape(B, 1, c.n_embd)


def attention_applies(config, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether a decode step's attention of the torch path (`Transformer._layer`, the layers
    `applies` leaves to it: q/k norms, post-norms, GELU, local windows, soft-capped scores)
    reads the cache in place with the decode kernel: on the kernels' device, fp16."""
    return (products.runs_here(q.device) and q.dtype == torch.float16 and k_cache.dtype == torch.float16
            and config.head_dim in ATTENTION_HEAD_DIMS)


def attention_in_place(config, q, k_cache, v_cache, slots, positions, ctx_len: int, window: int):
    """q [B, 1, H, D] attending each row's cached positions (its last `window` only, where set)
    in place, by slot: [B, 1, H, D]. No copy of keys or values, static shapes for graphs."""
    attention_kernel, _, _ = _kernels()
    B, _, H, D = q.shape
    out = attention_kernel.decode_attention(q.reshape(B, H, D), k_cache, v_cache, slots, positions.reshape(B) + 1,
                                            ctx_len, config.query_scale, window=window,
                                            softcap=config.attn_softcap)
    return out.reshape(B, 1, H, D)


def _q8_out(w, rows: int, cols: int, device):
    """Room for the norm kernel to write its 8-bit quants into, where w's kernel reads them
    (then the rounding is the kernel's, 8 bits per block of 32, on any device)."""
    reads = w.layout == products.KERNEL_LAYOUT and products.reads_q8(w.qtype)
    return Q8Activations.empty(rows, cols, device) if reads else None


def head(model, h: torch.Tensor) -> torch.Tensor:
    """`Transformer.head` with the norm (and the output type's rounding) in one kernel."""
    _, norm, _ = _kernels()
    out = model.weights.output
    shape = h.shape
    h2 = h.reshape(-1, shape[-1]).contiguous()
    acts = _q8_out(out, h2.shape[0], h2.shape[1], h.device)
    q8 = acts is not None or rounds_to_q8(out.qtype, h.device.type)
    x = norm.add_rms_norm(h2, None, model.weights.output_norm, model.config.rms_eps, q8, q8_out=acts)
    return linear(x, out, rounded=q8, q8=acts).float().reshape(*shape[:-1], -1)


def would_apply(config, w) -> bool:
    """Whether `applies` would hold for this layer on a GPU, where its matrices are stacked: the
    layer's shape, read from weights that are not stacked (the sim computes on the CPU)."""
    same = lambda parts: len({(m.qtype, m.cols) for m in parts}) == 1  # noqa: E731
    return (config.plain_block and config.head_dim in ATTENTION_HEAD_DIMS and same([w.wq, w.wk, w.wv])
            and same([w.w_gate, w.w_up]))


def launches(config, w, batch: int, attended: int) -> list[tuple[str, str, int, int]]:
    """The kernels `layer` launches for `batch` rows whose attention reads `attended` cache
    positions in all: (name, kind, bytes moved through device memory, rows) each, kind being
    a product's (`products.product_kind`) or "small". What a simulated GPU charges for the same
    layer."""
    c, B = config, batch
    E, D, H, KV, F = c.n_embd, c.head_dim, c.n_heads, c.n_kv_heads, c.n_ff
    qkv = (H + 2 * KV) * D
    f32, f16 = 4, 2

    def product(name, parts, cols_in, cols_out):
        return (name, products.product_kind(parts[0].qtype), sum(m.nbytes for m in parts) + B * (cols_in + cols_out) * f16, B)
    return [
        ("add_rms_norm", "small", B * E * (f32 + f16) + E * f32, B),
        product("qkv product", [w.wq, w.wk, w.wv], E, qkv),
        ("rope_and_store", "small", 2 * B * qkv * f16, B),
        ("decode_attention", "small", attended * 2 * KV * D * f16 + B * H * D * (f16 + f32), B),
        ("attention merge", "small", B * H * D * (f32 + f16), B),
        ("q8 rounding", "small", 2 * B * H * D * f16, B),
        product("output product", [w.wo], H * D, E),
        ("add_rms_norm", "small", B * E * (2 * f32 + 2 * f16) + E * f32, B),
        product("gate_up product", [w.w_gate, w.w_up], E, F),
        ("q8 rounding", "small", 2 * B * F * f16, B),
        product("down product", [w.w_down], F, E),
        ("residual add", "small", B * E * (2 * f32 + f16), B),
    ]


def head_launches(config, output, rows: int) -> list[tuple[str, str, int, int]]:
    """The kernels `head` launches for `rows` rows, as `launches` gives a layer's."""
    E, f32, f16 = config.n_embd, 4, 2
    return [("add_rms_norm", "small", rows * E * (f32 + f16) + E * f32, rows),
            ("head product", products.product_kind(output.qtype), output.nbytes + rows * (E + output.rows) * f16, rows)]
