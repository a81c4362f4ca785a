"""Plugin loading: every strategy, built-in or third-party, arrives through the
``selbench`` entry-point group and the ``register_strategies`` hook."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import pluggy

from selbench import hookspecs
from selbench.embedders import Embedder, parse_spec
from selbench.errors import ConfigError, PluginError, UnknownMethodError
from selbench.strategy import Strategy

ENTRY_POINT_GROUP = "selbench"


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy (or embedder) and where it came from."""

    cls: type
    plugin: str  # the plugin module's name
    package: str  # the distribution that installed it, e.g. "selbench" or "my-plugin"
    version: str

    @property
    def name(self) -> str:
        return self.cls.name


class Registry:
    """Strategies registered by the loaded plugins, by name."""

    def __init__(self, plugin_manager: pluggy.PluginManager) -> None:
        self.plugin_manager = plugin_manager
        self._strategies: dict[str, StrategyInfo] = {}
        self._embedders: dict[str, StrategyInfo] = {}
        dist_of = {
            id(plugin): (dist.project_name, dist.version)
            for plugin, dist in plugin_manager.list_plugin_distinfo()
        }
        for hook in ("register_strategies", "register_embedders"):
            for impl in getattr(plugin_manager.hook, hook).get_hookimpls():
                package, version = dist_of.get(id(impl.plugin), (impl.plugin_name, ""))
                self._collect(hook, impl, package, version)

    def _collect(self, hook: str, impl: pluggy.HookImpl, package: str, version: str) -> None:
        plugin_name = getattr(impl.plugin, "__name__", impl.plugin_name)
        add = self._add if hook == "register_strategies" else self._add_embedder

        def register(cls: type) -> None:
            add(cls, plugin_name, package, version)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {plugin_name!r} (package {package!r}) failed in "
                f"{hook}: {type(exc).__name__}: {exc}"
            ) from exc

    def _add_embedder(self, cls: type, plugin: str, package: str, version: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Embedder)):
            raise PluginError(
                f"plugin {plugin!r} registered {cls!r}, which is not a selbench Embedder subclass"
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or ":" in name:
            raise PluginError(
                f"plugin {plugin!r} registered embedder {cls.__name__} without a name"
            )
        if name in self._embedders:
            other = self._embedders[name]
            raise PluginError(
                f"embedder name {name!r} is registered twice: by {other.plugin!r} and by {plugin!r}"
            )
        self._embedders[name] = StrategyInfo(cls, plugin, package, version)

    def embedder_infos(self) -> list[StrategyInfo]:
        return [self._embedders[n] for n in sorted(self._embedders)]

    def make_embedder(self, spec: str) -> Embedder:
        """An (unprepared) embedder from a spec such as ``proxy`` or ``open_clip:ARCH:PATH``."""
        name, args = parse_spec(spec)
        if name not in self._embedders:
            known = ", ".join(sorted(self._embedders)) or "none"
            raise ConfigError(f"unknown embedder {name!r} in {spec!r}; known embedders: {known}")
        return self._embedders[name].cls(args)

    def add_plugin(self, plugin: object, package: str = "local", version: str = "") -> None:
        """Register a plugin object or module in-process (tests, notebooks).

        Goes through the same hook as entry-point plugins, so it is what an installed
        plugin would do.
        """
        name = self.plugin_manager.register(plugin)
        for hook in ("register_strategies", "register_embedders"):
            for impl in getattr(self.plugin_manager.hook, hook).get_hookimpls():
                if impl.plugin_name == name:
                    self._collect(hook, impl, package, version)

    def _add(self, cls: type, plugin: str, package: str, version: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise PluginError(
                f"plugin {plugin!r} registered {cls!r}, which is not a selbench.Strategy subclass"
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered {cls.__name__} without a name")
        if name in self._strategies:
            other = self._strategies[name]
            raise PluginError(
                f"strategy name {name!r} is registered twice: by {other.plugin!r} "
                f"(package {other.package!r}) and by {plugin!r} (package {package!r})"
            )
        self._strategies[name] = StrategyInfo(cls, plugin, package, version)

    def names(self) -> list[str]:
        return sorted(self._strategies)

    def infos(self) -> list[StrategyInfo]:
        return [self._strategies[n] for n in self.names()]

    def get(self, name: str) -> StrategyInfo:
        try:
            return self._strategies[name]
        except KeyError:
            known = ", ".join(self.names()) or "none (is selbench installed?)"
            raise UnknownMethodError(f"unknown method {name!r}; known methods: {known}") from None


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with selbench's hookspecs and, by default, every installed plugin."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:
            raise PluginError(
                f"a plugin in entry-point group {ENTRY_POINT_GROUP!r} failed to import: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return pm


@cache
def get_registry() -> Registry:
    """The process-wide registry of installed strategies."""
    return Registry(make_plugin_manager())
