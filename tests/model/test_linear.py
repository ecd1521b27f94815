"""`model/linear.py`: the float32 products that follow llama.cpp's CUDA build into TF32."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.model.linear import f32_in_tf32, linear, tf32_products
from pipellm_core.model.weights import QuantizedMatrix


@pytest.mark.parametrize("qtype, dtype, rows, device, expected", [
    (GGMLType.F32, torch.float32, 1, "cuda", False),
    (GGMLType.F32, torch.float32, 3, "cuda", False),  # llama.cpp's float32 matrix-vector kernel
    (GGMLType.F32, torch.float32, 4, "cuda", True),  # its TF32 tensor-core kernel, then cuBLAS in TF32
    (GGMLType.F32, torch.float32, 328, "cuda", True),
    (GGMLType.F32, torch.float32, 328, "cpu", False),  # its CPU build multiplies in float32
    (GGMLType.F32, torch.float16, 328, "cuda", False),
    (GGMLType.F16, torch.float32, 328, "cuda", False),
    (GGMLType.Q8_0, torch.float32, 328, "cuda", False),
])
def test_which_products_run_in_tf32(qtype, dtype, rows, device, expected):
    assert f32_in_tf32(qtype, dtype, rows, device) is expected


def test_tf32_switch_is_restored_after_the_block():
    assert torch.backends.cuda.matmul.allow_tf32 is False
    with pytest.raises(RuntimeError):
        with tf32_products(True):
            assert torch.backends.cuda.matmul.allow_tf32 is True
            raise RuntimeError("a failing product")
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_f32_product_on_the_cpu_is_float32():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 64, generator=g)
    x = torch.randn(2, 5, 64, generator=g)
    matrix = QuantizedMatrix(w.numpy().view(np.uint8).reshape(24, -1).copy(), GGMLType.F32, 24, 64)
    matrix.raw = torch.from_numpy(matrix.raw)
    y = linear(x, matrix)
    reference = (x.double() @ w.double().t()).float()
    assert torch.allclose(y, reference, rtol=0, atol=1e-5), (y - reference).abs().max()
