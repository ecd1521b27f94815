"""The ablation API and `pipellm bench` on the CPU."""

import json
import subprocess
import sys

import pytest

from pipellm_core import ablate


def test_ablate_rows(tiny_models):
    rows = ablate(tiny_models["llama"], [[], ["graphs"]], backend="sim", batch=2, prompt_tokens=8,
                  n_predict=4, repeats=1, baseline="llamacpp", progress=False)
    assert [(r["backend"], r["plugins"]) for r in rows] == [("sim", []), ("sim", ["graphs"]), ("llamacpp", [])]
    assert rows[0]["same_tokens"] is True  # the reference itself
    assert rows[1]["same_tokens"] is True  # a plugin row, checked against the reference row
    assert rows[2]["same_tokens"] is None
    for r in rows:
        assert r["tok_s"] > 0 and r["ms_per_step"] > 0 and r["batch"] == 2
        assert abs(r["tok_s"] - 2 * 1000 / r["ms_per_step"]) < 1e-6 * r["tok_s"]


def test_ablate_flags_a_plugin_that_changes_tokens(tiny_models, monkeypatch):
    """`same_tokens` is a real comparison with the reference row: a second row whose decode
    picks other tokens is caught."""
    import torch

    from pipellm_core.bench import ablation
    from pipellm_core.hooks.specs import hookimpl

    class SkewedDecode:
        @hookimpl
        def decode(self, engine, stage, batch, hidden):
            out = engine.eager_stage_step(stage, batch, hidden)
            if stage == len(engine.plan.stages) - 1:  # logits: the reference's runner-up wins
                out = out.clone()
                out[torch.arange(out.shape[0]), out.argmax(-1)] = float("-inf")
            return out

    opened, open_backend = [], ablation.open_backend

    def open_skewed_after_the_first(*args, **kwargs):
        if opened:
            kwargs["extra_plugins"] = (SkewedDecode(),)
        opened.append(args)
        return open_backend(*args, **kwargs)

    monkeypatch.setattr(ablation, "open_backend", open_skewed_after_the_first)
    rows = ablate(tiny_models["llama"], [[], []], batch=1, prompt_tokens=8, n_predict=4, repeats=1,
                  progress=False)
    assert [r["same_tokens"] for r in rows] == [True, False]


def test_bench_cli_writes_results(tmp_path, tiny_models):
    out = tmp_path / "r"
    r = subprocess.run([sys.executable, "-m", "pipellm_core.frontends.cli", "bench", "-m", tiny_models["llama"],
                        "-b", "1,2", "--prompt-tokens", "8", "-n", "4", "--repeats", "1",
                        "--baseline", "llamacpp", "--json", str(out / "x.json"),
                        "--markdown", str(out / "x.md"), "--plot", str(out / "x.png"), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "x.json").read_text())
    assert result["commit"] and result["device"] and result["parameters"]["n_predict"] == 4
    assert [(row["backend"], row["batch"]) for row in result["rows"]] == \
        [("torch", 1), ("llamacpp", 1), ("torch", 2), ("llamacpp", 2)]
    assert "| torch | none | 2 |" in (out / "x.md").read_text()
    assert (out / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablate_reports_each_stage_busy_share_on_the_sim(tiny_models):
    rows = ablate(tiny_models["llama"], [[], ["pipeline"]], backend="sim", sim_devices=2, batch=2,
                  prompt_tokens=8, n_predict=4, repeats=1, progress=False)
    alone, split = rows
    assert len(alone["stage_busy"]) == 1 and alone["bubble"] == pytest.approx(1.0 - alone["stage_busy"][0])
    assert len(split["stage_busy"]) == 2 and split["same_tokens"] is True
    assert sum(split["stage_busy"]) <= 1.0 + 1e-9  # a layer split's GPUs take turns
    assert split["bubble"] == pytest.approx(1.0 - sum(split["stage_busy"]) / 2) and split["bubble"] >= 0.5 - 1e-9


def test_ablate_reports_no_busy_share_where_it_is_not_measured(tiny_models):
    (row,) = ablate(tiny_models["llama"], [[]], backend="torch", device="cpu", batch=1, prompt_tokens=8,
                    n_predict=2, repeats=1, warmup=0, progress=False)
    assert row["stage_busy"] is None and row["bubble"] is None
