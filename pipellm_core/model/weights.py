"""Model weights on their devices, quantized blocks kept as they are in the GGUF, loaded tensor by
tensor from the memory-mapped file so host memory never holds more than one tensor's copy."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.gguf.dequant import check_supported, dequantize
from pipellm_core.gguf.model_file import ModelFile, TensorInfo
from pipellm_core.model.kernels import products
from pipellm_core.model.load_plan import LoadPlan
from pipellm_core.progress import progress_bar


@dataclass
class QuantizedMatrix:
    """A [rows, cols] matrix stored as GGUF blocks (uint8 [rows, bytes per row]), in the file's
    layout or rearranged for the GPU kernels (`products.KERNEL_LAYOUT`: the same bytes per row)."""

    raw: torch.Tensor
    qtype: GGMLType
    rows: int
    cols: int
    layout: str = products.GGUF_LAYOUT
    dense: torch.Tensor | None = field(default=None, repr=False, compare=False)  # cpu_weights.py

    def _decode(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.layout == products.KERNEL_LAYOUT:
            return products.dequantize(raw, self.qtype, self.cols, dtype)
        return dequantize(raw, self.qtype, self.cols, dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self._decode(self.raw, dtype)

    def rows_dequantized(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._decode(self.raw[ids.reshape(-1)], dtype).reshape(*ids.shape, self.cols)

    def row_range(self, start: int, stop: int) -> "QuantizedMatrix":
        """Rows start..stop as a matrix of their own (a view: rows are whole blocks)."""
        return QuantizedMatrix(self.raw[start:stop], self.qtype, stop - start, self.cols, self.layout)

    def to(self, device) -> "QuantizedMatrix":
        return QuantizedMatrix(self.raw.to(device, non_blocking=True), self.qtype, self.rows, self.cols, self.layout)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()


def joined(parts: list[QuantizedMatrix]) -> tuple[QuantizedMatrix, list[QuantizedMatrix]] | None:
    """Matrices of one type stacked by rows into one (so one product computes them all), and
    each part again as a view of its rows; None where types, widths or layouts differ."""
    first = parts[0]
    if any((p.qtype, p.cols, p.layout) != (first.qtype, first.cols, first.layout) for p in parts):
        return None
    raw = torch.cat([p.raw for p in parts])
    whole = QuantizedMatrix(raw, first.qtype, sum(p.rows for p in parts), first.cols, first.layout)
    views, row = [], 0
    for p in parts:
        views.append(whole.row_range(row, row + p.rows))
        row += p.rows
    return whole, views


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wq: QuantizedMatrix
    wk: QuantizedMatrix
    wv: QuantizedMatrix
    wo: QuantizedMatrix
    ffn_norm: torch.Tensor
    w_gate: QuantizedMatrix
    w_up: QuantizedMatrix
    w_down: QuantizedMatrix
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # per-head RMSNorm weights of q and k [head_dim]
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # norms of the attention and feed-forward outputs
    post_ffn_norm: torch.Tensor | None = None
    host: "HostLayer | None" = field(default=None, repr=False, compare=False)  # set on streamed layers
    # q, k and v stacked into one matrix (wq, wk, wv are then views of its rows), and gate over up
    wqkv: QuantizedMatrix | None = field(default=None, repr=False, compare=False)
    bqkv: torch.Tensor | None = field(default=None, repr=False, compare=False)
    w_gate_up: QuantizedMatrix | None = field(default=None, repr=False, compare=False)

    JOINED = ("host", "wqkv", "bqkv", "w_gate_up")

    def tensors(self) -> dict[str, object]:
        """Each tensor once: the joined matrices are left out, their parts are views of them."""
        return {k: v for k, v in vars(self).items() if v is not None and k not in self.JOINED}

    def join_for_kernels(self) -> None:
        """Stack q/k/v and gate/up where their types agree, for one product each."""
        qkv = joined([self.wq, self.wk, self.wv])
        if qkv is not None:
            self.wqkv, (self.wq, self.wk, self.wv) = qkv
            if self.bq is not None:
                self.bqkv = torch.cat([self.bq, self.bk, self.bv])
                self.bq, self.bk, self.bv = (self.bqkv[: self.wq.rows],
                                             self.bqkv[self.wq.rows: self.wq.rows + self.wk.rows],
                                             self.bqkv[self.wq.rows + self.wk.rows:])
        gate_up = joined([self.w_gate, self.w_up])
        if gate_up is not None:
            self.w_gate_up, (self.w_gate, self.w_up) = gate_up

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes if isinstance(v, QuantizedMatrix) else v.numel() * v.element_size()
                   for v in self.tensors().values())


ALIGN = 256  # byte alignment of each tensor inside a packed layer (any dtype's, and the GPU's copy engines')


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def packed_bytes(info: TensorInfo) -> int:
    """Room one tensor takes in a packed layer: vectors (norms, biases) are kept in float32,
    matrices as their blocks."""
    return aligned(info.nbytes if len(info.shape) > 1 else 4 * int(info.shape[0]))


def packed_layer_bytes(tensors: dict[str, TensorInfo], layer: int) -> int:
    """Bytes of layer `layer` packed into one buffer (`HostLayer`), from the tensor table alone."""
    prefix = f"blk.{layer}."
    total = sum(packed_bytes(info) for name, info in tensors.items() if name.startswith(prefix))
    # a fused matrix (phi3's attn_qkv, and ffn_up holding gate and up) is packed as its parts,
    # each aligned on its own: room for the alignment of the parts past the first
    if prefix + "attn_qkv.weight" in tensors:
        total += 2 * ALIGN
    if prefix + "ffn_up.weight" in tensors and prefix + "ffn_gate.weight" not in tensors:
        total += ALIGN
    return total


@dataclass
class TensorSlot:
    """Where one tensor of a packed layer sits: its byte range and how to view it."""

    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    qtype: GGMLType | None = None  # a QuantizedMatrix's type (then shape is its raw [rows, bytes per row])
    rows: int = 0
    cols: int = 0
    layout: str = products.GGUF_LAYOUT


class HostLayer:
    """A layer's weights packed into one buffer of host memory (pinned when CUDA is there), so
    that bringing the layer to a GPU is one copy; `view(buffer)` gives the layer over any buffer
    of the same layout, such as a staging slot on the GPU."""

    def __init__(self, buffer: torch.Tensor, layout: list[TensorSlot]):
        self.buffer, self.layout = buffer, layout
        self.weights = self.view(buffer)

    @property
    def nbytes(self) -> int:
        return int(self.buffer.numel())

    @classmethod
    def pack(cls, lw: LayerWeights) -> "HostLayer":
        layout, offset = [], 0
        for name, v in lw.tensors().items():
            t = v.raw if isinstance(v, QuantizedMatrix) else v
            n = t.numel() * t.element_size()
            q = (v.qtype, v.rows, v.cols, v.layout) if isinstance(v, QuantizedMatrix) else (None, 0, 0)
            layout.append(TensorSlot(name, offset, n, t.dtype, tuple(t.shape), *q))
            offset += aligned(n)
        buffer = torch.empty(offset, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        for slot, v in zip(layout, lw.tensors().values()):
            t = v.raw if isinstance(v, QuantizedMatrix) else v
            buffer[slot.offset: slot.offset + slot.nbytes].copy_(t.contiguous().reshape(-1).view(torch.uint8))
        return cls(buffer, layout)

    def view(self, buffer: torch.Tensor) -> LayerWeights:
        parts = {}
        for s in self.layout:
            t = buffer[s.offset: s.offset + s.nbytes].view(s.dtype).reshape(s.shape)
            parts[s.name] = QuantizedMatrix(t, s.qtype, s.rows, s.cols, s.layout) if s.qtype is not None else t
        lw = LayerWeights(**parts)
        lw.host = self
        return lw


@dataclass
class ModelWeights:
    token_embd: QuantizedMatrix
    layers: list[LayerWeights]
    output_norm: torch.Tensor
    output: QuantizedMatrix  # the embedding itself when the head is tied
    rope_freqs: torch.Tensor | None = None
    layer_devices: list[torch.device] = field(default_factory=list)
    rope_factors: dict[str, torch.Tensor] = field(default_factory=dict)  # phi3: "long", "short"


def _host_bytes(info: TensorInfo) -> torch.Tensor:
    """The tensor's bytes as a uint8 [rows, bytes per row] view of the mapping (no copy)."""
    data = np.asarray(info.data).view(np.uint8)
    rows = info.shape[0] if len(info.shape) > 1 else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mapping is read-only; torch warns, but we only read
        return torch.from_numpy(data.reshape(rows, -1))


def _matrix(info: TensorInfo, device, computed_on=None) -> QuantizedMatrix:
    """The matrix on `device`, in the layout of the device that computes with it (`computed_on`,
    by default `device`: a streamed layer is stored on the host but computed on a GPU)."""
    check_supported(info.qtype, info.name)
    rows, cols = (info.shape if len(info.shape) == 2 else (1, info.shape[0]))
    raw = _host_bytes(info)
    # on the CPU the blocks are used straight from the file's mapping (read-only, never written)
    raw = raw if torch.device(device).type == "cpu" else raw.to(device)
    m = QuantizedMatrix(raw, info.qtype, rows, cols)
    if products.layout_for(info.qtype, computed_on or device) == products.KERNEL_LAYOUT:
        m = QuantizedMatrix(products.to_kernel_layout(raw, info.qtype), info.qtype, rows, cols, products.KERNEL_LAYOUT)
    return m


def _vector(info: TensorInfo, device) -> torch.Tensor:
    check_supported(info.qtype, info.name)
    cols = info.shape[-1]
    return dequantize(_host_bytes(info), info.qtype, cols).reshape(-1).to(device)


def load_weights(mf: ModelFile, plan: LoadPlan, progress: bool = True) -> ModelWeights:
    """Copy every tensor to the device the plan gives it; a streamed (not resident) layer is packed
    into one buffer of host memory, pinned when CUDA is there (`LayerWeights.host`)."""
    t = mf.tensors
    for info in t.values():
        check_supported(info.qtype, info.name)
    total = sum(info.nbytes for info in t.values())
    bar = progress_bar(total=total, desc="loading", unit="B", unit_scale=True, enabled=progress)

    def take(name, make, device):
        out = make(t[name], device)
        bar.update(t[name].nbytes)
        return out

    embd_dev = plan.embedding_device
    token_embd = take("token_embd.weight", _matrix, embd_dev)
    layers = []
    for i in range(mf.config.n_layers):
        p = plan.layers[i]
        dev = p.device if p.resident else "cpu"
        matrix = lambda info, device: _matrix(info, device, p.device)  # noqa: E731
        get = lambda suffix, make: take(f"blk.{i}.{suffix}", make, dev)  # noqa: E731
        opt = lambda suffix: take(f"blk.{i}.{suffix}", _vector, dev) if f"blk.{i}.{suffix}" in t else None  # noqa: E731
        c = mf.config
        if c.fused_qkv:  # phi3: one matrix, q then k then v by rows
            qkv = get("attn_qkv.weight", matrix)
            nq, nkv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
            wq, wk, wv = qkv.row_range(0, nq), qkv.row_range(nq, nq + nkv), qkv.row_range(nq + nkv, nq + 2 * nkv)
        else:
            wq, wk, wv = get("attn_q.weight", matrix), get("attn_k.weight", matrix), get("attn_v.weight", matrix)
        if c.fused_gate_up:  # phi3: gate's rows over up's
            gate_up = get("ffn_up.weight", matrix)
            w_gate, w_up = gate_up.row_range(0, c.n_ff), gate_up.row_range(c.n_ff, 2 * c.n_ff)
        else:
            w_gate, w_up = get("ffn_gate.weight", matrix), get("ffn_up.weight", matrix)
        lw = LayerWeights(
            attn_norm=get("attn_norm.weight", _vector),
            wq=wq, wk=wk, wv=wv, wo=get("attn_output.weight", matrix),
            ffn_norm=get("ffn_norm.weight", _vector),
            w_gate=w_gate, w_up=w_up,
            w_down=get("ffn_down.weight", matrix),
            bq=opt("attn_q.bias"), bk=opt("attn_k.bias"), bv=opt("attn_v.bias"),
            q_norm=opt("attn_q_norm.weight"), k_norm=opt("attn_k_norm.weight"),
            post_attn_norm=opt("post_attention_norm.weight"), post_ffn_norm=opt("post_ffw_norm.weight"),
        )
        if not p.resident:
            lw = HostLayer.pack(lw).weights
        elif products.runs_here(dev):
            lw.join_for_kernels()
        layers.append(lw)
    head_dev = plan.head_device
    output_norm = take("output_norm.weight", _vector, head_dev)
    if "output.weight" in t:
        output = take("output.weight", _matrix, head_dev)
    elif torch.device(head_dev) == torch.device(embd_dev):
        output = token_embd
    else:
        output = _matrix(t["token_embd.weight"], head_dev)
    rope_freqs = take("rope_freqs.weight", _vector, "cpu") if "rope_freqs.weight" in t else None
    rope_factors = {}
    for kind in ("long", "short"):
        if f"rope_factors_{kind}.weight" in t:
            rope_factors[kind] = take(f"rope_factors_{kind}.weight", _vector, "cpu")
    bar.close()
    return ModelWeights(token_embd, layers, output_norm, output, rope_freqs,
                        [torch.device(plan.layers[i].device) for i in range(mf.config.n_layers)], rope_factors)
