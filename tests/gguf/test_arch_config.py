"""The new architectures' metadata read as llama.cpp reads it, and each missing piece a clear error."""

import math
from dataclasses import fields, replace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGMLType, GGUFReader, GGUFValueType, GGUFWriter

from pipellm_core.errors import GGUFError, UnsupportedModelError
from pipellm_core.gguf.model_file import ModelFile
from pipellm_core.gguf.synthetic import SHAPES, write_random_gguf

ARCHS = ["qwen3", "gemma2", "gemma3", "phi3"]


@pytest.fixture(scope="module")
def arch_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("arch-config")
    return {a: write_random_gguf(str(d / f"{a}.gguf"), shape(a), GGMLType.F32, tokenizer_from=None, seed=1)
            for a in ARCHS}


def shape(arch):
    return replace(SHAPES[f"tiny-{arch}"], vocab_size=256)


def rewrite(src: str, dst: str, drop: tuple[str, ...] = (), keys: dict | None = None) -> str:
    """`src` again, without the tensors or metadata keys in `drop`, with `keys` (name: (value, type)) set."""
    reader = GGUFReader(src, "r")
    arch = reader.get_field("general.architecture").contents()
    w = GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop or name in (keys or {}):
            continue
        vtype = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[1]) if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for name, (value, vtype) in (keys or {}).items():
        sub = GGUFValueType.UINT32 if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("arch", ARCHS)
def test_config_from_metadata(arch_files, arch):
    got, want = ModelFile(arch_files[arch]).config, shape(arch).config()
    for f in fields(got):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name == "name":
            continue
        assert a == (pytest.approx(b, rel=1e-6) if isinstance(b, float) else b), f.name


def test_head_size_from_key_length(arch_files):
    c = ModelFile(arch_files["qwen3"]).config
    assert (c.n_embd // c.n_heads, c.head_dim, c.rope_dim) == (16, 32, 32)
    assert c.qk_norm and c.plain_block is False and c.query_scale == pytest.approx(1 / math.sqrt(32))


def test_gemma_local_layers_and_scales(arch_files):
    g2 = ModelFile(arch_files["gemma2"]).config
    assert g2.swa_layers == (True, False, True) and g2.sliding_window == 8  # even layers local
    assert (g2.attn_softcap, g2.final_softcap, g2.embd_scale) == (10.0, 8.0, 8.0)
    assert g2.ffn_act == "gelu" and g2.post_norms and not g2.qk_norm
    g3 = ModelFile(arch_files["gemma3"]).config
    assert g3.swa_layers == (True, True, False, True, True, False)  # the file's period of 3
    assert (g3.rope_base, g3.rope_base_swa, g3.attn_softcap) == (1e6, 2e4, 0.0)  # 2e4: not the default


def test_gemma_defaults_where_keys_are_absent(arch_files, tmp_path):
    keys = ("attention.sliding_window", "attention.sliding_window_pattern", "rope.freq_base_swa",
            "attn_logit_softcapping", "final_logit_softcapping")
    g2 = ModelFile(rewrite(arch_files["gemma2"], str(tmp_path / "g2.gguf"), tuple(f"gemma2.{k}" for k in keys))).config
    assert (g2.sliding_window, g2.attn_softcap, g2.final_softcap) == (4096, 50.0, 30.0)
    # gemma3 without a window: every layer global, and no logit cap unless the file gives one
    g3 = ModelFile(rewrite(arch_files["gemma3"], str(tmp_path / "g3.gguf"), tuple(f"gemma3.{k}" for k in keys))).config
    assert (g3.sliding_window, any(g3.swa_layers), g3.final_softcap) == (0, False, 0.0)
    g3w = ModelFile(rewrite(arch_files["gemma3"], str(tmp_path / "g3w.gguf"),
                            ("gemma3.attention.sliding_window_pattern", "gemma3.rope.freq_base_swa"))).config
    assert g3w.swa_layers == (True,) * 5 + (False,) and g3w.rope_base_swa == 10000.0  # llama.cpp's 6, 10000


def test_phi3_fused_matrices_and_rope_factors(arch_files):
    c = ModelFile(arch_files["phi3"]).config
    assert c.fused_qkv and c.fused_gate_up and (c.rope_dim, c.rope_orig_context) == (24, 192)
    assert c.rope_attn_factor == pytest.approx(1.19) and c.plain_block
    assert c.swa_layers == ()  # llama.cpp leaves phi3's sliding window off


@pytest.mark.parametrize("arch, tensor", [("qwen3", "blk.1.attn_k_norm.weight"),
                                          ("gemma2", "blk.0.post_ffw_norm.weight"),
                                          ("gemma3", "blk.5.post_attention_norm.weight"),
                                          ("gemma3", "blk.2.attn_q_norm.weight"),
                                          ("phi3", "blk.1.attn_qkv.weight")])
def test_missing_tensor_is_named(arch_files, tmp_path, arch, tensor):
    path = rewrite(arch_files[arch], str(tmp_path / "cut.gguf"), (tensor,))
    with pytest.raises(GGUFError, match=f"tensor '{tensor}' is missing"):
        ModelFile(path)


def test_phi3_rope_factors_of_the_wrong_size(arch_files, tmp_path):
    bad = rewrite(arch_files["phi3"], str(tmp_path / "dim.gguf"),
                  keys={"phi3.rope.dimension_count": (16, GGUFValueType.UINT32)})
    with pytest.raises(GGUFError, match="rope_factors_long.weight' has shape"):
        ModelFile(bad)


def test_unsupported_features_are_named(arch_files, tmp_path):
    per_layer = rewrite(arch_files["gemma3"], str(tmp_path / "pattern.gguf"),
                        keys={"gemma3.attention.sliding_window_pattern": ([1, 1, 0, 1, 1, 0], GGUFValueType.ARRAY)})
    with pytest.raises(UnsupportedModelError, match="sliding_window_pattern as a per-layer list"):
        ModelFile(per_layer)
    value = rewrite(arch_files["qwen3"], str(tmp_path / "v.gguf"),
                    keys={"qwen3.attention.value_length": (16, GGUFValueType.UINT32)})
    with pytest.raises(UnsupportedModelError, match="value heads of 16 and key heads of 32"):
        ModelFile(value)
    yarn = rewrite(arch_files["phi3"], str(tmp_path / "yarn.gguf"),
                   keys={"phi3.rope.scaling.type": ("yarn", GGUFValueType.STRING)})
    with pytest.raises(UnsupportedModelError, match="RoPE scaling 'yarn'"):
        ModelFile(yarn)


def test_layer_bytes_count_split_matrices(arch_files):
    """A streamed phi3 layer packs q, k, v, gate and up apart: its size from the tensor table
    must hold the packed buffer."""
    from pipellm_core.model.load_plan import LoadPlan
    from pipellm_core.model.weights import HostLayer, load_weights, packed_layer_bytes
    for arch in ARCHS:
        mf = ModelFile(arch_files[arch])
        plan = LoadPlan.empty(mf.config.n_layers)
        plan.embedding_device = plan.head_device = "cpu"
        for p in plan.layers:
            p.device = "cpu"
        weights = load_weights(mf, plan, progress=False)
        for i, lw in enumerate(weights.layers):
            assert HostLayer.pack(lw).nbytes <= packed_layer_bytes(mf.tensors, i), (arch, i)


def test_linear_rope_scaling_read_as_llamacpp_reads_it(arch_files, tmp_path):
    """Gemma 3's files from 4B up scale the global layers' positions linearly; llama.cpp takes
    `rope.scaling.factor` (or the older `rope.scale_linear`) as linear where no type is given,
    and a factor of 0 as none."""
    assert ModelFile(arch_files["gemma3"]).config.rope_linear_scale == 8.0  # written with its type
    cases = [({"gemma3.rope.scaling.type": ("none", GGUFValueType.STRING)}, ("gemma3.rope.scaling.factor",), 1.0),
             ({"gemma3.rope.scaling.factor": (4.0, GGUFValueType.FLOAT32)}, ("gemma3.rope.scaling.type",), 4.0),
             ({"gemma3.rope.scale_linear": (2.0, GGUFValueType.FLOAT32)},
              ("gemma3.rope.scaling.type", "gemma3.rope.scaling.factor"), 2.0),
             ({"gemma3.rope.scaling.factor": (0.0, GGUFValueType.FLOAT32)}, (), 1.0)]
    for i, (keys, drop, scale) in enumerate(cases):
        path = rewrite(arch_files["gemma3"], str(tmp_path / f"s{i}.gguf"), drop=drop, keys=keys)
        assert ModelFile(path).config.rope_linear_scale == scale, keys
