import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as GGMLType
from gguf.quants import dequantize as gguf_dequantize

from pipellm_core.gguf.dequant import DECODERS, check_supported, dequantize
from pipellm_core.errors import UnsupportedModelError
from pipellm_core.gguf.synthetic import SCALE_FIELDS, random_blocks

QUANTIZED = sorted(SCALE_FIELDS, key=lambda t: t.value)


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_quantized_types_match_gguf(qtype):
    rng = np.random.default_rng(qtype.value)
    block = GGML_QUANT_SIZES[qtype][0]
    rows, cols = 8, block * 4
    raw = random_blocks(qtype, rows * cols // block, rng, scale=0.01).reshape(rows, -1)
    expected = gguf_dequantize(raw, qtype)
    got = dequantize(torch.from_numpy(raw), qtype, cols).numpy()
    assert got.shape == expected.shape == (rows, cols)
    np.testing.assert_array_equal(got, expected.astype(np.float32))


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_any_scale_bits_match_gguf(qtype):
    """Fully random blocks (scales included), comparing only where both are finite."""
    rng = np.random.default_rng(100 + qtype.value)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(4, 3 * size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        expected = gguf_dequantize(raw, qtype).astype(np.float32)
    got = dequantize(torch.from_numpy(raw), qtype, 3 * block).numpy()
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(got[finite], expected[finite])
    assert np.array_equal(np.isfinite(got), finite)


@pytest.mark.parametrize("qtype", [GGMLType.F32, GGMLType.F16, GGMLType.BF16], ids=lambda t: t.name)
def test_float_types_match_gguf(qtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    raw = {GGMLType.F32: x, GGMLType.F16: x.astype(np.float16),
           GGMLType.BF16: (x.view(np.uint32) >> 16).astype(np.uint16)}[qtype].view(np.uint8)
    expected = gguf_dequantize(raw, qtype)
    got = dequantize(torch.from_numpy(raw.copy()), qtype, 64).numpy()
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_every_listed_type_is_supported():
    listed = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
              "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    assert {t.name for t in DECODERS} == listed


def test_unsupported_type_names_tensor_and_type():
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ffn_up\.weight.*IQ2_XXS"):
        check_supported(GGMLType.IQ2_XXS, "blk.0.ffn_up.weight")
