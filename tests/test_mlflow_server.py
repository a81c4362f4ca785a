"""selbench against a real MLflow tracking server (``mlflow server``), started by the test on
loopback with its own sqlite store and artifact root, and stopped (its whole process tree)
by the fixture. The server also goes away in the middle of a run and comes back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from e2e_helpers import logged_runs

from selbench import tracking
from selbench.rundir import RunDir

pytestmark = pytest.mark.slow

EXPERIMENT = "server"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``mlflow server`` on 127.0.0.1 in its own process group, restartable on its port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", "1"]
        command += ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        command += ["--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed with the process
        # The server keeps lock files (db_init_lock-*) in its temporary directory: its own.
        # MLflow's job runner (its GenAI jobs: 7 consumer processes) has nothing to run here.
        env = dict(os.environ, TMPDIR=str(self.root), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=log, start_new_session=True, cwd=self.root, env=env
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError((self.root / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not start in {timeout_s} s")

    def stop(self) -> None:
        """Kill the server's whole process group (uvicorn and its job runner too)."""
        if self.process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process.wait()
        deadline = time.monotonic() + 10
        while _group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.process = None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory, empty_mlflow_store):
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copyfile(empty_mlflow_store, root / "mlflow.db")  # its tables made once (conftest)
    started = Server(root)
    started.start()
    yield started
    pid = started.process.pid if started.process else None
    started.stop()
    assert pid is None or not _group_alive(pid)  # uvicorn and the job runner went with it


@pytest.fixture
def against(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    return server


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="300")
    return subprocess.run(
        [sys.executable, "-m", "selbench.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_run_sweep_and_leaderboard_log_to_the_server(against, tiny, tmp_path):
    pool, scale = tiny
    common = ["--pool", str(pool), "--scale", str(scale), "--experiment", EXPERIMENT]
    swept = _cli(
        "sweep", "--methods", "random", "--budgets", "0.5", "--seeds", "0", "--no-full-pool",
        *common, "--leaderboard", "board", "--out", str(tmp_path / "boards"),
    )  # fmt: skip
    assert swept.returncode == 0, swept.stderr[-3000:]
    board = _cli(
        "leaderboard", "--experiment", EXPERIMENT, "--out", str(tmp_path / "again"), "--no-plots"
    )
    assert board.returncode == 0, board.stderr[-3000:]
    assert (tmp_path / "boards" / "board.md").is_file()
    assert (tmp_path / "again" / f"{EXPERIMENT}.md").is_file()

    runs = [r for r in logged_runs(EXPERIMENT) if "selbench.method" in r.data.tags]
    assert [r.data.params["budget"] for r in runs] == ["0.5"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    # artifacts went through the server into its own artifact root
    selection = tracking.Store().download(
        runs[0].info.run_id, "selection.parquet", tmp_path / "download"
    )
    assert len(pd.read_parquet(selection)) == int(runs[0].data.params["budget_count"])
    assert list((against.root / "artifacts").rglob("selection.parquet"))


def test_a_server_that_goes_away_mid_run_then_returns(against, tiny, monkeypatch):
    """The server stops while the subset is materialized: the run goes on, ends with an
    error saying where the selection and the metrics are, and ``--resume`` logs them."""
    from selbench.run import lifecycle, stages
    from selbench.run.selection_io import selection_path

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    real_materialize = stages.materialize

    def server_goes_away(*args, **kwargs):
        against.stop()
        return real_materialize(*args, **kwargs)

    monkeypatch.setattr(stages, "materialize", server_goes_away)
    pool, scale = tiny
    request = lifecycle.RunRequest(
        method="random", budget=0.25, seed=4, pool=str(pool), scale=str(scale), experiment="outage"
    )
    with pytest.raises(tracking.TrackingUnreachable) as raised:
        lifecycle.execute(request)
    message = str(raised.value)
    run_id = message.split("during run ")[1].split()[0]
    rundir = RunDir.for_run(run_id)
    assert f"the selection in {selection_path(rundir)}" in message
    assert f"the metrics in {rundir.metrics_path}" in message
    assert f"selbench run --resume {run_id}" in message
    assert set(rundir.stages()) == {"select", "materialize", "train", "evaluate"}
    assert rundir.journal_path.is_file()

    against.start()
    monkeypatch.setattr(stages, "materialize", real_materialize)
    resumed = _cli("run", "--resume", run_id, "--experiment", "outage")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not rundir.journal_path.exists()
    (found,) = logged_runs("outage")
    assert found.info.status == "FINISHED"
    kept = json.loads(rundir.metrics_path.read_text())
    assert found.data.metrics["mean_R1"] == pytest.approx(kept["mean_R1"])
    assert "samples_seen" in found.data.metrics and "materialize_seconds" in found.data.metrics
    history = mlflow.MlflowClient().get_metric_history(run_id, "train_loss")
    assert history, "the loss curve reached the server after the outage"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"selection.parquet", "config.yaml"} <= artifacts
