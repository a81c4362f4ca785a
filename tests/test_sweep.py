"""selbench sweep: a grid of nested runs that resumes after a kill without redoing cells."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from e2e_helpers import make_tiny_pool, make_tiny_scale

from selbench import sweep as sw
from selbench import tracking
from selbench.cli import main
from selbench.errors import ConfigError, UnknownMethodError

EXPERIMENT = "sweep-test"


def grid(pool, scale):
    return sw.plan(
        ["random", "clip_score"],
        [0.25, 0.5],
        [0, 1],
        pool=str(pool),
        scale=str(scale),
        experiment=EXPERIMENT,
        full_pool=False,
    )


def runs_by_status():
    tracking.setup(EXPERIMENT)
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")
    cells = [r for r in runs if sw.CELL_TAG in r.data.tags]
    out: dict[str, list] = {}
    for run in cells:
        out.setdefault(run.info.status, []).append(run)
    return out


def test_plan_validates_names_and_budgets_before_running(tmp_path):
    with pytest.raises(UnknownMethodError, match="nope"):
        sw.plan(["random", "nope"], [0.25], [0])
    with pytest.raises(ConfigError, match="budget"):
        sw.plan(["random"], [1.7], [0])
    cells = sw.plan(["random"], [0.25, 0.5], [0, 1, 2])
    assert len(cells) == 2 * 3 + 3  # plus the full-pool reference for every seed
    assert len({c.key for c in cells}) == len(cells)


@pytest.mark.slow
def test_killed_sweep_resumes_only_the_missing_cells(tmp_path):
    pool, scale = make_tiny_pool(tmp_path), make_tiny_scale(tmp_path)
    cells = grid(pool, scale)
    assert len(cells) == 8
    command = [
        sys.executable, "-m", "selbench.cli", "sweep", "--methods", "random,clip_score",
        "--budgets", "0.25,0.5", "--seeds", "0,1", "--pool", str(pool), "--scale",
        str(scale), "--experiment", EXPERIMENT, "--no-full-pool",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    finished_before: list = []
    while time.time() < deadline and proc.poll() is None:
        finished_before = runs_by_status().get("FINISHED", [])
        if len(finished_before) >= 3:
            break
        time.sleep(0.3)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = runs_by_status().get("FINISHED", [])
    assert 3 <= len(finished_before) < 8
    before_ids = {r.data.tags[sw.CELL_TAG]: r.info.run_id for r in finished_before}

    ran = []
    result = sw.run_sweep(
        grid(pool, scale),
        EXPERIMENT,
        on_update=lambda cell, cells: ran.append(cell.key) if cell.status == "done" else None,
    )
    assert result.count("failed") == 0
    assert result.count("skipped") == len(before_ids)
    assert sorted(ran) == sorted({c.key for c in cells} - set(before_ids))
    by_status = runs_by_status()
    assert "RUNNING" not in by_status  # the run the kill interrupted is marked KILLED
    finished = by_status["FINISHED"]
    keys = [r.data.tags[sw.CELL_TAG] for r in finished]
    assert sorted(keys) == sorted(c.key for c in cells)  # one finished run per cell
    for run in finished:  # earlier cells kept their runs; every cell hangs off the parent
        key = run.data.tags[sw.CELL_TAG]
        if key in before_ids:
            assert run.info.run_id == before_ids[key]
        assert run.data.tags.get("mlflow.parentRunId") == result.parent_run_id

    # a finished sweep only looks its cells up
    def fail(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    original = sw.execute
    sw.execute = fail
    try:
        again = sw.run_sweep(grid(pool, scale), EXPERIMENT)
    finally:
        sw.execute = original
    assert again.count("skipped") == 8 and again.parent_run_id == result.parent_run_id

    # --leaderboard writes the table of exactly this sweep's runs, saying how it was made
    other = sw.plan(["random"], [0.25], [5], pool=str(pool), scale=str(scale),
                    experiment=EXPERIMENT, full_pool=False)  # fmt: skip
    sw.run_sweep(other, EXPERIMENT)  # a run outside the grid, in the same experiment
    out = tmp_path / "boards"
    sw.execute = fail
    try:
        cli = CliRunner().invoke(main, [*command[3:], "--leaderboard", "grid", "--out", str(out)])
    finally:
        sw.execute = original
    assert cli.exit_code == 0, cli.output
    page = (out / "grid.md").read_text()
    assert "Runs: 8 finished MLflow runs; seeds 0, 1." in page
    assert "Produced by `selbench sweep --methods random,clip_score --budgets 0.25,0.5" in page
    assert "8 cells" in page and "0 cells ran in it and 8 were already finished" in page
    assert len(pd.read_csv(out / "grid.csv")) == 4  # 2 methods x 2 budgets
    assert (out / "grid_budget.png").exists() and (out / "grid.html").exists()


@pytest.mark.slow
def test_failed_cells_are_recorded_and_retried(tmp_path, monkeypatch):
    pool, scale = make_tiny_pool(tmp_path), make_tiny_scale(tmp_path)
    cells = sw.plan(
        ["random"], [0.5], [0], pool=str(pool), scale=str(scale), experiment=EXPERIMENT,
        full_pool=False,
    )  # fmt: skip
    import selbench.runner as runner

    real = runner.train_clip

    def broken(*args, **kwargs):
        raise FloatingPointError("training loss became nan at step 0")

    monkeypatch.setattr(runner, "train_clip", broken)
    first = sw.run_sweep(cells, EXPERIMENT)
    assert first.count("failed") == 1 and "nan" in first.cells[0].error
    assert [r.info.status for r in runs_by_status().get("FAILED", [])] == ["FAILED"]
    monkeypatch.setattr(runner, "train_clip", real)
    second = sw.run_sweep(
        sw.plan(["random"], [0.5], [0], pool=str(pool), scale=str(scale),
                experiment=EXPERIMENT, full_pool=False),
        EXPERIMENT,
    )  # fmt: skip
    assert second.count("done") == 1
