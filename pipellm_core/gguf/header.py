"""Bounds-checked walk over a GGUF header, run before `gguf.GGUFReader` sees the file.

Why this exists: `gguf.GGUFReader` trusts every count in the header. A corrupt array length
makes it loop for hours or slice past the end of the file, and a bad tensor offset surfaces as
an obscure numpy error. This walk reads only the header, checks every length against the bytes
that are actually left, and turns any inconsistency into a `GGUFError` naming what is wrong.
It never allocates more than the header itself.
"""

from __future__ import annotations

import os
import struct

from pipellm_core.errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_ARRAY_NESTING = 4

# value type id -> (struct format, size in bytes); 8 = string, 9 = array are variable-sized
_SCALAR_TYPES = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, data, size: int):
        self.data, self.size, self.pos = data, size, 0

    def skip(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"truncated or corrupt GGUF: {what} runs past the end of the file "
                            f"(needs {n} bytes at offset {self.pos}, file has {self.size})")
        start = self.pos
        self.pos += n
        return start

    def take(self, n: int, what: str) -> bytes:
        start = self.skip(n, what)
        return self.data[start:start + n]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"corrupt GGUF: {what} is not valid UTF-8") from e


def _skip_value(cur: _Cursor, vtype: int, key: str, depth: int = 0):
    if vtype in _SCALAR_TYPES:
        fmt, size = _SCALAR_TYPES[vtype]
        return struct.unpack(fmt, cur.take(size, f"value of {key!r}"))[0]
    if vtype == _STRING:
        return cur.string(f"value of {key!r}")
    if vtype == _ARRAY:
        if depth >= MAX_ARRAY_NESTING:
            raise GGUFError(f"corrupt GGUF: arrays nested too deep in {key!r}")
        etype = cur.u32(f"element type of {key!r}")
        count = cur.u64(f"length of {key!r}")
        if etype in _SCALAR_TYPES:
            cur.skip(count * _SCALAR_TYPES[etype][1], f"array {key!r}")
        elif etype in (_STRING, _ARRAY):
            # each element needs at least 8 bytes (a length): reject impossible counts up front
            if count * 8 > cur.size - cur.pos:
                raise GGUFError(f"truncated or corrupt GGUF: array {key!r} claims {count} "
                                f"elements, more than the file can hold")
            for _ in range(count):
                _skip_value(cur, etype, key, depth + 1)
        else:
            raise GGUFError(f"corrupt GGUF: array {key!r} has unknown element type {etype}")
        return None
    raise GGUFError(f"corrupt GGUF: metadata {key!r} has unknown value type {vtype}")


def check_gguf_header(path: str) -> None:
    """Raise `GGUFError` unless `path` is a GGUF whose header and tensor table are consistent."""
    if not os.path.exists(path):
        raise GGUFError(f"model file not found: {path}")
    if not os.path.isfile(path):
        raise GGUFError(f"model path is not a file: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
        if head != GGUF_MAGIC:
            raise GGUFError(f"not a GGUF file (bad magic {head!r}): {path}")
        import mmap
        if size < 24:
            raise GGUFError(f"truncated GGUF file ({size} bytes): {path}")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        _walk(_Cursor(mm, size), size, path)
    finally:
        mm.close()


def _walk(cur: _Cursor, size: int, path: str) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cur.take(4, "magic")
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"unsupported GGUF version {version} (supported: 2, 3): {path}")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # every metadata entry takes >= 8+4 bytes and every tensor entry >= 8+4+4+8
    if n_kv * 12 > size or n_tensors * 24 > size:
        raise GGUFError(f"corrupt GGUF: header claims {n_kv} metadata entries and "
                        f"{n_tensors} tensors, more than a {size}-byte file can hold")
    alignment = 32
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.u32(f"type of {key!r}")
        value = _skip_value(cur, vtype, key)
        if key == "general.alignment":
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise GGUFError(f"corrupt GGUF: general.alignment = {value!r}")
            alignment = value
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"rank of tensor {name!r}")
        if not 1 <= n_dims <= 4:
            raise GGUFError(f"corrupt GGUF: tensor {name!r} has rank {n_dims}")
        dims = [cur.u64(f"shape of {name!r}") for _ in range(n_dims)]
        ttype = cur.u32(f"type of tensor {name!r}")
        offset = cur.u64(f"offset of tensor {name!r}")
        infos.append((name, dims, ttype, offset))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    for name, dims, ttype, offset in infos:
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFError(f"corrupt GGUF: tensor {name!r} has unknown type id {ttype}") from None
        n = 1
        for d in dims:
            n *= d
        if n == 0 or dims[0] % block:
            raise GGUFError(f"corrupt GGUF: tensor {name!r} has shape {dims} "
                            f"that does not fit {qtype.name} blocks of {block}")
        nbytes = n // block * type_size
        if data_start + offset + nbytes > size:
            raise GGUFError(f"truncated or corrupt GGUF: data of tensor {name!r} "
                            f"({nbytes} bytes at {data_start + offset}) lies past the end "
                            f"of the {size}-byte file")
