"""llama.cpp (through llama-cpp-python's low-level API) behind the same generation interface as
the torch engine: the baseline of every benchmark and the oracle of the correctness tests.

The low-level API is used because the high-level `Llama` object decodes one sequence at a time;
batched decoding (one sequence id per cache slot) is what the benchmarks compare against.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from .batching import ContinuousBatcher
from .errors import GGUFError, PipeLLMError
from .model_file import ModelFile
from .request import GenerationStats, Request
from .tokenizer import Tokenizer

_backend_ready = False


class LlamaCppBackend(ContinuousBatcher):
    def __init__(self, model_path: str, *, device: str = "cpu", max_batch: int = 1,
                 ctx_size: int = 2048, n_gpu_layers: int | None = None, flash_attn: bool = True,
                 n_threads: int | None = None):
        import llama_cpp

        global _backend_ready
        self.lib = llama_cpp
        self.file = ModelFile(model_path)  # the same checks and clear errors as the torch engine
        self.config = self.file.config
        if ctx_size > self.config.context_length:
            raise PipeLLMError(f"context size {ctx_size} exceeds the model's trained context "
                               f"of {self.config.context_length}")
        if device.startswith("cuda") and not llama_cpp.llama_supports_gpu_offload():
            raise PipeLLMError("--device cuda asked for, but this llama-cpp-python was built without GPU support")
        self.device, self.max_batch, self.ctx_size = device, max_batch, ctx_size
        self.tokenizer = Tokenizer(model_path)
        self.stats = GenerationStats()
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True
        mparams = llama_cpp.llama_model_default_params()
        if n_gpu_layers is None:
            n_gpu_layers = -1 if device.startswith("cuda") else 0
        mparams.n_gpu_layers = n_gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(model_path.encode(), mparams)
        if not self.model:
            raise GGUFError(f"llama.cpp could not load {model_path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = ctx_size * max_batch
        cparams.n_batch = max(512, max_batch)
        cparams.n_ubatch = max(512, max_batch)
        cparams.n_seq_max = max_batch
        cparams.flash_attn_type = 1 if flash_attn and device.startswith("cuda") else 0
        if n_threads:
            cparams.n_threads = cparams.n_threads_batch = n_threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise PipeLLMError("llama.cpp could not create a context (out of memory?)")
        self.n_batch = cparams.n_batch
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.memory = llama_cpp.llama_get_memory(self.ctx)

    def close(self):
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def release_slot(self, slot: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, slot, -1, -1)

    def _run(self, items: list[tuple[int, int, int, bool]]) -> list[torch.Tensor]:
        """Decode (token, position, sequence, wants_logits) items in chunks of n_batch."""
        out = []
        for start in range(0, len(items), self.n_batch):
            chunk = items[start:start + self.n_batch]
            b = self.batch
            b.n_tokens = len(chunk)
            for i, (tok, pos, seq, want) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
                b.seq_id[i][0] = seq
                b.logits[i] = want
            rc = self.lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise PipeLLMError(f"llama.cpp decode failed with code {rc}")
            for i, (_, _, _, want) in enumerate(chunk):
                if want:
                    ptr = self.lib.llama_get_logits_ith(self.ctx, i)
                    arr = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                shape=(self.n_vocab,))
                    out.append(torch.from_numpy(arr.copy()))
        return out

    def prefill_logits(self, admitted: list[Request]):
        items = []
        for r in admitted:
            self.release_slot(r.slot)
            n = len(r.prompt_tokens)
            items += [(t, p, r.slot, p == n - 1) for p, t in enumerate(r.prompt_tokens)]
        return self._run(items)

    def decode_logits(self, active: list[Request]):
        return self._run([(r.generated[-1], r.position, r.slot, True) for r in active])

    def prompt_logits(self, tokens: list[int], slot: int = 0) -> torch.Tensor:
        """Logits at every position of one prompt [T, vocab] (for parity tests)."""
        self.release_slot(slot)
        return torch.stack(self._run([(t, p, slot, True) for p, t in enumerate(tokens)]))
