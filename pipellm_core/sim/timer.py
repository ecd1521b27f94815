"""Timing a step on the sim backend's virtual clock instead of the wall clock."""

from __future__ import annotations


class VirtualTimer:
    """Like `request.Timer`, in virtual seconds: the step ends when the host has its result."""

    def __init__(self, runtime):
        self.runtime = runtime

    def __enter__(self):
        self.start = self.runtime.elapsed()
        return self

    def __exit__(self, *exc):
        self.runtime.synchronize()  # the host reads the step's tokens back
        self.seconds = self.runtime.elapsed() - self.start
