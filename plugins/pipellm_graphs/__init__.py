"""graphs: the decode step as CUDA graphs, one per (batch bucket, context bucket).

Eager PyTorch pays host time for every operation of a step; a replayed CUDA graph launches the
whole step at once. The engine runs each decode step in a fixed shape (`pipellm_core.runtime.step_shapes`,
set by `--batch-buckets` and `--ctx-buckets`); this plugin captures the graph of each shape on
first use or all up front, and checks each new graph against the eager step on the same inputs:
a mismatch warns and that shape stays eager.

Option (`Engine(plugin_options=...)`):
  graphs.capture        "lazy" (default) or "all" (`--graphs-capture`)
Graphs are captured through the engine's platform (`Platform.graph`): on the sim backend a replay
is charged as one launch plus the graph's nodes; on a CPU without the sim there is nothing to
capture, and the plugin says so and leaves the steps eager.
"""

from __future__ import annotations

import warnings

from pipellm_core import hookimpl
from pipellm_core.errors import PluginError
from pipellm_core.hooks.options import PluginOptions

from .runner import GraphRunner

def runner_of(engine) -> GraphRunner | None:
    """The engine's graphs (None when the plugin is not running on it)."""
    return engine.plugin_state.get("graphs")


@hookimpl
def capture(engine):
    mode = PluginOptions(engine, "graphs", ("capture",)).get("capture", "lazy")
    if mode not in ("lazy", "all"):
        raise PluginError(f"graphs: capture mode must be 'lazy' or 'all', got {mode!r}")
    if not engine.platform.can_capture_graphs:
        warnings.warn("graphs: CUDA graphs need --device cuda (or the sim backend); "
                      "decode steps stay eager", stacklevel=2)
        return
    runner = GraphRunner(engine, engine.shapes)
    engine.plugin_state["graphs"] = runner
    if mode == "all":
        runner.capture_all()


@hookimpl
def decode(engine, stage, batch, hidden):
    runner = runner_of(engine)
    return runner.run(stage, batch, hidden) if runner is not None else None
