"""Finding, selecting and tracing plugins, all through pluggy.

Installed plugins register under the entry-point group `pipellm`. A run enables only those it
names (`--plugins a,b`); the rest are blocked with `set_blocked`, so they never load. The core's
defaults are a plugin too, registered first, so that every other implementation runs before it.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import distributions

import pluggy

from pipellm_core.hooks import core_defaults as core_plugin

from pipellm_core.hooks import specs as hookspecs
from pipellm_core.errors import PluginError

ENTRY_POINT_GROUP = "pipellm"
TRACE_ENV = "PIPELLM_TRACE_HOOKS"
CORE_PLUGIN_NAME = "core"


def installed_plugins() -> dict[str, object]:
    """Entry-point name -> entry point, for every installed plugin.

    Walks every distribution the way pluggy's `load_setuptools_entrypoints` does (not
    `entry_points()`, which keeps one copy of a distribution found twice on the path), so the
    names listed here are exactly the ones pluggy would load.
    """
    found: dict[str, object] = {}
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                found.setdefault(ep.name, ep)
    return found


def parse_plugin_list(value) -> list[str]:
    """Plugin names from "a,b" or a list; "none" stands for no plugin."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    names = [str(v).strip() for v in value if str(v).strip() not in ("", "none")]
    return list(dict.fromkeys(names))


def make_plugin_manager(plugins=(), extra: tuple = ()) -> pluggy.PluginManager:
    """A manager with the core defaults and the named installed plugins (plus `extra` objects)."""
    wanted = parse_plugin_list(plugins)
    available = installed_plugins()
    unknown = [n for n in wanted if n not in available]
    if unknown:
        listing = ", ".join(sorted(available)) or "none"
        raise PluginError(f"unknown plugin {', '.join(map(repr, unknown))} (installed: {listing})")
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    pm.register(core_plugin, name=CORE_PLUGIN_NAME)
    for name in available:
        if name not in wanted:
            pm.set_blocked(name)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for obj in extra:
        pm.register(obj)
    if os.environ.get(TRACE_ENV):
        enable_tracing(pm)
    return pm


def enable_tracing(pm: pluggy.PluginManager, stream=None) -> None:
    """Print every hook call, the plugins it reaches and what it returns."""
    out = stream or sys.stderr

    def before(hook_name, hook_impls, kwargs):
        names = [impl.plugin_name for impl in hook_impls]
        args = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items())
        print(f"[pipellm hook] {hook_name}({args}) -> {names}", file=out)

    def after(outcome, hook_name, hook_impls, kwargs):
        try:
            result = outcome.get_result()
        except BaseException as e:  # the exception propagates to the caller anyway
            result = f"raised {type(e).__name__}"
        print(f"[pipellm hook] {hook_name} returned {_short(result)}", file=out)

    pm.add_hookcall_monitoring(before, after)


def _short(value) -> str:
    text = type(value).__name__ if hasattr(value, "__dict__") and not isinstance(value, type) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_plugins() -> list[dict]:
    """Every installed plugin: name, distribution, version and the hooks it implements."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    pm.register(core_plugin, name=CORE_PLUGIN_NAME)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    dists = {plugin: dist for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda x: (x[0] != CORE_PLUGIN_NAME, x[0])):
        dist = dists.get(plugin)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        out.append({
            "name": name,
            "hooks": hooks,
            "distribution": dist.project_name if dist else "pipellm",
            "version": dist.version if dist else _own_version(),
            "builtin": name == CORE_PLUGIN_NAME or (dist is not None and dist.project_name == "pipellm"),
        })
    return out


def _own_version() -> str:
    from pipellm_core import __version__
    return __version__
