"""How the layers split into pipeline stages, and how a step's batch splits into micro-batches."""

from __future__ import annotations

from pipellm_core.model.weights import packed_bytes
from pipellm_core.runtime.step import Schedule, StepBatch


def split_layers(layer_bytes: list[float], n_stages: int, shares: list[float] | None = None,
                 first_bytes: float = 0, last_bytes: float = 0) -> list[int]:
    """The stage of each layer: contiguous runs of layers, at least one a stage, whose largest
    load over share is as small as whole layers allow (shares default equal). A stage's load is
    the bytes of its layers; the first stage's also `first_bytes` (the embedding) and the
    last's `last_bytes` (the head). Among the splits that reach that least load, the earlier
    stages take as many layers as it allows."""
    n = len(layer_bytes)
    n_stages = max(1, min(n_stages, n))
    shares = shares or [1.0] * n_stages
    prefix = [0.0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)

    def load(k: int, start: int, stop: int) -> float:  # stage k holding layers start..stop-1
        ends = (first_bytes if k == 0 else 0) + (last_bytes if k == n_stages - 1 else 0)
        return (prefix[stop] - prefix[start] + ends) / shares[k]

    # least[k][j]: the least largest load of stages 0..k holding layers 0..j-1
    least = [[float("inf")] * (n + 1) for _ in range(n_stages)]
    for j in range(1, n + 1):
        least[0][j] = load(0, 0, j)
    for k in range(1, n_stages):
        for j in range(k + 1, n + 1):
            least[k][j] = min(max(least[k - 1][i], load(k, i, j)) for i in range(k, j))
    limit = least[-1][n] * (1 + 1e-9)
    # from the last stage back, each starting as late as the limit allows, so that the earlier
    # stages take as many layers as they can
    stops, j = [n], n
    for k in range(n_stages - 1, 0, -1):
        j = next(i for i in range(j - 1, k - 1, -1) if least[k - 1][i] <= limit and load(k, i, j) <= limit)
        stops.append(j)
    stops.append(0)
    stops.reverse()
    return [k for k in range(n_stages) for _ in range(stops[k], stops[k + 1])]


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
