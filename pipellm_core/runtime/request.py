"""One sequence to generate, as every backend sees it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pipellm_core.runtime.sampling import Sampler, SamplingParams


@dataclass
class Request:
    prompt_tokens: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end of generation or stop string) or "length"
    slot: int = -1
    ignore_eos: bool = False  # benchmarks: always generate max_tokens

    def __post_init__(self):
        self.sampler = Sampler(self.params)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """Where the next token is written in the cache (the last token's position)."""
        return len(self.prompt_tokens) + len(self.generated) - 1

    def history(self) -> list[int]:
        return self.prompt_tokens + self.generated


@dataclass
class GenerationStats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    stage_busy_seconds: list[float] | None = None  # each stage's GPU computing during decode (sim only)

    def add_stage_busy(self, busy: list[float] | None) -> None:
        """Add a decode step's busy seconds per stage (a step timer's `.busy`, None where unknown)."""
        if busy is None:
            return
        if self.stage_busy_seconds is None:
            self.stage_busy_seconds = [0.0] * len(busy)
        self.stage_busy_seconds = [a + b for a, b in zip(self.stage_busy_seconds, busy)]

    @property
    def stage_busy_fractions(self) -> list[float] | None:
        """The share of the decode time each stage's GPU computed, where it is known."""
        if self.stage_busy_seconds is None or not self.decode_seconds:
            return None
        return [b / self.decode_seconds for b in self.stage_busy_seconds]

    @property
    def bubble_fraction(self) -> float | None:
        """The share of the stages' decode time spent idle: 1 - their mean busy fraction."""
        busy = self.stage_busy_fractions
        return None if busy is None else 1.0 - sum(busy) / len(busy)

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class Timer:
    busy = None  # no stage's busy time on the wall clock (`sim.timer.VirtualTimer` has it)

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
