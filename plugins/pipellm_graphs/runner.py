"""The graphs of one engine: one per (stage, batch bucket, context bucket), captured on first use
(or all up front), each checked against the eager step before it is trusted."""

from __future__ import annotations

import sys
import time
import warnings

import torch

from pipellm_core.progress import progress_bar
from pipellm_core.runtime.step import StepBatch

from pipellm_core.runtime.step_shapes import StepShapes

# A graph replays the eager step's kernels, but a library may pick another algorithm while
# capturing (cuBLAS does, on any stream), so outputs can differ in the last bits, which the
# 8-bit activation rounding then amplifies. A wrong graph (stale or misplaced buffers) is off by
# the order of the logits themselves; the bound sits far between the two.
VALIDATION_REL_L2 = 0.05


class StepBuffers:
    """Static input buffers of one fixed-shape step and the eager step that reads them."""

    def __init__(self, engine, stage: int, batch: int, ctx: int):
        self.engine, self.stage, self.batch, self.ctx = engine, stage, batch, ctx
        dev = engine.stage_device(stage) if stage > 0 else engine.plan.embedding_device
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.slots = torch.full((batch,), engine.pad_slot, dtype=torch.long, device=dev)
        self.hidden = (torch.zeros(batch, 1, engine.config.n_embd, dtype=engine.residual_dtype, device=dev)
                       if stage > 0 else None)
        self.step_batch = StepBatch(self.tokens, self.positions, self.slots, ctx)

    def fill(self, batch: StepBatch, hidden: torch.Tensor | None) -> None:
        batch.write_into(self.step_batch, self.engine.pad_slot)
        if self.hidden is not None:
            self.hidden[:len(batch)].copy_(hidden)

    def eager(self) -> torch.Tensor:
        return self.engine.eager_stage_step(self.stage, self.step_batch, self.hidden)


def capture_graph(engine, shape: StepBuffers, pool):
    """A graph of `shape`'s step, not recorded yet, on the GPU of its stage (`Platform.graph`)."""
    return engine.platform.graph(shape.eager, shape.stage, pool)


def outputs_match(graph_out: torch.Tensor, eager_out: torch.Tensor) -> tuple[bool, float]:
    """Whether a graph's output agrees with the eager step's: per row, relative L2 error."""
    g, e = graph_out.float().flatten(1), eager_out.float().flatten(1)
    rel = ((g - e).norm(dim=-1) / e.norm(dim=-1).clamp_min(1e-6)).max().item()
    return bool(torch.isfinite(g).all()) and rel <= VALIDATION_REL_L2, rel


class GraphRunner:
    def __init__(self, engine, policy: StepShapes):
        self.engine, self.policy = engine, policy
        self.graphs: dict[tuple[int, int, int], object] = {}  # (stage, B, C) -> graph, or None: disabled
        self.shapes: dict[tuple[int, int, int], StepBuffers] = {}
        self.pools: dict[int, object] = {}  # per GPU: the graphs of one GPU share a memory pool
        self.replays = 0
        self.eager_fallbacks = 0

    def _pool(self, stage: int):
        """The memory pool of the stage's GPU."""
        pool = self.engine.platform.graph_pool(stage)
        self.pools[pool.gpu] = pool
        return pool

    @property
    def memory_bytes(self) -> int:
        """Device memory the graphs hold (their pools)."""
        return sum(p.nbytes for p in self.pools.values())

    def run(self, stage: int, batch: StepBatch, hidden):
        """The step's output from a graph replay, or None when no graph serves it (eager runs)."""
        bucket = self.policy.pick(len(batch), batch.ctx_len)
        if bucket is None:
            self.eager_fallbacks += 1
            return None
        key = (stage, *bucket)
        shape = self._shape(key)
        shape.fill(batch, hidden)
        if key not in self.graphs:
            out = self._capture(key, shape)
        elif self.graphs[key] is None:
            self.eager_fallbacks += 1
            return None
        else:
            out = self.graphs[key].replay()
            self.replays += 1
        return out[: len(batch)].clone() if out is not None else None

    def _shape(self, key) -> StepBuffers:
        """The static buffers of `key` (stage, batch, context), made on first use."""
        if key not in self.shapes:
            self.shapes[key] = StepBuffers(self.engine, *key)
        return self.shapes[key]

    def _capture(self, key, shape: StepBuffers):
        """Record the graph of `key`, check it against eager on the same inputs, keep it or not."""
        stage, b, c = key
        start = time.perf_counter()
        graph = capture_graph(self.engine, shape, self._pool(stage))
        try:
            out = graph.record()
        except RuntimeError as e:
            warnings.warn(f"graphs: cannot capture stage {stage}, batch {b} x context {c} "
                          f"({str(e).splitlines()[0]}); that shape runs eager", stacklevel=2)
            self.graphs[key] = None
            return None
        captured = out.clone()
        expected = shape.eager()
        if not bool(torch.isfinite(expected).all()):
            warnings.warn(f"graphs: the eager step of stage {stage}, batch {b} x context {c} gives non-finite "
                          f"values (the model overflows), so its graph cannot be checked; that shape runs eager",
                          stacklevel=2)
            self.graphs[key] = None
            return expected
        ok, diff = outputs_match(captured, expected)
        if not ok:
            warnings.warn(f"graphs: the graph of stage {stage}, batch {b} x context {c} differs from "
                          f"the eager step (relative error {diff:.3g}); that shape runs eager", stacklevel=2)
            self.graphs[key] = None
            return expected
        self.graphs[key] = graph
        if self.engine.progress:
            print(f"graphs: captured batch {b} x context {c} (stage {stage}) in "
                  f"{time.perf_counter() - start:.2f} s; graphs hold {self.memory_bytes / 2**20:.1f} MiB",
                  file=sys.stderr)
        return captured

    def capture_all(self) -> None:
        """Capture every shape of every stage now (`--graphs-capture all`), with progress: each
        runs as the engine's decode of that stage on padding rows, so on first use."""
        stages = len(self.engine.plan.stages)
        shapes = [(s, b, c) for s in range(stages) for b, c in self.policy.all_shapes()]
        bar = progress_bar(total=len(shapes), desc="capturing graphs", enabled=self.engine.progress)
        for key in shapes:
            buffers = self._shape(key)  # made as padding rows
            with self.engine.running():
                self.engine.decode_stage(key[0], buffers.step_batch, buffers.hidden)
            bar.update(1)
        bar.close()
