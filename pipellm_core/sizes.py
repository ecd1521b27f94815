"""Sizes written for people: '6GiB', '6.5GB', '800MiB' or a plain number of bytes."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text) -> int:
    """Bytes from '6GiB', '6.5GB', '800MiB' or a number; ValueError for anything else."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size (say 6GiB, 6.5GB or 800MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])



def format_size(nbytes: int) -> str:
    """'1.50 GiB' from a GiB up, else '12.0 MiB': a size for people, in binary units."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
