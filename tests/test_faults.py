"""Faults: a strategy that calls sys.exit(), a disk that fills while the embedding cache or
the selection is written. Each ends in a clear error, leaves nothing half-written, and the
next command redoes the work (docs/reliability.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from e2e_helpers import logged_runs

import selbench
from selbench import tracking
from selbench.cache import EmbeddingCache
from selbench.cli import main
from selbench.registry import Registry, make_plugin_manager
from selbench.run.selection_io import selection_path
from selbench.rundir import RunDir

HERE = Path(__file__).parent
EXPERIMENT = "faults"


def _temporary_files(root: Path) -> list[Path]:
    """Files and folders a writer leaves when it stops halfway."""
    patterns = ("*.tmp", ".tmp-*", "*.partial/chunk-*")
    return sorted(p for pattern in patterns for p in root.rglob(pattern))


# -- a strategy calling sys.exit() ------------------------------------------------------
class ExitsInSelect(selbench.Strategy):
    name = "exits_in_select"

    def select(self, ctx):
        sys.exit()


class ExitsWhenBuilt(selbench.Strategy):
    name = "exits_when_built"

    def __init__(self, params=None):
        sys.exit("cannot start")

    def select(self, ctx):  # pragma: no cover - never reached
        raise AssertionError


@pytest.fixture
def exiting_plugins(monkeypatch):
    module = types.ModuleType("exiting_plugin")

    @selbench.hookimpl
    def register_strategies(register):
        for strategy in (ExitsInSelect, ExitsWhenBuilt):
            register(strategy)

    module.register_strategies = register_strategies
    registry = Registry(make_plugin_manager())
    registry.add_plugin(module, package="exiting-plugin", version="0.0.1")
    monkeypatch.setattr("selbench.run.stages.get_registry", lambda: registry)
    monkeypatch.setattr("selbench.run.plan.get_registry", lambda: registry)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, call",
    [
        ("exits_in_select", "sys.exit(None)"),
        ("exits_when_built", "sys.exit('cannot start')"),
    ],
)
def test_a_strategy_calling_sys_exit_fails_its_run_with_an_error_naming_it(
    tiny, exiting_plugins, method, call
):
    pool, scale = tiny
    result = CliRunner().invoke(
        main,
        ["run", "-m", method, "-b", "0.25", "--pool", str(pool), "--scale", str(scale)]
        + ["--experiment", EXPERIMENT],
    )
    assert result.exit_code == 1
    assert f"error: strategy {method!r} (package 'exiting-plugin') called {call}" in result.output
    (found,) = logged_runs(EXPERIMENT)
    assert found.info.status == "FAILED"
    assert call in found.data.tags["selbench.error"]


# -- a disk that fills up -----------------------------------------------------------------
def _driven(point: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(HERE / "fault_driver.py"), point, *args]
    env = dict(os.environ, COLUMNS="300")
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="300")
    return subprocess.run(
        [sys.executable, "-m", "selbench.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from selbench.train import build_model

    model, _, _ = build_model("selbench-tiny", seed=11)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_a_full_disk_while_the_cache_is_written_is_a_clear_error_then_recomputed(tiny, weights):
    pool, _ = tiny
    args = ["embed", "--pool", str(pool), "--embedder", f"open_clip:selbench-tiny:{weights}"]
    args += ["--chunk-size", "64"]
    full = _driven("cache", *args)
    assert full.returncode == 1, full.stderr[-2000:]
    assert "cannot write embedding cache chunk" in full.stderr
    assert "file size limit" in full.stderr and "Traceback" not in full.stderr
    cache_root = Path(os.environ["SELBENCH_HOME"]) / "embeddings"
    assert [e["status"] for e in EmbeddingCache(cache_root).ls()] in ([], ["partial"])
    assert _temporary_files(cache_root) == []  # no torn chunk, no temporary file

    again = _cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [e["status"] for e in EmbeddingCache(cache_root).ls()] == ["complete"]
    assert _temporary_files(cache_root) == []


@pytest.mark.slow
def test_a_full_disk_while_the_selection_is_written_fails_the_run_and_resume_redoes_it(tiny):
    pool, scale = tiny
    args = ["run", "-m", "random", "-b", "0.25", "--pool", str(pool), "--scale", str(scale)]
    args += ["--experiment", EXPERIMENT, "--stage", "select"]
    full = _driven("selection", *args)
    assert full.returncode == 1, full.stderr[-2000:]
    assert "cannot write the selection" in full.stderr and "Traceback" not in full.stderr
    (found,) = logged_runs(EXPERIMENT)
    assert found.info.status == "FAILED"
    assert "cannot write the selection" in found.data.tags["selbench.error"]
    rundir = RunDir.for_run(found.info.run_id)
    assert not selection_path(rundir).exists() and "select" not in rundir.stages()
    assert _temporary_files(rundir.root) == []

    again = _cli(
        "run", "--resume", found.info.run_id, "--stage", "select", "--experiment", EXPERIMENT
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert selection_path(rundir).is_file() and "select" in rundir.stages()
    (found,) = logged_runs(EXPERIMENT)
    assert found.info.status == "SCHEDULED"


@pytest.mark.parametrize("store_named_by_user", [False, True])
def test_artifacts_stay_beside_the_store_not_in_the_current_directory(
    tmp_path, monkeypatch, store_named_by_user
):
    """mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI in the environment, which made
    selbench think the user had chosen a store, so experiments kept their artifacts in
    ./mlruns of whatever directory a command ran in, outside the home. A sqlite store the
    user does name (MLFLOW_TRACKING_URI) keeps them beside it too: an experiment created
    from a git worktree lost every run's selection.parquet when the worktree went."""
    store = Path(os.environ["SELBENCH_HOME"]) / "runs"
    if store_named_by_user:
        store = tmp_path / "store"
        store.mkdir()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    workdir = tmp_path / "somewhere"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    recorder = tracking.Recorder("artifacts-here")
    note = tmp_path / "note.txt"
    note.write_text("kept with the run")
    recorder.start("artifact-test")
    recorder.artifact(note)
    recorder.finish()
    assert list(workdir.iterdir()) == []
    assert list((store / "artifacts").rglob("note.txt"))
