"""Rounding of activations the way llama.cpp rounds them before a quantized matrix product.

llama.cpp multiplies a quantized weight by activations that it first quantizes to 8 bits per
block (Q8_0 / Q8_1 on 32 values, Q8_K on 256 on the CPU; Q8_1 for every type on CUDA) and by
fp16 activations for F16 weights. Doing the same rounding here, then multiplying in float,
gives logits within float-summation noise of llama.cpp's, so greedy tokens agree; without it
they drift by a few percent and near-ties flip.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.model.kernels import activation_q8

_Q8_32 = {GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0}
_K = {GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K}


def _q8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """ggml's quantize_row_q8_0/q8_1: d = amax/127 (stored as fp16), q = round(x / d)."""
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], -1, block)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv)
    return (q * d.half().float()).reshape(shape)


def _q8_k(x: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_K: scale from the signed value of largest magnitude, float32 d."""
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], -1, 256)
    idx = xb.abs().argmax(-1, keepdim=True)
    mx = torch.gather(xb, -1, idx)
    iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
    q = torch.clamp(torch.round(iscale * xb), max=127)
    d = torch.where(mx != 0, 1.0 / iscale, torch.zeros_like(mx))
    return (q * d).reshape(shape)


def rounds_to_q8(qtype: GGMLType, device_kind: str) -> bool:
    """Whether llama.cpp rounds activations to 8-bit blocks of 32 before a product with `qtype`."""
    return qtype in _Q8_32 or (qtype in _K and device_kind == "cuda")


def round_like_llamacpp(x: torch.Tensor, qtype: GGMLType, device_kind: str) -> torch.Tensor:
    if rounds_to_q8(qtype, device_kind):
        if activation_q8.supports(x):
            return activation_q8.round_q8_blocks(x)  # the same numbers in one kernel
        return _q8_blocks(x, 32).to(x.dtype)
    if qtype in _K:
        return _q8_k(x).to(x.dtype)
    if qtype == GGMLType.F16:
        return x.half().to(x.dtype)
    if qtype == GGMLType.BF16:
        return x.bfloat16().to(x.dtype)
    return x
