"""Staged runs: select -> materialize -> train -> evaluate, each resumable, one MLflow run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from e2e_helpers import TINY_SCALE, logged_runs

from selbench import tracking
from selbench.errors import SelbenchError
from selbench.run.lifecycle import execute, reap_stale_runs, resume
from selbench.run.selection_io import selection_path
from selbench.run.spec import RunRequest, selection_hash
from selbench.rundir import RunBusyError, RunDir

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
EXPERIMENT = "stages"


@pytest.fixture(scope="module")
def tiny(tiny_pool, tmp_path_factory):
    """conftest's tiny pool with a scale of this module's own (it overrides ``tiny``)."""
    scale = tmp_path_factory.mktemp("stages") / "stages-tiny.yaml"
    # Small shards so that materialize writes several; 4 checkpoints for the open_clip engine.
    scale.write_text(TINY_SCALE + "shard_size: 20\nnum_checkpoints: 4\nepochs: 3\n")
    return tiny_pool, scale


def _cli(*args, driver: str | None = None, timeout=900):
    if driver:
        command = [sys.executable, str(HERE / "kill_driver.py"), driver, *args]
    else:
        command = [sys.executable, "-m", "selbench.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _request(tiny, **kw):
    pool, scale = tiny
    base = dict(method="random", budget=0.25, pool=str(pool), scale=str(scale))
    return RunRequest(experiment=EXPERIMENT, **{**base, **kw})


def test_select_stage_alone_then_resume_in_steps(tiny):
    first = execute(_request(tiny, seed=1), stages=["select"])
    assert first.next_stage == "materialize" and first.stages_run == ["select"]
    (found,) = logged_runs(EXPERIMENT)
    assert found.info.status == "SCHEDULED"
    assert found.data.tags["selbench.next_stage"] == "materialize"
    with pytest.raises(SelbenchError, match="needs stage 'materialize' first"):
        resume(first.run_id, ["train"], experiment=EXPERIMENT)
    with pytest.raises(SelbenchError, match="already done"):
        resume(first.run_id, ["select"], experiment=EXPERIMENT)
    middle = resume(first.run_id, ["materialize", "train"], experiment=EXPERIMENT)
    assert middle.next_stage == "evaluate"
    last = resume(first.run_id, experiment=EXPERIMENT)
    assert last.next_stage is None and "mean_R1" in last.metrics
    (found,) = logged_runs(EXPERIMENT)
    assert found.info.status == "FINISHED"
    assert found.data.params["selection_sha256"] == selection_hash(first.selection.uids)
    assert last.selection.uids == first.selection.uids
    with pytest.raises(SelbenchError, match="nothing to resume"):
        resume(first.run_id, experiment=EXPERIMENT)


def test_a_new_run_must_start_with_select_and_a_busy_run_is_refused(tiny):
    with pytest.raises(SelbenchError, match="starts with the select stage"):
        execute(_request(tiny), stages=["train"])
    assert logged_runs(EXPERIMENT) == []  # refused before any run was created
    outcome = execute(_request(tiny, seed=2), stages=["select"])
    lock = RunDir.for_run(outcome.run_id).acquire(outcome.run_id)
    try:
        with pytest.raises(RunBusyError, match=outcome.run_id):
            resume(outcome.run_id, experiment=EXPERIMENT)
    finally:
        lock.release()
    (found,) = logged_runs(EXPERIMENT)
    assert found.info.status == "SCHEDULED"  # the refused resume changed nothing


def test_kill_during_materialize_and_during_training_then_resume_finishes_one_run(tiny):
    pool, scale = tiny
    args = ["run", "--method", "random", "--budget", "0.5", "--pool", str(pool)]
    args += ["--scale", str(scale), "--experiment", EXPERIMENT, "--seed", "3"]
    killed = _cli(*args, driver="materialize")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (found,) = logged_runs(EXPERIMENT)
    run_id = found.info.run_id
    rundir = RunDir.for_run(run_id)
    assert found.info.status == "RUNNING"  # nobody could mark it
    assert list(rundir.stages()) == ["select"]
    assert len(list(rundir.subset_dir.glob("*.tar"))) == 1  # one shard of 8 written
    assert not (rundir.subset_dir / "manifest.json").exists()
    digest = found.data.params["selection_sha256"]

    # A later command on this host sees the dead owner and marks the run KILLED.
    assert reap_stale_runs(tracking.Recorder(EXPERIMENT)) == [run_id]
    assert logged_runs(EXPERIMENT)[0].info.status == "KILLED"

    killed = _cli("run", "--resume", run_id, "--experiment", EXPERIMENT, driver="train")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert set(rundir.stages()) == {"select", "materialize"}

    done = _cli("run", "--resume", run_id, "--experiment", EXPERIMENT)
    assert done.returncode == 0, done.stderr
    assert "R@1" in done.stdout
    (found,) = logged_runs(EXPERIMENT)  # still one run
    assert found.info.status == "FINISHED"
    assert found.data.params["selection_sha256"] == digest
    frame = pd.read_parquet(selection_path(rundir))
    assert selection_hash(frame["uid"].tolist()) == digest
    assert "mean_R1" in found.data.metrics
    assert not list(rundir.root.rglob("*.tmp"))


def _temporary_files(root: Path) -> list[Path]:
    """What a writer killed halfway leaves: temporary files and cache entries in assembly."""
    return sorted(p for pattern in ("*.tmp", ".tmp-*") for p in root.rglob(pattern))


def test_kill_while_embedding_and_while_evaluating_then_every_next_command_cleans_up(
    tiny, tmp_path
):
    """``kill -9`` in the select stage (while the embedding cache entry is assembled) and
    in the evaluate stage: each time the next command marks the run KILLED, and once it
    finishes no temporary file is left anywhere under the home."""
    from selbench.train import build_model

    pool, scale = tiny
    model, _, _ = build_model("selbench-tiny", seed=5)
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    home = Path(os.environ["SELBENCH_HOME"])
    args = ["run", "--method", "clip_score", "--budget", "0.5", "--pool", str(pool)]
    args += ["--scale", str(scale), "--experiment", EXPERIMENT, "--seed", "6"]
    args += ["-p", f"embedder=open_clip:selbench-tiny:{weights}"]
    killed = _cli(*args, driver="select")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (found,) = logged_runs(EXPERIMENT)
    run_id = found.info.run_id
    assert found.info.status == "RUNNING" and RunDir.for_run(run_id).stages() == {}
    assert list((home / "embeddings").glob(".tmp-*"))  # the half-assembled entry

    killed = _cli("run", "--resume", run_id, "--experiment", EXPERIMENT, driver="evaluate")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert set(RunDir.for_run(run_id).stages()) == {"select", "materialize", "train"}
    assert _temporary_files(home) == []  # the resumed select cleaned the cache up
    # A later command on this host (here an unrelated one) marks the dead run KILLED.
    other = _cli(
        "run", "-m", "random", "-b", "0.5", "--pool", str(pool), "--scale", str(scale),
        "--experiment", EXPERIMENT, "--stage", "select",
    )  # fmt: skip
    assert other.returncode == 0, other.stderr[-2000:]
    assert {r.info.run_id: r.info.status for r in logged_runs(EXPERIMENT)}[run_id] == "KILLED"

    done = _cli("run", "--resume", run_id, "--experiment", EXPERIMENT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {r.info.run_id: r.info.status for r in logged_runs(EXPERIMENT)}[run_id] == "FINISHED"
    assert _temporary_files(home) == []


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_open_clip_engine_two_process_gloo_trains_resumes_after_kill_and_evaluates(tiny):
    """open_clip_train under torchrun, 2 CPU processes (gloo), on a SynthWeb subset; a
    ``kill -9`` of selbench mid-training takes the workers with it, and --resume
    continues from open_clip_train's last checkpoint in the same MLflow run."""
    pool, scale = tiny
    args = ["run", "--method", "random", "--budget", "0.5", "--pool", str(pool)]
    args += ["--scale", str(scale), "--experiment", EXPERIMENT, "--seed", "4"]
    args += ["--engine", "open_clip", "--nproc-per-node", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "selbench.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    checkpoint = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(Path(os.environ["SELBENCH_HOME"]).rglob("epoch_latest.pt"))
        if found:
            checkpoint = found[0]
            break
        time.sleep(0.1)
    assert checkpoint is not None, proc.stderr.read() if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = checkpoint.parents[3]
    # Workers die with their launcher at once; their data-loader processes notice their
    # parent is gone within PyTorch's status-check interval (5 s), so allow for that.
    deadline = time.monotonic() + 60
    while _processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(str(run_dir)) == []  # nothing outlives the run

    (found,) = logged_runs(EXPERIMENT)
    assert set(RunDir(run_dir).stages()) == {"select", "materialize"}
    done = _cli("run", "--resume", found.info.run_id, "--experiment", EXPERIMENT)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run_dir / "train" / "open_clip" / "out.log").read_text()
    assert "resuming checkpoint" in log or "loaded checkpoint" in log
    (found,) = logged_runs(EXPERIMENT)
    assert found.info.status == "FINISHED"
    assert found.data.params["engine"] == "open_clip"
    assert found.data.params["nproc_per_node"] == "2"
    # 320 x 3 epochs (fixed compute) = 15 steps of 64, spread over 4 checkpoints: 16 steps
    assert found.data.metrics["samples_seen"] == 16 * 64
    assert 0.0 <= found.data.metrics["mean_R1"] <= 1.0
    history = mlflow.MlflowClient().get_metric_history(found.info.run_id, "train_loss")
    assert history, "the loss curve reaches MLflow"
