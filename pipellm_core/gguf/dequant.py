"""GGUF block formats decoded in torch, so quantized weights stay quantized on the device and are
expanded one matrix at a time, just before use.

Why written here: `gguf.quants` decodes the same formats, but in numpy on the host; these run on
whatever device holds the bytes (CPU or CUDA) and are checked against `gguf.quants.dequantize`
bit for bit in the tests. The layouts follow ggml's `block_*` structs.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as GGMLType

from pipellm_core.errors import UnsupportedModelError

QK_K = 256


def _f16(b: torch.Tensor, start: int) -> torch.Tensor:
    return b[:, start:start + 2].contiguous().view(torch.float16).float()


class _DeviceConstant:
    """A small constant tensor made once per device: creating it inside a step would be a
    host-to-device copy, which CUDA-graph capture forbids."""

    def __init__(self, make):
        self.make, self.copies = make, {}

    def on(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self.copies:
            self.copies[key] = self.make(device)
        return self.copies[key]


_SHIFTS_2BIT = _DeviceConstant(lambda d: torch.tensor([0, 2, 4, 6], device=d).reshape(1, 1, 4, 1))


def _lo_hi(q: torch.Tensor) -> torch.Tensor:
    """Bytes -> low nibbles then high nibbles, the order ggml stores 4-bit values in a block."""
    return torch.cat([q & 0x0F, q >> 4], dim=-1)


def _u32(b: torch.Tensor, start: int) -> torch.Tensor:
    x = b[:, start:start + 4].to(torch.int64)
    return x[:, 0] | (x[:, 1] << 8) | (x[:, 2] << 16) | (x[:, 3] << 24)


def _q4_0(b):
    d = _f16(b, 0)
    return d * (_lo_hi(b[:, 2:18]).float() - 8)


def _q4_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    return d * _lo_hi(b[:, 4:20]).float() + m


def _q5_high_bits(qh: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(32, device=qh.device)
    return ((qh[:, None] >> shifts) & 1).to(torch.uint8) << 4


def _q5_0(b):
    d = _f16(b, 0)
    q = _lo_hi(b[:, 6:22]) | _q5_high_bits(_u32(b, 2))
    return d * (q.float() - 16)


def _q5_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    q = _lo_hi(b[:, 8:24]) | _q5_high_bits(_u32(b, 4))
    return d * q.float() + m


def _q8_0(b):
    return _f16(b, 0) * b[:, 2:34].contiguous().view(torch.int8).float()


def _q2_k(b):
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    # out index = half*128 + shift*32 + l, from qs[half*32 + l] >> (2*shift)
    qs = qs.reshape(-1, 2, 1, 32).to(torch.int32)
    shifts = _SHIFTS_2BIT.on(b.device)
    q = ((qs >> shifts) & 3).reshape(-1, 16, 16).float()  # 16 groups of 16 values
    sc = (scales & 0x0F).float().unsqueeze(-1)
    mn = (scales >> 4).float().unsqueeze(-1)
    return (d.unsqueeze(-1) * sc * q - dmin.unsqueeze(-1) * mn).reshape(-1, QK_K)


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    s = s.to(torch.int32)
    low = torch.cat([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], dim=1)
    i = torch.arange(16, device=s.device)
    high = (s[:, 8 + i % 4] >> (2 * (i // 4))) & 3
    return (low | (high << 4)) - 32


def _q3_k(b):
    hmask, qs, scales = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    sc = _q3_k_scales(scales).float()
    qs = qs.reshape(-1, 2, 1, 32).to(torch.int32)
    shifts = _SHIFTS_2BIT.on(b.device)
    low = (qs >> shifts) & 3  # [n, half, shift, 32]
    bit = torch.arange(8, device=b.device).reshape(1, 2, 4, 1)  # hmask bit = half*4 + shift
    high = (hmask.to(torch.int32).reshape(-1, 1, 1, 32) >> bit) & 1
    q = (low - 4 * (1 - high)).reshape(-1, 16, 16).float()
    return (d.unsqueeze(-1) * sc.unsqueeze(-1) * q).reshape(-1, QK_K)


def _k4_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed into 12 bytes (ggml's get_scale_min_k4)."""
    s = s.to(torch.int32)
    sc_lo, mn_lo = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc_hi = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn_hi = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([sc_lo, sc_hi], 1).float(), torch.cat([mn_lo, mn_hi], 1).float()


def _q4_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k4_scales_mins(b[:, 4:16])
    qs = b[:, 16:144].reshape(-1, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32).float()  # 8 groups of 32
    return (d.unsqueeze(-1) * sc.unsqueeze(-1) * q - dmin.unsqueeze(-1) * mn.unsqueeze(-1)).reshape(-1, QK_K)


def _q5_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k4_scales_mins(b[:, 4:16])
    qh = b[:, 16:48].to(torch.int32).reshape(-1, 1, 32)
    qs = b[:, 48:176].reshape(-1, 4, 32)
    low = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32).to(torch.int32)
    high = (qh >> torch.arange(8, device=b.device).reshape(1, 8, 1)) & 1
    q = (low | (high << 4)).float()
    return (d.unsqueeze(-1) * sc.unsqueeze(-1) * q - dmin.unsqueeze(-1) * mn.unsqueeze(-1)).reshape(-1, QK_K)


def _q6_k(b):
    ql = b[:, 0:128].reshape(-1, 2, 2, 32).to(torch.int32)  # [n, half, first/second 32, l]
    qh = b[:, 128:192].reshape(-1, 2, 1, 32).to(torch.int32)  # [n, half, -, l]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()  # 16 scales, one per 16 values
    d = _f16(b, 208)
    low = torch.stack([ql & 0x0F, ql >> 4], dim=2)  # [n, half, nibble, part, l] -> order below
    low = low.reshape(-1, 2, 4, 32)  # quarter = nibble*2 + part  (q1,q2,q3,q4)
    shifts = _SHIFTS_2BIT.on(b.device)
    high = (qh >> shifts) & 3
    q = ((low | (high << 4)) - 32).reshape(-1, 16, 16).float()
    return (d.unsqueeze(-1) * sc.unsqueeze(-1) * q).reshape(-1, QK_K)


def _bf16(b):
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _f16_all(b):
    return b.contiguous().view(torch.float16).float()


def _f32(b):
    return b.contiguous().view(torch.float32)


DECODERS = {
    GGMLType.F32: _f32, GGMLType.F16: _f16_all, GGMLType.BF16: _bf16,
    GGMLType.Q4_0: _q4_0, GGMLType.Q4_1: _q4_1, GGMLType.Q5_0: _q5_0, GGMLType.Q5_1: _q5_1, GGMLType.Q8_0: _q8_0,
    GGMLType.Q2_K: _q2_k, GGMLType.Q3_K: _q3_k, GGMLType.Q4_K: _q4_k, GGMLType.Q5_K: _q5_k, GGMLType.Q6_K: _q6_k,
}
SUPPORTED_TYPES = tuple(t.name for t in DECODERS)


def check_supported(qtype, tensor_name: str) -> None:
    if qtype not in DECODERS:
        name = getattr(qtype, "name", str(qtype))
        raise UnsupportedModelError(
            f"tensor {tensor_name!r} has unsupported type {name} (supported: {', '.join(SUPPORTED_TYPES)})")


def row_bytes(qtype, cols: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return cols // block * size


_STORED_AS = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


def dequantize(raw: torch.Tensor, qtype, cols: int, dtype=torch.float32) -> torch.Tensor:
    """Decode `raw` (uint8 bytes of whole rows) into a float tensor [rows, cols]."""
    if _STORED_AS.get(qtype) == dtype and raw.is_contiguous():
        return raw.view(dtype).reshape(-1, cols)  # already in that format: no copy
    size = GGML_QUANT_SIZES[qtype][1]
    return DECODERS[qtype](raw.reshape(-1, size)).reshape(-1, cols).to(dtype)
