"""MLflow: where runs are stored and how selbench records them.

The default store is a sqlite file under the run home (MLflow 3 refuses the old
``./mlruns`` file store); ``MLFLOW_TRACKING_URI`` overrides it.
"""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path

from selbench.paths import run_home

DEFAULT_EXPERIMENT = "selbench"


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or ``sqlite:///<run home>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = run_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(home / 'mlflow.db').resolve()}"


def setup(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at selbench's store and make sure ``experiment`` exists; return its id."""
    import logging

    import mlflow

    # MLflow sets its loggers to INFO on import; its table-creation notices are noise here.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    artifact_location = None
    if "MLFLOW_TRACKING_URI" not in os.environ:
        # Keep artifacts beside the sqlite store, not in ./mlruns of the current directory.
        artifact_location = (run_home() / "artifacts").resolve().as_uri()
    try:
        return mlflow.create_experiment(experiment, artifact_location=artifact_location)
    except Exception:
        # Another process may have created it between the lookup and the create.
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def ui_command() -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri()}"


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of the packages that decide a run's numbers."""
    names = ("selbench", "torch", "open_clip_torch", "numpy", "faiss-cpu", "mlflow", "pillow")
    versions = {"python": platform.python_version()}
    for name in names + extra:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(path: Path | None = None) -> str | None:
    """The checkout's commit when selbench runs from a git work tree."""
    import subprocess

    root = path or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Recorder:
    """Every MLflow call selbench makes goes through one of these.

    A recorder is bound to an experiment and, while a run is open, to that run. The
    runner opens a run (:meth:`start`) or reopens one to resume it (:meth:`reopen`),
    logs through it, and closes it with exactly one of :meth:`finish` (all stages done),
    :meth:`pause` (SCHEDULED: stages remain, ``selbench run --resume`` continues),
    :meth:`fail` (FAILED, or KILLED on an interrupt). Sweeps, the leaderboard and
    ``export`` use its query methods. No other module imports mlflow to write.
    """

    def __init__(self, experiment: str = DEFAULT_EXPERIMENT) -> None:
        self.experiment = experiment
        self.experiment_id = setup(experiment)
        self.run_id: str | None = None

    # -- opening and closing a run --------------------------------------------------
    def start(
        self,
        run_name: str,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        import mlflow

        run = mlflow.start_run(
            experiment_id=self.experiment_id,
            run_name=run_name,
            parent_run_id=parent_run_id,
            nested=parent_run_id is not None,
            tags=tags or {},
        )
        self.run_id = run.info.run_id
        return self.run_id

    def reopen(self, run_id: str) -> None:
        """Make an existing run (SCHEDULED, FAILED, KILLED or stale RUNNING) active again."""
        import mlflow

        if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run_id:
            self.run_id = run_id
            return
        mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
        self.run_id = run_id

    def finish(self) -> None:
        self._end("FINISHED")

    def pause(self, next_stage: str) -> None:
        """End the process's hold on the run with stages left: SCHEDULED, resumable."""
        self.tags({"selbench.next_stage": next_stage})
        self._end("SCHEDULED")

    def fail(self, exc: BaseException) -> None:
        """Record why the run stopped and end it FAILED (KILLED on Ctrl-C)."""
        interrupted = isinstance(exc, KeyboardInterrupt)
        message = "interrupted" if interrupted else f"{type(exc).__name__}: {exc}"
        try:
            self.tags({"selbench.error": message[:5000]})
        finally:
            self._end("KILLED" if interrupted else "FAILED")

    def _end(self, status: str) -> None:
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status=status)
        elif self.run_id is not None:
            mlflow.MlflowClient().set_terminated(self.run_id, status)
        self.run_id = None

    # -- logging into the open run -----------------------------------------------
    def params(self, values: dict[str, object]) -> None:
        """Log parameters (MLflow keeps at most 6,000 characters of each value)."""
        import mlflow

        mlflow.log_params({k: str(v)[:6000] for k, v in values.items()})

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def series(self, key: str, points: list[tuple[int, float]]) -> None:
        """A curve, one point per step (``train_loss``)."""
        import mlflow
        from mlflow.entities import Metric

        if not points:
            return
        now = int(time.time() * 1000)
        batch = [Metric(key, float(v), now, int(s)) for s, v in points]
        mlflow.MlflowClient().log_batch(self.run_id, metrics=batch)

    def tags(self, values: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags(values)

    def artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    # -- queries (no open run needed) -------------------------------------------
    def get_run(self, run_id: str):
        """The MLflow run, or a SelbenchError naming the id when there is none."""
        import mlflow

        from selbench.errors import SelbenchError

        try:
            return mlflow.MlflowClient().get_run(run_id)
        except Exception:
            raise SelbenchError(
                f"no MLflow run {run_id!r} in the store {tracking_uri()}; "
                "`mlflow ui` or `selbench leaderboard` lists runs"
            ) from None

    def search(self, filter_string: str = "", pandas: bool = False):
        """Runs of this recorder's experiment (a list of runs, or a pandas frame)."""
        import mlflow

        return mlflow.search_runs(
            experiment_ids=[self.experiment_id],
            filter_string=filter_string,
            output_format="pandas" if pandas else "list",
        )

    def set_terminated(self, run_id: str, status: str, error: str | None = None) -> None:
        """Close a run this process does not hold (a stale one, a sweep parent)."""
        import mlflow

        client = mlflow.MlflowClient()
        if error is not None:
            client.set_tag(run_id, "selbench.error", error[:5000])
        client.set_terminated(run_id, status)

    def create_run(self, run_name: str, tags: dict[str, str]) -> str:
        """A run that holds no stage of its own (a sweep's parent), left FINISHED."""
        import mlflow

        client = mlflow.MlflowClient()
        run = client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def hold(self, run_id: str):
        """Context manager: ``run_id`` is the active (RUNNING) run inside the block and
        ends with the status passed to the returned handle's ``status`` (default
        FINISHED) -- a sweep's parent while one of its cells runs."""
        import contextlib

        import mlflow

        @contextlib.contextmanager
        def held():
            box = {"status": "FINISHED"}
            mlflow.start_run(run_id=run_id)
            try:
                yield box
            finally:
                mlflow.end_run(box["status"])

        return held()

    def download(self, run_id: str, artifact_path: str, dst: Path | None = None) -> Path:
        import mlflow

        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_path, dst_path=str(dst) if dst else None
            )
        )
