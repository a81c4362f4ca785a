import os
import subprocess
import sys
import types

import pytest

import selbench
from selbench.errors import PluginError, UnknownMethodError
from selbench.registry import Registry, get_registry, make_plugin_manager


def test_builtin_random_is_loaded_through_the_entry_point():
    info = get_registry().get("random")
    assert info.package == "selbench"
    assert info.plugin == "selbench_plugins.random_strategy"


def test_core_does_not_import_strategies_by_name():
    import pathlib

    core = pathlib.Path(selbench.__file__).parent
    for path in core.rglob("*.py"):
        assert "selbench_plugins" not in path.read_text(), path


def test_unknown_method_lists_known_ones():
    with pytest.raises(UnknownMethodError, match="unknown method 'nope'.*random"):
        get_registry().get("nope")


def _plugin(*classes):
    module = types.ModuleType("fake_plugin")

    @selbench.hookimpl
    def register_strategies(register):
        for cls in classes:
            register(cls)

    module.register_strategies = register_strategies
    return module


class Mine(selbench.Strategy):
    name = "mine"

    def select(self, ctx):
        return selbench.Selection(uids=list(ctx.pool.uids)[: ctx.budget_count])


def test_add_plugin_registers_through_the_hook():
    registry = Registry(make_plugin_manager(load_entry_points=False))
    registry.add_plugin(_plugin(Mine), package="my-pkg", version="1.2")
    info = registry.get("mine")
    assert (info.package, info.version, info.cls) == ("my-pkg", "1.2", Mine)


def test_duplicate_strategy_names_are_an_error_naming_both():
    class Random2(Mine):
        name = "random"

    registry = Registry(make_plugin_manager())
    with pytest.raises(PluginError, match="registered twice.*selbench_plugins.random_strategy"):
        registry.add_plugin(_plugin(Random2), package="other")


def test_registering_a_non_strategy_is_an_error():
    registry = Registry(make_plugin_manager(load_entry_points=False))
    with pytest.raises(PluginError, match="not a selbench.Strategy"):
        registry.add_plugin(_plugin(dict))


def test_unknown_needs_are_refused_at_registration():
    class Greedy(Mine):
        name = "greedy"
        needs = frozenset({"embeddings", "gpu"})

    registry = Registry(make_plugin_manager(load_entry_points=False))
    with pytest.raises(PluginError, match=r"'greedy'.*unknown needs \['gpu'\].*embeddings"):
        registry.add_plugin(_plugin(Greedy))
    assert "greedy" not in registry.names()


def test_a_plugin_registers_all_or_nothing():
    class Good(Mine):
        name = "good"

    registry = Registry(make_plugin_manager(load_entry_points=False))
    with pytest.raises(PluginError):
        registry.add_plugin(_plugin(Good, dict))
    assert "good" not in registry.names()


def test_needs_are_enforced_at_run_time(tmp_path):
    from selbench.errors import UndeclaredNeedError
    from selbench.strategy import SelectionContext
    from selbench.testing import RecordingServices, make_memory_pool

    class Sneaky(Mine):
        name = "sneaky"
        needs = frozenset({"embeddings"})

        def select(self, ctx):
            ctx.embeddings()
            ctx.target()
            return super().select(ctx)

    pool = make_memory_pool(20)
    services = RecordingServices(pool)
    ctx = SelectionContext(
        pool, 5, 0.25, 0, "cpu", tmp_path, services=services, strategy="sneaky",
        needs=Sneaky.needs,
    )  # fmt: skip
    with pytest.raises(UndeclaredNeedError, match=r"'sneaky' called ctx.target\(\) without "):
        Sneaky().select(ctx)
    assert services.used == {"embeddings"}  # refused before the target was loaded


def test_every_builtin_plugin_loads_without_faiss(tmp_path):
    # The GPU check's machine has no faiss (docs/gpu-check.md): a plugin that imported it
    # at module level would be recorded as broken there. faiss is imported where used.
    blocked = tmp_path / "faiss"
    blocked.mkdir()
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError('no faiss', name='faiss')\n")
    code = (
        "from selbench.registry import get_registry\n"
        "r = get_registry()\n"
        "print([(b.entry_point, b.error) for b in r.broken])\n"
        "assert not r.broken\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
