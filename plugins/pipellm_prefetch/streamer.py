"""Streaming the weights of non-resident layers into a few GPU slots, ahead of their compute.

Streamed layer k of a stage (in layer order) always lands in slot k mod S. Before each layer runs
(`before_layer`), the streamer marks the compute stream (the layers before it are then done with
their slots), and issues, in layer order, the copy of every next streamed layer whose slot is
free; the layer about to run waits for its own copy (`layer_weights`). With two slots the copy of one streamed layer overlaps the compute
of everything between it and the previous one.

Every forward pass (a decode step, a prefill, a graph capture) starts afresh (`begin_pass`) and
ends with all its copies consumed, so the work of a step is self-contained and a CUDA graph can capture it whole.
"""

from __future__ import annotations

class LayerStreamer:
    """The streamed layers of one pipeline stage (all of them without a pipeline), with slots on
    the stage's GPU and copies on its copy queue."""

    def __init__(self, engine, streamed: list[int], n_slots: int, streams, stage: int = 0):
        self.engine, self.streams = engine, streams  # a `CopyQueue` of the engine's platform
        self.stage = stage
        plan = engine.plan
        self.streamed = sorted(streamed)
        n_slots = max(1, min(n_slots, len(self.streamed)))  # more slots than streamed layers would sit idle
        self.slot_of: dict[int, int] = {}
        for layers in plan.stages:
            mine = [i for i in layers if i in set(self.streamed)]
            self.slot_of.update({layer: k % n_slots for k, layer in enumerate(mine)})
        hosts = {i: engine.weights.layers[i].host for i in self.streamed}
        slot_bytes = max((h.nbytes for h in hosts.values()), default=0)
        self.slots = [engine.platform.buffer(slot_bytes, "prefetch slots", stage) for _ in range(n_slots)]
        self.hosts = hosts
        # each streamed layer's weights as views into its slot, made once
        self.views = {i: h.view(self.slots[self.slot_of[i]][: h.nbytes]) for i, h in hosts.items()}
        self.ready = {i: streams.event() for i in self.streamed}
        self.passed = {i: streams.event() for i in range(plan.n_layers)}
        self.copies = 0
        self._pending: list[int] = []
        self._holder: dict[int, int] = {}  # slot -> streamed layer whose weights it holds or gets
        self._free_after: dict[int, object] = {}  # slot -> event after which it may be overwritten

    @property
    def slot_bytes(self) -> int:
        return int(self.slots[0].numel()) if self.slots else 0

    def begin_pass(self, layers: range) -> None:
        """A forward pass over `layers` begins: the slots are free, its streamed layers pending."""
        for slot in self._holder:
            if slot not in self._free_after:
                self.streams.compute_done_with(self._buffer(slot))
        self._holder, self._free_after = {}, {}
        self._pending = [i for i in self.streamed if i in layers]

    def issue_copies(self, layer: int) -> None:
        """Before `layer` runs: issue the copies that can start now."""
        passed = self.passed[layer]
        for slot, holder in list(self._holder.items()):
            if holder < layer and slot not in self._free_after:
                self.streams.compute_done_with(self._buffer(slot))
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
                              f"layer {nxt}", self._buffer(slot))
            self._holder[slot] = nxt
            self._pending.pop(0)
            self.copies += 1

    def weights(self, layer: int):
        """The weights of `layer` if it streams (the compute stream waits for its copy), else None."""
        if layer not in self.views:
            return None
        self.streams.compute_waits(self.ready[layer], self._buffer(self.slot_of[layer]))
        return self.views[layer]


    def _buffer(self, slot: int) -> tuple[str, int, int]:
        """How a slot is named to the platform's copy queue (the sim's hazard checks)."""
        return ("prefetch slot", self.stage, slot)
