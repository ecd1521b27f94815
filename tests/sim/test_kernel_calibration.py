"""The h200 profile against the decode steps measured on an H200 with the kernels: the sim's
charge of the kernel path (`sim/calibration.kernel_step_seconds`, built from
`fused_decode.launches`) must come within 25% of each measured graph step of
benchmarks/results/h200/ (the calibration fits them to within 12%)."""

import json
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.gguf.synthetic import SHAPES, q4_k_m_mix
from pipellm_core.sim.calibration import kernel_step_seconds

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "h200"
CASES = {
    "smollm2-135m-q4_1": ("smollm2-135m", lambda name, i: GGMLType.Q4_1, GGMLType.Q8_0),
    "llama-8b-q4_0": ("llama-8b", lambda name, i: GGMLType.Q4_0, GGMLType.Q6_K),
    "llama-8b-q4_k_m": ("llama-8b", lambda name, i: q4_k_m_mix(name, i, 32) or GGMLType.Q4_K, GGMLType.Q6_K),
    "llama-8b-f16": ("llama-8b", lambda name, i: GGMLType.F16, GGMLType.F16),
}


def measured(name: str) -> tuple[dict[int, float], int]:
    """ms per step of pipellm's graphs rows by batch, and the mean context a step attended."""
    d = json.loads((RESULTS / f"{name}.json").read_text())
    p = d["parameters"]
    context = p["prompt_tokens"] + p["n_predict"] // 2
    return {r["batch"]: r["ms_per_step"] for r in d["rows"] if r["backend"] == "torch"}, context


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("batch", [1, 8, 32])
def test_h200_profile_charges_the_kernel_step_as_measured(name, batch):
    shape, type_of, head = CASES[name]
    steps, context = measured(name)
    sim = kernel_step_seconds(SHAPES[shape].config(), "h200", batch, context, type_of, head) * 1e3
    assert abs(sim / steps[batch] - 1) < 0.25, (name, batch, sim, steps[batch])


def test_sim_engine_step_matches_the_h200_on_smollm2(vocab_path, tmp_path):
    """The whole engine on the sim (h200, graphs), a random SmolLM2-shape Q4_1 model: its decode
    step within 25% of the one measured on the H200."""
    from pipellm_core.bench.ablation import ablate
    from pipellm_core.gguf.synthetic import write_random_gguf

    path = write_random_gguf(str(tmp_path / "smollm2.gguf"), "smollm2-135m", GGMLType.Q4_1,
                             tokenizer_from=vocab_path, embedding_type=GGMLType.Q8_0)
    steps, _ = measured("smollm2-135m-q4_1")
    (row,) = ablate(path, [["graphs"]], backend="sim", batch=1, prompt_tokens=128, n_predict=8,
                    repeats=1, progress=False, sim_profile="h200")
    assert abs(row["ms_per_step"] / steps[1] - 1) < 0.25, (row["ms_per_step"], steps[1])
