import os

import pytest
import torch

from pipellm_core.gguf.default_model import default_model_path

torch.set_num_threads(max(1, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_path):
    """Small random-weight GGUFs (F32, so llama.cpp computes them exactly as we do)."""
    from gguf import GGMLQuantizationType as GGMLType

    from pipellm_core.gguf.synthetic import write_random_gguf

    d = tmp_path_factory.mktemp("models")
    return {
        arch: write_random_gguf(str(d / f"{arch}.gguf"), f"tiny-{arch}", GGMLType.F32,
                                tokenizer_from=smollm2_path, std=0.3, seed=7)
        for arch in ("qwen2", "llama")
    }


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_path):
    from pipellm_core.runtime.engine import Engine
    return Engine(smollm2_path, max_batch=4, ctx_size=512, progress=False)


@pytest.fixture(scope="session")
def smollm2_llamacpp(smollm2_path):
    from pipellm_core.llamacpp.backend import LlamaCppBackend
    return LlamaCppBackend(smollm2_path, max_batch=4, ctx_size=512)


@pytest.fixture
def foreign_arch_gguf(tmp_path, smollm2_path):
    """Write a GGUF of another architecture (a real tokenizer, one tensor); returns its path."""
    import numpy as np
    from gguf import GGUFWriter

    from pipellm_core.gguf.synthetic import copy_tokenizer

    def write(arch: str) -> str:
        path = tmp_path / f"{arch}.gguf"
        w = GGUFWriter(str(path), arch)
        copy_tokenizer(w, smollm2_path)
        w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return str(path)
    return write


@pytest.fixture(scope="session")
def vocab_path() -> str:
    """A GGUF carrying SmolLM2's tokenizer, for tests that write random-weight models with it:
    PIPELLM_TEST_VOCAB (a vocabulary-only GGUF, on machines without the default model) or the
    default model itself."""
    return os.environ.get("PIPELLM_TEST_VOCAB") or default_model_path()


class IdTokenizer:
    """For engines fed token ids and compared by token ids (no llama.cpp needed): nothing ends
    a generation but its length."""

    def is_end_of_generation(self, token: int) -> bool:
        return False
