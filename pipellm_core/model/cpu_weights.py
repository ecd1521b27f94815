"""Quantized matrices dequantized once, kept for every later product on the CPU.

On the CPU a product with a quantized weight otherwise expands the matrix's blocks again at
every call: on a small model that expansion, not the product, is most of a decode step. Where
the float copies fit a RAM budget, each matrix is expanded the first time it is used and the
copy kept (`QuantizedMatrix.dense`); the product is then one BLAS call on the same values, so
results are bit for bit those of expanding each time. Matrices beyond the budget keep being
expanded per product. Nothing is kept while a dispatch mode is charging operations (the sim
backend costs a step by the operations it sees, which must stay those of a GPU step).

The budget: PIPELLM_CPU_DENSE_BUDGET (bytes, or e.g. "4GiB"; "0" turns this off), by default
half of the machine's memory, shared by every model in the process.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from pipellm_core import sizes
from pipellm_core.errors import PipeLLMError
from pipellm_core.model.weights import QuantizedMatrix

BUDGET_ENV = "PIPELLM_CPU_DENSE_BUDGET"
_in_use = 0  # bytes of dense copies alive in this process


def parse_size(text: str) -> int:
    try:
        return sizes.parse_size(text)
    except ValueError as e:
        raise PipeLLMError(f"{BUDGET_ENV}: {e}") from None


def budget_bytes() -> int:
    value = os.environ.get(BUDGET_ENV)
    if value not in (None, ""):
        return parse_size(value)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 0


def bytes_in_use() -> int:
    return _in_use


def _release(nbytes: int) -> None:
    global _in_use
    _in_use -= nbytes


def dense_weight(w: QuantizedMatrix, dtype: torch.dtype) -> torch.Tensor:
    """`w` as a [rows, cols] tensor of `dtype` on its (CPU) device: the kept copy if there is
    one, else a copy kept from now on if the budget allows, else expanded for this call only."""
    global _in_use
    if w.raw.device.type != "cpu":
        return w.dequantize(dtype)
    if w.dense is not None and w.dense.dtype == dtype:
        return w.dense
    out = w.dequantize(dtype)
    nbytes = out.numel() * out.element_size()
    if w.dense is None and _get_current_dispatch_mode() is None and _in_use + nbytes <= budget_bytes():
        w.dense = out.contiguous()
        _in_use += nbytes
        weakref.finalize(w, _release, nbytes)
        return w.dense
    return out
