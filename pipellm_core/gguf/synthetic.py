"""Random-weight GGUFs of real model shapes, written tensor by tensor with `gguf.GGUFWriter`.

Decode speed does not depend on weight values, so benchmarks make multi-gigabyte models where
they run instead of shipping them. Quantized tensors are random bytes whose fp16 scale fields
are set to sane values, so every block decodes to finite weights of a realistic size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as GGMLType, GGUFReader, GGUFValueType, GGUFWriter


@dataclass(frozen=True)
class Shape:
    arch: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_heads: int
    n_kv_heads: int
    context_length: int = 8192
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    tied_output: bool = False
    vocab_size: int = 49152
    head_dim: int = 0  # written as attention.key_length; 0: n_embd / n_heads, and not written
    rope_dim: int = 0  # 0: the head size
    sliding_window: int = 0  # gemma2, gemma3, phi3: attention.sliding_window (0: not written)
    swa_pattern: int = 0  # gemma3: attention.sliding_window_pattern (0: not written)
    rope_base_swa: float = 0.0  # gemma3: rope.freq_base_swa (0: not written)
    attn_softcap: float = 0.0  # gemma2: attn_logit_softcapping (0: not written)
    final_softcap: float = 0.0  # gemma2, gemma3: final_logit_softcapping (0: not written)
    rope_orig_context: int = 0  # phi3: rope.scaling.original_context_length, with rope factors
    rope_attn_factor: float = 0.0  # phi3: rope.scaling.attn_factor (0: not written)
    rope_scale: float = 0.0  # rope.scaling.type linear with this rope.scaling.factor (0: not written)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_heads

    def config(self):
        """The `ModelConfig` a file of this shape reads as."""
        import math

        from pipellm_core.gguf import model_file as mf
        hd, a = self.head_size, self.arch
        extra: dict = {"qk_norm": a in mf.QK_NORM_ARCHS}
        if a in mf.GEMMA_ARCHS:
            window = self.sliding_window or (4096 if a == "gemma2" else 0)
            period = self.swa_pattern or mf.GEMMA_SWA_PERIOD[a] if a == "gemma3" else mf.GEMMA_SWA_PERIOD[a]
            big = self.n_layers == mf.GEMMA_EMBD_PER_HEAD_SCALE_LAYERS[a]
            extra.update(post_norms=True, ffn_act="gelu", embd_scale=math.sqrt(self.n_embd),
                         attn_scale=1.0 / math.sqrt(self.n_embd / self.n_heads if big else hd))
            if window:
                extra.update(sliding_window=window,
                             swa_layers=tuple(i % period < period - 1 for i in range(self.n_layers)),
                             rope_base_swa=self.rope_base_swa or (mf.GEMMA3_LOCAL_ROPE_BASE if a == "gemma3"
                                                                  else self.rope_base))
            if a == "gemma2":
                extra["attn_softcap"] = self.attn_softcap or mf.GEMMA_ATTN_SOFTCAP
            extra["final_softcap"] = self.final_softcap or (mf.GEMMA_FINAL_SOFTCAP if a == "gemma2" else 0.0)
        if a == "phi3":
            extra.update(fused_qkv=True, fused_gate_up=True,
                         rope_orig_context=self.rope_orig_context or self.context_length,
                         rope_attn_factor=self.rope_attn_factor or 1.0)
        return mf.ModelConfig(a, self.n_layers, self.n_embd, self.n_heads, self.n_kv_heads,
                              hd, self.n_ff, self.vocab_size, self.context_length, self.rms_eps,
                              self.rope_base, mf.ROPE_STYLE[a], self.rope_dim or hd, self.rope_scale or 1.0, **extra)


SHAPES = {
    "smollm2-135m": Shape("llama", 30, 576, 1536, 9, 3, 8192, 100000.0, 1e-5, tied_output=True),
    "llama-1b": Shape("llama", 16, 2048, 8192, 32, 8, 8192, 500000.0, 1e-5, tied_output=True),
    "llama-8b": Shape("llama", 32, 4096, 14336, 32, 8, 8192, 500000.0, 1e-5),
    "llama-70b": Shape("llama", 80, 8192, 28672, 64, 8, 8192, 500000.0, 1e-5),
    "tiny-llama": Shape("llama", 2, 64, 128, 4, 2, 2048),
    "tiny-qwen2": Shape("qwen2", 2, 64, 128, 4, 2, 2048, 1000000.0, 1e-6),
    # the new architectures, each with every optional tensor and metadata key llama.cpp reads
    "tiny-qwen3": Shape("qwen3", 2, 64, 128, 4, 2, 2048, 1000000.0, 1e-6, head_dim=32),
    "tiny-gemma2": Shape("gemma2", 3, 64, 128, 4, 2, 2048, 10000.0, 1e-6, tied_output=True, head_dim=32,
                         sliding_window=8, attn_softcap=10.0, final_softcap=8.0),
    "tiny-gemma3": Shape("gemma3", 6, 64, 128, 4, 2, 2048, 1000000.0, 1e-6, tied_output=True, head_dim=32,
                         sliding_window=8, swa_pattern=3, rope_base_swa=20000.0, final_softcap=8.0,
                         rope_scale=8.0),
    "tiny-phi3": Shape("phi3", 2, 128, 160, 4, 2, 2048, 10000.0, 1e-5, head_dim=32, rope_dim=24,
                       sliding_window=16, rope_orig_context=192, rope_attn_factor=1.19),
    "qwen3-8b": Shape("qwen3", 36, 4096, 12288, 32, 8, 40960, 1000000.0, 1e-6, head_dim=128, vocab_size=151936),
    "gemma3-270m": Shape("gemma3", 18, 640, 2048, 4, 1, 32768, 1000000.0, 1e-6, tied_output=True, head_dim=256,
                         sliding_window=512, vocab_size=262144),
}

# byte offsets of the fp16 scale fields in one block of each type ("d", and "m"/"dmin" at +2)
SCALE_FIELDS = {
    GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2), GGMLType.Q8_0: (0,),
    GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,),
}


def random_blocks(qtype: GGMLType, n_blocks: int, rng: np.random.Generator, scale: float = 0.002) -> np.ndarray:
    """Random blocks of `qtype` ([n_blocks, bytes per block], uint8) with sane fp16 scales."""
    size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    fields = SCALE_FIELDS[qtype]
    d = (rng.uniform(0.5, 1.5, n_blocks) * scale).astype(np.float16)
    blocks[:, fields[0]:fields[0] + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    if len(fields) > 1:
        # a min that centres the block on zero: -8 steps (Q4_1), -16 (Q5_1); the K types
        # subtract dmin times a 6-bit (Q2_K: 4-bit) min whose mean equals their scales' mean
        centre = {GGMLType.Q4_1: -8, GGMLType.Q5_1: -16, GGMLType.Q2_K: 1.5, GGMLType.Q4_K: 7.5, GGMLType.Q5_K: 15.5}[qtype]
        m = (d.astype(np.float32) * centre).astype(np.float16)
        blocks[:, fields[1]:fields[1] + 2] = m.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def _random_tensor(qtype: GGMLType, rows: int, cols: int, rng, std: float) -> np.ndarray:
    if qtype == GGMLType.F32:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std)
    if qtype == GGMLType.F16:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float16)
    block = GGML_QUANT_SIZES[qtype][0]
    # spread of a block's values is about 4.6 steps (4-bit), 74 (8-bit): pick the step from std
    # (the K types' sub-block scales, random bytes, multiply a step by about their mean)
    step = std / {GGMLType.Q8_0: 74.0, GGMLType.Q5_0: 9.2, GGMLType.Q5_1: 9.2, GGMLType.Q4_K: 150.0, GGMLType.Q5_K: 290.0,
                  GGMLType.Q6_K: 1370.0, GGMLType.Q2_K: 10.0}.get(qtype, 4.6)
    blocks = random_blocks(qtype, rows * cols // block, rng, step)
    return blocks.reshape(rows, -1)


# Phi-3's turn tokens, given to unused special tokens of a copied tokenizer (by id), so that its
# chat template can be rendered with the tokens a real file has.
ARCH_TOKENS = {"phi3": {4: "<|end|>", 5: "<|user|>", 6: "<|assistant|>", 7: "<|system|>"}}


def copy_tokenizer(writer: GGUFWriter, source: str, renamed: dict[int, str] | None = None) -> int:
    """Copy every tokenizer.* field of `source` (a GGUF) into `writer`, token ids in `renamed`
    given new texts; returns the vocab size."""
    reader = GGUFReader(source, "r")
    vocab = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = GGUFValueType(field.types[0])
        value = field.contents()
        sub = GGUFValueType(field.types[1]) if vtype == GGUFValueType.ARRAY else None
        if name == "tokenizer.ggml.tokens" and renamed:
            value = [renamed.get(i, t) for i, t in enumerate(value)]
        writer.add_key_value(name, value, vtype, sub_type=sub)
        if name == "tokenizer.ggml.tokens":
            vocab = len(value)
    return vocab


def q4_k_m_mix(name: str, layer: int, n_layers: int) -> GGMLType | None:
    """The type llama.cpp's quantizer gives a layer matrix in a Q4_K_M file where it departs from
    Q4_K: Q6_K for `attn_v` and `ffn_down` in the first and last eighth of the layers and in
    every third layer between (its `use_more_bits` rule)."""
    if name not in ("attn_v", "ffn_down"):
        return None
    eighth = n_layers // 8
    more = layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2
    return GGMLType.Q6_K if more else None


# what llama.cpp's quantizer writes instead of a 256-value block type whose blocks do not divide
# a row (its tensor_type_fallback): Gemma 3 270M's rows of 640 values are Q5_0 in a Q4_K_M file
FALLBACK_TYPES = {GGMLType.Q2_K: GGMLType.Q4_0, GGMLType.Q3_K: GGMLType.Q4_0, GGMLType.Q4_K: GGMLType.Q5_0,
                  GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0}


def fitting_type(qtype: GGMLType, cols: int) -> GGMLType:
    """`qtype`, or llama.cpp's fallback where its blocks do not divide a row of `cols` values."""
    if cols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    fallback = FALLBACK_TYPES.get(qtype)
    if fallback is None or cols % GGML_QUANT_SIZES[fallback][0]:
        raise ValueError(f"rows of {cols} values cannot be stored as {qtype.name}")
    return fallback


def write_random_gguf(path: str, shape: Shape | str, qtype: T = GGMLType.Q4_0, *, tokenizer_from: str | None,
                      embedding_type: GGMLType | None = None, output_type: GGMLType | None = None,
                      layer_types=None, seed: int = 0, std: float = 0.02, progress: bool = False) -> str:
    """Write a model of `shape` with random weights in `qtype` and a real tokenizer's metadata
    (copied from the GGUF `tokenizer_from`; without one, a placeholder vocabulary of
    `shape.vocab_size` tokens that only pipellm's file reader, not llama.cpp, accepts).
    `layer_types(name, layer, n_layers)` may give another type for one layer matrix
    (`q4_k_m_mix` mixes types as a Q4_K_M file does). A type whose blocks do not divide a row
    becomes llama.cpp's fallback (`fitting_type`)."""
    from pipellm_core.progress import progress_bar

    shape = SHAPES[shape] if isinstance(shape, str) else shape
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, shape.arch)
    if tokenizer_from:
        vocab = copy_tokenizer(w, tokenizer_from, ARCH_TOKENS.get(shape.arch))
    else:
        vocab = shape.vocab_size
        w.add_tokenizer_model("none")
        w.add_token_list([f"<t{i}>" for i in range(vocab)])
    shape = replace(shape, vocab_size=vocab)
    a, hd = shape.arch, shape.head_size
    # llama.cpp gives special tokens other attributes where the name holds "phi3" or "phi-3", and
    # those look for tokens a copied tokenizer may lack: the name leaves the architecture out
    w.add_name(f"random weights {qtype.name}")
    w.add_uint32(f"{a}.block_count", shape.n_layers)
    w.add_uint32(f"{a}.context_length", shape.context_length)
    w.add_uint32(f"{a}.embedding_length", shape.n_embd)
    w.add_uint32(f"{a}.feed_forward_length", shape.n_ff)
    w.add_uint32(f"{a}.attention.head_count", shape.n_heads)
    w.add_uint32(f"{a}.attention.head_count_kv", shape.n_kv_heads)
    rope_dim = shape.rope_dim or hd
    w.add_uint32(f"{a}.rope.dimension_count", rope_dim)
    w.add_float32(f"{a}.rope.freq_base", shape.rope_base)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", shape.rms_eps)
    if shape.head_dim:
        w.add_uint32(f"{a}.attention.key_length", hd)
        w.add_uint32(f"{a}.attention.value_length", hd)
    for key, value in (("attention.sliding_window", shape.sliding_window),
                       ("attention.sliding_window_pattern", shape.swa_pattern),
                       ("rope.scaling.original_context_length", shape.rope_orig_context)):
        if value:
            w.add_uint32(f"{a}.{key}", value)
    for key, value in (("rope.freq_base_swa", shape.rope_base_swa),
                       ("attn_logit_softcapping", shape.attn_softcap),
                       ("final_logit_softcapping", shape.final_softcap),
                       ("rope.scaling.attn_factor", shape.rope_attn_factor)):
        if value:
            w.add_float32(f"{a}.{key}", value)
    if shape.rope_scale:
        w.add_string(f"{a}.rope.scaling.type", "linear")
        w.add_float32(f"{a}.rope.scaling.factor", shape.rope_scale)

    q, kv = shape.n_heads * hd, shape.n_kv_heads * hd
    plan: list[tuple[str, GGMLType, int, int, float]] = [
        ("token_embd.weight", embedding_type or qtype, vocab, shape.n_embd, 1.0)]
    if shape.rope_orig_context:  # phi3's LongRoPE: divisors of the angles, about 1 (short) and more (long)
        plan += [("rope_factors_long.weight", GGMLType.F32, 1, rope_dim // 2, -4.0),
                 ("rope_factors_short.weight", GGMLType.F32, 1, rope_dim // 2, -1.2)]
    for i in range(shape.n_layers):
        p = f"blk.{i}."

        def qt(name):
            return (layer_types and layer_types(name, i, shape.n_layers)) or qtype
        plan.append((p + "attn_norm.weight", GGMLType.F32, 1, shape.n_embd, 0.0))
        if a == "phi3":
            plan.append((p + "attn_qkv.weight", qt("attn_qkv"), q + 2 * kv, shape.n_embd, std))
        else:
            plan += [(p + "attn_q.weight", qt("attn_q"), q, shape.n_embd, std),
                     (p + "attn_k.weight", qt("attn_k"), kv, shape.n_embd, std),
                     (p + "attn_v.weight", qt("attn_v"), kv, shape.n_embd, std)]
        if a in ("qwen3", "gemma3"):
            plan += [(p + "attn_q_norm.weight", GGMLType.F32, 1, hd, 0.0),
                     (p + "attn_k_norm.weight", GGMLType.F32, 1, hd, 0.0)]
        plan.append((p + "attn_output.weight", qt("attn_output"), shape.n_embd, q, std))
        if a in ("gemma2", "gemma3"):
            plan.append((p + "post_attention_norm.weight", GGMLType.F32, 1, shape.n_embd, 0.0))
        plan.append((p + "ffn_norm.weight", GGMLType.F32, 1, shape.n_embd, 0.0))
        if a == "phi3":
            plan.append((p + "ffn_up.weight", qt("ffn_up"), 2 * shape.n_ff, shape.n_embd, std))
        else:
            plan += [(p + "ffn_gate.weight", qt("ffn_gate"), shape.n_ff, shape.n_embd, std),
                     (p + "ffn_up.weight", qt("ffn_up"), shape.n_ff, shape.n_embd, std)]
        plan.append((p + "ffn_down.weight", qt("ffn_down"), shape.n_embd, shape.n_ff, std))
        if a in ("gemma2", "gemma3"):
            plan.append((p + "post_ffw_norm.weight", GGMLType.F32, 1, shape.n_embd, 0.0))
        if shape.arch == "qwen2":
            plan += [(p + "attn_q.bias", GGMLType.F32, 1, shape.n_embd, std),
                     (p + "attn_k.bias", GGMLType.F32, 1, kv, std),
                     (p + "attn_v.bias", GGMLType.F32, 1, kv, std)]
    plan.append(("output_norm.weight", GGMLType.F32, 1, shape.n_embd, 0.0))
    if not shape.tied_output:
        plan.append(("output.weight", output_type or qtype, vocab, shape.n_embd, std))

    def make(qt, rows, cols, s):
        if s == 0.0:  # norms: ones, slightly perturbed
            return (1.0 + rng.standard_normal(cols, dtype=np.float32) * 0.05).astype(np.float32)
        if s < 0.0:  # RoPE factors: from 1 to -s over the frequencies
            return np.linspace(1.0, -s, cols, dtype=np.float32)
        t = _random_tensor(qt, rows, cols, rng, s)
        return t.reshape(-1) if rows == 1 else t

    plan = [(name, fitting_type(qt, cols), rows, cols, s) for name, qt, rows, cols, s in plan]
    for name, qt, rows, cols, _ in plan:
        block, size = GGML_QUANT_SIZES[qt]
        nbytes = rows * cols // block * size
        dtype = {GGMLType.F32: np.float32, GGMLType.F16: np.float16}.get(qt, np.uint8)
        byte_shape = (rows, cols) if dtype is not np.uint8 else (rows, cols // block * size)
        if rows == 1:
            byte_shape = byte_shape[1:]
        w.add_tensor_info(name, byte_shape, np.dtype(dtype), nbytes,
                          raw_dtype=None if dtype is not np.uint8 else qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    bar = progress_bar(total=len(plan), desc=f"writing {path}", enabled=progress)
    for name, qt, rows, cols, s in plan:
        w.write_tensor_data(make(qt, rows, cols, s))
        bar.update(1)
    bar.close()
    w.close()
    return path
