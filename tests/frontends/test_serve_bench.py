"""benchmarks/serve_bench.py's clients against a `pipellm serve` on a small model: every request
answered, its tokens counted, a time to first token for each."""

import sys
from pathlib import Path

from tests.frontends.serve_harness import running_server, settings_from_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from serve_bench import markdown_rows, percentile, run_clients  # noqa: E402


def test_percentile():
    assert percentile([3.0], 99) == 3.0
    assert percentile([float(v) for v in range(1, 101)], 99) == 99.0
    assert percentile([1.0, 2.0], 50) == 1.0


def test_clients_against_pipellm_serve(tiny_models):
    flags = ["-m", tiny_models["llama"], "-np", "2", "-c", "256"]
    with running_server(settings_from_flags(flags)) as (url, _):
        row = run_clients(f"{url}/v1", 2, requests=2, prompt_tokens=16, max_tokens=8, warmup_tokens=2)
    assert (row["requests"], row["failed"], row["errors"]) == (4, 0, [])
    assert 0 < row["tokens_per_request"] <= 8 and row["generated_tokens"] == row["tokens_per_request"] * 4
    assert 0 < row["ttft_median_ms"] <= row["ttft_p99_ms"]
    assert markdown_rows([row])[-1].startswith("| - | - | 2 |")
