"""`pipellm serve`'s web application: OpenAI's completion, chat, model and health endpoints over
one engine loop (`runtime.scheduler.EngineLoop`), on Starlette.

Each HTTP request becomes a `Job` in the loop; its tokens are turned into text (UTF-8 pieces,
stop strings) on the engine thread and handed to the request's asyncio queue, from which the
handler streams server-sent events or builds one answer. A client that goes away cancels its
job, and the loop frees its slot before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipellm_core.errors import ChatTemplateError, ContextLengthError, PipeLLMError
from pipellm_core.frontends.openai_requests import APIError, GenerationRequest, SamplingDefaults, parse_generation
from pipellm_core.runtime.request import Request
from pipellm_core.runtime.sampling import SamplingParams
from pipellm_core.runtime.scheduler import EngineLoop, Job, QueueFullError
from pipellm_core.text.stop_strings import StopMatcher
from pipellm_core.text.tokenizer import StreamDecoder

RETRY_AFTER_S = 1


@dataclass
class ServeSettings:
    """What the server needs besides the model: `load()` returns an `LLM` (called on a thread
    at start-up, while /health answers 503)."""
    load: Callable[[], object]
    model_path: str
    alias: str | None = None
    api_keys: tuple[str, ...] = ()
    metrics: bool = False
    max_waiting: int = 64
    keepalive_s: float = 10.0
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    on_load_error: Callable[[BaseException], None] | None = None

    @property
    def model_id(self) -> str:
        return self.alias or Path(self.model_path).name


class ServeState:
    """The loaded model and its loop, once ready."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.llm = None
        self.loop: EngineLoop | None = None
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self.created = int(time.time())
        self.metrics = None
        if settings.metrics:
            from pipellm_core.frontends.serve_metrics import ServeMetrics
            self.metrics = ServeMetrics(self)

    def load(self) -> None:
        try:
            llm = self.settings.load()
            self.loop = EngineLoop(llm.backend, self.settings.max_waiting).start()
            self.llm = llm
            self.ready.set()
        except BaseException as e:  # reported by /health and by the command, never raised into the server
            self.load_error = e
            if self.settings.on_load_error:
                self.settings.on_load_error(e)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.stop()
        close = getattr(getattr(self.llm, "backend", None), "close", None)
        if close is not None:
            close()


# --- the bridge from the engine thread to one HTTP request ---------------------------------

class TextStream:
    """Turns a job's tokens into text on the engine thread and queues it for the handler."""

    def __init__(self, aloop: asyncio.AbstractEventLoop, tokenizer, stop: list[str]):
        self.aloop = aloop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.decoder = StreamDecoder(tokenizer)
        self.stop = StopMatcher(stop)

    def on_token(self, job: Job, token: int) -> None:
        text, hit = self.stop.push(self.decoder.push(token))
        if hit:
            job.request.finish_reason = "stop"
        if text:
            self._put(("text", text))

    def on_end(self, job: Job, error: BaseException | None) -> None:
        tail = ""
        if not self.stop.stopped:
            tail, _ = self.stop.push(self.decoder.flush())
            tail += self.stop.flush()
        self._put(("end", tail, error))

    def gone(self) -> None:
        """The client disconnected: wake the handler (the job is cancelled separately)."""
        self.queue.put_nowait(("gone",))

    def _put(self, item) -> None:
        self.aloop.call_soon_threadsafe(self.queue.put_nowait, item)


# --- responses -----------------------------------------------------------------------------

def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(payload) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class SSEResponse(Response):
    """Server-sent events from an async iterator of bytes. It watches the connection itself:
    a disconnect calls `on_disconnect` at once, even while no event is being sent."""

    media_type = "text/event-stream"

    def __init__(self, events, on_disconnect: Callable[[], None]):
        self.events, self.on_disconnect = events, on_disconnect
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.on_disconnect()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client is gone; the job was or is being cancelled
            self.on_disconnect()
        finally:
            watcher.cancel()
            await self.events.aclose()


# --- the application -----------------------------------------------------------------------

def create_app(settings: ServeSettings) -> Starlette:
    state = ServeState(settings)

    def check_key(request: HTTPRequest) -> None:
        if not settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'",
                           "invalid_request_error", "invalid_api_key")
        if not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in settings.api_keys):
            raise APIError(401, "incorrect API key", "invalid_request_error", "invalid_api_key")

    def check_ready() -> None:
        if state.load_error is not None:
            raise APIError(500, f"the model failed to load: {state.load_error}", "server_error", "model_load_failed")
        if not state.ready.is_set():
            raise APIError(503, "the model is loading", "server_error", "model_loading",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def check_model(name: str | None) -> None:
        known = {settings.model_id, Path(settings.model_path).name, settings.model_path}
        if name is not None and name not in known:
            raise APIError(404, f"the model '{name}' does not exist (this server has '{settings.model_id}')",
                           "invalid_request_error", "model_not_found", "model")

    async def read_json(request: HTTPRequest):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def prompt_tokens(g: GenerationRequest) -> list[int]:
        llm = state.llm
        try:
            if g.chat:
                return llm.chat_prompt_tokens(g.messages)
            if isinstance(g.prompt, str):
                return llm.tokenize(g.prompt)
        except ChatTemplateError as e:
            raise APIError(400, f"chat template: {e}", code="invalid_messages") from None
        n_vocab = llm.tokenizer.vocab_size
        bad = [t for t in g.prompt if not 0 <= t < n_vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})",
                           code="invalid_value", param="prompt")
        return list(g.prompt)

    async def generate(request: HTTPRequest, chat: bool) -> Response:
        try:
            check_key(request)
            g = parse_generation(await read_json(request), chat=chat, defaults=settings.defaults)
            check_model(g.model)
            check_ready()
            tokens = prompt_tokens(g)
            params = SamplingParams(g.temperature, g.top_k, g.top_p, g.min_p, g.repeat_penalty, seed=g.seed)
            stream = TextStream(asyncio.get_running_loop(), state.llm.tokenizer, g.stop)
            request = Request(tokens, g.max_tokens, params, ignore_eos=g.ignore_eos)
            job = Job(request, stream.on_token, stream.on_end)
            try:
                state.loop.submit(job)
            except ContextLengthError as e:
                raise APIError(400, str(e), code="context_length_exceeded", param="messages" if chat else "prompt") from None
            except QueueFullError as e:
                raise APIError(503, f"the server is busy: {e}; retry later", "server_error", "server_busy",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            except PipeLLMError as e:
                raise APIError(400, str(e), code="invalid_value") from None
        except APIError as e:
            if state.metrics:
                state.metrics.refused(e.status)
            return error_response(e)
        if state.metrics:
            state.metrics.accepted()
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": settings.model_id}
        if g.stream:
            return SSEResponse(_events(state, job, stream, meta, chat, g), lambda: _disconnected(state, job, stream))
        return await _collect(state, request, job, stream, meta, chat)

    async def completions(request: HTTPRequest) -> Response:
        return await generate(request, chat=False)

    async def chat_completions(request: HTTPRequest) -> Response:
        return await generate(request, chat=True)

    async def models(request: HTTPRequest) -> Response:
        try:
            check_key(request)
        except APIError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [
            {"id": settings.model_id, "object": "model", "created": state.created, "owned_by": "pipellm",
             "meta": {"path": settings.model_path, "ready": state.ready.is_set()}}]})

    async def health(request: HTTPRequest) -> Response:
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": str(state.load_error)}, status_code=500)
        if not state.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        loop = state.loop
        return JSONResponse({"status": "ok", "slots": loop.batcher.max_batch, "running": loop.running,
                             "waiting": loop.waiting})

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    if state.metrics:
        async def metrics(request: HTTPRequest) -> Response:
            try:
                check_key(request)
            except APIError as e:
                return error_response(e)
            return await state.metrics.endpoint(request)
        routes.append(Route("/metrics", metrics, methods=["GET"]))

    async def http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=code))

    async def server_error(request, exc: Exception):
        print(f"pipellm serve: {request.method} {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", "server_error", "internal_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loader = threading.Thread(target=state.load, name="pipellm-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            state.close()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.serve = state
    return app


def _disconnected(state: ServeState, job: Job, stream: TextStream) -> None:
    state.loop.cancel(job)
    stream.gone()
    if state.metrics:
        state.metrics.disconnected()


def _usage(job: Job) -> dict:
    p, c = len(job.request.prompt_tokens), len(job.request.generated)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish_reason(job: Job) -> str:
    return job.request.finish_reason if job.request.finish_reason in ("stop", "length") else "stop"


def _engine_error(error: BaseException) -> APIError:
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", "server_error", "generation_failed")


async def _next(stream: TextStream, getter: asyncio.Future | None, timeout: float):
    """The next item of the stream, or None after `timeout` (the pending get is kept)."""
    getter = getter or asyncio.ensure_future(stream.queue.get())
    done, _ = await asyncio.wait({getter}, timeout=timeout)
    return (getter.result(), None) if done else (None, getter)


async def _collect(state: ServeState, request: HTTPRequest, job: Job, stream: TextStream, meta, chat) -> Response:
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        _disconnected(state, job, stream)

    watcher = asyncio.ensure_future(watch())
    text, getter = "", None
    try:
        while True:
            item, getter = await _next(stream, getter, 3600.0)
            if item is None:
                continue
            if item[0] == "text":
                text += item[1]
            elif item[0] == "gone":
                return Response(status_code=499)
            else:
                _, tail, error = item
                if error is not None:
                    return error_response(_engine_error(error))
                text += tail
                break
    finally:
        watcher.cancel()
        if getter is not None:
            getter.cancel()
    reason = _finish_reason(job)
    if state.metrics:
        state.metrics.finished(job)
    if chat:
        return JSONResponse({**meta, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
             "finish_reason": reason}], "usage": _usage(job)})
    return JSONResponse({**meta, "object": "text_completion", "choices": [
        {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}], "usage": _usage(job)})


async def _events(state: ServeState, job: Job, stream: TextStream, meta, chat, g: GenerationRequest):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason=None, **extra) -> dict:
        if chat:
            delta = {"content": text} if text else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": reason}
        return {**meta, "object": obj, "choices": [choice], **extra}

    if chat:
        yield _sse({**meta, "object": obj, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
    getter = None
    try:
        while True:
            item, getter = await _next(stream, getter, state.settings.keepalive_s)
            if item is None:
                yield b": keep-alive\n\n"
                continue
            if item[0] == "text":
                yield _sse(chunk(item[1]))
            elif item[0] == "gone":
                return
            else:
                _, tail, error = item
                if error is not None:
                    yield _sse(_engine_error(error).body())
                else:
                    usage = _usage(job)
                    if tail:
                        yield _sse(chunk(tail))
                    yield _sse(chunk(None, _finish_reason(job), usage=usage))
                    if g.include_usage_chunk:
                        yield _sse({**meta, "object": obj, "choices": [], "usage": usage})
                    if state.metrics:
                        state.metrics.finished(job)
                yield b"data: [DONE]\n\n"
                return
    finally:
        if getter is not None:
            getter.cancel()
        if not job.request.finished:
            state.loop.cancel(job)
