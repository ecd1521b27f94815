"""One matrix product of the model, by whichever path serves its weights here: the kernels of
the weights' layout on the GPU, the fp16 product kernel, or the torch path (dequantize, then
multiply), after the activation rounding llama.cpp applies for the weights' type. F32 weights
on CUDA are multiplied in TF32 where llama.cpp's CUDA build does so."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as GGMLType
from torch.utils._python_dispatch import _get_current_dispatch_mode

from pipellm_core.model.activation_rounding import round_like_llamacpp
from pipellm_core.model.cpu_weights import dense_weight
from pipellm_core.model.kernels import products, quant_matmul
from pipellm_core.model.kernels.activation_q8 import Q8Activations
from pipellm_core.model.weights import QuantizedMatrix

# llama.cpp's CUDA build multiplies F32 weights in float32 by at most 3 activation rows
# (`mmvf`) and in TF32 by more (its F32 tensor-core kernel `mmf`, and cuBLAS in TF32 math mode)
LLAMACPP_F32_ROWS = 3


def linear(x: torch.Tensor, w: QuantizedMatrix, bias: torch.Tensor | None = None, *,
           rounded: bool = False, swiglu: bool = False, q8: Q8Activations | None = None) -> torch.Tensor:
    """x @ w.T (+ bias), after llama.cpp's rounding of x for w's type unless x is `rounded`
    already. With `swiglu`, w stacks gate over up and the result is silu(gate) * up (in the
    product's epilogue where the kernels run). `q8`, x's 8-bit quants where they were made with
    x, serve the kernels that multiply those (which otherwise round x themselves)."""
    if w.layout == products.KERNEL_LAYOUT and products.reads_q8(w.qtype):
        y = products.matmul(q8 if q8 is not None else x, w.raw, w.qtype, w.rows, w.cols, swiglu=swiglu)
        return y + bias.to(y.dtype) if bias is not None else y
    if not rounded:
        x = round_like_llamacpp(x, w.qtype, x.device.type)
    if w.layout == products.KERNEL_LAYOUT:
        y = products.matmul(x, w.raw, w.qtype, w.rows, w.cols, swiglu=swiglu)
    elif swiglu:
        gate, up = linear(x, w, rounded=True).chunk(2, dim=-1)
        y = F.silu(gate) * up
    elif quant_matmul.supports_dense(x):
        y = quant_matmul.dense_matmul(x, w.dequantize(x.dtype))
    elif x.device.type == "cpu":
        y = x @ dense_weight(w, x.dtype).t()
    else:
        rows = x.numel() // x.shape[-1]
        with tf32_products(f32_in_tf32(w.qtype, x.dtype, rows, x.device.type)):
            y = x @ w.dequantize(x.dtype).t()
    return y + bias.to(y.dtype) if bias is not None else y


def f32_in_tf32(qtype: GGMLType, dtype: torch.dtype, rows: int, device_kind: str) -> bool:
    """Whether llama.cpp's CUDA build would multiply `rows` activation rows by weights of
    `qtype` in TF32 (computing in `dtype` on `device_kind`). A decode step's rows are its
    padded bucket's, in graphs and eager alike, so both choose the same."""
    return (device_kind == "cuda" and qtype == GGMLType.F32 and dtype == torch.float32
            and rows > LLAMACPP_F32_ROWS)


@contextlib.contextmanager
def tf32_products(on: bool):
    """cuBLAS float32 products in TF32 within the block where `on`; elsewhere the process's
    own setting, untouched."""
    if not on:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def round_once(x: torch.Tensor, mats: list[QuantizedMatrix]) -> tuple[torch.Tensor, bool]:
    """On the CPU, x rounded once for products with all of `mats` where they share a type (each
    `linear` would otherwise round it again), and whether it was; elsewhere x as it is. Not
    while a dispatch mode charges operations: the sim costs the operations a GPU step runs."""
    types = {m.qtype for m in mats}
    if x.device.type != "cpu" or len(types) != 1 or _get_current_dispatch_mode() is not None:
        return x, False
    return round_like_llamacpp(x, types.pop(), "cpu"), True
