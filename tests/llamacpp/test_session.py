"""llama.cpp used safely on every CPU: no extra buffer types where the CPU has AMX (its AMX
kernels crash there), and a worker process that dies ends in one clear error."""

import os
import signal

import numpy as np
import pytest

from pipellm_core.errors import LlamaCppError
from pipellm_core.llamacpp import session as session_module
from pipellm_core.llamacpp.session import LlamaCppSession, cpu_has_amx, model_params
from pipellm_core.llamacpp.worker import RemoteSession

FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr avx2 avx512f"


@pytest.mark.parametrize("extra, expected", [
    ("", False), (" amx_tile", True), (" amx_bf16 amx_int8 amx_tile", True), (" amx_fp16x", False)])
def test_cpu_has_amx_reads_the_flags(tmp_path, extra, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {FLAGS}{extra}\n\n"
                    f"processor\t: 1\nflags\t\t: {FLAGS}{extra}\n")
    assert cpu_has_amx(str(info)) is expected


def test_cpu_has_amx_without_cpuinfo(tmp_path):
    assert cpu_has_amx(str(tmp_path / "absent")) is False


@pytest.mark.parametrize("amx", [False, True])
def test_extra_buffer_types_off_only_with_amx(monkeypatch, amx):
    monkeypatch.setattr(session_module, "cpu_has_amx", lambda: amx)
    lib = session_module._lib()
    params = model_params(lib, vocab_only=False, n_gpu_layers=0)
    assert "use_extra_bufts" in dict(type(params)._fields_)  # the field this relies on
    assert params.use_extra_bufts is (not amx)


def _greedy_logits(path):
    s = LlamaCppSession(path, ctx_size=64)
    try:
        tokens = s.tokenize(b"The capital of France is", True, False)
        return np.stack(s.decode([(t, p, 0, True) for p, t in enumerate(tokens)]))
    finally:
        s.close()


def test_session_decodes_with_and_without_extra_buffer_types(monkeypatch, tiny_models):
    """Both paths load and decode; on F32 weights (never repacked) they compute the same."""
    monkeypatch.setattr(session_module, "cpu_has_amx", lambda: False)
    with_extra = _greedy_logits(tiny_models["llama"])
    monkeypatch.setattr(session_module, "cpu_has_amx", lambda: True)
    without = _greedy_logits(tiny_models["llama"])
    assert np.isfinite(without).all()
    assert (with_extra.argmax(1) == without.argmax(1)).all()
    np.testing.assert_allclose(without, with_extra, rtol=0, atol=1e-3 * np.abs(with_extra).max())


def test_worker_that_dies_is_one_clear_error(tiny_models):
    s = RemoteSession(tiny_models["llama"], ctx_size=64)
    os.kill(s._proc.pid, signal.SIGSEGV)
    with pytest.raises(LlamaCppError, match=r"^the llama.cpp worker process died \(killed by SIGSEGV\)$"):
        s.decode([(1, 0, 0, True)])
    s.close()  # nothing left to close: no second error


def test_cli_reports_a_worker_crash_in_one_line(monkeypatch, capsys, tiny_models):
    """A llama.cpp crash in the worker (as its AMX kernels did) ends `pipellm run` with one
    `pipellm: error:` line and no traceback."""
    from pipellm_core.frontends import cli
    from pipellm_core.llamacpp import backend

    class CrashingSession(RemoteSession):
        def decode(self, *args, **kwargs):
            os.kill(self._proc.pid, signal.SIGSEGV)
            return self._call("decode", args, kwargs)

    monkeypatch.setattr(backend, "open_session", CrashingSession)
    rc = cli.main(["run", "--backend", "llamacpp", "-m", tiny_models["llama"], "-p", "Hello",
                   "-n", "4", "--temp", "0", "-c", "64", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("pipellm: error:")]
    assert errors == ["pipellm: error: the llama.cpp worker process died (killed by SIGSEGV)"], err
