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
    from gguf import GGMLQuantizationType as GGMLType
    from pipellm_core.gguf.synthetic import SHAPES, write_random_gguf
    path = tmp_path_factory.mktemp("fuzz") / "small.gguf"
    write_random_gguf(str(path), replace(SHAPES["tiny-llama"], vocab_size=512), GGMLType.Q8_0,
                      tokenizer_from=None, embedding_type=GGMLType.F16)
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


# --- metadata that claims more than the file holds ------------------------------------------

def _rewrite(src: str, dst, metadata: dict | None = None, drop: tuple = ()) -> str:
    """Copy the GGUF `src` to `dst` with some metadata values replaced (same types) or added
    (uint32, or a string array), and some tensors left out."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    metadata = dict(metadata or {})
    r = GGUFReader(src)
    w = GGUFWriter(str(dst), r.get_field("general.architecture").contents())
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[1]) if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, metadata.pop(name, field.contents()), vtype, sub_type=sub)
    for name, value in metadata.items():
        if isinstance(value, list):
            w.add_array(name, value)
        else:
            w.add_uint32(name, value)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(dst)


@pytest.mark.parametrize("metadata, drop, message", [
    ({"llama.block_count": 1000}, (),
     r"tensor 'blk\.2\.attn_norm\.weight' is missing \(llama\.block_count = 1000 claims layer 2\)"),
    ({}, ("blk.1.ffn_down.weight",), r"tensor 'blk\.1\.ffn_down\.weight' is missing"),
    ({}, ("output_norm.weight",), r"tensor 'output_norm\.weight' is missing"),
    ({"llama.attention.head_count": 8}, (),
     r"tensor 'blk\.0\.attn_k\.weight' has shape \(32, 64\), but the metadata claims \(16, 64\) "
     r"\(llama\.attention\.head_count_kv = 2 heads of 8"),
    ({"llama.attention.head_count_kv": 4}, (),
     r"'blk\.0\.attn_k\.weight' has shape \(32, 64\), but the metadata claims \(64, 64\) "
     r"\(llama\.attention\.head_count_kv = 4 heads of 16"),
    ({"llama.attention.key_length": 4096}, (),
     r"'blk\.0\.attn_q\.weight' has shape \(64, 64\), but the metadata claims \(16384, 64\) "
     r"\(llama\.attention\.head_count = 4 heads of 4096"),
    ({"llama.embedding_length": 128}, (), r"'token_embd\.weight' has shape \(512, 64\), but the "
     r"metadata claims \(512, 128\) \(llama\.embedding_length = 128\)"),
    ({"llama.feed_forward_length": 4096}, (), r"'blk\.0\.ffn_gate\.weight' has shape \(128, 64\)"),
    ({"llama.context_length": 0}, (), r"llama\.context_length = 0"),
    ({"llama.rope.dimension_count": 4096}, (), r"llama\.rope\.dimension_count = 4096 for heads of 16"),
    ({"llama.vocab_size": 100000}, (),
     r"llama\.vocab_size = 100000 tokens, but tensor 'token_embd\.weight' holds 512"),
    ({"tokenizer.ggml.tokens": [f"<t{i}>" for i in range(600)]}, (),
     r"tokenizer\.ggml\.tokens lists 600 tokens, but tensor 'token_embd\.weight' holds 512"),
], ids=["block_count", "layer-tensor", "output-norm", "head_count", "head_count_kv", "key_length",
        "embedding_length", "feed_forward_length", "context_length", "rope_dims", "vocab_size",
        "token_list"])
def test_metadata_claiming_more_than_the_file_holds(tmp_path, small_model, metadata, drop, message):
    bad = _rewrite(small_model, tmp_path / "claims.gguf", metadata, drop)
    with pytest.raises(GGUFError, match=message) as e:
        ModelFile(bad)
    assert "\n" not in str(e.value)


def test_rewrite_keeps_a_readable_file(tmp_path, small_model):
    """The helper above changes only what it is asked to (so the errors come from the claims)."""
    same = ModelFile(_rewrite(small_model, tmp_path / "same.gguf"))
    assert same.config == ModelFile(small_model).config


def test_fuzzed_block_count_fails_before_loading_weights(tmp_path, small_model):
    """Through the engine: the one-line error comes from reading the file, not from loading."""
    from pipellm_core.runtime.engine import Engine
    bad = _rewrite(small_model, tmp_path / "deep.gguf", {"llama.block_count": 1000})
    with pytest.raises(GGUFError, match="claims layer 2"):
        Engine(bad, progress=False)
