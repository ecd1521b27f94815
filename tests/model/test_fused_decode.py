"""The decode step on the kernels (`fused_decode`: stacked q/k/v and gate/up, kernel layouts,
attention over the cache in place) against the torch path on the same random-weight models: in
Triton's interpreter on the CPU, and on CUDA where there is a GPU.

Teacher-forced steps. Bound: the same top token wherever the torch path's top two are not a
near-tie (1% of the logits' spread), and logits within 2e-2 relative L2 of the torch path's
(the kernels round the attention output and SiLU(gate) * up to fp16 once where the torch path
rounds each part, and sum in another order). K-quants in the interpreter: 3e-2, because there
the two paths round the activations differently, as llama.cpp does on each device: the kernels
per block of 32 (llama.cpp's CUDA rounding), the torch path on the CPU per 256 (its CPU
rounding). On CUDA both round per block of 32."""

import json
import os
import subprocess
import sys

from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

RUN = r"""
import json, sys, torch
from gguf import GGMLQuantizationType as GGMLType
from pipellm_core.gguf.synthetic import Shape, write_random_gguf
from pipellm_core.runtime.engine import Engine
from tests.conftest import IdTokenizer

qtype, path, device = GGMLType[sys.argv[1]], sys.argv[2], sys.argv[3]
k_quant = qtype.name.endswith("_K")
shape = Shape("llama", 2, 256 if k_quant else 128, 512 if k_quant else 256, 4, 2, 512, vocab_size=256)
write_random_gguf(path, shape, qtype, tokenizer_from=None, output_type=GGMLType.Q8_0, seed=3, std=0.05)
e = Engine(path, device=device, max_batch=3, ctx_size=64, dtype=torch.float16, progress=False,
           tokenizer=IdTokenizer(), pad_steps=False)
fused = e.weights.layers[0].wqkv is not None
prompts = [[1, 5, 9, 200], [7, 3], [11, 12, 13, 14, 15, 16]]
slots = [0, 1, 2]
logits = e.prefill(prompts, slots).float().cpu()
pos = [len(p) for p in prompts]
steps = []
for step in range(4):
    tokens = torch.tensor([(31 * step + 7 * row + 1) % 256 for row in range(3)])  # teacher-forced
    from pipellm_core.runtime.step import StepBatch
    batch = StepBatch(tokens=tokens.to(device), positions=torch.tensor(pos, device=device),
                      slots=torch.tensor(slots, device=device), ctx_len=max(pos) + 1)
    logits = e.decode_step(batch).float().cpu()
    steps.append(logits.tolist())
    pos = [p + 1 for p in pos]
print(json.dumps({"fused": fused, "steps": steps}))
"""


def run(qtype: str, kernels: bool, tmp_path, device: str = "cpu") -> dict:
    """The steps on `device`; with `kernels` on the CPU, in Triton's interpreter."""
    env = {**os.environ, "PIPELLM_KERNELS": "triton" if kernels else "torch"}
    if kernels and device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    path = tmp_path / f"{qtype}-{kernels}.gguf"
    r = subprocess.run([sys.executable, "-c", RUN, qtype, str(path), device], capture_output=True,
                       text=True, env=env, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
def test_fused_decode_matches_the_torch_path(qtype, tmp_path):
    check(run(qtype, True, tmp_path), run(qtype, False, tmp_path), 3e-2 if qtype.endswith("_K") else 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_fused_decode_matches_the_torch_path_on_cuda(qtype, tmp_path):
    check(run(qtype, True, tmp_path, "cuda"), run(qtype, False, tmp_path, "cuda"))


def check(fused: dict, ref: dict, bound: float = 2e-2) -> None:
    import torch
    assert fused["fused"] and not ref["fused"]
    for got, want in zip(fused["steps"], ref["steps"]):
        got, want = torch.tensor(got), torch.tensor(want)
        assert torch.isfinite(want).all() and torch.isfinite(got).all()
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-2 * want.std()  # not a near-tie
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
        err = ((got - want).norm() / want.norm()).item()
        assert err < bound, err
