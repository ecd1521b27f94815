"""Which kernel multiplies by which GGUF type, and the layout each reads.

Weights of the types below are rearranged once at load (`to_kernel_layout`: the same bits, the
same bytes per row, quants apart from scales) for the matrix products of `q32_products`
(Q4_0, Q4_1, Q8_0) and `k_products` (Q4_K, Q5_K, Q6_K). Other types keep the file's layout and
the older kernels of `quant_matmul`, or the torch path.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.model.kernels import quant_matmul

GGUF_LAYOUT = "gguf"
KERNEL_LAYOUT = "kernel"
# the kernel family that multiplies each type (the sim charges each family at its own speed)
FAMILY = {GGMLType.Q4_0: "q32", GGMLType.Q4_1: "q32", GGMLType.Q8_0: "q32", GGMLType.Q4_K: "k", GGMLType.Q5_K: "k", GGMLType.Q6_K: "k"}


def product_kind(qtype) -> str:
    """What kind of product multiplies by `qtype` on the GPU: "q32 product", "k product", or
    "dense product" (fp16 weights, or weights dequantized to fp16)."""
    return f"{FAMILY[qtype]} product" if qtype in FAMILY else "dense product"


def _module(qtype):
    if not quant_matmul.ENABLED:
        return None
    from pipellm_core.model.kernels import k_products, q32_products
    for module in (q32_products, k_products):
        if qtype in module.TYPES:
            return module
    return None


def runs_here(device) -> bool:
    """Whether products on `device` run in the kernels (CUDA, or Triton's interpreter)."""
    return quant_matmul.ENABLED and (torch.device(device).type == "cuda" or quant_matmul.INTERPRETED)


def layout_for(qtype, device) -> str:
    """The layout a matrix of `qtype` computed on `device` is kept in."""
    return KERNEL_LAYOUT if runs_here(device) and _module(qtype) is not None else GGUF_LAYOUT


def to_kernel_layout(raw: torch.Tensor, qtype) -> torch.Tensor:
    return _module(qtype).to_kernel_layout(raw, qtype)


def from_kernel_layout(kl: torch.Tensor, qtype) -> torch.Tensor:
    return _module(qtype).from_kernel_layout(kl, qtype)


def dequantize(kl: torch.Tensor, qtype, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return _module(qtype).dequantize(kl, qtype, cols, dtype)


def reads_q8(qtype) -> bool:
    """Whether the kernel for `qtype` multiplies 8-bit activations (`Q8Activations`), which it
    rounds from fp16 itself when given fp16: all the kernels of the kernel layout do."""
    return _module(qtype) is not None


def matmul(x, w: torch.Tensor, qtype, n: int, k: int, swiglu: bool = False) -> torch.Tensor:
    """x [..., k] (fp16; or, where `reads_q8`, 8-bit `Q8Activations` [M, k]) times the transpose
    of the [n, k] matrix `w` (kernel layout): [..., n] in fp16; with `swiglu`, w's first n/2 rows
    are the gate and the rest the up projection, and the result is silu(gate) * up, [..., n/2]."""
    if not isinstance(x, torch.Tensor):
        return _module(qtype).matmul(x, w, qtype, n, k, swiglu=swiglu)
    shape = x.shape
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    with quant_matmul.on_device_of(x):
        out = _module(qtype).matmul(x2, w, qtype, n, k, swiglu=swiglu)
    return out.reshape(*shape[:-1], out.shape[-1])
