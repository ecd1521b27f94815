"""An example pipellm plugin: wall time per layer, summed over a run and printed at exit.

It implements one hook, `prefetch`, which the engine calls just before each layer runs: the
time between the calls for layer i and layer i + 1 is layer i's. (On CUDA this measures when
work is issued, not when it runs; a real profiler would record CUDA events instead.)
"""

import atexit
import sys
import time
from collections import defaultdict

from pipellm_core import hookimpl

SECONDS: dict[int, float] = defaultdict(float)
CALLS: dict[int, int] = defaultdict(int)
_last: list = [None, None]  # (layer, time) of the previous call


@hookimpl
def prefetch(engine, layer):
    now = time.perf_counter()
    prev_layer, prev_time = _last
    if prev_layer is not None and layer == prev_layer + 1:
        SECONDS[prev_layer] += now - prev_time
        CALLS[prev_layer] += 1
    _last[:] = [layer, now]


def summary() -> str:
    total = sum(SECONDS.values())
    lines = [f"layer-timer: {total * 1e3:.1f} ms over {len(SECONDS)} layers"]
    for layer in sorted(SECONDS):
        lines.append(f"  layer {layer:3d}: {SECONDS[layer] * 1e3 / CALLS[layer]:8.3f} ms/call "
                     f"x {CALLS[layer]}")
    return "\n".join(lines)


@atexit.register
def _report():
    if SECONDS:
        print(summary(), file=sys.stderr)
