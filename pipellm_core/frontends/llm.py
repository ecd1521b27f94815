"""The Python API: `LLM(...)` with OpenAI-shaped completion and chat-completion results."""

from __future__ import annotations

import time
import uuid
from typing import Iterator

from pipellm_core.text.chat_template import render_chat
from pipellm_core.gguf.default_model import default_model_path
from pipellm_core.errors import PipeLLMError, PluginError
from pipellm_core.hooks.manager import parse_plugin_list
from pipellm_core.runtime.device_choice import choose_device
from pipellm_core.runtime.request import Request
from pipellm_core.runtime.sampling import SamplingParams
from pipellm_core.text.stop_strings import StopMatcher
from pipellm_core.text.tokenizer import StreamDecoder

BACKENDS = ("torch", "sim", "llamacpp")


def open_backend(model: str, backend: str, *, plugins=(), device: str | None = None, n_ctx: int = 2048,
                 max_batch: int = 8, progress: bool = True, sim_profile: str = "h100",
                 **engine_options):
    """The engine of `backend`: torch (CPU or CUDA), sim (a virtual GPU of `sim_profile`), or
    llamacpp (the baseline). `device` "auto" (or None: $PIPELLM_DEVICE, else "auto") is CUDA
    where torch sees a GPU, else the CPU."""
    device = choose_device(device, backend)
    if backend in ("torch", "sim"):
        from pipellm_core.runtime.engine import Engine
        if backend == "sim":
            engine_options["sim"] = sim_profile
        return Engine(model, device=device, plugins=plugins, max_batch=max_batch, ctx_size=n_ctx,
                      progress=progress, **engine_options)
    if backend == "llamacpp":
        if parse_plugin_list(plugins):
            raise PluginError("plugins do not apply to the llamacpp backend (it is the baseline); "
                              "drop --plugins or use --backend torch")
        from pipellm_core.llamacpp.backend import LlamaCppBackend
        return LlamaCppBackend(model, device=device, max_batch=max_batch, ctx_size=n_ctx,
                               n_gpu_layers=engine_options.pop("n_gpu_layers", None))
    raise PipeLLMError(f"unknown backend {backend!r} (supported: {', '.join(BACKENDS)})")


class LLM:
    """A GGUF model ready to complete text, on the torch engine (with plugins) or on llama.cpp.

    >>> llm = LLM(plugins=[], device="cpu")           # the default SmolLM2-135M model
    >>> llm.create_completion("Hello", max_tokens=8, temperature=0)["choices"][0]["text"]

    `device`: "cpu", "cuda", or "auto" (CUDA where torch sees a GPU, else the CPU); None (the
    default) reads $PIPELLM_DEVICE, else "auto". `llm.device` is the device chosen.
    """

    def __init__(self, model: str | None = None, *, plugins=(), backend: str = "torch",
                 device: str | None = None, n_ctx: int = 2048, max_batch: int = 8, progress: bool = True,
                 **engine_options):
        self.model_path = str(model) if model else default_model_path()
        self.backend_name = backend
        self.device = device = choose_device(device, backend)
        self.backend = open_backend(self.model_path, backend, plugins=plugins, device=device,
                                    n_ctx=n_ctx, max_batch=max_batch, progress=progress,
                                    **engine_options)
        self.tokenizer = self.backend.tokenizer

    # --- tokens --------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    @property
    def stats(self):
        return self.backend.stats

    # --- completions ---------------------------------------------------------------------

    def create_completion(self, prompt: str | list[str], *, max_tokens: int = 16,
                          temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                          min_p: float = 0.05, repeat_penalty: float = 1.0, seed: int | None = None,
                          stop: str | list[str] | None = None, stream: bool = False):
        """Complete one prompt or a batch of prompts (run together). OpenAI `text_completion`."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        token_lists = [self.tokenize(p) for p in prompts]
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed)
        requests = [Request(tokens, max_tokens, params) for tokens in token_lists]
        events = self._generate(requests, stop)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.model_path}
        if stream:
            return ({**meta, "object": "text_completion",
                     "choices": [{"text": text, "index": i, "logprobs": None, "finish_reason": reason}]}
                    for i, text, reason in events)
        texts, reasons = [""] * len(prompts), [None] * len(prompts)
        for i, text, reason in events:
            texts[i] += text
            reasons[i] = reason or reasons[i]
        return {**meta, "object": "text_completion",
                "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": r}
                            for i, (t, r) in enumerate(zip(texts, reasons))],
                "usage": usage(requests)}

    def create_chat_completion(self, messages: list[dict], *, max_tokens: int = 256,
                               temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                               min_p: float = 0.05, repeat_penalty: float = 1.0,
                               seed: int | None = None, stop: str | list[str] | None = None,
                               stream: bool = False):
        """Answer a conversation with the model's own chat template. OpenAI `chat.completion`."""
        tokens = self.chat_prompt_tokens(messages)
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed)
        requests = [Request(tokens, max_tokens, params)]
        events = self._generate(requests, stop)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.model_path}
        if stream:
            def chunks():
                yield {**meta, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
                for _, text, reason in events:
                    delta = {"content": text} if text else {}
                    yield {**meta, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            return chunks()
        text, reason = "", None
        for _, piece, r in events:
            text += piece
            reason = r or reason
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": reason}],
                "usage": usage(requests)}

    def chat_prompt_tokens(self, messages: list[dict]) -> list[int]:
        tok = self.tokenizer
        bos = tok.token_text(tok.bos_id) if tok.bos_id >= 0 else ""
        eos = tok.token_text(tok.eos_id) if tok.eos_id >= 0 else ""
        text = render_chat(tok.chat_template, messages, bos_token=bos, eos_token=eos)
        add_bos = tok.add_bos and not (bos and text.startswith(bos))
        return tok.encode(text, add_bos=add_bos, special=True)

    # --- the shared loop -----------------------------------------------------------------

    def _generate(self, requests: list[Request], stop) -> Iterator[tuple[int, str, str | None]]:
        """Yield (request index, text, finish reason or None) as text becomes final."""
        index = {id(r): i for i, r in enumerate(requests)}
        decoders = [StreamDecoder(self.tokenizer) for _ in requests]
        stops = [StopMatcher(stop) for _ in requests]
        reported = set()
        for req, token in self.backend.generate(requests):
            i = index[id(req)]
            text, hit = stops[i].push(decoders[i].push(token))
            if hit:
                req.finish_reason = "stop"
            if text:
                yield i, text, None
            if req.finished:
                reported.add(i)
                yield i, self._tail(decoders[i], stops[i], hit), req.finish_reason
        # requests that ended without a last visible token (end of generation, max_tokens=0)
        for j, r in enumerate(requests):
            if j not in reported:
                yield j, self._tail(decoders[j], stops[j], False), r.finish_reason

    @staticmethod
    def _tail(decoder: StreamDecoder, stop: StopMatcher, stopped: bool) -> str:
        if stopped:
            return ""
        text, _ = stop.push(decoder.flush())
        return text + stop.flush()


def usage(requests: list[Request]) -> dict:
    """OpenAI's token counts of finished requests."""
    prompt = sum(len(r.prompt_tokens) for r in requests)
    completion = sum(len(r.generated) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
