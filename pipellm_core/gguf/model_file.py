"""A GGUF model file: metadata turned into a `ModelConfig`, tensors left memory-mapped."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipellm_core.errors import GGUFError, UnsupportedModelError
from pipellm_core.gguf.header import check_gguf_header

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

# llama.cpp rotates adjacent pairs for `llama` (its converter permutes Q/K to match) and the two
# halves of each head ("NeoX" style) for the others.
ROPE_STYLE = {"llama": "pairs", "qwen2": "halves", "qwen3": "halves", "gemma2": "halves",
              "gemma3": "halves", "phi3": "halves"}

# Per-head RMSNorm of q and k before RoPE (`attn_q_norm`, `attn_k_norm`).
QK_NORM_ARCHS = ("qwen3", "gemma3")
# Gemma's block: embeddings scaled by sqrt(n_embd), a norm after attention and after the
# feed-forward (`post_attention_norm`, `post_ffw_norm`), GELU-gated feed-forward, local layers.
GEMMA_ARCHS = ("gemma2", "gemma3")
# llama.cpp's local/global layer period for Gemma (a layer i is local unless i % period is the
# last of the period), and the local layers' RoPE base where the file gives none.
GEMMA_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}
GEMMA3_LOCAL_ROPE_BASE = 10000.0
# llama.cpp's default soft-capping values where a Gemma file gives none.
GEMMA_ATTN_SOFTCAP, GEMMA_FINAL_SOFTCAP = 50.0, 30.0
# Gemma sizes whose queries llama.cpp scales by 1/sqrt(n_embd / n_head) rather than by
# 1/sqrt(head size): it recognises them by their layer count (Gemma 2 27B, Gemma 3 27B).
GEMMA_EMBD_PER_HEAD_SCALE_LAYERS = {"gemma2": 46, "gemma3": 62}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    n_embd: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_ff: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_base: float
    rope_style: str
    rope_dim: int
    rope_linear_scale: float
    name: str = ""
    qk_norm: bool = False
    post_norms: bool = False
    ffn_act: str = "silu"  # the gate's activation: "silu", or "gelu" (tanh approximation)
    embd_scale: float = 1.0
    attn_scale: float = 0.0  # queries' scale before attention; 0: 1/sqrt(head_dim)
    attn_softcap: float = 0.0  # attention scores become cap * tanh(score / cap); 0: none
    final_softcap: float = 0.0  # the same on the logits
    sliding_window: int = 0  # a local layer's query sees the last `sliding_window` positions
    swa_layers: tuple[bool, ...] = ()  # which layers are local (empty: none)
    rope_base_swa: float = 0.0  # the local layers' RoPE base; 0: rope_base
    fused_qkv: bool = False  # q, k and v stored as one matrix `attn_qkv` (phi3)
    fused_gate_up: bool = False  # gate over up stored as one matrix `ffn_up` (phi3)
    rope_orig_context: int = 0  # beyond this context, `rope_factors_long`; else `_short`
    rope_attn_factor: float = 1.0  # cos and sin multiplied by it (LongRoPE's attention factor)

    @property
    def query_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    def is_local(self, layer: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[layer]

    @property
    def plain_block(self) -> bool:
        """A `llama`/`qwen2` block: pre-norms, SwiGLU, global attention scaled by 1/sqrt(head_dim)."""
        return not (self.qk_norm or self.post_norms or self.ffn_act != "silu" or self.attn_softcap
                    or any(self.swa_layers) or self.attn_scale)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: "object"  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: (rows, cols) for matrices
    data: np.ndarray  # raw bytes (uint8) or elements, memory-mapped

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class ModelFile:
    """Opens a GGUF lazily: nothing but the header is read until a tensor's bytes are touched."""

    def __init__(self, path: str):
        import gguf

        self.path = str(path)
        check_gguf_header(self.path)
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the header walk passed, so this is corruption it cannot see
            raise GGUFError(f"corrupt GGUF ({type(e).__name__}: {e}): {self.path}") from None
        self.tensors: dict[str, TensorInfo] = {}
        for t in self.reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[t.name] = TensorInfo(t.name, t.tensor_type, shape, t.data)
        self.config = self._read_config()

    def metadata(self, key: str, default=None):
        field = self.reader.get_field(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise GGUFError(f"corrupt GGUF: metadata {key!r} cannot be read ({e})") from None

    def _require(self, key: str):
        value = self.metadata(key)
        if value is None:
            raise GGUFError(f"GGUF lacks required metadata {key!r}: {self.path}")
        return value

    def _read_config(self) -> ModelConfig:
        arch = self.metadata("general.architecture")
        if arch is None:
            raise GGUFError(f"GGUF lacks general.architecture: {self.path}")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        n_embd = int(self._require(f"{arch}.embedding_length"))
        n_heads = int(self._require(f"{arch}.attention.head_count"))
        n_kv_heads = int(self.metadata(f"{arch}.attention.head_count_kv", n_heads))
        head_dim = int(self.metadata(f"{arch}.attention.key_length", n_embd // max(n_heads, 1)))
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads or head_dim <= 0:
            raise GGUFError(f"corrupt GGUF: {n_heads} heads, {n_kv_heads} KV heads, head size {head_dim}")
        if "token_embd.weight" not in self.tensors:
            raise GGUFError(f"GGUF lacks tensor 'token_embd.weight': {self.path}")
        vocab = self.tensors["token_embd.weight"].shape[0]
        scaling = self.metadata(f"{arch}.rope.scaling.type", "linear")  # llama.cpp's default
        linear_scale = 1.0
        if scaling == "linear":
            factor = float(self.metadata(f"{arch}.rope.scaling.factor",
                                         self.metadata(f"{arch}.rope.scale_linear", 0.0)) or 0.0)
            linear_scale = factor if factor > 0 else 1.0  # 0 or absent: none, as llama.cpp reads it
        elif scaling not in ("none", None):
            raise UnsupportedModelError(f"unsupported RoPE scaling {scaling!r} (supported: none, linear)")
        n_layers = int(self._require(f"{arch}.block_count"))
        if n_layers <= 0 or n_layers > 10_000:
            raise GGUFError(f"corrupt GGUF: block_count = {n_layers}")
        value_length = self.metadata(f"{arch}.attention.value_length")
        if value_length is not None and int(value_length) != head_dim:
            raise UnsupportedModelError(f"unsupported: value heads of {int(value_length)} and key heads of "
                                        f"{head_dim} ({arch}.attention.value_length differs from key_length)")
        config = ModelConfig(
            arch=arch,
            n_layers=n_layers,
            n_embd=n_embd,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            n_ff=int(self._require(f"{arch}.feed_forward_length")),
            vocab_size=vocab,
            context_length=int(self.metadata(f"{arch}.context_length", 2048)),
            rms_eps=float(self.metadata(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(self.metadata(f"{arch}.rope.freq_base", 10000.0)),
            rope_style=ROPE_STYLE[arch],
            rope_dim=int(self.metadata(f"{arch}.rope.dimension_count", head_dim)),
            rope_linear_scale=linear_scale,
            name=str(self.metadata("general.name", "") or ""),
            **self._arch_features(arch, n_embd, n_heads, head_dim, n_layers),
        )
        self._check_claims(config)
        return config

    def _arch_features(self, arch: str, n_embd: int, n_heads: int, head_dim: int, n_layers: int) -> dict:
        """What sets this architecture's block apart from `llama`'s, read as llama.cpp reads it."""
        out: dict = {"qk_norm": arch in QK_NORM_ARCHS}
        if arch in GEMMA_ARCHS:
            out.update(post_norms=True, ffn_act="gelu", embd_scale=math.sqrt(n_embd))
            out["attn_scale"] = 1.0 / math.sqrt(n_embd / n_heads if n_layers == GEMMA_EMBD_PER_HEAD_SCALE_LAYERS[arch]
                                                else head_dim)
            window = self.metadata(f"{arch}.attention.sliding_window")
            window = int(4096 if window is None and arch == "gemma2" else window or 0)
            period = GEMMA_SWA_PERIOD[arch]
            if arch == "gemma3":
                pattern = self.metadata(f"{arch}.attention.sliding_window_pattern")
                if isinstance(pattern, list):
                    raise UnsupportedModelError(f"unsupported: {arch}.attention.sliding_window_pattern as a "
                                                f"per-layer list (supported: one period)")
                period = int(pattern) if pattern is not None else period
            if window < 0 or period < 0:
                raise GGUFError(f"corrupt GGUF: sliding window {window}, pattern {period}: {self.path}")
            if window:
                out["sliding_window"] = window
                out["swa_layers"] = tuple(period == 0 or i % period < period - 1 for i in range(n_layers))
                base = self.metadata(f"{arch}.rope.freq_base_swa")
                if base is None:
                    base = GEMMA3_LOCAL_ROPE_BASE if arch == "gemma3" else self.metadata(f"{arch}.rope.freq_base", 10000.0)
                out["rope_base_swa"] = float(base)
            if arch == "gemma2":
                out["attn_softcap"] = float(self.metadata(f"{arch}.attn_logit_softcapping", GEMMA_ATTN_SOFTCAP))
            # llama.cpp caps Gemma 2's logits by default, Gemma 3's only where the file says so
            default_cap = GEMMA_FINAL_SOFTCAP if arch == "gemma2" else 0.0
            out["final_softcap"] = float(self.metadata(f"{arch}.final_logit_softcapping", default_cap))
        if arch == "phi3":
            out.update(fused_qkv="blk.0.attn_qkv.weight" in self.tensors,
                       fused_gate_up="blk.0.ffn_gate.weight" not in self.tensors)
            out["rope_orig_context"] = int(self.metadata(f"{arch}.rope.scaling.original_context_length",
                                                         self.metadata(f"{arch}.context_length", 2048)))
            out["rope_attn_factor"] = float(self.metadata(f"{arch}.rope.scaling.attn_factor", 1.0))
        return out

    def _check_claims(self, c: ModelConfig) -> None:
        """Every tensor the metadata implies is in the file, in the shape it implies, so a count
        that claims more than the file holds ends here in one line, before weights are loaded."""
        a = c.arch
        embd = f"{a}.embedding_length = {c.n_embd}"
        q = f"{a}.attention.head_count = {c.n_heads} heads of {c.head_dim}"
        kv = f"{a}.attention.head_count_kv = {c.n_kv_heads} heads of {c.head_dim}"
        ff = f"{a}.feed_forward_length = {c.n_ff}"
        wanted = [("token_embd.weight", (c.vocab_size, c.n_embd), embd),
                  ("output_norm.weight", (c.n_embd,), embd)]
        if "output.weight" in self.tensors:
            wanted.append(("output.weight", (c.vocab_size, c.n_embd),
                           f"{embd}, and {c.vocab_size} rows of token_embd.weight"))
        for i in range(c.n_layers):
            p = f"blk.{i}."
            wanted.append((p + "attn_norm.weight", (c.n_embd,), embd))
            if c.fused_qkv:
                wanted.append((p + "attn_qkv.weight", ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.n_embd),
                               f"{q}, {kv}, {embd}"))
            else:
                wanted += [(p + "attn_q.weight", (c.n_heads * c.head_dim, c.n_embd), f"{q}, {embd}"),
                           (p + "attn_k.weight", (c.n_kv_heads * c.head_dim, c.n_embd), f"{kv}, {embd}"),
                           (p + "attn_v.weight", (c.n_kv_heads * c.head_dim, c.n_embd), f"{kv}, {embd}")]
            wanted += [(p + "attn_output.weight", (c.n_embd, c.n_heads * c.head_dim), f"{embd}, {q}"),
                       (p + "ffn_norm.weight", (c.n_embd,), embd)]
            if c.fused_gate_up:
                wanted.append((p + "ffn_up.weight", (2 * c.n_ff, c.n_embd), f"gate and up, {ff}, {embd}"))
            else:
                wanted += [(p + "ffn_gate.weight", (c.n_ff, c.n_embd), f"{ff}, {embd}"),
                           (p + "ffn_up.weight", (c.n_ff, c.n_embd), f"{ff}, {embd}")]
            wanted.append((p + "ffn_down.weight", (c.n_embd, c.n_ff), f"{embd}, {ff}"))
            if c.qk_norm:
                wanted += [(p + "attn_q_norm.weight", (c.head_dim,), f"{a}: q/k norms, heads of {c.head_dim}"),
                           (p + "attn_k_norm.weight", (c.head_dim,), f"{a}: q/k norms, heads of {c.head_dim}")]
            if c.post_norms:
                wanted += [(p + "post_attention_norm.weight", (c.n_embd,), f"{a}: post-norms, {embd}"),
                           (p + "post_ffw_norm.weight", (c.n_embd,), f"{a}: post-norms, {embd}")]
            for bias, size, claim in (("attn_q.bias", c.n_heads * c.head_dim, q),
                                      ("attn_k.bias", c.n_kv_heads * c.head_dim, kv),
                                      ("attn_v.bias", c.n_kv_heads * c.head_dim, kv)):
                if p + bias in self.tensors:
                    wanted.append((p + bias, (size,), claim))
        if c.arch == "phi3" and ("rope_factors_long.weight" in self.tensors or "rope_factors_short.weight" in self.tensors):
            for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
                wanted.append((name, (c.rope_dim // 2,), f"{a}.rope.dimension_count = {c.rope_dim}"))
        for name, shape, claim in wanted:
            info = self.tensors.get(name)
            if info is None:
                layer = name.split(".")[1] if name.startswith("blk.") else None
                because = f" ({a}.block_count = {c.n_layers} claims layer {layer})" if layer else ""
                raise GGUFError(f"corrupt GGUF: tensor {name!r} is missing{because}: {self.path}")
            if tuple(info.shape) != shape:
                raise GGUFError(f"corrupt GGUF: tensor {name!r} has shape {tuple(info.shape)}, but the "
                                f"metadata claims {shape} ({claim}): {self.path}")
        tokens = self.reader.get_field("tokenizer.ggml.tokens")
        n_tokens = len(tokens.data) if tokens is not None else 0
        claimed_vocab = int(self.metadata(f"{a}.vocab_size", 0) or 0)
        for claim, n in (("tokenizer.ggml.tokens lists", n_tokens), (f"{a}.vocab_size =", claimed_vocab)):
            if n > c.vocab_size:
                raise GGUFError(f"corrupt GGUF: {claim} {n} tokens, but tensor 'token_embd.weight' "
                                f"holds {c.vocab_size}: {self.path}")
        if c.context_length <= 0:
            raise GGUFError(f"corrupt GGUF: {a}.context_length = {c.context_length}: {self.path}")
        if c.rope_dim <= 0 or c.rope_dim % 2 or c.rope_dim > c.head_dim:
            raise GGUFError(f"corrupt GGUF: {a}.rope.dimension_count = {c.rope_dim} for heads of "
                            f"{c.head_dim}: {self.path}")

    def decode_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads: every tensor but the embedding table, plus the
        embedding when it doubles as the output head."""
        total = sum(t.nbytes for name, t in self.tensors.items() if name != "token_embd.weight")
        if "output.weight" not in self.tensors:
            total += self.tensors["token_embd.weight"].nbytes
        return total
