"""The server's engine loop: one thread owns a backend and runs its steps for requests that
arrive at any time.

`ContinuousBatcher.generate` batches a list of requests known before it starts. A server's
requests come while others are running, so this loop drives the same parts of the batcher
(`check_fits`, `prefill_logits`, `decode_logits`, `pick_tokens`, `accept_token`, `release_slot`, its
timer and stats) one step at a time, taking new requests into free slots before each step, in
the order `generate` uses them: so one request alone gets `generate`'s tokens.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from pipellm_core.errors import PipeLLMError
from pipellm_core.runtime.batching import ContinuousBatcher
from pipellm_core.runtime.request import Request


class QueueFullError(PipeLLMError):
    """Every slot is busy and the wait queue is full."""


@dataclass(eq=False)
class Job:
    """One request in the loop and where its tokens go.

    Both callbacks run on the engine thread and must be quick. `on_token(job, token)` sees each
    token as it is made and may end the request by setting `job.request.finish_reason` (a stop
    string); `on_end(job, error)` is called once, when the request has left its slot (error is
    None, or the exception that ended it).
    """
    request: Request
    on_token: Callable[["Job", int], None]
    on_end: Callable[["Job", BaseException | None], None]
    cancelled: bool = False
    error: BaseException | None = None
    submitted_at: float = field(default_factory=time.monotonic)


@dataclass
class StepRecord:
    kind: str        # "prefill" or "decode"
    batch: int       # sequences in the step
    seconds: float   # as the backend's timer measures it (virtual time on the sim)


class EngineLoop:
    """Runs `batcher` on its own thread; `submit` and `cancel` may be called from any thread.

    At most `max_waiting` jobs wait for a slot; `submit` raises `QueueFullError` beyond that.
    `steps` keeps the last `step_history` steps (kind, batch size, seconds).
    """

    def __init__(self, batcher: ContinuousBatcher, max_waiting: int, step_history: int = 4096):
        if max_waiting < 0:
            raise PipeLLMError(f"the wait queue size must be at least 0, got {max_waiting}")
        if getattr(batcher, "group_kv_offload", None):  # its cache holds three groups' slots
            raise PipeLLMError("the server steps its batch as one group, without the KV offload of "
                               "waiting groups: leave pipeline.kv_offload out")
        self.batcher = batcher
        self.max_waiting = max_waiting
        self.steps: deque[StepRecord] = deque(maxlen=step_history)
        self.prompt_tokens = 0
        self._recent_decode: deque = deque(maxlen=1024)  # (ended at, tokens, seconds) per decode step
        self.generated_tokens = 0
        self._pending: deque[Job] = deque()
        self._running = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pipellm-engine-loop", daemon=True)

    # --- any thread ----------------------------------------------------------------------

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue `job`; it joins the running batch at the next step with a free slot. Raises
        the batcher's error for a prompt that cannot fit, `QueueFullError` when full."""
        self.batcher.check_fits(job.request)
        with self._cond:
            if self._stopping:
                raise PipeLLMError("the server is shutting down")
            waiting_after = self._running + len(self._pending) + 1 - self.batcher.max_batch
            if waiting_after > self.max_waiting:
                raise QueueFullError(f"all {self.batcher.max_batch} slots are busy and "
                                     f"{len(self._pending)} requests are waiting")
            self._pending.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """End `job` before the loop's next step (a client that went away); its slot is freed."""
        with self._cond:
            job.cancelled = True
            self._cond.notify_all()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def decode_tok_s(self, window_s: float = 10.0) -> float:
        """Tokens per second of the decode steps that ended in the last `window_s` seconds."""
        now = time.monotonic()
        tokens = seconds = 0.0
        for ended, n, s in list(self._recent_decode):
            if now - ended <= window_s:
                tokens += n
                seconds += s
        return tokens / seconds if seconds else 0.0

    # --- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        b = self.batcher
        free = list(range(b.max_batch))
        active: list[Job] = []
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not active:
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = []
                while self._pending and (free or self._pending[0].cancelled):
                    job = self._pending.popleft()
                    if job.cancelled:
                        job.request.finish_reason = "cancelled"
                        self._end(job, None)
                        continue
                    job.request.slot = free.pop(0)
                    admitted.append(job)
                self._running = len(active) + len(admitted)
            if admitted:
                self._prefill(admitted)
                active += admitted
            active = self._retire(active, free)
            if active:
                self._decode(active)
                active = self._retire(active, free)
            self._running = len(active)
        for job in active + list(self._pending):
            self._end(job, PipeLLMError("the server is shutting down"))

    def _prefill(self, admitted: list[Job]) -> None:
        b = self.batcher
        reqs = [j.request for j in admitted]
        try:
            with b.step_timer() as t:
                logits = b.prefill_logits(reqs)
                picks = b.pick_tokens(reqs, logits, self._sampling_failed(admitted))
        except Exception as e:  # the backend failed: these requests end, the loop goes on
            self._fail(admitted, e)
            return
        n = sum(len(r.prompt_tokens) for r in reqs)
        b.stats.prefill_tokens += n
        b.stats.prefill_seconds += t.seconds
        self.prompt_tokens += n
        self.steps.append(StepRecord("prefill", len(reqs), t.seconds))
        for job, tok in zip(admitted, picks):
            req = job.request
            if tok is None:  # its sampling failed: it ends alone
                continue
            if req.max_tokens <= 0:
                req.finish_reason = "length"
            elif b.accept_token(req, tok):
                self._deliver(job, tok)

    def _decode(self, active: list[Job]) -> None:
        b = self.batcher
        for job in active:  # a client gone since the last step: its slot is freed first
            if job.cancelled:
                job.request.finish_reason = "cancelled"
        live = [j for j in active if not j.request.finished]
        if not live:
            return
        reqs = [j.request for j in live]
        try:
            with b.step_timer() as t:
                logits = b.decode_logits(reqs)
                picks = b.pick_tokens(reqs, logits, self._sampling_failed(live))
        except Exception as e:
            self._fail(live, e)
            return
        b.stats.decode_seconds += t.seconds
        b.stats.decode_tokens += len(reqs)
        b.stats.decode_steps += 1
        self.steps.append(StepRecord("decode", len(reqs), t.seconds))
        self._recent_decode.append((time.monotonic(), len(reqs), t.seconds))
        for job, tok in zip(live, picks):
            if tok is not None and not job.request.finished and b.accept_token(job.request, tok):
                self._deliver(job, tok)

    def _deliver(self, job: Job, token: int) -> None:
        self.generated_tokens += 1
        try:
            job.on_token(job, token)
        except Exception as e:
            job.request.finish_reason = "error"
            job.error = e

    def _sampling_failed(self, jobs: list[Job]):
        """pick_tokens' `failed`: the job of a request whose sampling raised ends with that error."""
        of_request = {id(j.request): j for j in jobs}
        return lambda request, error: self._fail([of_request[id(request)]], error)

    def _fail(self, jobs: list[Job], error: BaseException) -> None:
        for job in jobs:
            job.request.finish_reason = "error"
            job.error = error

    def _retire(self, active: list[Job], free: list[int]) -> list[Job]:
        for job in active:
            if job.cancelled and not job.request.finished:
                job.request.finish_reason = "cancelled"
            if job.request.finished:
                self.batcher.release_slot(job.request.slot)
                free.append(job.request.slot)
                self._end(job, job.error)
        free.sort()
        return [j for j in active if not j.request.finished]

    @staticmethod
    def _end(job: Job, error: BaseException | None) -> None:
        try:
            job.on_end(job, error)
        except Exception:
            pass  # a broken consumer must not stop the loop that serves the others
