"""Progress bars on stderr for long work (loading, benchmarks); silent when asked or not a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(*, total=None, desc: str = "", unit: str = "it", unit_scale: bool = False,
                 enabled: bool = True) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr,
                disable=None if enabled else True, leave=False, dynamic_ncols=True)
