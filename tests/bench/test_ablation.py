"""The ablation API and `pipellm bench` on the CPU."""

import json
import subprocess
import sys

from pipellm_core import ablate


def test_ablate_rows(tiny_models):
    rows = ablate(tiny_models["llama"], [[], "none"], batch=2, prompt_tokens=8, n_predict=4,
                  repeats=1, baseline="llamacpp", progress=False)
    assert [(r["backend"], r["plugins"]) for r in rows] == [("torch", []), ("torch", []), ("llamacpp", [])]
    assert rows[0]["same_tokens"] is True and rows[1]["same_tokens"] is True
    assert rows[2]["same_tokens"] is None
    for r in rows:
        assert r["tok_s"] > 0 and r["ms_per_step"] > 0 and r["batch"] == 2
        assert abs(r["tok_s"] - 2 * 1000 / r["ms_per_step"]) < 1e-6 * r["tok_s"]


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
