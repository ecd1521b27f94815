"""The copies of `runtime.group_kv_offload` charged to virtual GPUs without any data, for models
too large to compute: a group's rows of each stage's layers come in from host memory on the
stage GPU's `kv in` stream before the group's turn and go back on its `kv out` stream after,
one copy per layer for keys and one for values, ordered by events as the engine orders them.
"""

from __future__ import annotations

from itertools import count


class KVOffloadCharges:
    def __init__(self, runtime, layers_of_stage: list[range], row_bytes_per_layer: int, rows: int):
        """`rows` sequences per group, each `row_bytes_per_layer` of keys (as many of values)
        in every layer."""
        self.runtime, self.layers_of_stage = runtime, layers_of_stage
        self.copy_bytes = rows * row_bytes_per_layer
        self.set_written = [{} for _ in layers_of_stage]
        self.home_written = [{} for _ in layers_of_stage]
        self._issued = count()

    def bring_in(self, stage: int, group: int, kv_set: int) -> None:
        device = self.runtime.device(stage)
        copies, compute = device.stream("kv in"), device.default_stream
        written = [w for w in (self.set_written[stage].get(kv_set), self.home_written[stage].get(group)) if w]
        if written:
            copies.wait_event(max(written, key=lambda w: w[0])[1])
        rows, home = ("kv set", stage, kv_set), ("host", "kv of group", group, stage)
        for _ in range(2 * len(self.layers_of_stage[stage])):
            copies.copy(f"kv of group {group}, stage {stage}", self.copy_bytes, "h2d", src=home, dst=rows)
        compute.wait_event(copies.record_event())
        compute.launch("access", 0.0, host_cost=0.0, reads=[rows])

    def write_back(self, stage: int, group: int, kv_set: int) -> None:
        device = self.runtime.device(stage)
        copies, compute = device.stream("kv out"), device.default_stream
        rows, home = ("kv set", stage, kv_set), ("host", "kv of group", group, stage)
        compute.launch("access", 0.0, host_cost=0.0, writes=[rows])
        copies.wait_event(compute.record_event())
        for _ in range(2 * len(self.layers_of_stage[stage])):
            copies.copy(f"kv of group {group}, stage {stage}", self.copy_bytes, "d2h", src=rows, dst=home)
        done = copies.record_event()
        self.set_written[stage][kv_set] = self.home_written[stage][group] = (next(self._issued), done)
