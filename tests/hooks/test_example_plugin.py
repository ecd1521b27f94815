"""The example plugin package installs on its own and runs through its entry point."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_layer_timer_installs_and_runs(tmp_path, tiny_models):
    target, source = tmp_path / "site", tmp_path / "src"
    shutil.copytree(ROOT / "examples" / "pipellm-layer-timer", source)  # builds leave files behind
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)],
                   check=True, capture_output=True, timeout=600)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    listing = subprocess.run([sys.executable, "-m", "pipellm_core.frontends.cli", "plugins", "--json"],
                             capture_output=True, text=True, env=env, check=True).stdout
    plugin = {p["name"]: p for p in json.loads(listing)}["layer-timer"]
    assert plugin["distribution"] == "pipellm-layer-timer" and plugin["hooks"] == ["prefetch"]
    run = subprocess.run([sys.executable, "-m", "pipellm_core.frontends.cli", "run", "-m", tiny_models["llama"],
                          "--plugins", "layer-timer", "-p", "Hello", "-n", "3", "--temp", "0",
                          "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "layer-timer:" in run.stderr and "layer   0:" in run.stderr
    off = subprocess.run([sys.executable, "-m", "pipellm_core.frontends.cli", "run", "-m", tiny_models["llama"],
                          "-p", "Hello", "-n", "3", "--temp", "0", "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert "layer-timer:" not in off.stderr
