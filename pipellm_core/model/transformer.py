"""The decoder-only transformer of the `llama`, `qwen2`, `qwen3`, `gemma2`, `gemma3` and `phi3`
GGUF architectures, in plain torch, computed as llama.cpp computes them.

Every step works on static buffers: a preallocated KV cache indexed by (slot, position), and
attention over a fixed number of cache positions (`ctx_len`) with a mask, so one decode step
has the same shapes from call to call and can be captured as a CUDA graph.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from pipellm_core.gguf.model_file import ModelConfig
from pipellm_core.model import fused_decode
from pipellm_core.model.gelu import gelu_gate
from pipellm_core.model.linear import linear, round_once
from pipellm_core.model.weights import LayerWeights, ModelWeights


class KVCache:
    """Keys and values of every layer for `max_batch` slots of `ctx_size` positions each."""

    def __init__(self, config: ModelConfig, max_batch: int, ctx_size: int, dtype: torch.dtype,
                 layer_devices: list[torch.device]):
        shape = (max_batch, config.n_kv_heads, ctx_size, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in layer_devices]
        self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in layer_devices]
        self.max_batch, self.ctx_size = max_batch, ctx_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

LLAMACPP_CONTEXT_STEP = 256


def rope_tables(config: ModelConfig, ctx_size: int, freq_factors: torch.Tensor | None,
                base: float | None = None, linear_scale: float | None = None, attn_factor: float = 1.0):
    """cos/sin [ctx_size, rope_dim/2], angles computed in float64 like ggml's rope cache; `base`
    and `linear_scale` default to the config's (global layers'), `attn_factor` multiplies both."""
    half = config.rope_dim // 2
    base = config.rope_base if base is None else base
    linear_scale = config.rope_linear_scale if linear_scale is None else linear_scale
    inv = base ** (-torch.arange(0, half, dtype=torch.float64) * 2 / config.rope_dim)
    if freq_factors is not None:
        inv = inv / freq_factors.to(torch.float64)[:half]
    pos = torch.arange(ctx_size, dtype=torch.float64) / linear_scale
    ang = pos[:, None] * inv[None, :]
    return (torch.cos(ang) * attn_factor).float(), (torch.sin(ang) * attn_factor).float()


def rope_freq_factors(config: ModelConfig, weights: ModelWeights, ctx_size: int) -> torch.Tensor | None:
    """The per-frequency divisors of the angles: `rope_freqs` (llama 3), or phi3's long factors
    where the context per sequence exceeds the original training context and its short ones
    elsewhere. llama.cpp compares its own context per sequence, which it rounds up to a multiple
    of 256; so does this."""
    if weights.rope_freqs is not None:
        return weights.rope_freqs
    if weights.rope_factors:
        per_sequence = -(-ctx_size // LLAMACPP_CONTEXT_STEP) * LLAMACPP_CONTEXT_STEP
        return weights.rope_factors["long" if per_sequence > config.rope_orig_context else "short"]
    return None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str, rope_dim: int):
    """x: [B, T, heads, head_dim]; cos/sin: [B, T, rope_dim/2]."""
    rot, rest = x[..., :rope_dim].float(), x[..., rope_dim:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if style == "pairs":
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    else:
        a, b = rot[..., : rope_dim // 2], rot[..., rope_dim // 2:]
        out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return torch.cat([out.to(x.dtype), rest], dim=-1) if rest.numel() else out.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap), in float32 (Gemma's attention scores and logits)."""
    return torch.tanh(x.float() / cap) * cap


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
              scale: float | None = None, softcap: float = 0.0) -> torch.Tensor:
    """q [B, T, heads, d], keys/values [B, kv_heads, ctx, d], mask [B, 1, T, ctx] -> [B, T, heads, d].

    Scores are q.k * `scale` (default 1/sqrt(d)), soft-capped where `softcap` is set.

    On CUDA, the query heads that share a key/value head are laid out as extra query positions
    of that head, so that the fused attention kernels serve grouped-query attention: the
    fallback would be matrix products in cuBLAS, whose results differ between a CUDA-graph
    capture and an eager run. Elsewhere, PyTorch's grouped-query attention as it is."""
    kv, H = keys.shape[1], q.shape[2]
    if softcap:
        return soft_capped_attention(q, keys, values, mask, scale, softcap)
    if q.is_cuda and kv != H:
        return grouped_query_attention(q, keys, values, mask, scale)
    if q.shape[1] == 1 and q.device.type == "cpu" and _get_current_dispatch_mode() is None:
        return one_query_attention(q, keys, values, mask, scale)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=kv != H,
                                         scale=scale)
    return out.transpose(1, 2)


def one_query_attention(q, keys, values, mask, scale=None):
    """`attention` of one new position per row (a decode step on the CPU) as two products and a
    softmax, the G query heads of a key/value head in one product: PyTorch's fused CPU kernel
    tiles for many query positions and took several times longer per layer for one."""
    B, _, H, D = q.shape
    kv, ctx = keys.shape[1], keys.shape[2]
    qg = q.reshape(B, kv, H // kv, D)
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * (D ** -0.5 if scale is None else scale)
    scores = scores.masked_fill(~mask.reshape(B, 1, 1, ctx), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values).reshape(B, 1, H, D)


def grouped_query_attention(q, keys, values, mask, scale=None):
    """`attention` with each key/value head's G query heads as G × T query positions."""
    B, T, H, D = q.shape
    kv = keys.shape[1]
    G = H // kv
    qg = q.reshape(B, T, kv, G, D).permute(0, 2, 3, 1, 4).reshape(B, kv, G * T, D)  # position g*T + t
    mg = mask.expand(B, 1, T, mask.shape[-1]).repeat(1, 1, G, 1)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mg, scale=scale)
    return out.reshape(B, kv, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H, D)


def soft_capped_attention(q, keys, values, mask, scale, softcap):
    """`attention` with scores soft-capped before the mask and softmax (Gemma 2), in float32:
    the fused kernels have no place for the cap."""
    B, T, H, D = q.shape
    kv = keys.shape[1]
    G = H // kv
    qg = q.float().reshape(B, T, kv, G, D).permute(0, 2, 3, 1, 4)  # [B, kv, G, T, D]
    scores = torch.matmul(qg, keys.float()[:, :, None].transpose(-1, -2)) * (scale or D ** -0.5)
    scores = soft_cap(scores, softcap).masked_fill(~mask[:, :, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), values.float()[:, :, None])  # [B, kv, G, T, D]
    return out.permute(0, 3, 1, 2, 4).reshape(B, T, H, D).to(q.dtype)


class Transformer:
    """The model's forward pass. Matrix products run in `dtype`; the residual stream between
    them stays in float32, as llama.cpp keeps it (an fp16 residual overflows on models whose
    activations grow past 65504 over the layers)."""

    residual_dtype = torch.float32
    # set by a simulated GPU: charges a decode layer as the kernels that compute it on CUDA
    # (`fused_decode.launches`) while its torch operations run uncharged
    charge_kernels = None

    def __init__(self, config: ModelConfig, weights: ModelWeights, cache: KVCache, dtype: torch.dtype):
        self.config, self.weights, self.cache, self.dtype = config, weights, cache, dtype
        factors = rope_freq_factors(config, weights, cache.ctx_size)
        cos, sin = rope_tables(config, cache.ctx_size, factors, attn_factor=config.rope_attn_factor)
        devices = {str(d) for d in weights.layer_devices}
        self._rope = {d: (cos.to(d), sin.to(d)) for d in devices}
        self._rope_local = self._rope
        if any(config.swa_layers):  # local layers: their own base, no linear scaling (as llama.cpp)
            cos, sin = rope_tables(config, cache.ctx_size, factors, config.rope_base_swa or config.rope_base, 1.0,
                                   config.rope_attn_factor)
            self._rope_local = {d: (cos.to(d), sin.to(d)) for d in devices}
        self._positions = {d: torch.arange(cache.ctx_size, device=d) for d in devices}

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.weights.token_embd.rows_dequantized(tokens, self.residual_dtype)
        return h * self.config.embd_scale if self.config.embd_scale != 1.0 else h

    def attention_mask(self, positions: torch.Tensor, ctx_len: int, window: int = 0) -> torch.Tensor:
        """[B, 1, T, ctx_len]: a query at position p sees cache positions 0..p of its own slot
        (with a `window`, only the last `window` of them: p - window < key <= p)."""
        keys = self._positions[str(positions.device)][:ctx_len]
        seen = keys[None, None, :] <= positions[:, :, None]
        if window:
            seen &= keys[None, None, :] > positions[:, :, None] - window
        return seen.unsqueeze(1)

    def layer(self, i: int, h: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
              mask: torch.Tensor, ctx_len: int, w: LayerWeights | None = None) -> torch.Tensor:
        """One block on h [B, T, n_embd] (float32); writes this step's keys/values into the cache."""
        c, w = self.config, w or self.weights.layers[i]
        B, T, _ = h.shape
        if T == 1 and fused_decode.applies(c, w, h):
            return fused_decode.layer(self, i, h, positions, slots, ctx_len, w)
        if T == 1 and self.charge_kernels is not None and fused_decode.would_apply(c, w):
            attended = lambda: int((positions + 1).sum())  # noqa: E731
            with self.charge_kernels(lambda: fused_decode.launches(c, w, B, attended())):
                return self._layer(i, h, positions, slots, mask, ctx_len, w)
        return self._layer(i, h, positions, slots, mask, ctx_len, w)

    def _layer(self, i, h, positions, slots, mask, ctx_len, w):
        c = self.config
        B, T, _ = h.shape
        x = rms_norm(h, w.attn_norm, c.rms_eps).to(self.dtype)
        x, rounded = round_once(x, [w.wq, w.wk, w.wv])
        q = linear(x, w.wq, w.bq, rounded=rounded).view(B, T, c.n_heads, c.head_dim)
        k = linear(x, w.wk, w.bk, rounded=rounded).view(B, T, c.n_kv_heads, c.head_dim)
        v = linear(x, w.wv, w.bv, rounded=rounded).view(B, T, c.n_kv_heads, c.head_dim)
        if w.q_norm is not None:
            q, k = rms_norm(q, w.q_norm, c.rms_eps), rms_norm(k, w.k_norm, c.rms_eps)
        local = c.is_local(i)
        cos, sin = (self._rope_local if local else self._rope)[str(h.device)]
        cos, sin = cos[positions], sin[positions]
        q = apply_rope(q, cos, sin, c.rope_style, c.rope_dim)
        k = apply_rope(k, cos, sin, c.rope_style, c.rope_dim)
        kc, vc = self.cache.k[i], self.cache.v[i]
        kc[slots[:, None], :, positions] = k.to(kc.dtype)
        vc[slots[:, None], :, positions] = v.to(vc.dtype)
        window = c.sliding_window if local else 0
        if T == 1 and fused_decode.attention_applies(c, q, kc):
            attn = fused_decode.attention_in_place(c, q, kc, vc, slots, positions, ctx_len, window)
        else:
            keys, values = kc[slots, :, :ctx_len], vc[slots, :, :ctx_len]
            if local:
                mask = self.attention_mask(positions, ctx_len, window)
            attn = attention(q, keys.to(q.dtype), values.to(q.dtype), mask, c.query_scale, c.attn_softcap)
        out = linear(attn.reshape(B, T, -1), w.wo)
        if w.post_attn_norm is not None:
            out = rms_norm(out.float(), w.post_attn_norm, c.rms_eps)
        h = h + out.to(h.dtype)
        x = rms_norm(h, w.ffn_norm, c.rms_eps).to(self.dtype)
        x, rounded = round_once(x, [w.w_gate, w.w_up])
        gate, up = linear(x, w.w_gate, rounded=rounded), linear(x, w.w_up, rounded=rounded)
        act = gelu_gate(gate, up) if c.ffn_act == "gelu" else F.silu(gate) * up
        out = linear(act, w.w_down)
        if w.post_ffn_norm is not None:
            out = rms_norm(out.float(), w.post_ffn_norm, c.rms_eps)
        return h + out.to(h.dtype)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if fused_decode.norm_applies(h, self.dtype):
            logits = fused_decode.head(self, h)
        elif self.charge_kernels is not None:
            rows = h.numel() // h.shape[-1]
            with self.charge_kernels(lambda: fused_decode.head_launches(self.config, self.weights.output, rows)):
                logits = self._head(h)
        else:
            logits = self._head(h)
        return soft_cap(logits, self.config.final_softcap) if self.config.final_softcap else logits

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = rms_norm(h, self.weights.output_norm, self.config.rms_eps).to(self.dtype)
        return linear(h, self.weights.output).float()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                ctx_len: int, layers: range | None = None, hidden: torch.Tensor | None = None,
                before_layer: Callable[[int, torch.Tensor], LayerWeights | None] | None = None,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Run `layers` (all by default) on tokens [B, T] at positions [B, T] in cache `slots` [B].

        Starts from the embedding unless `hidden` is given; ends with the head (logits
        [B, T, vocab]) when the last layer is included, else returns the hidden state.
        `before_layer(i, h)` runs ahead of each layer (the prefetch hook) and may return the
        weights to use for it (a streamed copy). With `logits_index` [B], the head runs only on
        that position of each row (logits [B, 1, vocab]).
        """
        n = self.config.n_layers
        layers = range(n) if layers is None else layers
        h = self.embed(tokens) if hidden is None else hidden
        mask = None
        for i in layers:
            dev = self.weights.layer_devices[i]
            if h.device != dev or positions.device != dev:  # the hidden state may have arrived already
                h, positions, slots = h.to(dev), positions.to(dev), slots.to(dev)
                mask = None
            if mask is None:
                mask = self.attention_mask(positions, ctx_len)
            w = before_layer(i, h) if before_layer else None
            h = self.layer(i, h, positions, slots, mask, ctx_len, w)
        if layers and layers[-1] == n - 1:
            if logits_index is not None:
                h = h[torch.arange(h.shape[0], device=h.device), logits_index.to(h.device)][:, None]
            return self.head(h.to(self.weights.output_norm.device))
        return h
