"""A plugin that fails to import is listed as broken; only a run that asks for it fails."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from selbench.errors import PluginError, UnknownMethodError
from selbench.registry import Registry, make_plugin_manager

SELBENCH = [sys.executable, "-m", "selbench.cli"]


@pytest.fixture
def broken_site(tmp_path, monkeypatch):
    """An installed distribution (dist-info with an entry point, as pip writes it) whose
    plugin module raises ImportError; on sys.path here and on PYTHONPATH for commands."""
    site = tmp_path / "site"
    info = site / "selbench_broken_plugin-0.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: selbench-broken-plugin\nVersion: 0.2\n"
    )
    (info / "entry_points.txt").write_text("[selbench]\nbroken_method = selbench_broken_plugin\n")
    (site / "selbench_broken_plugin.py").write_text(
        "raise ImportError('selbench_broken_plugin needs libfoo, which is not installed')\n"
    )
    monkeypatch.syspath_prepend(str(site))
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, COLUMNS="250")


def test_registry_records_the_broken_plugin_and_loads_the_rest(broken_site):
    registry = Registry(make_plugin_manager())
    assert "random" in registry.names()
    (broken,) = [b for b in registry.broken if b.entry_point == "broken_method"]
    assert broken.package == "selbench-broken-plugin" and broken.version == "0.2"
    assert broken.module == "selbench_broken_plugin"
    assert broken.error.startswith("ImportError: selbench_broken_plugin needs libfoo")
    with pytest.raises(PluginError, match="selbench_broken_plugin.*failed to load.*libfoo"):
        registry.get("broken_method")
    with pytest.raises(UnknownMethodError, match="broken plugins.*broken_method"):
        registry.get("nope")


def test_a_plugin_whose_hook_raises_is_broken_too():
    import types

    import selbench

    module = types.ModuleType("raising_plugin")

    @selbench.hookimpl
    def register_strategies(register):
        raise RuntimeError("boom")

    module.register_strategies = register_strategies
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(module, name="raising")
    registry = Registry(pm)
    (broken,) = registry.broken
    assert broken.entry_point == "raising" and "RuntimeError: boom" in broken.error


def test_methods_lists_the_broken_plugin_with_package_and_error(broken_site):
    done = subprocess.run(
        SELBENCH + ["methods"], env=broken_site, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    heading = lines.index("Broken plugins (not loaded; a run asking for them fails)")
    (broken,) = [line for line in lines[heading + 1 :] if line.startswith("  broken_method")]
    assert "selbench-broken-plugin 0.2: ImportError:" in broken and "needs libfoo" in broken
    assert any(line.split()[:2] == ["random", "chooser"] for line in lines)
    # at 80 columns the line is cut; `selbench methods NAME` gives the whole error
    narrow = dict(broken_site, COLUMNS="80")
    done = subprocess.run(
        SELBENCH + ["methods", "broken_method"],
        env=narrow,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "module: selbench_broken_plugin" in done.stdout
    assert "needs libfoo, which is not installed" in " ".join(done.stdout.split())


def test_a_run_asking_for_the_broken_plugin_fails_with_its_error(broken_site, tmp_path):
    env = dict(broken_site, SELBENCH_HOME=str(tmp_path / "home"))
    done = subprocess.run(
        SELBENCH + ["run", "--method", "broken_method", "--budget", "0.25"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "needs libfoo" in done.stderr + done.stdout


@pytest.mark.slow
def test_run_random_works_with_a_broken_plugin_installed(broken_site, tiny, tmp_path):
    pool, scale = tiny
    env = dict(broken_site, SELBENCH_HOME=str(tmp_path / "home"))
    done = subprocess.run(
        SELBENCH
        + ["run", "--method", "random", "--budget", "0.25", "--pool", str(pool)]
        + ["--scale", str(scale)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "zero-shot top-1" in done.stdout
