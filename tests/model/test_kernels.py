"""The fp16 product and the activation-rounding kernels against torch, in Triton's interpreter on
the CPU (a subprocess: the interpreter is chosen when the kernels are defined); the runner the
other kernel tests share. On a GPU, the marked tests run them for real."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

CHECK = r"""
import torch
from pipellm_core.model.kernels import quant_matmul

dev = "{device}"
for m, n, k in ((1, 48, 64), (3, 40, 200), (17, 33, 320), (64, 70, 256)):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half().to(dev)
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(n)) * 0.05).half().to(dev)
    assert quant_matmul.supports_dense(x)
    got = quant_matmul.dense_matmul(x, w).float()
    want = x.float() @ w.float().t()
    err = ((got - want).norm() / want.norm()).item()
    assert got.shape == (m, n) and err < 2e-3, ("dense", m, n, k, err)
    print("dense", m, n, k, f"{{err:.2e}}")
assert not quant_matmul.supports_dense(torch.zeros(65, 64, dtype=torch.float16, device=dev))
print("ok")
"""


def run_in_interpreter(script: str) -> None:
    """Run a check script on the CPU in Triton's interpreter (a subprocess: the interpreter is
    chosen when the kernels are defined); it must end by printing ok."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", script.format(device="cpu")], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_kernels_match_the_torch_path_in_the_interpreter():
    run_in_interpreter(CHECK)


@pytest.mark.gpu
def test_kernels_match_the_torch_path_on_cuda():
    exec(CHECK.format(device="cuda"), {})


def test_torch_path_where_no_kernel_applies():
    from gguf import GGMLQuantizationType as GGMLType

    from pipellm_core.model.kernels import products, quant_matmul
    x = torch.zeros(2, 64, dtype=torch.float16)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert not quant_matmul.supports_dense(x) or interpreted
    assert not quant_matmul.supports_dense(x.float())
    assert products.layout_for(GGMLType.Q4_0, "cpu") == products.GGUF_LAYOUT or interpreted
    assert products.layout_for(GGMLType.Q5_0, "cpu") == products.GGUF_LAYOUT


ROUNDING = r"""
import torch
from pipellm_core.model.activation_rounding import _q8_blocks
from pipellm_core.model.kernels import activation_q8

dev = "{device}"
g = torch.Generator().manual_seed(0)
for dtype in (torch.float16, torch.float32):
    for shape in ((1, 64), (3, 576), (2, 5, 320)):
        x = (torch.randn(*shape, generator=g) * 3).to(dtype)
        x[..., 7] = 40.0  # an outlier, as real activations have
        x[..., 32:64] = 0.0  # a block of zeros: scale 0
        x = x.to(dev)
        assert activation_q8.supports(x)
        got = activation_q8.round_q8_blocks(x)
        want = _q8_blocks(x, 32).to(dtype)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, want), (dtype, shape, (got.float() - want.float()).abs().max().item())
# ties round to even, as torch.round does: 0.5 and 2.5 of a step go down, 1.5 up
x = torch.zeros(1, 32)
x[0, :4] = torch.tensor([127.0, 0.5, 1.5, 2.5])
got = activation_q8.round_q8_blocks(x.to(dev)).cpu()
assert got[0, :4].tolist() == [127.0, 0.0, 2.0, 2.0], got[0, :4]
print("ok")
"""


def test_activation_rounding_kernel_equals_the_torch_rounding_in_the_interpreter():
    run_in_interpreter(ROUNDING)


@pytest.mark.gpu
def test_activation_rounding_kernel_equals_the_torch_rounding_on_cuda():
    exec(ROUNDING.format(device="cuda"), {})
