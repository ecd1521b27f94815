"""Gemma's GELU-gated feed-forward, with the numbers llama.cpp's CPU backend gives.

ggml evaluates GELU (tanh approximation) on the CPU through a table of all fp16 inputs: the
input is rounded to fp16, its GELU is looked up as an fp16 value, and inputs at or beyond ±10
bypass the table (0 below, the input itself above). The same rounding here keeps logits of
Gemma files within float32 noise of llama.cpp's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TABLE_LIMIT = 10.0


def gelu_fp16_table(x: torch.Tensor) -> torch.Tensor:
    """GELU (tanh approximation) of float32 `x` as ggml's fp16 table gives it, in float32."""
    xf = x.float()
    looked_up = F.gelu(xf.half().float(), approximate="tanh").half().float()
    out = torch.where(xf >= TABLE_LIMIT, xf, looked_up)
    return torch.where(xf <= -TABLE_LIMIT, torch.zeros_like(xf), out)


def gelu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GELU(gate) * up, in the dtype of `gate`."""
    return (gelu_fp16_table(gate) * up.float()).to(gate.dtype)
