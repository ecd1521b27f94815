"""Streaming the weights of non-resident layers into a few GPU slots, ahead of their compute.

Streamed layer k of a stage (in layer order) always lands in slot k mod S. Before each layer runs,
the streamer marks the compute stream (the layers before it are then done with their slots), and
issues, in layer order, the copy of every next streamed layer whose slot is free; the layer about
to run waits for its own copy. With two slots the copy of one streamed layer overlaps the compute
of everything between it and the previous one.

Every forward pass (a decode step, a prefill, a graph capture) starts afresh and ends with all its
copies consumed, so the work of a step is self-contained and a CUDA graph can capture it whole.
"""

from __future__ import annotations

import torch


class LayerStreamer:
    def __init__(self, engine, streamed: list[int], n_slots: int, streams, slot_device):
        self.engine, self.streams = engine, streams
        plan = engine.plan
        self.streamed = sorted(streamed)
        n_slots = max(1, min(n_slots, len(self.streamed)))  # more slots than streamed layers would sit idle
        self.stage_of = {i: plan.layers[i].stage for i in range(plan.n_layers)}
        self.slot_of: dict[int, int] = {}
        for stage in plan.stages:
            mine = [i for i in stage if i in set(self.streamed)]
            self.slot_of.update({layer: k % n_slots for k, layer in enumerate(mine)})
        hosts = {i: engine.weights.layers[i].host for i in self.streamed}
        slot_bytes = max((h.nbytes for h in hosts.values()), default=0)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=slot_device) for _ in range(n_slots)]
        self.hosts = hosts
        # each streamed layer's weights as views into its slot, made once
        self.views = {i: h.view(self.slots[self.slot_of[i]][: h.nbytes]) for i, h in hosts.items()}
        self.ready = {i: streams.event() for i in self.streamed}
        self.passed = {i: streams.event() for i in range(plan.n_layers)}
        self.copies = 0
        self._last: int | None = None
        self._holder: dict[int, int] = {}  # slot -> streamed layer whose weights it holds or gets
        self._free_after: dict[int, object] = {}  # slot -> event after which it may be overwritten

    @property
    def slot_bytes(self) -> int:
        return int(self.slots[0].numel()) if self.slots else 0

    def _begin_pass(self, first: int) -> None:
        for slot in self._holder:
            if slot not in self._free_after:
                self.streams.compute_done_with(slot)
        self._holder, self._free_after = {}, {}
        stage = self.stage_of[first]
        self._pending = [i for i in self.streamed if i >= first and self.stage_of[i] == stage]

    def before_layer(self, layer: int):
        """Issue the copies that can start now; the weights of `layer` if it streams, else None."""
        if self._last is None or layer != self._last + 1 or self.stage_of[layer] != self.stage_of[self._last]:
            self._begin_pass(layer)
        self._last = layer
        passed = self.passed[layer]
        for slot, holder in list(self._holder.items()):
            if holder < layer and slot not in self._free_after:
                self.streams.compute_done_with(slot)
        self.streams.mark_compute(passed)
        for slot in range(len(self.slots)):
            if self._holder.get(slot, -1) < layer:
                self._free_after.setdefault(slot, passed)
        while self._pending:
            nxt = self._pending[0]
            slot = self.slot_of[nxt]
            after = self._free_after.pop(slot, None)
            if after is None:  # its slot still serves an earlier layer
                break
            h = self.hosts[nxt]
            self.streams.copy(self.slots[slot][: h.nbytes], h.buffer, after, self.ready[nxt],
                              f"layer {nxt}", slot)
            self._holder[slot] = nxt
            self._pending.pop(0)
            self.copies += 1
        if layer not in self.views:
            return None
        self.streams.compute_waits(self.ready[layer], self.slot_of[layer])
        return self.views[layer]
