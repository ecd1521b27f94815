"""Timing a step on the sim backend's virtual clock instead of the wall clock."""

from __future__ import annotations

from collections.abc import Callable


class VirtualTimer:
    """Like `request.Timer`, in virtual seconds: the step ends when the host has its result.

    `busy` (if given) says how long each pipeline stage's GPU has computed so far; `.busy` is
    then what each computed of the work queued within the step. Most of the engine's steps start
    once the host has seen the work before them complete, so that work runs within the step; a
    prefill between the ticks of groups in flight starts while they still run, and its work on
    an idle GPU may start before `start`."""

    def __init__(self, runtime, busy: Callable[[], list[float]] | None = None):
        self.runtime = runtime
        self._busy = busy
        self.busy: list[float] | None = None

    def __enter__(self):
        self.start = self.runtime.elapsed()
        self._busy_before = self._busy() if self._busy is not None else None
        return self

    def __exit__(self, *exc):
        self.runtime.synchronize()  # the host reads the step's tokens back
        self.seconds = self.runtime.elapsed() - self.start
        if self._busy_before is not None:
            self.busy = [b - a for a, b in zip(self._busy_before, self._busy())]
