"""The layering docs/architecture.md and docs/hooks.md describe, checked on the source: the model
package stands alone, plugins do not import each other, and plugins use only the documented slice
of the engine."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if p.is_dir() and p.name.startswith("pipellm_"))


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved within its package)."""
    tree = ast.parse(path.read_text())
    top = ROOT / "plugins" if (ROOT / "plugins") in path.parents else ROOT
    package = path.relative_to(top).parent.parts
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def test_the_model_imports_nothing_from_runtime_sim_or_front_ends():
    files = sorted((ROOT / "pipellm_core" / "model").rglob("*.py"))
    assert files
    for f in files:
        for name in imported_modules(f):
            for forbidden in ("pipellm_core.runtime", "pipellm_core.sim", "pipellm_core.frontends",
                              "pipellm_core.hooks", "pipellm_core.bench", "pipellm_core.llamacpp"):
                assert not name.startswith(forbidden), f"{f.relative_to(ROOT)} imports {name}"
            assert not name.startswith("pipellm_") or name.startswith("pipellm_core"), \
                f"{f.relative_to(ROOT)} imports the plugin {name}"


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_no_plugin_imports_another(plugin):
    others = {p.name for p in PLUGINS} - {plugin.name}
    for f in sorted(plugin.rglob("*.py")):
        for name in imported_modules(f):
            assert name.split(".")[0] not in others, f"{f.relative_to(ROOT)} imports {name}"
            assert not name.startswith("pipellm_core.sim"), f"{f.relative_to(ROOT)} reaches into the sim: {name}"


def documented_engine_slice() -> set[str]:
    doc = (ROOT / "docs" / "hooks.md").read_text()
    section = doc.split("## What a plugin sees of the engine")[1].split("\n## ")[0]
    return set(re.findall(r"`engine\.(\w+)", section))


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_plugins_use_only_the_documented_slice_of_the_engine(plugin):
    allowed = documented_engine_slice()
    assert {"platform", "plan", "config", "plugin_state"} <= allowed
    for f in sorted(plugin.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "engine" \
                    or isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "engine" and isinstance(node.value.value, ast.Name):
                assert node.attr in allowed, f"{f.relative_to(ROOT)} uses engine.{node.attr}, not in docs/hooks.md"


def test_the_slice_exists_on_the_engine():
    import inspect

    from pipellm_core.runtime.engine import Engine
    init = inspect.getsource(Engine.__init__)
    for name in documented_engine_slice():
        assert hasattr(Engine, name) or re.search(rf"self\.{name}\b[^(]", init), \
            f"docs/hooks.md names engine.{name}, which the Engine lacks"
