"""`pipellm run` and `pipellm plugins` as a user meets them, in a subprocess."""

import json
import os
import subprocess
import sys

import pytest


def pipellm(*args, env=None, stdin=None):
    return subprocess.run([sys.executable, "-m", "pipellm_core.frontends.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, input=stdin, timeout=600)


def assert_clean_error(r, pattern):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("pipellm: error:")]
    assert len(lines) == 1, r.stderr
    assert pattern in lines[0], lines[0]


def test_run_default_model_greedy():
    r = pipellm("run", "-p", "The capital of France is", "-n", "6", "--temp", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "prefill:" in r.stderr and "decode:" in r.stderr and "tok/s" in r.stderr


def test_run_chat():
    r = pipellm("run", "--chat", "-p", "What is the capital of France?", "-n", "12", "--temp", "0",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_prompts_file_batch_job(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "The capital of France is"}\n"One, two, three,"\n\n{"prompt": "Hello"}\n')
    r = pipellm("run", "--prompts", str(f), "-n", "5", "--temp", "0", "-b", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert rows[1]["prompt"] == "One, two, three,"
    assert all(row["text"] for row in rows)
    single = pipellm("run", "-p", "One, two, three,", "-n", "5", "--temp", "0", "--no-progress")
    assert single.stdout.rstrip("\n") == rows[1]["text"]


def test_seeded_sampling_reproduces():
    args = ("run", "-p", "Once upon a time", "-n", "12", "--temp", "1.0", "-s", "123", "--no-progress")
    a, b = pipellm(*args), pipellm(*args)
    assert a.returncode == 0 and a.stdout == b.stdout


def test_llamacpp_backend_runs():
    r = pipellm("run", "--backend", "llamacpp", "-p", "The capital of France is", "-n", "6",
                "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_llamacpp_backend_refuses_plugins():
    assert_clean_error(pipellm("run", "--backend", "llamacpp", "--plugins", "core", "-p", "x"),
                       "plugins do not apply to the llamacpp backend")


@pytest.mark.parametrize("case", ["missing", "directory", "not_gguf", "truncated"])
def test_bad_model_files(tmp_path, smollm2_path, case):
    path = {"missing": tmp_path / "none.gguf", "directory": tmp_path}.get(case, tmp_path / "bad.gguf")
    if case == "not_gguf":
        path.write_text("hello, I am not a model")
    if case == "truncated":
        path.write_bytes(open(smollm2_path, "rb").read(3_000_000))
    expected = {"missing": "not found", "directory": "not a file", "not_gguf": "not a GGUF",
                "truncated": "truncated"}[case]
    assert_clean_error(pipellm("run", "-m", str(path), "-p", "x"), expected)


def test_unsupported_architecture(foreign_arch_gguf):
    assert_clean_error(pipellm("run", "-m", foreign_arch_gguf("mamba"), "-p", "x"),
                       "unsupported architecture 'mamba'")


def test_context_too_long():
    assert_clean_error(pipellm("run", "-c", "100000", "-p", "x"), "exceeds the model's trained context")
    assert_clean_error(pipellm("run", "-c", "16", "-p", "word " * 40, "--no-progress"),
                       "does not fit the context")


def test_unknown_plugin():
    assert_clean_error(pipellm("run", "--plugins", "warp-drive", "-p", "x"), "unknown plugin 'warp-drive'")


def test_bad_engine_options():
    assert_clean_error(pipellm("run", "-O", "capture=all", "-p", "x"), "--plugin-option takes PLUGIN.KEY=VALUE")
    assert_clean_error(pipellm("run", "--batch-buckets", "1,two", "-p", "x", "--no-progress"),
                       "batch buckets take comma-separated integers")
    assert_clean_error(pipellm("run", "--backend", "sim", "--device", "cuda", "-p", "x"),
                       "sim backend computes on the CPU")


def test_plugins_listing():
    r = pipellm("plugins", "--json")
    assert r.returncode == 0
    listed = {p["name"]: p for p in json.loads(r.stdout)}
    assert listed["core"]["distribution"] == "pipellm"
    assert listed["graphs"]["distribution"] == "pipellm" and listed["graphs"]["builtin"]
    assert listed["graphs"]["hooks"] == ["capture", "decode"]


def test_help_explains_flags():
    r = pipellm("run", "--help")
    for flag in ("--model", "--prompt", "--n-predict", "--ctx-size", "--temp", "--top-k", "--top-p",
                 "--min-p", "--seed", "--chat", "--prompts", "--backend", "--device", "--plugins",
                 "--graphs-capture", "--batch-buckets", "--ctx-buckets", "--sim-profile", "--trace"):
        assert flag in r.stdout


def test_vram_budget_list_sets_the_pipeline_budgets():
    # one budget per stage: the split is printed with them; a list without the pipeline is refused
    r = pipellm("run", "--backend", "sim", "--sim-devices", "2", "--plugins", "pipeline",
                "--vram-budget", "120MiB,40MiB", "-p", "Hello", "-n", "2", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert "of 120.0 MiB; stage 1:" in r.stderr and "of 40.0 MiB" in r.stderr
    assert_clean_error(pipellm("run", "--vram-budget", "1GiB,1GiB", "-p", "Hi", "-n", "1"),
                       "--vram-budget is a setting of the pipeline plugin")
    assert_clean_error(pipellm("run", "--backend", "sim", "--sim-devices", "2", "--plugins", "pipeline",
                               "--vram-budget", "1GiB,1MiB", "-p", "Hi", "-n", "1"), "over its budget")
