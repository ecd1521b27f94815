"""Bad model files end in one clear error, never a crash, a hang or a huge allocation."""

import os
import struct
import time
import tracemalloc

import numpy as np
import pytest

from pipellm_core.errors import GGUFError, PipeLLMError, UnsupportedModelError
from pipellm_core.gguf.model_file import ModelFile


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="not found"):
        ModelFile(str(tmp_path / "nope.gguf"))


def test_directory(tmp_path):
    with pytest.raises(GGUFError, match="not a file"):
        ModelFile(str(tmp_path))


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 4)
    with pytest.raises(GGUFError, match="not a GGUF"):
        ModelFile(str(p))


def test_truncated(tmp_path, tiny_models):
    data = open(tiny_models["qwen2"], "rb").read()
    for cut in (10, 100, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(GGUFError):
            ModelFile(str(p))


def test_unsupported_architecture(foreign_arch_gguf):
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'mamba'"):
        ModelFile(foreign_arch_gguf("mamba"))


def test_real_model_reads(smollm2_path):
    mf = ModelFile(smollm2_path)
    c = mf.config
    assert (c.arch, c.n_layers, c.n_embd, c.n_heads, c.n_kv_heads, c.vocab_size) == \
        ("llama", 30, 576, 9, 3, 49152)
    assert c.rope_style == "pairs"


# --- fuzzing: corrupt headers, metadata and tensor tables --------------------------------

def _header_regions(data: bytes):
    """Offsets of the header fields worth corrupting: counts, lengths, types, offsets."""
    from gguf import GGUFReader
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".gguf", delete=False) as f:
        f.write(data)
    r = GGUFReader(f.name)
    offsets = [4, 8, 16]  # version, tensor count, metadata count
    for field in list(r.fields.values())[3:]:
        offsets.append(field.offset)  # key length
        offsets.append(int(field.offset) + 8 + len(field.name))  # value type
        if field.types and field.types[0] == 9:
            offsets.append(int(field.offset) + 8 + len(field.name) + 8)  # array length
    for t in r.tensors:
        offsets.append(t.field.offset)  # name length
        offsets.append(int(t.field.offset) + 8 + len(t.name))  # rank
        offsets.append(int(t.field.offset) + 8 + len(t.name) + 4)  # first dim
    os.unlink(f.name)
    return offsets


CORRUPTIONS = [
    lambda v: v ^ 0xFF, lambda v: 0xFFFFFFFFFFFFFFFF, lambda v: 0x7FFFFFFF, lambda v: 0,
    lambda v: v + 1, lambda v: 1 << 40,
]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A small complete GGUF (2 layers, 512-token placeholder vocabulary) to corrupt."""
    from dataclasses import replace
    from gguf import GGMLQuantizationType as T
    from pipellm_core.gguf.synthetic import SHAPES, write_random_gguf
    path = tmp_path_factory.mktemp("fuzz") / "small.gguf"
    write_random_gguf(str(path), replace(SHAPES["tiny-llama"], vocab_size=512), T.Q8_0,
                      tokenizer_from=None, embedding_type=T.F16)
    ModelFile(str(path))  # intact, it reads
    return str(path)


def test_fuzz_header_fields_end_in_clear_error(tmp_path, small_model):
    data = open(small_model, "rb").read()
    rng = np.random.default_rng(0)
    offsets = _header_regions(data)
    cases = 0
    for off in offsets:
        for corrupt in CORRUPTIONS:
            bad = bytearray(data)
            (value,) = struct.unpack_from("<Q", bad, off)
            struct.pack_into("<Q", bad, off, corrupt(value) & 0xFFFFFFFFFFFFFFFF)
            _expect_clean_outcome(tmp_path, bytes(bad), f"field at {off}")
            cases += 1
    for _ in range(150):  # random bytes flipped anywhere in the header
        bad = bytearray(data)
        header_end = 4096
        for _ in range(rng.integers(1, 8)):
            bad[rng.integers(0, header_end)] = rng.integers(0, 256)
        _expect_clean_outcome(tmp_path, bytes(bad), "random flips")
        cases += 1
    assert cases > 200


def _expect_clean_outcome(tmp_path, data: bytes, what: str):
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(data)
    start = time.perf_counter()
    tracemalloc.start()
    try:
        ModelFile(str(p))
    except PipeLLMError as e:
        assert str(e) and "\n" not in str(e), what
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - start < 10, f"{what}: took too long"
    assert peak < 20 * len(data), f"{what}: allocated {peak} bytes for a {len(data)}-byte file"
