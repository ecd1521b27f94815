"""A plugin's settings, read from `Engine.plugin_options` ("plugin.key" = value) and checked
against the keys the plugin knows, so that a typo is an error instead of a silent default."""

from __future__ import annotations

from pipellm_core.errors import PluginError


class PluginOptions:
    def __init__(self, engine, plugin: str, known: tuple[str, ...]):
        self.plugin = plugin
        prefix = plugin + "."
        self.values = {k[len(prefix):]: v for k, v in engine.plugin_options.items() if k.startswith(prefix)}
        unknown = sorted(set(self.values) - set(known))
        if unknown:
            raise PluginError(f"{plugin}: unknown option {prefix}{unknown[0]} "
                              f"(known: {', '.join(prefix + k for k in known)})")

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    def integer(self, key: str, default: int | None = None) -> int | None:
        """A whole number; "auto" or absent gives `default`."""
        value = self.values.get(key)
        if value is None or value == "auto":
            return default
        try:
            return int(value)
        except (TypeError, ValueError):
            raise PluginError(f"{self.plugin}.{key} takes a whole number, got {value!r}") from None
