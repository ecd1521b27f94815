"""Simulated GPUs: virtual time, streams, events, memory and hazard checks on the CPU, with a Chrome trace."""

from pipellm_core.sim.profiles import PROFILES, DeviceProfile, get_profile
from pipellm_core.sim.runtime import Allocation, Event, SimRuntime, Stream, VirtualDevice
from pipellm_core.sim.trace import TraceRecorder

__all__ = [
    "PROFILES",
    "Allocation",
    "DeviceProfile",
    "Event",
    "SimRuntime",
    "Stream",
    "TraceRecorder",
    "VirtualDevice",
    "get_profile",
]
