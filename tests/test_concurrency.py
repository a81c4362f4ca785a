"""Users sharing one machine: runs started at once on the same pool and home share one
embedding pass (one computes it, the other waits for it and loads it), and a sweep and a
leaderboard run side by side. Every command is a separate ``selbench`` process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from e2e_helpers import logged_runs

from selbench.cache import EmbeddingCache

pytestmark = pytest.mark.slow

EXPERIMENT = "together"


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    from selbench.train import build_model

    root = tmp_path_factory.mktemp("concurrency")
    model, _, _ = build_model("selbench-tiny", seed=3)
    weights = root / "tiny.pt"
    torch.save(model.state_dict(), weights)
    return *tiny, weights


def _start(home: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, SELBENCH_HOME=str(home), COLUMNS="300", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "selbench.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(*processes: subprocess.Popen) -> list[str]:
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]
        outputs.append(out)
    return outputs


def _run_args(setup, method: str, seed: int, *extra: str) -> list[str]:
    pool, scale, weights = setup
    return [
        "run", "-m", method, "-b", "0.5", "--seed", str(seed), "--pool", str(pool),
        "--scale", str(scale), "--experiment", EXPERIMENT,
        "-p", f"embedder=open_clip:selbench-tiny:{weights}", *extra,
    ]  # fmt: skip


def _embedding_hits(runs) -> list[str]:
    return sorted(
        value for r in runs for key, value in r.data.params.items() if key.endswith(".hit")
    )


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """The home the first test fills and the sweep-and-leaderboard test reads."""
    return tmp_path_factory.mktemp("home-shared")


def test_two_runs_of_one_method_at_once_share_one_embedding_pass(setup, shared_home):
    home = shared_home
    first = _start(home, *_run_args(setup, "clip_score", 0))
    second = _start(home, *_run_args(setup, "clip_score", 1))
    _finish(first, second)
    runs = logged_runs(EXPERIMENT, home)
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert _embedding_hits(runs) == ["False", "True"]  # one computed, the other loaded it
    entries = EmbeddingCache(home / "embeddings").ls()
    assert [e["status"] for e in entries] == ["complete"]


def test_two_methods_at_once_share_one_embedding_pass(setup, tmp_path_factory):
    home = tmp_path_factory.mktemp("home-different")
    first = _start(home, *_run_args(setup, "clip_score", 0, "--stage", "select"))
    second = _start(home, *_run_args(setup, "semdedup", 0, "--stage", "select"))
    _finish(first, second)
    runs = logged_runs(EXPERIMENT, home)
    assert sorted(r.data.params["method"] for r in runs) == ["clip_score", "semdedup"]
    assert [r.info.status for r in runs] == ["SCHEDULED", "SCHEDULED"]
    assert _embedding_hits(runs) == ["False", "True"]
    assert len(EmbeddingCache(home / "embeddings").ls()) == 1


def test_a_sweep_and_a_leaderboard_at_once(setup, shared_home, tmp_path):
    home = shared_home
    pool, scale, _ = setup
    out = tmp_path / "boards"
    if not (home / "runs").is_dir():  # run alone: the board needs a finished run to read
        _finish(_start(home, *_run_args(setup, "clip_score", 0)))
    sweep = _start(
        home, "sweep", "--methods", "random", "--budgets", "0.25", "--seeds", "0",
        "--no-full-pool", "--pool", str(pool), "--scale", str(scale),
        "--experiment", EXPERIMENT,
    )  # fmt: skip
    board = _start(home, "leaderboard", "--experiment", EXPERIMENT, "--out", str(out), "--no-plots")
    swept, _ = _finish(sweep, board)
    assert "1 ran" in swept
    assert (out / f"{EXPERIMENT}.md").is_file()
    runs = logged_runs(EXPERIMENT, home)
    statuses = {r.info.status for r in runs if "selbench.method" in r.data.tags}
    assert statuses == {"FINISHED"}
