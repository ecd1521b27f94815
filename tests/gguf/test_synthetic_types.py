"""The types of a random-weight Q4_K_M file: the mix's Q6_K layers, and llama.cpp's fallback
wherever 256-value blocks do not divide a row (as in the real Gemma 3 270M Q4_K_M file)."""

from dataclasses import replace

import pytest
from gguf import GGMLQuantizationType as GGMLType, GGUFReader

from pipellm_core.gguf.synthetic import SHAPES, fitting_type, q4_k_m_mix, write_random_gguf


def test_fitting_type():
    assert fitting_type(GGMLType.Q4_K, 4096) == GGMLType.Q4_K
    assert fitting_type(GGMLType.Q4_K, 640) == GGMLType.Q5_0
    assert fitting_type(GGMLType.Q6_K, 640) == GGMLType.Q8_0
    assert fitting_type(GGMLType.Q4_0, 640) == GGMLType.Q4_0
    with pytest.raises(ValueError, match="cannot be stored as Q4_K"):
        fitting_type(GGMLType.Q4_K, 48)


def test_gemma3_q4_k_m_types(tmp_path):
    # rows of 256 (attn_output, ffn_down) keep the mix's types, rows of 640 take the fallback
    shape = replace(SHAPES["gemma3-270m"], n_layers=8, n_embd=640, n_ff=512, n_heads=1, n_kv_heads=1, vocab_size=512)
    path = write_random_gguf(str(tmp_path / "g.gguf"), shape, GGMLType.Q4_K, tokenizer_from=None,
                             embedding_type=GGMLType.Q6_K, layer_types=q4_k_m_mix)
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert types["token_embd.weight"] == GGMLType.Q8_0
    assert "output.weight" not in types
    for i in range(8):
        more = q4_k_m_mix("attn_v", i, 8) is not None
        assert types[f"blk.{i}.attn_q.weight"] == GGMLType.Q5_0
        assert types[f"blk.{i}.attn_v.weight"] == (GGMLType.Q8_0 if more else GGMLType.Q5_0)
        assert types[f"blk.{i}.attn_output.weight"] == GGMLType.Q4_K
        assert types[f"blk.{i}.ffn_down.weight"] == (GGMLType.Q6_K if more else GGMLType.Q4_K)
