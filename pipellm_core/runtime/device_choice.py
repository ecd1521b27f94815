"""`device="auto"`, the default of the CLI and the API: CUDA where torch sees a GPU, else the CPU.

The engine itself takes only a concrete device; the front ends resolve "auto" here, so the
choice is made (and reported) in one place.
"""

from __future__ import annotations

import os

import torch

DEVICE_ENV = "PIPELLM_DEVICE"
AUTO = "auto"


def requested_device(device: str | None) -> str:
    """The device asked for: `device`, else $PIPELLM_DEVICE, else "auto"."""
    return device or os.environ.get(DEVICE_ENV) or AUTO


def choose_device(device: str | None, backend: str = "torch") -> str:
    """The concrete device for `device` (None reads $PIPELLM_DEVICE): "auto" is "cuda" where
    torch sees a GPU, else "cpu"; the sim backend computes on the CPU, so there "auto" is "cpu".
    Anything else is returned as given, for the backend to check."""
    device = requested_device(device)
    if device != AUTO:
        return device
    if backend != "sim" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def describe_choice(device: str, backend: str = "torch") -> str:
    """One line saying what "auto" chose and why."""
    if device.startswith("cuda"):
        return f"device: cuda (auto: torch sees {torch.cuda.get_device_name(torch.device(device))})"
    if backend == "sim":
        return "device: cpu (auto: the sim backend computes on the CPU)"
    return "device: cpu (auto: torch sees no CUDA GPU)"
