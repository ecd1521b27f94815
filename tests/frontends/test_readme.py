"""The README's commands and Python example run as written."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_run_command():
    cmd = re.search(r"^\.venv/bin/pipellm (run -p .*)$", README, re.M).group(1)
    exe = shutil.which("pipellm") or str(Path(sys.executable).parent / "pipellm")
    r = subprocess.run(f"{exe} {cmd} --no-progress", shell=True, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "decode:" in r.stderr


def test_readme_python_example(capsys):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    code = code.replace("llm = LLM()", "llm = LLM(progress=False)")
    exec(compile(code, "README.md", "exec"), {})
    assert "Paris" in capsys.readouterr().out
