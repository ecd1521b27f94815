"""Sizes of what the engine will put on the GPU, read from the GGUF's tensor table before loading."""

from __future__ import annotations

from pipellm_core.model.weights import packed_bytes


def fixed_gpu_bytes(engine, tensors: dict) -> int:
    """Embedding, output norm and head, and the KV cache: on the GPU whatever streams."""
    out = tensors["token_embd.weight"].nbytes + packed_bytes(tensors["output_norm.weight"])
    if "output.weight" in tensors:
        out += tensors["output.weight"].nbytes
    return out + engine.kv_cache_bytes


def prefill_activation_bytes(engine) -> int:
    """A bound on the activations of prefilling every cache slot at once (prompts are not cut
    into chunks): per token a float32 hidden state, its fp16 normed copy and attention output,
    and three fp16 feed-forward vectors."""
    c = engine.config
    return engine.max_batch * engine.ctx_size * (3 * 4 * c.n_embd + 3 * 2 * c.n_ff)
