"""A `pipellm serve` in this process for tests: uvicorn on 127.0.0.1 at a free port, in a thread."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import uvicorn

from pipellm_core.frontends.cli import build_parser
from pipellm_core.frontends.serve import create_app
from pipellm_core.frontends.serve_command import serve_settings


def settings_from_flags(flags: list[str]):
    args = build_parser().parse_args(["serve", "--device", "cpu", "--no-progress", *flags])
    return serve_settings(args)


def get(url: str, headers: dict | None = None, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post(url: str, body, headers: dict | None = None, timeout: float = 60.0) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_until(condition, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def running_server(settings, ready_timeout: float = 300.0, wait_ready: bool = True):
    """Yields (base URL, the app's ServeState) while the server runs; stops it afterwards."""
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    state = app.state.serve
    try:
        wait_until(lambda: server.started, 30, "the server to start")
        if wait_ready:
            wait_until(lambda: state.ready.is_set() or state.load_error is not None, ready_timeout,
                       "the model to load", interval=0.1)
            assert state.load_error is None, state.load_error
        yield base, state
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
