"""Timeline of a simulated run in the Chrome trace format, for Perfetto (ui.perfetto.dev) or chrome://tracing.

Each simulated GPU is a process and each of its streams a named thread; the host is a process of its own.
Kernels, copies and host work are complete ("X") events, memory use is a counter ("C"). Times are recorded in
seconds and written in microseconds.
"""

from __future__ import annotations

import json
import os
from typing import Any

DEFAULT_MAX_EVENTS = 2_000_000


class TraceRecorder:
    """Collects trace events in memory, up to `max_events` of them (names of tracks do not count)."""

    def __init__(self, max_events: int | None = DEFAULT_MAX_EVENTS) -> None:
        self.max_events = max_events
        self.dropped = 0  # events not kept because the cap was reached
        self.other_data: dict[str, Any] = {}  # written as the file's "otherData"
        self._events: list[tuple] = []
        self._metadata: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self._events)

    def _full(self) -> bool:
        if self.max_events is not None and len(self._events) >= self.max_events:
            self.dropped += 1
            return True
        return False

    def process(self, pid: int, name: str, sort_index: int | None = None) -> None:
        """Name the track group `pid`."""
        self._metadata.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
        if sort_index is not None:
            self._metadata.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                                   "args": {"sort_index": sort_index}})

    def thread(self, pid: int, tid: int, name: str) -> None:
        """Name the track `tid` of `pid`; tracks are shown in tid order."""
        self._metadata.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
        self._metadata.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                               "args": {"sort_index": tid}})

    def complete(self, name: str, cat: str, pid: int, tid: int, start_s: float, dur_s: float,
                 args: dict[str, Any] | None = None) -> None:
        """Something that ran on track (pid, tid) from `start_s` for `dur_s` seconds."""
        if not self._full():
            self._events.append(("X", name, cat, pid, tid, start_s, dur_s, args))

    def counter(self, name: str, pid: int, time_s: float, values: dict[str, float]) -> None:
        """Values of the counter `name` of `pid` from `time_s` on."""
        if not self._full():
            self._events.append(("C", name, None, pid, 0, time_s, None, values))

    def events(self) -> list[dict[str, Any]]:
        """All events as the dicts written to the file: track names first, then in recording order."""
        return [*self._metadata, *map(_event_dict, self._events)]

    def to_dict(self) -> dict[str, Any]:
        return {"traceEvents": self.events(), "displayTimeUnit": "ms", "otherData": self._other_data()}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trace as JSON, one event a line."""
        with open(path, "w", encoding="utf-8") as f:
            f.write('{"traceEvents": [\n')
            first = True
            for event in self._metadata:
                f.write(("" if first else ",\n") + json.dumps(event))
                first = False
            for event in self._events:
                f.write(("" if first else ",\n") + json.dumps(_event_dict(event)))
                first = False
            f.write('\n],\n"displayTimeUnit": "ms",\n"otherData": ')
            f.write(json.dumps(self._other_data()))
            f.write("}\n")

    def _other_data(self) -> dict[str, Any]:
        return {**self.other_data, "max_events": self.max_events, "dropped_events": self.dropped,
                "truncated": self.dropped > 0}


def _event_dict(event: tuple) -> dict[str, Any]:
    ph, name, cat, pid, tid, start_s, dur_s, args = event
    d: dict[str, Any] = {"ph": ph, "name": name, "pid": pid, "tid": tid, "ts": _us(start_s)}
    if ph == "X":
        d["cat"] = cat
        d["dur"] = _us(dur_s)
    if args:
        d["args"] = args
    return d


def _us(seconds: float) -> float:
    """Seconds as microseconds, to the nanosecond."""
    return round(seconds * 1e6, 3)
