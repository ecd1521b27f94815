"""Happens-before tracking with vector clocks: catches buffers that streams share without an event ordering them.

Each stream has a vector clock: for every stream id, the number of that stream's operations known to be ordered
before the stream's next operation. Operation n on stream s is identified by (s, n). Events carry a snapshot of a
stream's clock to the streams that wait on them; the host keeps the clock of the work it knows complete (learned by
synchronizing), which every later operation inherits. The host also has an id of its own (`HOST`) for buffers it
touches directly, such as pinned staging memory.

Per buffer only the last write and, for each stream, the latest read since that write are kept: a later operation
of a stream is ordered after everything its earlier operations are, so older reads add nothing.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from pipellm_core.errors import HazardError

VectorClock = dict[int, int]

HOST = -1  # stream id of the host's own buffer accesses


def merge(into: VectorClock, other: VectorClock) -> bool:
    """Raise each entry of `into` to `other`'s; True when anything changed."""
    changed = False
    for sid, n in other.items():
        if into.get(sid, 0) < n:
            into[sid] = n
            changed = True
    return changed


class HazardTracker:
    """Vector clocks of streams, events and the host, and who last wrote and read each buffer."""

    def __init__(self) -> None:
        self._clocks: dict[int, VectorClock] = {}
        self._labels: dict[int, tuple[int, str]] = {}  # stream id -> (device index, stream name)
        self._host: VectorClock = {}
        self._host_version = 0
        self._merged_version: dict[int, int] = {}  # host version each stream's clock last took in
        self._last_write: dict[Hashable, tuple[int, int, str]] = {}  # buffer -> (stream, op number, op name)
        self._reads: dict[Hashable, dict[int, tuple[int, str]]] = {}  # buffer -> stream -> (op number, op name)

    def add_stream(self, sid: int, device: int, name: str) -> None:
        if sid in self._clocks or sid == HOST:
            raise ValueError(f"stream id {sid} is taken")
        self._clocks[sid] = {}
        self._labels[sid] = (device, name)
        self._merged_version[sid] = -1

    def _clock(self, sid: int) -> VectorClock:
        """The clock that the next operation of `sid` starts from, with what the host knows complete merged in."""
        if sid == HOST:
            return self._host
        vc = self._clocks[sid]
        if self._merged_version[sid] != self._host_version:
            merge(vc, self._host)
            self._merged_version[sid] = self._host_version
        return vc

    def snapshot(self, sid: int) -> VectorClock:
        """A copy of the clock of `sid` now: what an event recorded on it orders before its waiters."""
        return dict(self._clock(sid))

    def host_clock(self) -> VectorClock:
        """A copy of the clock of work the host knows complete."""
        return dict(self._host)

    def stream_waits(self, sid: int, vc: VectorClock) -> None:
        """Later operations of `sid` are ordered after everything `vc` covers."""
        merge(self._clock(sid), vc)

    def host_learns(self, vc: VectorClock) -> None:
        """The host has seen everything `vc` covers complete."""
        if merge(self._host, vc):
            self._host_version += 1

    def host_learns_stream(self, sid: int) -> None:
        """The host has seen all work queued so far on `sid` complete."""
        self.host_learns(self._clocks[sid])

    def access(self, sid: int, name: str, reads: Iterable[Hashable] = (), writes: Iterable[Hashable] = (),
               check: bool = True) -> int:
        """Record operation `name` of stream `sid` (or `HOST`) and return its number.

        With `check`, first raise HazardError if it reads a buffer whose last write is not ordered before it, or
        writes one whose last write or reads since are not; nothing is recorded then. Without `check`, buffers
        are not tracked at all (only the clocks advance).
        """
        vc = self._clock(sid)
        if check:
            reads = tuple(reads)
            writes = tuple(writes)
            for key in reads:
                self._check_write_before(sid, vc, key, "read")
            for key in writes:
                self._check_write_before(sid, vc, key, "written")
                for other, (n, op) in self._reads.get(key, {}).items():
                    if other != sid and vc.get(other, 0) < n:
                        raise HazardError(
                            f"hazard: {key!r} written on {self._label(sid)} while "
                            f"{self._label(other, self._device(sid))} may still be reading it "
                            f"({op!r}, no event orders them)"
                        )
        n = vc.get(sid, 0) + 1
        vc[sid] = n
        if sid == HOST:
            self._host_version += 1
        if check:
            for key in reads:
                self._reads.setdefault(key, {})[sid] = (n, name)
            for key in writes:
                self._last_write[key] = (sid, n, name)
                self._reads.pop(key, None)
        return n

    def forget(self, key: Hashable) -> None:
        """Drop what is known about buffer `key` (its memory is gone for good)."""
        self._last_write.pop(key, None)
        self._reads.pop(key, None)

    def _check_write_before(self, sid: int, vc: VectorClock, key: Hashable, verb: str) -> None:
        last = self._last_write.get(key)
        if last is None:
            return
        other, n, op = last
        if other != sid and vc.get(other, 0) < n:
            raise HazardError(
                f"hazard: {key!r} {verb} on {self._label(sid)} while its write by {op!r} on "
                f"{self._label(other, self._device(sid))} may not have completed (no event orders them)"
            )

    def _device(self, sid: int) -> int | None:
        return None if sid == HOST else self._labels[sid][0]

    def _label(self, sid: int, seen_from: int | None = None) -> str:
        """'the host', or the stream named with its GPU unless that is the GPU `seen_from`."""
        if sid == HOST:
            return "the host"
        device, name = self._labels[sid]
        return f"stream {name!r}" if device == seen_from else f"GPU {device} stream {name!r}"
