"""docs/serve.md's curl commands and openai-client example run as written, against a server on a
free port (a small random-weight model stands in for the default one, under the docs' alias)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.frontends.serve_harness import running_server, settings_from_flags

DOC = (Path(__file__).resolve().parents[2] / "docs" / "serve.md").read_text()
DOC_BASE = "http://127.0.0.1:8080"


@pytest.fixture(scope="module")
def base(tiny_models):
    flags = ["-m", tiny_models["llama"], "-np", "2", "-c", "256", "--alias", "smollm2"]
    with running_server(settings_from_flags(flags)) as (url, _):
        yield url


def test_every_flag_of_serve_is_in_the_doc():
    from pipellm_core.frontends.cli import build_parser
    parser = build_parser()
    serve = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["serve"]
    for action in serve._actions:
        if action.dest != "help":
            assert any(f"`{o}" in DOC or f"{o}`" in DOC for o in action.option_strings), action.option_strings


def test_curl_examples(base):
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", DOC, re.S) if b.startswith("curl")]
    assert len(blocks) == 4
    for block in blocks:
        r = subprocess.run(block.replace(DOC_BASE, base), shell=True, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        if '"stream": true' in block:
            events = [line for line in r.stdout.splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and len(events) > 3
            assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 32
        else:
            answer = json.loads(r.stdout)
            assert "error" not in answer, answer


def test_openai_client_example(base, capsys):
    code = re.search(r"```python\n(.*?)```", DOC, re.S).group(1)
    exec(compile(code.replace(DOC_BASE, base), "docs/serve.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip()
