"""The fixed shapes (batch bucket, context bucket) that decode steps run in.

A step of n sequences whose longest context is L runs in the smallest shape (B >= n, C >= L):
the batch is padded with rows that write to a scratch cache slot, and attention reads C cache
positions with the ones past each sequence masked out. The engine does this with or without
plugins, so that a CUDA graph of a shape (the graphs plugin) runs the very kernels of the eager
step of that shape and gives its bits: kernels pick their algorithms by shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipellm_core.errors import PipeLLMError

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
FIRST_CTX_BUCKET = 512


def _sizes(text, what: str) -> list[int]:
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = sorted({int(v) for v in items if str(v).strip()})
    except ValueError:
        raise PipeLLMError(f"{what} take comma-separated integers, got {text!r}") from None
    if not values or values[0] <= 0:
        raise PipeLLMError(f"{what} must be positive integers, got {text!r}")
    return values


@dataclass(frozen=True)
class StepShapes:
    batch_buckets: tuple[int, ...]
    ctx_buckets: tuple[int, ...]

    @classmethod
    def for_engine(cls, max_batch: int, ctx_size: int, batch_buckets=None, ctx_buckets=None) -> "StepShapes":
        """Batch buckets up to `max_batch` (which is always one); context buckets 512, 1024,
        2048, ... doubling up to the cache's context `ctx_size` (always the last one)."""
        batches = _sizes(batch_buckets, "batch buckets") if batch_buckets else list(DEFAULT_BATCH_BUCKETS)
        batches = sorted({b for b in batches if b < max_batch} | {max_batch})
        if ctx_buckets:
            ctxs = _sizes(ctx_buckets, "context buckets")
        else:
            ctxs, c = [], FIRST_CTX_BUCKET
            while c < ctx_size:
                ctxs.append(c)
                c *= 2
        ctxs = sorted({c for c in ctxs if c < ctx_size} | {ctx_size})
        return cls(tuple(batches), tuple(ctxs))

    def pick(self, batch: int, ctx_len: int) -> tuple[int, int] | None:
        """The smallest (batch bucket, context bucket) holding the step, None if none does."""
        b = next((x for x in self.batch_buckets if x >= batch), None)
        c = next((x for x in self.ctx_buckets if x >= ctx_len), None)
        return None if b is None or c is None else (b, c)

    def all_shapes(self) -> list[tuple[int, int]]:
        return [(b, c) for b in self.batch_buckets for c in self.ctx_buckets]
