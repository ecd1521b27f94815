"""Token sampling on the device: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The order follows llama.cpp's default chain (penalties, top-k, top-p, min-p, temperature), so
the same settings mean the same thing in both backends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# temperatures below this divide the logits past float32's range: the top token, as at 0
GREEDY_BELOW = 1e-30


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) means greedy
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def apply_repeat_penalty(logits: torch.Tensor, history: list[int], penalty: float, last_n: int):
    """llama.cpp's rule: divide positive logits of recent tokens by the penalty, multiply negative."""
    if penalty == 1.0 or not history:
        return logits
    ids = torch.tensor(sorted(set(history[-last_n:])), device=logits.device, dtype=torch.long)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Mask (to -inf) every token outside top-k, top-p and min-p; `logits` is [vocab]."""
    logits = logits.float()
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        before = torch.cumsum(probs, -1) - probs  # mass strictly before each token
        drop = before >= p.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0.0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


class Sampler:
    """One per sequence: holds its own random generator so seeded runs reproduce exactly."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device="cpu")
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        p = self.params
        logits = apply_repeat_penalty(logits, history, p.repeat_penalty, p.repeat_last_n)
        if p.greedy:
            return int(torch.argmax(logits))
        # a penalty that overflows gives the largest float, not inf (whose softmax is NaN)
        logits = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max,
                                  neginf=float("-inf"))
        # from the largest logit down, so that a small temperature overflows to -inf (a token
        # left out) rather than to inf - inf
        logits = filter_logits(logits, p)
        probs = torch.softmax((logits - logits.max()) / p.temperature, -1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))
