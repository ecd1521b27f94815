"""Speeds and sizes of the GPUs that the simulated runtime imitates, and how long work takes on them."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pipellm_core.errors import PipeLLMError


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_bytes: int
    hbm_bytes_per_s: float  # device memory traffic, bytes read + written per second
    pinned_h2d_bytes_per_s: float
    pinned_d2h_bytes_per_s: float
    pageable_h2d_bytes_per_s: float
    pageable_d2h_bytes_per_s: float
    peer_bytes_per_s: float  # device to another device of the same host
    flops_per_s: float  # achievable dense fp16/bf16 matmul rate
    eager_op_host_s: float  # host time to issue one kernel-launching op eagerly from PyTorch
    view_op_host_s: float  # host time of an op that launches no kernel (views, metadata)
    kernel_min_s: float  # shortest possible kernel duration
    graph_launch_host_s: float  # host time of one CUDA-graph replay call
    graph_node_s: float  # extra device time per kernel node inside a replayed graph
    copy_setup_s: float  # fixed latency added to every copy
    notes: str = ""  # where the figures come from
    # pipellm's GPU kernels on this card, fitted to measured decode steps: for each kind of
    # launch ("small", or a product's `products.product_kind`), (rows of the step, fixed
    # seconds, bytes per second); a kind not listed: its bytes at the memory bandwidth
    kernel_costs: tuple[tuple[str, tuple[tuple[int, float, float], ...]], ...] = ()

    def kernel_seconds(self, nbytes: float, flops: float) -> float:
        """Duration of a kernel moving `nbytes` through device memory and doing `flops`: the slower bound wins."""
        return max(self.kernel_min_s, nbytes / self.hbm_bytes_per_s, flops / self.flops_per_s)

    def launch_seconds(self, kind: str, nbytes: float, rows: int) -> float:
        """Duration of one of pipellm's GPU kernels (`fused_decode.launches`): the fixed time
        and bandwidth fitted for its kind at its number of rows (interpolated between the fitted
        row counts, in log scale), or its bytes at the memory bandwidth where none is fitted;
        never less than the shortest kernel."""
        table = dict(self.kernel_costs).get(kind)
        if not table:
            return max(self.kernel_min_s, nbytes / self.hbm_bytes_per_s)
        fixed = _interpolate([(r, f) for r, f, _ in table], rows)
        bandwidth = _interpolate([(r, b) for r, _, b in table], rows)
        return max(self.kernel_min_s, fixed + nbytes / bandwidth)

    def copy_seconds(self, nbytes: float, kind: str, pinned: bool = True) -> float:
        """Duration of a copy of kind 'h2d', 'd2h', 'd2d' or 'peer'; `pinned` matters for h2d and d2h only."""
        if kind == "h2d":
            seconds = nbytes / (self.pinned_h2d_bytes_per_s if pinned else self.pageable_h2d_bytes_per_s)
        elif kind == "d2h":
            seconds = nbytes / (self.pinned_d2h_bytes_per_s if pinned else self.pageable_d2h_bytes_per_s)
        elif kind == "d2d":
            seconds = 2 * nbytes / self.hbm_bytes_per_s  # a device copy reads and writes every byte
        elif kind == "peer":
            seconds = nbytes / self.peer_bytes_per_s
        else:
            raise ValueError(f"unknown copy kind {kind!r}: expected 'h2d', 'd2h', 'd2d' or 'peer'")
        return self.copy_setup_s + seconds

def _interpolate(points: list[tuple[int, float]], rows: int) -> float:
    points = sorted(points)
    if rows <= points[0][0]:
        return points[0][1]
    for (r0, v0), (r1, v1) in zip(points, points[1:]):
        if rows <= r1:
            t = (math.log(rows) - math.log(r0)) / (math.log(r1) - math.log(r0))
            return v0 + t * (v1 - v0)
    return points[-1][1]


H100 = DeviceProfile(
    name="h100",
    memory_bytes=85_031_714_816,  # 79.19 GiB, what torch reports for an H100 80GB HBM3
    hbm_bytes_per_s=2984e9,
    pinned_h2d_bytes_per_s=54.8e9,
    pinned_d2h_bytes_per_s=52.6e9,
    pageable_h2d_bytes_per_s=20e9,
    pageable_d2h_bytes_per_s=18e9,
    peer_bytes_per_s=300e9,
    flops_per_s=600e12,
    eager_op_host_s=15.2e-6,
    view_op_host_s=0.5e-6,
    kernel_min_s=1.0e-6,
    graph_launch_host_s=15e-6,
    graph_node_s=0.4e-6,
    copy_setup_s=5e-6,
    notes=(
        "Measured on our H100 80GB HBM3: memory (as torch reports it), HBM bandwidth, pinned h2d/d2h copies. "
        "Estimates: pageable copies, peer bandwidth, matmul rate. The host and launch overheads are fitted "
        "so that the plain bf16 SmolLM2-135M decode step of sim/calibration.py (1602 kernels, 1503 views "
        "as aten sees them) takes the measured 25.2 ms eager and 2.37 ms as a graph; the same figures "
        "put pipellm's own eager Q4_1 step (about 6400 kernels) at 99 ms, against 112 ms measured."
    ),
)

H200 = replace(
    H100,
    name="h200",
    memory_bytes=150_754_820_096,  # 140.4 GiB
    hbm_bytes_per_s=4300e9,
    pinned_h2d_bytes_per_s=55e9,
    pinned_d2h_bytes_per_s=53e9,
    peer_bytes_per_s=450e9,
    kernel_costs=(
        ("small", ((1, 3.3e-6, 4.3e12),)),
        ("q32 product", ((1, 4.8e-6, 2.0e12), (8, 5.4e-6, 0.52e12), (32, 17e-6, 0.32e12))),
        ("k product", ((1, 4.8e-6, 1.0e12), (8, 5.4e-6, 0.3e12), (32, 17e-6, 0.22e12))),
        ("dense product", ((1, 3.3e-6, 2.9e12), (8, 3.3e-6, 2.7e12), (32, 3.3e-6, 2.35e12))),
    ),
    notes=(
        "Measured on our H200: memory, copy bandwidth (4.24 TB/s), pinned copies (55 GB/s). "
        "pipellm's own kernels (fixed time and bandwidth by rows, per kind) are fitted to the "
        "decode steps measured at commit ee402e7 (benchmarks/results/h200/): SmolLM2 Q4_1, 8B "
        "Q4_0, Q4_K_M and F16 at batch 1, 8 and 32 come within 12% "
        "(tests/sim/test_kernel_calibration.py). Peer bandwidth is an estimate for NVLink (NV18); "
        "the other overheads are the H100's."
    ),
)

RTX4090 = DeviceProfile(
    name="rtx4090",
    memory_bytes=25_757_220_864,  # 23.99 GiB, what torch reports for a 24 GB card
    hbm_bytes_per_s=1000e9,
    pinned_h2d_bytes_per_s=25e9,  # PCIe 4.0 x16
    pinned_d2h_bytes_per_s=25e9,
    pageable_h2d_bytes_per_s=12e9,
    pageable_d2h_bytes_per_s=10e9,
    peer_bytes_per_s=25e9,  # no NVLink: peer copies go through PCIe
    flops_per_s=165e12,
    eager_op_host_s=25e-6,
    view_op_host_s=3e-6,
    kernel_min_s=2.5e-6,
    graph_launch_host_s=12e-6,
    graph_node_s=1.2e-6,
    copy_setup_s=8e-6,
    notes="Estimates from public specifications, not measured.",
)

PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (H100, H200, RTX4090)}


def get_profile(name: str) -> DeviceProfile:
    """The profile called `name` (case-insensitive)."""
    try:
        return PROFILES[name.lower()]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise PipeLLMError(f"unknown sim device profile {name!r}: known profiles are {known}") from None
