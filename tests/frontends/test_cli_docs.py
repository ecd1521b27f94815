"""docs/cli.md holds the current --help of every command (regenerate: python tests/frontends/test_cli_docs.py)."""

import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
COMMANDS = [[], ["run"], ["bench"], ["compare"], ["plugins"], ["serve"]]


def render() -> str:
    os.environ["COLUMNS"] = "100"
    from pipellm_core.frontends.cli import build_parser

    parts = ["# Command line\n\nGenerated from `--help`; `python tests/frontends/test_cli_docs.py` rewrites this file.\n"]
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for cmd in COMMANDS:
        p = subs[cmd[0]] if cmd else parser
        parts.append(f"## `pipellm {' '.join(cmd + ['--help'])}`\n\n```\n{p.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


def test_cli_doc_is_current():
    assert DOC.read_text() == render(), "docs/cli.md is stale: run python tests/frontends/test_cli_docs.py"


if __name__ == "__main__":
    sys.path.insert(0, str(DOC.parents[2]))
    DOC.write_text(render())
