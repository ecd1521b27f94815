"""Continuous batching shared by every backend: sequences join free cache slots as others end.

A backend supplies `prefill_logits` (new sequences, whole prompts) and `decode_logits` (one token
for each active sequence); sampling, stopping and slot reuse are the same for all of them.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import torch

from pipellm_core.errors import ContextLengthError, PipeLLMError
from pipellm_core.runtime.request import GenerationStats, Request, Timer
from pipellm_core.runtime.sampling import SamplingParams


def check_context_size(ctx_size: int, trained_context: int) -> None:
    """A cache of `ctx_size` positions per sequence, for a model trained on `trained_context`."""
    if ctx_size <= 0:
        raise ContextLengthError(f"context size must be positive, got {ctx_size}")
    if ctx_size > trained_context:
        raise ContextLengthError(f"context size {ctx_size} exceeds the model's trained context "
                                 f"of {trained_context}")


class ContinuousBatcher:
    max_batch: int
    ctx_size: int

    def prefill_logits(self, admitted: list[Request]):
        raise NotImplementedError

    def decode_logits(self, active: list[Request]):
        raise NotImplementedError

    def step_timer(self):
        """Measures a prefill or decode step (a virtual clock on the sim backend)."""
        return Timer()

    def release_slot(self, slot: int) -> None:
        """Called when a sequence ends; its slot's cache may be reused."""

    def timed_greedy_run(self, prompts: list[list[int]], n_predict: int) -> dict:
        """Every prompt prefilled, then greedy decode steps until each has `n_predict` tokens
        (end of generation ignored): seconds and steps of each phase, the share of the decode
        time each pipeline stage's GPU computed (None where the platform cannot tell), and the
        tokens."""
        self.stats = GenerationStats()
        reqs = [Request(p, n_predict, SamplingParams(temperature=0), ignore_eos=True) for p in prompts]
        for _ in self.generate(reqs):
            pass
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        s = self.stats
        return {"prefill_seconds": s.prefill_seconds, "decode_seconds": s.decode_seconds,
                "decode_steps": s.decode_steps, "stage_busy": s.stage_busy_fractions,
                "tokens": [r.generated for r in reqs]}

    def check_fits(self, req: Request) -> None:
        n = len(req.prompt_tokens)
        if n == 0:
            raise PipeLLMError("empty prompt: nothing to generate from")
        if n >= self.ctx_size:
            raise ContextLengthError(f"prompt of {n} tokens does not fit the context of "
                                     f"{self.ctx_size} (raise -c/--ctx-size)")

    def accept_token(self, req: Request, token: int) -> bool:
        """Record a sampled token; returns whether the caller should see it."""
        if self.tokenizer.is_end_of_generation(token) and not req.ignore_eos:
            req.finish_reason = "stop"
            return False
        req.generated.append(token)
        if len(req.generated) >= req.max_tokens or req.position + 1 >= self.ctx_size:
            req.finish_reason = "length"
        return True

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, int]]:
        """Yield (request, token) as tokens come; a consumer may end a request by setting its
        `finish_reason` (a stop string) and it is dropped before the next step."""
        pending = deque(requests)
        for req in pending:
            self.check_fits(req)
        free = list(range(self.max_batch))
        active: list[Request] = []
        while pending or active:
            admitted = []
            while pending and free:
                req = pending.popleft()
                req.slot = free.pop(0)
                admitted.append(req)
            if admitted:
                with self.step_timer() as t:
                    logits = self.prefill_logits(admitted)
                    picks = self.pick_tokens(admitted, logits)
                self.stats.prefill_tokens += sum(len(r.prompt_tokens) for r in admitted)
                self.stats.prefill_seconds += t.seconds
                for req, tok in zip(admitted, picks):
                    if req.max_tokens <= 0:
                        req.finish_reason = "length"
                    elif self.accept_token(req, tok):
                        yield req, tok
                active += admitted
            active = self._retire(active, free)
            if not active:
                continue
            with self.step_timer() as t:
                logits = self.decode_logits(active)
                picks = self.pick_tokens(active, logits)
            self.stats.decode_seconds += t.seconds
            self.stats.add_stage_busy(t.busy)
            self.stats.decode_tokens += len(active)
            self.stats.decode_steps += 1
            for req, tok in zip(active, picks):
                if not req.finished and self.accept_token(req, tok):
                    yield req, tok
            active = self._retire(active, free)

    @staticmethod
    def pick_tokens(reqs: list[Request], logits, failed=None) -> list[int | None]:
        """Next token of each request; all-greedy batches take one argmax (one device sync).
        With `failed`, a request whose sampling raises is passed to failed(request, error) and
        gets None, and the others their tokens."""
        if all(r.params.greedy and r.params.repeat_penalty == 1.0 for r in reqs):
            stacked = logits if isinstance(logits, torch.Tensor) else torch.stack(list(logits))
            return stacked.argmax(-1).tolist()
        picks: list[int | None] = []
        for i, r in enumerate(reqs):
            try:
                picks.append(r.sampler(logits[i], r.history()))
            except Exception as e:
                if failed is None:
                    raise
                failed(r, e)
                picks.append(None)
        return picks

    def _retire(self, active: list[Request], free: list[int]) -> list[Request]:
        for req in active:
            if req.finished:
                self.release_slot(req.slot)
                free.append(req.slot)
        free.sort()
        return [r for r in active if not r.finished]
