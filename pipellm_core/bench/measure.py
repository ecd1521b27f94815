"""Decode-speed measurement, the same for every backend: B sequences of a fixed prompt length,
then a fixed number of decode steps, median over repeats after a warm-up."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch



@dataclass
class DecodeMeasurement:
    backend: str
    plugins: list[str]
    device: str
    batch: int
    prompt_tokens: int
    n_predict: int
    repeats: int
    ms_per_step: float
    tok_s: float
    prefill_tok_s: float
    weight_bytes: int
    gb_s: float  # weight bytes read per step / step time
    stage_busy: list[float] | None  # share of the decode time each stage's GPU computed (sim only)
    bubble: float | None  # share of the stages' decode time spent idle: 1 - their mean busy share
    tokens: list[list[int]]  # greedy tokens of the last repeat, to compare runs

    def row(self) -> dict:
        out = asdict(self)
        out.pop("tokens")
        return out


def synthetic_prompts(batch: int, prompt_tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Token ids drawn from the middle of the vocabulary (no special tokens), fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = min(1000, vocab // 4), max(min(vocab - 1000, 30000), vocab // 2)
    return torch.randint(lo, hi, (batch, prompt_tokens), generator=g).tolist()


def measure_decode(backend, *, batch: int, prompt_tokens: int, n_predict: int, repeats: int = 3,
                   warmup: int = 1, backend_name: str = "torch", plugins=(), device: str = "cpu",
                   weight_bytes: int = 0, progress=None) -> DecodeMeasurement:
    """Run `warmup` + `repeats` generations of `n_predict` greedy tokens for `batch` sequences
    (end-of-generation ignored) and report the median decode step time, and each stage's
    median busy share where the backend tells it (the sim)."""
    prompts = synthetic_prompts(batch, prompt_tokens, backend.tokenizer.vocab_size)
    steps, prefill, busy, tokens = [], [], [], []
    for i in range(warmup + repeats):
        r = backend.timed_greedy_run(prompts, n_predict)
        if i >= warmup:
            steps.append(r["decode_seconds"] / max(r["decode_steps"], 1))
            prefill.append(batch * prompt_tokens / r["prefill_seconds"] if r["prefill_seconds"] else 0.0)
            if r.get("stage_busy") is not None:
                busy.append(r["stage_busy"])
            tokens = r["tokens"]
        if progress:
            progress.update(1)
    step = statistics.median(steps)
    stage_busy = [statistics.median(b) for b in zip(*busy)] if busy else None
    return DecodeMeasurement(
        backend=backend_name, plugins=list(plugins), device=device, batch=batch,
        prompt_tokens=prompt_tokens, n_predict=n_predict, repeats=repeats,
        ms_per_step=step * 1e3, tok_s=batch / step, prefill_tok_s=statistics.median(prefill),
        weight_bytes=weight_bytes, gb_s=weight_bytes / step / 1e9 if weight_bytes else 0.0,
        stage_busy=stage_busy, bubble=1.0 - sum(stage_busy) / len(stage_busy) if stage_busy else None,
        tokens=tokens)
