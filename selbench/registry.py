"""Plugin loading: every strategy, built-in or third-party, arrives through the
``selbench`` entry-point group and the ``register_strategies`` hook (online strategies,
which choose each training batch, through ``register_online_strategies``).

A plugin that fails to import, or whose hook raises or registers something invalid, is
recorded as broken (:class:`BrokenPlugin`, listed by ``selbench methods``) instead of
breaking every command: only a run that asks for one of its methods fails, with its error.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from functools import cache
from typing import Generic, TypeVar

import pluggy

from selbench import hookspecs
from selbench.embedders import Embedder, parse_spec
from selbench.errors import ConfigError, PluginError, UnknownMethodError
from selbench.online.contract import OnlineStrategy
from selbench.strategy import Strategy, check_needs

ENTRY_POINT_GROUP = "selbench"

#: What a plugin registers: a strategy class or an embedder class.
Plugged = TypeVar("Plugged", Strategy, Embedder, OnlineStrategy)


@dataclass(frozen=True)
class StrategyInfo(Generic[Plugged]):
    """A registered strategy (or embedder) and where it came from."""

    cls: type[Plugged]
    plugin: str  # the plugin module's name
    package: str  # the distribution that installed it, e.g. "selbench" or "my-plugin"
    version: str

    @property
    def name(self) -> str:
        return self.cls.name


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be loaded or registered, and why."""

    entry_point: str  # the entry-point name (by convention the method it provides)
    module: str  # the entry point's target, e.g. "my_package.plugin"
    package: str
    version: str
    error: str  # "ImportError: No module named 'x'"


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, loading entry points one at a time so a broken one is recorded
    in :attr:`broken` while the others load."""

    def __init__(self) -> None:
        super().__init__(ENTRY_POINT_GROUP)
        self.add_hookspecs(hookspecs)
        self.broken: list[BrokenPlugin] = []
        self.distributions: dict[str, tuple[str, str]] = {}  # plugin name -> (package, version)

    def load_entry_points(self) -> None:
        """Import and register every plugin of the ``selbench`` entry-point group (the
        same walk as pluggy's ``load_setuptools_entrypoints``, with a failure recorded
        per plugin instead of raised)."""
        for dist in importlib.metadata.distributions():
            package, version = dist.metadata["name"] or "", dist.version or ""
            for entry in dist.entry_points:
                if entry.group != ENTRY_POINT_GROUP or self.get_plugin(entry.name):
                    continue
                if self.is_blocked(entry.name) or entry.name in self.distributions:
                    continue
                if any(b.entry_point == entry.name for b in self.broken):
                    continue  # the same distribution found twice on sys.path
                try:
                    plugin = entry.load()
                except Exception as exc:
                    self.broken.append(
                        BrokenPlugin(
                            entry.name,
                            entry.value,
                            package,
                            version,
                            f"{type(exc).__name__}: {exc}",
                        )
                    )
                    continue
                self.register(plugin, name=entry.name)
                self.distributions[entry.name] = (package, version)


class Registry:
    """Strategies registered by the loaded plugins, by name."""

    def __init__(self, plugin_manager: pluggy.PluginManager) -> None:
        self.plugin_manager = plugin_manager
        self._strategies: dict[str, StrategyInfo[Strategy]] = {}
        self._embedders: dict[str, StrategyInfo[Embedder]] = {}
        self._online: dict[str, StrategyInfo[OnlineStrategy]] = {}
        self.broken: list[BrokenPlugin] = list(getattr(plugin_manager, "broken", []))
        dists = getattr(plugin_manager, "distributions", {})
        for name, plugin in plugin_manager.list_name_plugin():
            if plugin is None:  # blocked
                continue
            package, version = dists.get(name, (name, ""))
            try:
                self._collect_plugin(name, package, version)
            except PluginError as exc:
                module = getattr(plugin, "__name__", name)
                self.broken.append(BrokenPlugin(name, module, package, version, str(exc)))

    def _collect_plugin(self, name: str, package: str, version: str) -> None:
        """Run the plugin's hooks and add what it registers, all or nothing."""
        found: list[tuple[str, type, str]] = []
        for hook in _ADDERS:
            for impl in getattr(self.plugin_manager.hook, hook).get_hookimpls():
                if impl.plugin_name == name:
                    plugin_name = getattr(impl.plugin, "__name__", impl.plugin_name)
                    found += [(hook, cls, plugin_name) for cls in _call(hook, impl, package)]
        before = dict(self._strategies), dict(self._embedders), dict(self._online)
        try:
            for hook, cls, plugin_name in found:
                getattr(self, _ADDERS[hook])(cls, plugin_name, package, version)
        except PluginError:
            self._strategies, self._embedders, self._online = before
            raise

    def _add_online(self, cls: type, plugin: str, package: str, version: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, OnlineStrategy)):
            raise PluginError(
                f"plugin {plugin!r} registered {cls!r} as an online strategy, which is not a "
                "selbench.online.OnlineStrategy subclass"
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or not _ONLINE_NAME.fullmatch(name):
            raise PluginError(
                f"plugin {plugin!r} registered online strategy {cls.__name__} without a "
                f"valid name ({name!r}: letters, digits, '_' and '-')"
            )
        if "ratio" not in getattr(cls.Params, "model_fields", {}):
            raise PluginError(
                f"online strategy {name!r} (plugin {plugin!r}): its Params has no `ratio` "
                "field; subclass selbench.online.OnlineParams"
            )
        _claim(self._online, "online strategy", StrategyInfo(cls, plugin, package, version))

    def online_names(self) -> list[str]:
        return sorted(self._online)

    def online_infos(self) -> list[StrategyInfo[OnlineStrategy]]:
        return [self._online[n] for n in self.online_names()]

    def get_online(self, name: str) -> StrategyInfo[OnlineStrategy]:
        """The online strategy registered as ``name``; UnknownMethodError listing the known
        ones (and saying so when ``name`` is an offline strategy)."""
        if name in self._online:
            return self._online[name]
        known = ", ".join(self.online_names()) or "none (is selbench installed?)"
        hint = (
            f"; {name!r} is an offline strategy: it selects before training "
            "(`--method`), not each batch"
            if name in self._strategies
            else ""
        )
        raise UnknownMethodError(
            f"unknown online method {name!r}; known online methods: {known}{hint}"
        )

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
        _claim(self._embedders, "embedder", StrategyInfo(cls, plugin, package, version))

    def embedder_infos(self) -> list[StrategyInfo[Embedder]]:
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
        if name is None:  # a blocked plugin: pluggy registered nothing
            return
        self._collect_plugin(name, package, version)

    def _add(self, cls: type, plugin: str, package: str, version: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise PluginError(
                f"plugin {plugin!r} registered {cls!r}, which is not a selbench.Strategy subclass"
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered {cls.__name__} without a name")
        check_needs(cls, plugin)
        _claim(self._strategies, "strategy", StrategyInfo(cls, plugin, package, version))

    def names(self) -> list[str]:
        return sorted(self._strategies)

    def infos(self) -> list[StrategyInfo[Strategy]]:
        return [self._strategies[n] for n in self.names()]

    def get(self, name: str) -> StrategyInfo[Strategy]:
        """The strategy registered as ``name``. Unknown: UnknownMethodError listing the known
        ones; provided by a broken plugin (its entry-point name): PluginError with its error."""
        try:
            return self._strategies[name]
        except KeyError:
            pass
        for broken in self.broken:
            if broken.entry_point == name:
                raise PluginError(
                    f"method {name!r} comes from plugin {broken.module!r} (package "
                    f"{broken.package!r} {broken.version}), which failed to load: {broken.error}"
                )
        known = ", ".join(self.names()) or "none (is selbench installed?)"
        message = f"unknown method {name!r}; known methods: {known}"
        if self.broken:
            message += "; broken plugins (see `selbench methods`): " + ", ".join(
                f"{b.entry_point} ({b.package})" for b in self.broken
            )
        raise UnknownMethodError(message)


def _claim(table: dict[str, StrategyInfo], kind: str, info: StrategyInfo) -> None:
    """Add ``info`` to ``table`` under its name; PluginError naming both plugins when
    another one registered that name first."""
    other = table.get(info.name)
    if other is not None:
        raise PluginError(
            f"{kind} name {info.name!r} is registered twice: by {other.plugin!r} (package "
            f"{other.package!r}) and by {info.plugin!r} (package {info.package!r})"
        )
    table[info.name] = info


#: Each hook and the Registry method that adds what it registers.
_ADDERS = {
    "register_strategies": "_add",
    "register_embedders": "_add_embedder",
    "register_online_strategies": "_add_online",
}
_ONLINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _call(hook: str, impl: pluggy.HookImpl, package: str) -> list[type]:
    """What one hook implementation registers; its exceptions as PluginError."""
    registered: list[type] = []
    plugin_name = getattr(impl.plugin, "__name__", impl.plugin_name)
    try:
        impl.function(register=registered.append)
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(
            f"plugin {plugin_name!r} (package {package!r}) failed in "
            f"{hook}: {type(exc).__name__}: {exc}"
        ) from exc
    return registered


def make_plugin_manager(load_entry_points: bool = True) -> PluginManager:
    """A plugin manager with selbench's hookspecs and, by default, every installed plugin
    (those that fail to import are in its ``broken`` list)."""
    pm = PluginManager()
    if load_entry_points:
        pm.load_entry_points()
    return pm


@cache
def get_registry() -> Registry:
    """The process-wide registry of installed strategies."""
    return Registry(make_plugin_manager())
