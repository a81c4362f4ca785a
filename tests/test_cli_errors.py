"""Bad input gets a clear error naming the thing at fault and leaves no run RUNNING."""

from __future__ import annotations

import types

import mlflow
import pytest
from click.testing import CliRunner

import selbench
from selbench import tracking
from selbench.cli import main
from selbench.registry import Registry, make_plugin_manager


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_unknown_method_lists_the_known_ones():
    result = invoke("run", "--method", "nope", "--budget", "0.25")
    assert result.exit_code != 0
    assert "unknown method 'nope'" in result.output and "random" in result.output


@pytest.mark.parametrize("budget", ["1.7", "0", "-0.5"])
def test_budget_outside_the_unit_interval_is_refused(budget):
    result = invoke("run", "--method", "random", "--budget", budget)
    assert result.exit_code != 0
    assert "--budget" in result.output and "(0, 1]" in result.output


def test_missing_pool_path_is_named(tmp_path):
    missing = tmp_path / "no-such-pool"
    result = invoke("run", "--method", "random", "--budget", "0.25", "--pool", f"{missing}/")
    assert result.exit_code != 0
    assert "no-such-pool" in result.output


def test_corrupt_shard_is_named_and_refused_with_strict(tiny, tmp_path):
    """--strict refuses a pool with a cut shard, naming it (by default the shard is left
    out: tests/test_corrupt_shards.py)."""
    import shutil

    pool, scale = tiny
    broken = tmp_path / "broken"
    shutil.copytree(pool, broken)
    shard = broken / "pool" / "00001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    result = invoke(
        "run",
        "--method",
        "random",
        "--budget",
        "0.25",
        "--pool",
        str(broken),
        "--scale",
        str(scale),
        "--strict",
    )
    assert result.exit_code != 0
    assert "00001.tar" in result.output


def test_bad_strategy_parameter_is_named(tiny):
    pool, scale = tiny
    result = invoke(
        "run", "--method", "random", "--budget", "0.25", "-p", "k=1", "--pool", str(pool)
    )
    assert result.exit_code != 0 and "random" in result.output and "k" in result.output


class Raises(selbench.Strategy):
    name = "raises"

    def select(self, ctx):
        raise RuntimeError("boom in select")


class Duplicates(selbench.Strategy):
    name = "dupes"

    def select(self, ctx):
        return selbench.Selection(uids=[ctx.pool.uids[0]] * ctx.budget_count)


@pytest.fixture
def bad_plugins(monkeypatch):
    module = types.ModuleType("bad_plugin")

    @selbench.hookimpl
    def register_strategies(register):
        register(Raises)
        register(Duplicates)

    module.register_strategies = register_strategies
    registry = Registry(make_plugin_manager())
    registry.add_plugin(module, package="bad-plugin", version="0.0.1")
    monkeypatch.setattr("selbench.run.stages.get_registry", lambda: registry)
    monkeypatch.setattr("selbench.run.plan.get_registry", lambda: registry)


@pytest.mark.slow
@pytest.mark.parametrize("method, message", [("raises", "boom in select"), ("dupes", "duplicate")])
def test_failing_plugin_marks_the_run_failed(tiny, bad_plugins, method, message):
    pool, scale = tiny
    result = invoke(
        "run", "--method", method, "--budget", "0.25", "--pool", str(pool), "--scale", str(scale)
    )
    assert result.exit_code != 0
    assert message in result.output and repr(method) in result.output
    tracking.setup()
    runs = mlflow.search_runs(experiment_names=["selbench"])
    assert runs["status"].tolist() == ["FAILED"]
    assert message in runs["tags.selbench.error"].iloc[0]


class Interrupted(selbench.Strategy):
    name = "interrupted"

    def select(self, ctx):
        raise KeyboardInterrupt


@pytest.mark.slow
def test_ctrl_c_during_a_run_marks_it_killed_not_running(tiny, monkeypatch):
    from selbench.run.lifecycle import execute
    from selbench.run.spec import RunRequest

    module = types.ModuleType("interrupting_plugin")

    @selbench.hookimpl
    def register_strategies(register):
        register(Interrupted)

    module.register_strategies = register_strategies
    registry = Registry(make_plugin_manager())
    registry.add_plugin(module)
    monkeypatch.setattr("selbench.run.stages.get_registry", lambda: registry)
    monkeypatch.setattr("selbench.run.plan.get_registry", lambda: registry)
    pool, scale = tiny
    with pytest.raises(KeyboardInterrupt):
        execute(RunRequest(method="interrupted", budget=0.25, pool=str(pool), scale=str(scale)))
    tracking.setup()
    runs = mlflow.search_runs(experiment_names=["selbench"])
    assert runs["status"].tolist() == ["KILLED"]
