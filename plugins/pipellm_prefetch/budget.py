"""Which layers stay on the GPU and which stream from host memory, from a VRAM budget."""

from __future__ import annotations

from dataclasses import dataclass

from pipellm_core import sizes
from pipellm_core.errors import PluginError

MiB = 2**20
DEFAULT_WORKSPACE = 256 * MiB  # activations, attention scores, CUDA graph pools, library workspaces


def parse_size(text) -> int:
    """Bytes from '6GiB', '6.5GB', '800MiB' or a plain number of bytes."""
    try:
        return sizes.parse_size(text)
    except ValueError as e:
        raise PluginError(f"prefetch: {e}") from None


@dataclass
class StreamPlan:
    streamed: list[int]  # layers whose weights live in host memory and stream in
    layer_bytes: list[int]  # each layer's weights
    fixed_bytes: int  # what stays on the GPU besides the layers: embedding, head, KV cache, workspace
    slots: int  # staging buffers on the GPU, each as large as the largest streamed layer
    budget: int | None

    @property
    def slot_bytes(self) -> int:
        return max((self.layer_bytes[i] for i in self.streamed), default=0)

    @property
    def resident_bytes(self) -> int:
        return sum(b for i, b in enumerate(self.layer_bytes) if i not in self.streamed)

    @property
    def gpu_bytes(self) -> int:
        """What the plan puts on the GPU: fixed part, resident layers, staging slots."""
        return self.fixed_bytes + self.resident_bytes + min(self.slots, len(self.streamed)) * self.slot_bytes

    def describe(self) -> str:
        n = len(self.layer_bytes)
        if not self.streamed:
            return f"prefetch: all {n} layers fit on the GPU; nothing streams"
        host = sum(self.layer_bytes[i] for i in self.streamed)
        return (f"prefetch: {n - len(self.streamed)} of {n} layers resident, {len(self.streamed)} stream "
                f"from pinned host memory ({sizes.format_size(host)}) through {min(self.slots, len(self.streamed))} slots of "
                f"{sizes.format_size(self.slot_bytes)}; {sizes.format_size(self.gpu_bytes)} on the GPU")


def spread(n_layers: int, n_streamed: int) -> list[int]:
    """`n_streamed` layers spread evenly over the model, so that each copy overlaps the compute
    of the resident layers between two streamed ones."""
    if n_streamed >= n_layers:
        return list(range(n_layers))
    return [i for i in range(n_layers) if (i + 1) * n_streamed // n_layers > i * n_streamed // n_layers]


def plan_streaming(layer_bytes: list[int], fixed_bytes: int, *, budget: int | None = None,
                   resident_layers: int | None = None, slots: int = 2) -> StreamPlan:
    """Stream as few layers as the budget allows (or keep exactly `resident_layers`)."""
    n = len(layer_bytes)
    if slots < 1:
        raise PluginError(f"prefetch: slots must be at least 1, got {slots}")
    if resident_layers is not None:
        if not 0 <= resident_layers <= n:
            raise PluginError(f"prefetch: resident_layers must be between 0 and {n}, got {resident_layers}")
        return StreamPlan(spread(n, n - resident_layers), layer_bytes, fixed_bytes, slots, budget)
    if budget is None or fixed_bytes + sum(layer_bytes) <= budget:
        return StreamPlan([], layer_bytes, fixed_bytes, slots, budget)
    largest = max(layer_bytes)
    for n_streamed in range(1, n + 1):
        plan = StreamPlan(spread(n, n_streamed), layer_bytes, fixed_bytes, slots, budget)
        if plan.gpu_bytes <= budget:
            return plan
    need = fixed_bytes + slots * largest
    raise PluginError(f"prefetch: a VRAM budget of {sizes.format_size(budget)} is too small for this model: "
                      f"embedding, head, KV cache and workspace take {sizes.format_size(fixed_bytes)} and "
                      f"{slots} staging slots {sizes.format_size(slots * largest)}, {sizes.format_size(need)} in all "
                      f"before any layer (a smaller -c or batch shrinks the KV cache)")
