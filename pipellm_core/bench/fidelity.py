"""Fidelity to llama.cpp, measured teacher-forced: over one text, the next-token distribution at
every position from two backends, compared by the mean KL divergence and the top-1 agreement
(the figures llama.cpp's `llama-perplexity --kl-divergence` reports).

Counting identical greedy continuations mostly measures near-ties (one flip anywhere ends a
continuation); these two figures measure how close the distributions are, position by position.
They mean little alone, so each comparison of pipellm with llama.cpp comes with llama.cpp
against itself under a kernel switch (flash attention on/off; on CUDA also its CPU build), the
distance that llama.cpp's own kernel choices make.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

CHUNK = 64  # positions per step of the float64 comparison (bounds its memory to a few MB per row block)


@dataclass(frozen=True)
class Distance:
    """How far `candidate`'s next-token distributions are from `reference`'s over one text."""

    reference: str
    candidate: str
    kl_mean: float  # mean over positions of KL(reference || candidate), in nats
    kl_max: float
    top1: float  # fraction of positions whose most likely token is the same
    positions: int

    def as_dict(self) -> dict:
        return asdict(self)


def distance(reference: torch.Tensor, candidate: torch.Tensor, reference_name: str = "reference",
             candidate_name: str = "candidate") -> Distance:
    """Distance of logits `candidate` [T, vocab] from `reference` [T, vocab] (same tokens)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"logits of shapes {tuple(reference.shape)} and {tuple(candidate.shape)}")
    kl, same = [], []
    for start in range(0, reference.shape[0], CHUNK):
        r = torch.log_softmax(reference[start:start + CHUNK].double(), -1)
        c = torch.log_softmax(candidate[start:start + CHUNK].double(), -1)
        kl.append((r.exp() * (r - c)).sum(-1).clamp_min(0))  # >= 0 up to rounding
        same.append(r.argmax(-1) == c.argmax(-1))
    kl_all, same_all = torch.cat(kl), torch.cat(same)
    return Distance(reference_name, candidate_name, float(kl_all.mean()), float(kl_all.max()),
                    float(same_all.double().mean()), int(kl_all.numel()))


def engine_logits(model: str, tokens: list[int], *, backend: str = "torch", device: str = "cpu",
                  **engine_options) -> torch.Tensor:
    """pipellm's logits at every position of `tokens` [T, vocab] (float32, on the CPU)."""
    from pipellm_core.frontends.llm import open_backend
    engine = open_backend(model, backend, device=device, n_ctx=len(tokens), max_batch=1,
                          progress=False, **engine_options)
    try:
        return engine.prefill([tokens], [0], all_logits=True)[0].float().cpu()
    finally:
        del engine


def llamacpp_logits(model: str, tokens: list[int], *, device: str = "cpu",
                    flash_attn: bool | None = None) -> torch.Tensor:
    """llama.cpp's logits at every position of `tokens` [T, vocab]; `flash_attn` None is its
    session's default (on for the GPU, off on the CPU)."""
    from pipellm_core.llamacpp.worker import open_session
    session = open_session(model, gpu=device.startswith("cuda"), max_batch=1, ctx_size=len(tokens),
                           flash_attn=flash_attn)
    try:
        rows = session.decode([(t, p, 0, True) for p, t in enumerate(tokens)])
    finally:
        session.close()
    return torch.from_numpy(np.stack(rows))


def tokenize(model: str, text: str) -> list[int]:
    """`text` in llama.cpp's tokens for `model` (with BOS where the model adds one)."""
    from pipellm_core.text.tokenizer import Tokenizer
    return Tokenizer(model).encode(text)


def compare(model: str | None = None, text: str | None = None, *, backend: str = "torch",
            device: str | None = None, **engine_options) -> dict:
    """Both figures for pipellm against llama.cpp, and for llama.cpp against itself, over `text`
    (the package's default text when None) on `device` ("auto": CUDA where torch sees a GPU).

    Returns {"model", "device", "backend", "tokens", "pairs": [Distance as dict, ...],
    "kl_ratio"}: pairs[0] is pipellm against llama.cpp on the same device; the others are llama.cpp
    against itself with flash attention switched, and on CUDA llama.cpp's CPU build against its
    CUDA build. `kl_ratio` is pipellm's mean KL over llama.cpp's with flash attention switched."""
    from pipellm_core.bench.fidelity_text import DEFAULT_TEXT
    from pipellm_core.gguf.default_model import default_model_path
    from pipellm_core.runtime.device_choice import choose_device

    model = model or default_model_path()
    device = choose_device(device, backend)
    tokens = tokenize(model, DEFAULT_TEXT if text is None else text)
    if len(tokens) < 2:
        from pipellm_core.errors import PipeLLMError
        raise PipeLLMError("the text is too short to compare over (fewer than 2 tokens)")
    gpu = device.startswith("cuda")
    where = "cuda" if gpu else "cpu"
    ref_name = f"llama.cpp {where}"
    reference = llamacpp_logits(model, tokens, device=device)
    ours = engine_logits(model, tokens, backend=backend, device=device, **engine_options)
    pairs = [distance(reference, ours, ref_name, f"pipellm {backend} {device}")]
    switched = not gpu  # the session's default is flash attention on for the GPU, off on the CPU
    other = llamacpp_logits(model, tokens, device=device, flash_attn=switched)
    pairs.append(distance(reference, other, ref_name,
                          f"llama.cpp {where}, flash attention {'on' if switched else 'off'}"))
    if gpu:
        pairs.append(distance(reference, llamacpp_logits(model, tokens, device="cpu"), ref_name, "llama.cpp cpu"))
    own = pairs[1].kl_mean
    return {"model": model, "device": device, "backend": backend, "tokens": len(tokens),
            "pairs": [p.as_dict() for p in pairs],
            "kl_ratio": pairs[0].kl_mean / own if own > 0 else float("inf")}


def format_comparison(result: dict) -> str:
    """The comparison as a small table and one line of verdict."""
    lines = [f"{result['tokens']} positions, teacher-forced; KL(reference || candidate) in nats",
             f"{'reference':<16} {'candidate':<38} {'KL mean':>9} {'KL max':>9} {'top-1':>7}"]
    for p in result["pairs"]:
        lines.append(f"{p['reference']:<16} {p['candidate']:<38} {p['kl_mean']:>9.2e} "
                     f"{p['kl_max']:>9.2e} {100 * p['top1']:>6.1f}%")
    lines.append(f"pipellm's mean KL is {result['kl_ratio']:.2f}x llama.cpp's own with flash attention switched")
    return "\n".join(lines)
