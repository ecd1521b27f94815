"""llama.cpp through llama-cpp-python's low-level API, with no torch in sight.

This module must not import torch: on machines where torch's CUDA build and llama.cpp's CUDA
build are loaded into one process, loading a model crashes (seen on our H100 machines), so
there it runs in a worker process of its own (`worker.py`). Everything it returns is
plain Python or numpy.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time

import numpy as np

from pipellm_core.errors import LlamaCppError

_backend_ready = False

AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU reports Intel AMX (read from the kernel's CPU flags; False where unknown).

    llama.cpp's AMX matrix kernels (one of its "extra buffer types") crash with SIGSEGV on
    quantized models on such CPUs, so sessions there run without extra buffer types.
    """
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in AMX_FLAGS for flag in line.partition(":")[2].split())
    except OSError:
        pass
    return False


def _lib():
    import llama_cpp

    global _backend_ready
    if not _backend_ready:
        from llama_cpp import _logger
        _logger.set_verbose(bool(os.environ.get("PIPELLM_VERBOSE")))  # errors only, by default
        llama_cpp.llama_backend_init()
        _backend_ready = True
    return llama_cpp


@contextlib.contextmanager
def _quiet_fds():
    """Send what llama.cpp prints while loading to /dev/null at the file-descriptor level, as
    llama-cpp-python does; loading with its output going to a pipe has crashed on CUDA builds."""
    if os.environ.get("PIPELLM_VERBOSE"):
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def model_params(lib, *, vocab_only: bool, n_gpu_layers: int):
    """llama.cpp's model parameters; extra buffer types (AMX kernels, CPU weight repacking) stay
    on except where the CPU has AMX. Off, llama.cpp uses its generic CPU kernels for those
    products: slower there, but it runs."""
    mparams = lib.llama_model_default_params()
    mparams.vocab_only = vocab_only
    mparams.n_gpu_layers = n_gpu_layers
    if cpu_has_amx():
        mparams.use_extra_bufts = False
    return mparams


class LlamaCppSession:
    """One llama.cpp model with a context of `max_batch` sequences (vocab-only if asked)."""

    def __init__(self, model_path: str, *, vocab_only: bool = False, gpu: bool = False,
                 max_batch: int = 1, ctx_size: int = 2048, n_gpu_layers: int | None = None,
                 flash_attn: bool | None = None, n_threads: int | None = None):
        lib = self.lib = _lib()
        mparams = model_params(lib, vocab_only=vocab_only,
                               n_gpu_layers=(-1 if gpu else 0) if n_gpu_layers is None else n_gpu_layers)
        with _quiet_fds():
            self.model = lib.llama_model_load_from_file(model_path.encode(), mparams)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {model_path}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.ctx = None
        if vocab_only:
            return
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = ctx_size * max_batch
        cparams.n_batch = cparams.n_ubatch = max(512, max_batch)
        cparams.n_seq_max = max_batch
        # flash attention: on for the GPU and off on the CPU unless asked (the parity tests'
        # llama.cpp computes attention without it on the CPU)
        cparams.flash_attn_type = int(gpu if flash_attn is None else flash_attn)
        if n_threads:
            cparams.n_threads = cparams.n_threads_batch = n_threads
        with _quiet_fds():
            self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise LlamaCppError("llama.cpp could not create a context (out of memory?)")
        self.n_batch = cparams.n_batch
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.memory = lib.llama_get_memory(self.ctx)

    def close(self) -> None:
        lib = self.lib
        if self.ctx:
            lib.llama_batch_free(self.batch)
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None

    # --- vocabulary ----------------------------------------------------------------------

    def vocab_info(self) -> dict:
        lib, v = self.lib, self.vocab
        return {
            "n_vocab": self.n_vocab,
            "bos": lib.llama_vocab_bos(v),
            "eos": lib.llama_vocab_eos(v),
            "add_bos": bool(lib.llama_vocab_get_add_bos(v)),
            "eog": [t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(v, t)],
            "chat_template": self.metadata("tokenizer.chat_template"),
            "pieces": [self.piece(t) for t in range(self.n_vocab)],
        }

    def metadata(self, key: str) -> str:
        size = 1 << 20
        buf = ctypes.create_string_buffer(size)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, size)
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else ""

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, 256, 0, False)
        return bytes(buf[:max(n, 0)])

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        n_max = len(text) + 16
        out = (self.lib.llama_token * n_max)()
        n = self.lib.llama_tokenize(self.vocab, text, len(text), out, n_max, add_bos, special)
        if n < 0:  # buffer too small: -n is the size needed
            out = (self.lib.llama_token * -n)()
            n = self.lib.llama_tokenize(self.vocab, text, len(text), out, -n, add_bos, special)
        return list(out[:n])

    # --- decoding ------------------------------------------------------------------------

    def release(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def decode(self, items: list[tuple[int, int, int, bool]], greedy: bool = False):
        """Decode (token, position, sequence, wants_output) items, in chunks of n_batch.

        Returns, for each item that wants output, its logits (float32 numpy [vocab]) or, with
        `greedy`, the argmax token (the first of equal maxima, as llama.cpp's greedy sampler).
        """
        lib, b, out = self.lib, self.batch, []
        for start in range(0, len(items), self.n_batch):
            chunk = items[start:start + self.n_batch]
            b.n_tokens = len(chunk)
            for i, (tok, pos, seq, want) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
                b.seq_id[i][0] = seq
                b.logits[i] = want
            rc = lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise LlamaCppError(f"llama.cpp decode failed with code {rc}")
            n_out = sum(1 for item in chunk if item[3])
            if n_out == 0:
                continue
            # the rows of every output, in batch order: one argmax for all of them (a sampler
            # call per sequence would cost more than a whole decode step of a small model)
            logits = np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))
            out += logits.argmax(1).tolist() if greedy else list(logits.copy())
        return out

    def timed_greedy_run(self, prompts: list[list[int]], n_predict: int) -> dict:
        """A whole benchmark run inside llama.cpp's process: prefill every prompt (one sequence
        each), then `n_predict - 1` greedy decode steps for all of them together."""
        for s in range(len(prompts)):
            self.release(s)
        t0 = time.perf_counter()
        items = [(t, p, s, p == len(pr) - 1) for s, pr in enumerate(prompts) for p, t in enumerate(pr)]
        last = self.decode(items, greedy=True)
        t1 = time.perf_counter()
        tokens = [[t] for t in last]
        pos = [len(p) for p in prompts]
        for _ in range(n_predict - 1):
            last = self.decode([(last[s], pos[s], s, True) for s in range(len(prompts))], greedy=True)
            for s, t in enumerate(last):
                tokens[s].append(t)
                pos[s] += 1
        t2 = time.perf_counter()
        return {"prefill_seconds": t1 - t0, "decode_seconds": t2 - t1,
                "decode_steps": n_predict - 1, "tokens": tokens}
