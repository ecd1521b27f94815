"""The plugin machinery: hook specs, selection by name, entry points, listing and tracing."""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipellm_core import hookimpl
from pipellm_core.hooks import specs as hookspecs
from pipellm_core.errors import PluginError
from pipellm_core.hooks.manager import make_plugin_manager

ROOT = Path(__file__).resolve().parents[2]
HOOKS = sorted(n for n, f in vars(hookspecs).items()
               if inspect.isfunction(f) and hasattr(f, "pipellm_spec"))


def test_the_hooks_exist():
    assert HOOKS == ["before_layer", "begin_pass", "capture", "check_plan", "decode", "layer_weights",
                     "load", "prefetch", "schedule", "setup"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    doc = (ROOT / "docs" / "hooks.md").read_text()
    assert re.search(rf"^## `{hook}\(", doc, re.M), f"docs/hooks.md lacks a section for {hook}"
    spec = getattr(hookspecs, hook)
    assert spec.__doc__ and len(spec.__doc__.strip()) > 40
    for param in inspect.signature(spec).parameters:
        assert f"`{param}`" in doc.split(f"## `{hook}(")[1].split("\n## ")[0], (hook, param)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_named_test(hook):
    """`tests/hooks/test_hook_contracts.py` has `test_hook_<name>`, and that test implements the
    hook itself (a plugin elsewhere that implements every hook does not count)."""
    from tests.hooks import test_hook_contracts as contracts
    test = getattr(contracts, f"test_hook_{hook}", None)
    assert inspect.isfunction(test), f"no test_hook_{hook} in tests/hooks/test_hook_contracts.py"
    assert re.search(rf"def {hook}\(", inspect.getsource(test)), f"test_hook_{hook} does not implement {hook}"


def test_unknown_plugin_lists_installed():
    with pytest.raises(PluginError, match=r"unknown plugin 'nope' \(installed: "):
        make_plugin_manager(["nope"])


# --- hook tests: a recording plugin that implements every hook ------------------------

class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def load(self, plan, config, engine):
        self.calls.append(("load", config.n_layers))
        plan.head_device = "cpu"

    @hookimpl
    def capture(self, engine):
        self.calls.append(("capture", engine.config.arch))

    @hookimpl
    def prefetch(self, engine, layer):
        self.calls.append(("prefetch", layer))

    @hookimpl
    def schedule(self, engine, batch):
        self.calls.append(("schedule", len(batch)))  # returns None: the core answers

    @hookimpl
    def decode(self, engine, stage, batch, hidden):
        self.calls.append(("decode", stage))
        return None


def test_hooks_are_called_in_order(tiny_models):
    from pipellm_core.runtime.engine import Engine
    from pipellm_core.runtime.request import Request
    from pipellm_core.runtime.sampling import SamplingParams

    rec = Recorder()
    engine = Engine(tiny_models["llama"], extra_plugins=(rec,), progress=False)
    assert rec.calls[:2] == [("load", 2), ("capture", "llama")]
    req = Request(engine.tokenizer.encode("Hello"), 3, SamplingParams(temperature=0))
    list(engine.generate([req]))
    names = [c[0] for c in rec.calls[2:]]
    assert names[0] == "schedule"  # the engine asks once how many groups to keep in flight
    assert names[1:3] == ["prefetch", "prefetch"]  # prefill: both layers
    assert names[3:7] == ["schedule", "decode", "prefetch", "prefetch"]
    assert ("prefetch", 1) in rec.calls


class ZeroLogits:
    """A decode hook that wins over the core's and changes what is generated."""

    @hookimpl
    def decode(self, engine, stage, batch, hidden):
        import torch
        logits = torch.full((len(batch), engine.config.vocab_size), -1e9)
        logits[:, 42] = 0
        return logits


def test_first_decode_result_wins(tiny_models):
    from pipellm_core.runtime.engine import Engine
    from pipellm_core.runtime.request import Request
    from pipellm_core.runtime.sampling import SamplingParams

    engine = Engine(tiny_models["llama"], extra_plugins=(ZeroLogits(),), progress=False)
    req = Request(engine.tokenizer.encode("Hello"), 4, SamplingParams(temperature=0))
    tokens = [t for _, t in engine.generate([req])]
    assert tokens[1:] == [42, 42, 42]  # the first token comes from prefill, the rest from the hook


def _install_fake_plugin(tmp_path: Path) -> dict:
    """An installed distribution with a `pipellm` entry point, found through PYTHONPATH."""
    (tmp_path / "pipellm_counter.py").write_text(
        "from pipellm_core import hookimpl\n"
        "CALLS = []\n"
        "@hookimpl\n"
        "def prefetch(engine, layer):\n"
        "    CALLS.append(layer)\n")
    dist = tmp_path / "pipellm_counter-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pipellm-counter\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[pipellm]\ncounter = pipellm_counter\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    return env


def test_plugins_json_lists_installed_plugins(tmp_path):
    env = _install_fake_plugin(tmp_path)
    out = subprocess.run([sys.executable, "-m", "pipellm_core.frontends.cli", "plugins", "--json"],
                         capture_output=True, text=True, env=env, check=True).stdout
    plugins = {p["name"]: p for p in json.loads(out)}
    assert plugins["counter"]["hooks"] == ["prefetch"]
    assert plugins["counter"]["distribution"] == "pipellm-counter"
    assert plugins["counter"]["version"] == "1.2.3"
    assert set(plugins["core"]["hooks"]) == {"load", "layer_weights", "schedule", "decode"}


def test_entry_point_plugin_runs_only_when_selected(tmp_path, tiny_models):
    env = _install_fake_plugin(tmp_path)
    code = (
        "import sys, pipellm_counter\n"
        "from pipellm_core.frontends.llm import LLM\n"
        "llm = LLM(sys.argv[1], plugins=sys.argv[2], progress=False)\n"
        "llm.create_completion('Hi', max_tokens=2, temperature=0)\n"
        "print(len(pipellm_counter.CALLS))\n")
    on = subprocess.run([sys.executable, "-c", code, tiny_models["llama"], "counter"],
                        capture_output=True, text=True, env=env, check=True).stdout
    off = subprocess.run([sys.executable, "-c", code, tiny_models["llama"], ""],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert int(on.split()[-1]) == 4  # 2 layers x (prefill + 1 decode step)
    assert int(off.split()[-1]) == 0


def test_trace_env_prints_hook_calls(tiny_models):
    env = dict(os.environ, PIPELLM_TRACE_HOOKS="1")
    r = subprocess.run([sys.executable, "-m", "pipellm_core.frontends.cli", "run", "-m", tiny_models["llama"],
                        "-p", "Hi", "-n", "2", "--temp", "0", "--no-progress"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    for hook in ("load", "check_plan", "setup", "capture", "begin_pass", "before_layer", "prefetch",
                 "layer_weights", "schedule", "decode"):
        assert f"[pipellm hook] {hook}(" in r.stderr
