"""Simulated GPUs on the CPU: a virtual clock per stream and for the host, events, memory accounting, hazard checks.

Nothing is computed here. Each operation only takes virtual time: the host (the one Python thread that issues
work) pays an issue cost, and the work runs on its stream once both the stream and the host have reached it, as
on CUDA. Times are in seconds from 0.0.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from pipellm_core.errors import PipeLLMError, SimOutOfMemoryError
from pipellm_core.sim.hazards import HOST, HazardTracker
from pipellm_core.sim.profiles import DeviceProfile, get_profile
from pipellm_core.sim.trace import DEFAULT_MAX_EVENTS, TraceRecorder

GiB = 2**30


class SimRuntime:
    """A host thread and `n_devices` identical simulated GPUs of one machine."""

    def __init__(self, profile: DeviceProfile | str = "h100", n_devices: int = 1, trace: bool = True,
                 *, max_trace_events: int | None = DEFAULT_MAX_EVENTS) -> None:
        if n_devices < 1:
            raise PipeLLMError(f"a sim runtime needs at least one device, not {n_devices}")
        self.profile: DeviceProfile = get_profile(profile) if isinstance(profile, str) else profile
        self.host_time = 0.0
        self.check_hazards = True
        self.hazards = HazardTracker()
        self.trace: TraceRecorder | None = TraceRecorder(max_trace_events) if trace else None
        self.host_pid = n_devices  # trace process of the host, after the GPUs
        self._streams: list[Stream] = []
        if self.trace is not None:
            self.trace.other_data.update(simulated=True, profile=self.profile.name, n_devices=n_devices)
            self.trace.process(self.host_pid, "host", sort_index=self.host_pid)
            self.trace.thread(self.host_pid, 0, "python")
        self.devices: list[VirtualDevice] = [VirtualDevice(self, i) for i in range(n_devices)]

    def __repr__(self) -> str:
        return f"SimRuntime({self.profile.name!r}, n_devices={len(self.devices)}, host_time={self.host_time:.6f})"

    @property
    def streams(self) -> list[Stream]:
        """Every stream of every device, in creation order."""
        return list(self._streams)

    def device(self, index: int) -> VirtualDevice:
        if not 0 <= index < len(self.devices):
            raise PipeLLMError(f"no sim GPU {index}: this runtime has {len(self.devices)} "
                               f"(GPU 0 to {len(self.devices) - 1})")
        return self.devices[index]

    def event(self) -> Event:
        """A new event of this runtime, not recorded yet."""
        return Event(self)

    def host_work(self, seconds: float, name: str | None = None, *, reads: Iterable[Hashable] = (),
                  writes: Iterable[Hashable] = ()) -> None:
        """The host is busy for `seconds` (traced when named), touching host buffers `reads` and `writes`.

        Buffer accesses are hazard-checked against GPU work the host has not seen complete, e.g. reading a
        pinned buffer that a d2h copy still writes, or refilling one that an h2d copy still reads.
        """
        if seconds < 0:
            raise ValueError(f"host work cannot take negative time ({seconds})")
        if reads or writes:
            self.hazards.access(HOST, name or "host work", reads, writes, self.check_hazards)
        if name is not None and self.trace is not None:
            self.trace.complete(name, "host", self.host_pid, 0, self.host_time, seconds)
        self.host_time += seconds

    def synchronize(self, device: int | None = None) -> None:
        """The host waits for every stream (of GPU `device`, or of all) and knows their work complete."""
        streams = self._streams if device is None else self.device(device).streams
        for s in streams:
            s.synchronize()

    def elapsed(self) -> float:
        """When the last work queued so far ends, on the host or any stream."""
        return max([self.host_time, *(s.clock for s in self._streams)])

    def save_trace(self, path: str | os.PathLike[str]) -> None:
        """Write the Chrome trace (JSON) of everything so far."""
        if self.trace is None:
            raise PipeLLMError("this sim runtime was created with trace=False: there is no trace to save")
        self.trace.save(path)

    def _add_stream(self, device: VirtualDevice, name: str) -> Stream:
        stream = Stream(device, name, sid=len(self._streams), tid=len(device.streams))
        self._streams.append(stream)
        self.hazards.add_stream(stream.sid, device.index, name)
        if self.trace is not None:
            self.trace.thread(device.index, stream.tid, name)
        return stream


@dataclass(eq=False)
class Allocation:
    """A block of simulated device memory; give it back with `VirtualDevice.free`."""

    device: int
    nbytes: int
    tag: str = ""
    freed: bool = False


class VirtualDevice:
    """One simulated GPU: its streams and its memory."""

    def __init__(self, runtime: SimRuntime, index: int) -> None:
        self.runtime = runtime
        self.index = index
        self.profile = runtime.profile
        self.allocated_bytes = 0
        self.peak_bytes = 0
        self._streams: dict[str, Stream] = {}
        self._live: set[Allocation] = set()
        if runtime.trace is not None:
            runtime.trace.process(index, f"GPU {index} ({self.profile.name})", sort_index=index)
        self.default_stream = self.stream("compute")

    def __repr__(self) -> str:
        return f"VirtualDevice({self.index}, {self.profile.name!r})"

    @property
    def streams(self) -> list[Stream]:
        """This device's streams, in creation order."""
        return list(self._streams.values())

    @property
    def memory_bytes(self) -> int:
        return self.profile.memory_bytes

    @property
    def free_bytes(self) -> int:
        return self.profile.memory_bytes - self.allocated_bytes

    def stream(self, name: str) -> Stream:
        """The stream called `name`, created on first use."""
        s = self._streams.get(name)
        if s is None:
            s = self._streams[name] = self.runtime._add_stream(self, name)
        return s

    def allocate(self, nbytes: int, tag: str = "") -> Allocation:
        """Take `nbytes` of device memory; SimOutOfMemoryError when they do not fit."""
        if nbytes < 0:
            raise ValueError(f"cannot allocate a negative size ({nbytes})")
        if self.allocated_bytes + nbytes > self.profile.memory_bytes:
            what = f" ({tag})" if tag else ""
            raise SimOutOfMemoryError(
                f"sim GPU {self.index} ({self.profile.name}) out of memory: tried to allocate "
                f"{nbytes / GiB:.2f} GiB{what}; {self.allocated_bytes / GiB:.2f} GiB of "
                f"{self.profile.memory_bytes / GiB:.2f} GiB already allocated, {self.free_bytes / GiB:.2f} GiB free"
            )
        allocation = Allocation(self.index, nbytes, tag)
        self._live.add(allocation)
        self.allocated_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)
        self._trace_memory()
        return allocation

    def free(self, allocation: Allocation) -> None:
        """Give back an allocation of this device."""
        if allocation not in self._live:
            what = f" ({allocation.tag})" if allocation.tag else ""
            if allocation.freed:
                raise PipeLLMError(f"sim GPU {self.index}: double free of {allocation.nbytes} bytes{what}")
            raise PipeLLMError(f"sim GPU {self.index}: freeing {allocation.nbytes} bytes{what} "
                               f"that were not allocated on it")
        self._live.remove(allocation)
        allocation.freed = True
        self.allocated_bytes -= allocation.nbytes
        self._trace_memory()

    def reset_peak(self) -> None:
        self.peak_bytes = self.allocated_bytes

    def synchronize(self) -> None:
        """The host waits for every stream of this device."""
        self.runtime.synchronize(self.index)

    def _trace_memory(self) -> None:
        if self.runtime.trace is not None:
            self.runtime.trace.counter("memory", self.index, self.runtime.host_time,
                                       {"allocated_bytes": self.allocated_bytes})


class Stream:
    """An in-order queue of work on one device, with the time its queued work ends."""

    def __init__(self, device: VirtualDevice, name: str, sid: int, tid: int) -> None:
        self.device = device
        self.name = name
        self.sid = sid  # id among all streams of the runtime
        self.tid = tid  # trace track within the device
        self.clock = 0.0
        self.busy_seconds = 0.0  # time its kernels and copies have taken, all added up

    def __repr__(self) -> str:
        return f"Stream(GPU {self.device.index}, {self.name!r}, clock={self.clock:.6f})"

    def launch(self, name: str, duration: float, *, host_cost: float | None = None,
               reads: Iterable[Hashable] = (), writes: Iterable[Hashable] = ()) -> tuple[float, float]:
        """Queue a kernel of `duration` seconds after the host spends `host_cost` issuing it; returns (start, end)."""
        if duration < 0:
            raise ValueError(f"kernel {name!r} cannot take negative time ({duration})")
        return self._enqueue(name, "kernel", duration, host_cost, reads, writes, None)

    def copy(self, name: str, nbytes: int, kind: str, *, pinned: bool = True, src: Hashable | None = None,
             dst: Hashable | None = None, host_cost: float | None = None) -> tuple[float, float]:
        """Queue a copy of `nbytes` ('h2d', 'd2h', 'd2d' or 'peer') reading `src` and writing `dst`.

        A copy from or to pageable host memory (`pinned=False`, h2d or d2h) blocks the host until it is done.
        """
        duration = self.device.profile.copy_seconds(nbytes, kind, pinned)
        start, end = self._enqueue(name, "copy", duration, host_cost, () if src is None else (src,),
                                   () if dst is None else (dst,),
                                   {"bytes": nbytes, "kind": kind, "pinned": pinned})
        if not pinned and kind in ("h2d", "d2h"):
            self.synchronize()
        return start, end

    def _enqueue(self, name: str, cat: str, duration: float, host_cost: float | None, reads: Iterable[Hashable],
                 writes: Iterable[Hashable], args: dict | None) -> tuple[float, float]:
        rt = self.device.runtime
        rt.hazards.access(self.sid, name, reads, writes, rt.check_hazards)
        rt.host_time += self.device.profile.eager_op_host_s if host_cost is None else host_cost
        start = max(self.clock, rt.host_time)
        self.clock = end = start + duration
        self.busy_seconds += duration
        if rt.trace is not None:
            rt.trace.complete(name, cat, self.device.index, self.tid, start, duration, args)
        return start, end

    def record_event(self, event: Event | None = None) -> Event:
        """Mark the work queued so far; the event completes when it does (or now, on an idle stream)."""
        rt = self.device.runtime
        if event is None:
            event = Event(rt)
        elif event.runtime is None:
            event.runtime = rt
        elif event.runtime is not rt:
            raise PipeLLMError("an event of one sim runtime cannot be recorded on another's stream")
        event.time = max(self.clock, rt.host_time)
        event.stream = self
        event.clock = rt.hazards.snapshot(self.sid)
        return event

    def wait_event(self, event: Event) -> None:
        """Later work on this stream starts after the event's work completes; a no-op for an unrecorded event."""
        if event.time is None:
            return
        self.clock = max(self.clock, event.time)
        self.device.runtime.hazards.stream_waits(self.sid, event.clock)

    def wait_stream(self, other: Stream) -> None:
        """Later work on this stream starts after the work queued so far on `other`."""
        self.wait_event(other.record_event())

    def synchronize(self) -> None:
        """The host waits until this stream's work is done."""
        rt = self.device.runtime
        rt.host_time = max(rt.host_time, self.clock)
        rt.hazards.host_learns_stream(self.sid)

    def query(self) -> bool:
        """True when all work queued on this stream is done by the host's time."""
        return self.clock <= self.device.runtime.host_time


class Event:
    """A point in a stream's work, as a CUDA event: other streams and the host can wait for it."""

    def __init__(self, runtime: SimRuntime | None = None) -> None:
        self.runtime = runtime  # bound when first recorded if not given
        self.time: float | None = None  # when the work before it completes; None until recorded
        self.stream: Stream | None = None  # where it was last recorded
        self.clock: dict[int, int] = {}  # vector clock of the work before it

    def __repr__(self) -> str:
        where = f"GPU {self.stream.device.index} {self.stream.name!r}" if self.stream else "not recorded"
        return f"Event({where}, time={self.time})"

    def synchronize(self) -> None:
        """The host waits until the event completes and knows the work before it complete."""
        if self.time is None or self.runtime is None:
            return
        self.runtime.host_time = max(self.runtime.host_time, self.time)
        self.runtime.hazards.host_learns(self.clock)

    def query(self) -> bool:
        """True when the event was recorded and has completed by the host's time."""
        return self.time is not None and self.runtime is not None and self.time <= self.runtime.host_time

    def elapsed_time(self, end: Event) -> float:
        """Milliseconds from this event to `end`, as torch.cuda.Event.elapsed_time."""
        if self.time is None or end.time is None:
            raise PipeLLMError("elapsed_time needs two recorded events")
        return (end.time - self.time) * 1e3
