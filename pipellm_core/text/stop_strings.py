"""Stop strings over streamed text: text that might begin a stop string is held back until it
either completes one (generation ends there) or cannot any more (it is released)."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stop: str | list[str] | None):
        self.stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to show, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf, False
        cut = min((buf.find(s) for s in self.stops if s in buf), default=-1)
        if cut >= 0:
            self.held, self.stopped = "", True
            return buf[:cut], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out
