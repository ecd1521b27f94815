"""A CUDA graph on the sim backend: recorded once, replayed as one launch.

Recording runs the step once and keeps its kernels as nodes. A replay runs the same step again
on the CPU for its real outputs, uncharged, and charges the virtual device what a replayed CUDA
graph costs: one host call, then every node's kernel time plus the per-node overhead, back to
back on the stream. Like CUDA graphs sharing one memory pool, the graphs of an engine share a
`SimGraphPool` that holds, on the device, the largest working memory any of them needed.
"""

from __future__ import annotations

from typing import Callable

from pipellm_core.sim.op_costs import GraphNode, SimOpCosting


class SimGraphPool:
    """Device memory kept for graphs: as large as the largest graph's working memory."""

    def __init__(self, device):
        self.device, self.allocation = device, None

    @property
    def gpu(self) -> int:
        return self.device.index

    @property
    def nbytes(self) -> int:
        return self.allocation.nbytes if self.allocation is not None else 0

    def grow_to(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        if self.allocation is not None:
            self.device.free(self.allocation)
        self.allocation = self.device.allocate(nbytes, "cuda graph pool")


class SimGraph:
    def __init__(self, costing: SimOpCosting, step: Callable[[], object], pool: SimGraphPool | None = None):
        self.costing, self.step, self.pool = costing, step, pool
        self.nodes: list[GraphNode] = []
        self.output = None
        self.memory_bytes = 0

    def record(self):
        """Run `step` once, keeping its kernels as the graph's nodes; returns its output.

        The host pays for issuing every operation once, as a capture does."""
        costing = self.costing
        dev = costing.runtime.device(costing.device)
        before, peak = dev.allocated_bytes, dev.peak_bytes
        dev.reset_peak()
        saved, costing.recording = costing.recording, self.nodes
        try:
            self.output = self.step()
        finally:
            costing.recording = saved
        self.memory_bytes = dev.peak_bytes - before
        dev.peak_bytes = max(peak, dev.peak_bytes)
        costing.runtime.host_work(len(self.nodes) * dev.profile.eager_op_host_s, "graph capture")
        if self.pool is not None:
            self.pool.grow_to(self.memory_bytes)
        return self.output

    @property
    def device_seconds(self) -> float:
        """Time of the graph's compute-stream kernels, back to back."""
        profile = self.costing.runtime.device(self.costing.device).profile
        kernels = [n for n in self.nodes if n.run is None]
        return sum(n.seconds for n in kernels) + len(kernels) * profile.graph_node_s

    def replay(self, compute: bool = True):
        """The step's output, charged as one graph launch: the host pays once, then the nodes
        run on their streams, each run of kernels on one stream between other operations as one stretch.
        With `compute=False` only the charges are made (the output is the recorded one): for
        steps that are priced, never read."""
        costing = self.costing
        profile = costing.runtime.device(costing.device).profile
        if compute:
            with costing.uncharged():
                self.output = self.step()
        costing.runtime.host_work(profile.graph_launch_host_s, "graph launch")
        stretch: list[GraphNode] = []

        def flush():
            if stretch:
                seconds = sum(n.seconds for n in stretch) + len(stretch) * profile.graph_node_s
                stretch[0].stream.launch(f"graph ({len(stretch)} nodes)", seconds, host_cost=0.0)
                stretch.clear()

        for node in self.nodes:
            if node.run is None:
                if stretch and node.stream is not stretch[0].stream:
                    flush()
                stretch.append(node)
            else:
                flush()
                node.run()
        flush()
        return self.output
