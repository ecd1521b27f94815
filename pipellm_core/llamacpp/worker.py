"""A `LlamaCppSession` in a process of its own, called through pickled messages on a pipe.

Used where torch's CUDA build and llama.cpp's cannot share a process (`separate_process()`),
and wherever PIPELLM_LLAMACPP_PROCESS=1 asks for it. Run as `python -m pipellm_core.llamacpp.worker`;
this module and the session import no torch.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading

from pipellm_core.errors import LlamaCppError

PROCESS_ENV = "PIPELLM_LLAMACPP_PROCESS"


def separate_process() -> bool:
    """Whether llama.cpp should run outside this process: asked for, or torch has CUDA here."""
    flag = os.environ.get(PROCESS_ENV)
    if flag is not None:
        return flag not in ("", "0")
    if "torch" not in sys.modules:
        return False
    import torch
    return torch.cuda.is_available()


def open_session(*args, **kwargs):
    """A session here or in a worker process, by `separate_process()`; same methods either way."""
    if separate_process():
        return RemoteSession(*args, **kwargs)
    from pipellm_core.llamacpp.session import LlamaCppSession
    return LlamaCppSession(*args, **kwargs)


class RemoteSession:
    def __init__(self, *args, **kwargs):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self._proc = subprocess.Popen([sys.executable, "-m", "pipellm_core.llamacpp.worker"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._lock = threading.Lock()
        self._call("__init__", args, kwargs)

    def _call(self, method, args, kwargs):
        with self._lock:
            try:
                pickle.dump((method, args, kwargs), self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self._proc.stdin.flush()
                ok, value = pickle.load(self._proc.stdout)
            except (EOFError, BrokenPipeError, pickle.UnpicklingError):
                raise LlamaCppError(f"the llama.cpp worker process died ({self._exit_status()})") from None
        if not ok:
            raise LlamaCppError(value)
        return value

    def _exit_status(self) -> str:
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return "it stopped answering"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._call(name, args, kwargs)

    def close(self):
        if self._proc.poll() is None:
            try:
                self._call("close", (), {})
            except LlamaCppError:
                pass  # it died: nothing left to close
            finally:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)


def serve(stdin=None, stdout=None) -> None:
    from pipellm_core.llamacpp.session import LlamaCppSession

    stdin, stdout = stdin or sys.stdin.buffer, stdout or sys.stdout.buffer
    session = None
    while True:
        try:
            method, args, kwargs = pickle.load(stdin)
        except EOFError:
            return
        try:
            if method == "__init__":
                session, value = LlamaCppSession(*args, **kwargs), None
            else:
                value = getattr(session, method)(*args, **kwargs)
            reply = (True, value)
        except Exception as e:  # reported to the caller, which raises it there
            reply = (False, f"{type(e).__name__}: {e}")
        pickle.dump(reply, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


if __name__ == "__main__":
    # Load llama.cpp's libraries before numpy or anything else that brings C++ code: with the
    # CUDA build, loading them after such libraries crashed in the tokenizer's std::regex setup
    # (a libstdc++ symbol clash, the same that makes torch and llama.cpp crash in one process).
    import llama_cpp  # noqa: F401

    # llama.cpp logs to stdout/stderr from C; keep the pipe for messages only
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, out)
