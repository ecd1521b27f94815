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

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
