"""How the layers split into pipeline stages, and how a step's batch splits into micro-batches."""

from __future__ import annotations

from pipellm_core.model.weights import packed_bytes
from pipellm_core.runtime.step import Schedule, StepBatch


def split_layers(layer_bytes: list[int], n_stages: int, shares: list[float] | None = None,
                 first_bytes: int = 0, last_bytes: int = 0) -> list[int]:
    """The stage of each layer: contiguous runs of layers, each stage's bytes as close to its
    share of the whole (`shares`, default equal) as whole layers allow. The first stage also
    holds `first_bytes` (the embedding) and the last `last_bytes` (the head), which count."""
    n = len(layer_bytes)
    n_stages = max(1, min(n_stages, n))
    shares = shares or [1.0] * n_stages
    total = sum(layer_bytes) + first_bytes + last_bytes
    bounds = [total * sum(shares[:k + 1]) / sum(shares) for k in range(n_stages)]
    stages, acc, stage = [], first_bytes, 0
    for i, b in enumerate(layer_bytes):
        # move on to the next stage once this one has its share, leaving a layer for every later stage
        if stage < n_stages - 1 and acc + b / 2 > bounds[stage] and i > 0 and stages[-1] == stage:
            stage += 1
        stage = max(stage, n_stages - (n - i))  # leave at least one layer for every later stage
        stages.append(stage)
        acc += b
    return stages


def stage_bytes(of_layer: list[int], layer_bytes: list[int], first_bytes: int, last_bytes: int) -> list[int]:
    """Bytes each stage holds: its layers, the embedding on the first, the head on the last."""
    out = [0] * (max(of_layer) + 1)
    for s, b in zip(of_layer, layer_bytes):
        out[s] += b
    out[0] += first_bytes
    out[-1] += last_bytes
    return out


def end_bytes(tensors: dict) -> tuple[int, int]:
    """(bytes of the embedding, bytes of the head: output matrix, or the tied embedding, and
    its norm) from the tensor table."""
    first = packed_bytes(tensors["token_embd.weight"])
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    last = packed_bytes(head) + (packed_bytes(tensors["output_norm.weight"]) if "output_norm.weight" in tensors else 0)
    return first, last


def micro_batch_rows(batch: int, n_micro: int) -> list[tuple[int, int]]:
    """(start, end) rows of each micro-batch: equal sizes, the last one shorter if they do not divide."""
    n_micro = max(1, min(n_micro, batch))
    size = -(-batch // n_micro)
    return [(s, min(s + size, batch)) for s in range(0, batch, size)]


def pipeline_schedule(batch: StepBatch, n_stages: int, n_micro: int) -> Schedule:
    """Micro-batches through the stages in a fill-and-drain pipeline: at tick t, stage s works on
    micro-batch t - s. Within a tick later stages come first, so that the copy of a micro-batch's
    hidden state to the next GPU does not wait for work queued after it on the GPU before."""
    rows = micro_batch_rows(len(batch), n_micro)
    micro = [batch.select(slice(a, b)) for a, b in rows]
    ticks = []
    for t in range(len(micro) + n_stages - 1):
        ticks.append([(s, t - s) for s in reversed(range(n_stages)) if 0 <= t - s < len(micro)])
    return Schedule(micro, ticks)


def group_schedule(batch: StepBatch, n_stages: int, n_groups: int) -> Schedule:
    """One group's step as one micro-batch through the stages in order, asking the engine to
    keep `n_groups` groups in flight (`Schedule.groups`): their steps overlap across stages."""
    return Schedule([batch], [[(s, 0)] for s in range(n_stages)], groups=n_groups)
