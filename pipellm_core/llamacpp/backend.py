"""llama.cpp behind the same generation interface as the torch engine: the baseline of every
benchmark and the oracle of the correctness tests. Plugins do not apply to it.

Decoding goes through `LlamaCppSession` (the low-level API, one sequence id per cache slot, so
several sequences decode in one batch), in this process or in a worker process.
"""

from __future__ import annotations

import torch

from pipellm_core.runtime.batching import ContinuousBatcher, check_context_size
from pipellm_core.errors import GGUFError
from pipellm_core.llamacpp.worker import open_session
from pipellm_core.gguf.model_file import ModelFile
from pipellm_core.runtime.request import GenerationStats, Request
from pipellm_core.text.tokenizer import Tokenizer


class LlamaCppBackend(ContinuousBatcher):
    def __init__(self, model_path: str, *, device: str = "cpu", max_batch: int = 1,
                 ctx_size: int = 2048, n_gpu_layers: int | None = None, flash_attn: bool | None = None,
                 n_threads: int | None = None):
        self.file = ModelFile(model_path)  # the same checks and clear errors as the torch engine
        self.config = self.file.config
        check_context_size(ctx_size, self.config.context_length)
        self.device, self.max_batch, self.ctx_size = device, max_batch, ctx_size
        self.stats = GenerationStats()
        try:
            self.session = open_session(model_path, gpu=device.startswith("cuda"), max_batch=max_batch,
                                        ctx_size=ctx_size, n_gpu_layers=n_gpu_layers,
                                        flash_attn=flash_attn, n_threads=n_threads)
        except RuntimeError as e:
            raise GGUFError(str(e)) from None
        self.tokenizer = Tokenizer(model_path, session=self.session)  # no second load of the file

    def close(self):
        self.session.close()

    def timed_greedy_run(self, prompts: list[list[int]], n_predict: int) -> dict:
        return self.session.timed_greedy_run(prompts, n_predict)  # the whole run in llama.cpp's process

    def release_slot(self, slot: int) -> None:
        self.session.release(slot)

    def _logits(self, items) -> list[torch.Tensor]:
        return [torch.from_numpy(x) for x in self.session.decode(items)]

    def prefill_logits(self, admitted: list[Request]):
        items = []
        for r in admitted:
            self.session.release(r.slot)
            n = len(r.prompt_tokens)
            items += [(t, p, r.slot, p == n - 1) for p, t in enumerate(r.prompt_tokens)]
        return self._logits(items)

    def decode_logits(self, active: list[Request]):
        return self._logits([(r.generated[-1], r.position, r.slot, True) for r in active])

    def prompt_logits(self, tokens: list[int], slot: int = 0) -> torch.Tensor:
        """Logits at every position of one prompt [T, vocab] (for parity tests)."""
        self.session.release(slot)
        return torch.stack(self._logits([(t, p, slot, True) for p, t in enumerate(tokens)]))
