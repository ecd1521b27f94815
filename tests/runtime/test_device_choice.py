"""`--device auto` and `LLM(device=...)`: CUDA where torch sees a GPU, else the CPU."""

import pytest
import torch

from pipellm_core.runtime import device_choice
from pipellm_core.runtime.device_choice import choose_device, describe_choice


@pytest.mark.parametrize("gpu, backend, expected", [
    (False, "torch", "cpu"), (True, "torch", "cuda"), (True, "llamacpp", "cuda"),
    (True, "sim", "cpu"), (False, "sim", "cpu")])
def test_auto(monkeypatch, gpu, backend, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.delenv("PIPELLM_DEVICE", raising=False)
    assert choose_device("auto", backend) == expected
    assert choose_device(None, backend) == expected  # the default is auto


def test_explicit_and_environment(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("PIPELLM_DEVICE", "cpu")
    assert choose_device(None) == "cpu"       # the environment sets the default
    assert choose_device("cuda:1") == "cuda:1"  # an explicit device wins, as given
    monkeypatch.setenv("PIPELLM_DEVICE", "auto")
    assert choose_device(None) == "cuda"


def test_description(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Some GPU")
    assert describe_choice("cuda") == "device: cuda (auto: torch sees Some GPU)"
    assert describe_choice("cpu") == "device: cpu (auto: torch sees no CUDA GPU)"
    assert "sim backend" in describe_choice("cpu", "sim")


def test_cli_prints_the_choice_once(monkeypatch, capsys, tiny_models):
    from pipellm_core.frontends import cli
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("PIPELLM_DEVICE", raising=False)
    assert cli.main(["run", "-m", tiny_models["llama"], "-p", "Hi", "-n", "2", "--temp", "0",
                     "-c", "64", "--no-progress"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err.count("device: cpu (auto: torch sees no CUDA GPU)") == 1
    assert "(torch, cpu, plugins: none)" in err[-1]
    assert cli.main(["run", "-m", tiny_models["llama"], "--device", "cpu", "-p", "Hi", "-n", "2",
                     "-c", "64", "--no-progress"]) == 0
    assert not any(line.startswith("device:") for line in capsys.readouterr().err.splitlines())


def test_api_default(monkeypatch, tiny_models):
    from pipellm_core.frontends.llm import LLM
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("PIPELLM_DEVICE", raising=False)
    llm = LLM(tiny_models["llama"], n_ctx=64, max_batch=1, progress=False)
    assert llm.device == "cpu" and llm.backend.device == "cpu"
