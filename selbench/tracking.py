"""MLflow: where runs are stored, how selbench records them and reads them back.

The default store is a sqlite file under the run home (MLflow 3 refuses the old
``./mlruns`` file store); ``MLFLOW_TRACKING_URI`` overrides it.

A tracking server can go away in the middle of a run. The run then goes on: every
MLflow call the recorder cannot make is appended to the run directory's journal
(``unlogged.jsonl``), the stages keep their outputs on disk as always, and the run
ends with a :class:`TrackingUnreachable` error saying where everything is.
``selbench run --resume RUN_ID`` replays the journal once the server is back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

from selbench.errors import SelbenchError
from selbench.paths import run_home

DEFAULT_EXPERIMENT = "selbench"
log = logging.getLogger(__name__)


class TrackingUnreachable(SelbenchError):
    """The MLflow tracking server could not be reached."""


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the tracking server could not be reached (refused or dropped
    connection, time-out, a gateway's 502/503/504), as opposed to a request it refused."""
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(
            seen,
            (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError),
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    return "API request to" in text and bool(
        re.search(r"Max retries exceeded|Connection refused|timed out|error code 50[234]", text)
    )


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]


def unreachable_error(exc: BaseException) -> TrackingUnreachable:
    return TrackingUnreachable(
        f"cannot reach the MLflow tracking server {tracking_uri()} ({_first_line(exc)}); "
        "start it, or unset MLFLOW_TRACKING_URI to use the local store"
    )


@contextlib.contextmanager
def _no_retries() -> Iterator[None]:
    """MLflow's HTTP calls fail at once inside the block instead of retrying for minutes."""
    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved


def read_journal(path: Path) -> list[dict]:
    """The MLflow calls a run could not make (see :meth:`Recorder.keep_journal`); a last
    line cut short by a killed process is ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            break
    return entries


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or ``sqlite:///<run home>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return local_store_uri()


def local_store_uri() -> str:
    """selbench's own store: ``sqlite:///<run home>/mlflow.db``."""
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
    with _store_lock(uri):
        try:
            found = mlflow.get_experiment_by_name(experiment)  # creates a new store's tables
        except Exception as exc:
            if unreachable(exc):
                raise unreachable_error(exc) from None
            raise
    if found is not None:
        return found.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the sqlite store (selbench's own or one MLFLOW_TRACKING_URI
        # names), not in ./mlruns of whatever directory the experiment was created from:
        # runs would lose their selections when that directory goes.
        database = Path(uri.removeprefix("sqlite:///"))
        artifact_location = (database.parent / "artifacts").resolve().as_uri()
    try:
        return mlflow.create_experiment(experiment, artifact_location=artifact_location)
    except Exception:
        # Another process may have created it between the lookup and the create.
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def _store_lock(uri: str) -> contextlib.AbstractContextManager:
    """A lock beside a sqlite store while this process opens it: MLflow creates a new
    store's tables on first use without a lock of its own, and two ``selbench`` commands
    starting at once on a fresh home then both create them, and one fails ("table ...
    already exists")."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    import filelock

    database = Path(uri[len("sqlite:///") :])
    database.parent.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(database) + ".lock")


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
    """Every MLflow call that writes goes through one of these (reads: :class:`Store`).

    A recorder is bound to an experiment and, while a run is open, to that run. The run's
    lifecycle (:mod:`selbench.run.lifecycle`) opens a run (:meth:`start`) or reopens one
    to resume it (:meth:`reopen`),
    logs through it, and closes it with exactly one of :meth:`finish` (all stages done),
    :meth:`pause` (SCHEDULED: stages remain, ``selbench run --resume`` continues),
    :meth:`fail` (FAILED, or KILLED on an interrupt). Sweeps and ``export`` use its query
    methods; the leaderboard reads through :class:`Store`. No other module imports mlflow.
    """

    def __init__(self, experiment: str = DEFAULT_EXPERIMENT) -> None:
        self.experiment = experiment
        self.experiment_id = setup(experiment)
        self.run_id: str | None = None
        self.journal: Path | None = None
        #: Why the server could not be reached, from the first call that failed; None while
        #: every call has reached it.
        self.unreachable: str | None = None

    # -- when the server goes away ----------------------------------------------------
    def keep_journal(self, path: Path) -> None:
        """From now on, a logging call that cannot reach the server is appended to ``path``
        (one JSON object a line) instead of failing the run, and so is every later one:
        after the first failure the recorder stops trying, so a run does not wait out
        MLflow's retries at every metric. :meth:`replay` makes the calls later."""
        self.journal = Path(path)

    def _log(self, entry: dict, call: Callable[[], object]) -> None:
        if self.unreachable is None:
            try:
                call()
                return
            except Exception as exc:
                if self.journal is None or not unreachable(exc):
                    raise
                self.unreachable = _first_line(exc)
                log.warning(
                    "MLflow server %s unreachable (%s); recording to %s",
                    tracking_uri(),
                    self.unreachable,
                    self.journal,
                )
        self._append(entry)

    def _append(self, entry: dict) -> None:
        assert self.journal is not None
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def replay(self, entries: list[dict]) -> None:
        """Make the calls of a journal (:func:`read_journal`) in the open run; the run's
        end status is left to the caller. Raises if the server is still unreachable."""
        import mlflow

        try:
            for entry in entries:
                kind = entry["call"]
                if kind == "params":
                    mlflow.log_params(entry["values"])
                elif kind == "metrics":
                    mlflow.log_metrics(entry["values"], step=entry.get("step"))
                elif kind == "tags":
                    mlflow.set_tags(entry["values"])
                elif kind == "series":
                    self._log_series(entry["key"], [tuple(p) for p in entry["points"]])
                elif kind == "artifact":
                    mlflow.log_artifact(entry["path"], artifact_path=entry.get("artifact_path"))
        except Exception as exc:
            if unreachable(exc):
                raise unreachable_error(exc) from None
            raise

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

        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
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
        """Record why the run stopped and end it FAILED (KILLED on Ctrl-C); nothing if the
        run has already ended."""
        if self.run_id is None:
            return
        interrupted = isinstance(exc, KeyboardInterrupt)
        message = "interrupted" if interrupted else f"{type(exc).__name__}: {exc}"
        try:
            self.tags({"selbench.error": message[:5000]})
        finally:
            self._end("KILLED" if interrupted else "FAILED")

    def _end(self, status: str) -> None:
        import mlflow

        active = mlflow.active_run()
        run_id = self.run_id

        def end() -> None:
            if active is not None and active.info.run_id == run_id:
                mlflow.end_run(status=status)  # drops the active run even when it fails
            elif run_id is not None:
                mlflow.MlflowClient().set_terminated(run_id, status)

        if self.unreachable is None:
            self._log({"call": "end", "status": status}, end)
        else:
            with contextlib.suppress(Exception), _no_retries():
                end()  # the status goes to the journal; this only lets go of the run
            self._append({"call": "end", "status": status})
        self.run_id = None

    # -- logging into the open run -----------------------------------------------
    def params(self, values: dict[str, object]) -> None:
        """Log parameters (MLflow keeps at most 6,000 characters of each value)."""
        import mlflow

        values = {k: str(v)[:6000] for k, v in values.items()}
        self._log({"call": "params", "values": values}, lambda: mlflow.log_params(values))

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        import mlflow

        values = {k: float(v) for k, v in values.items()}
        self._log(
            {"call": "metrics", "values": values, "step": step},
            lambda: mlflow.log_metrics(values, step=step),
        )

    def series(self, key: str, points: list[tuple[int, float]]) -> None:
        """A curve, one point per step (``train_loss``)."""
        if not points:
            return
        points = [(int(s), float(v)) for s, v in points]
        self._log(
            {"call": "series", "key": key, "points": points},
            lambda: self._log_series(key, points),
        )

    def _log_series(self, key: str, points: list[tuple[int, float]]) -> None:
        import mlflow
        from mlflow.entities import Metric

        assert self.run_id is not None, "series are logged to an open run"
        now = int(time.time() * 1000)
        batch = [Metric(key, v, now, s) for s, v in points]
        mlflow.MlflowClient().log_batch(self.run_id, metrics=batch)

    def tags(self, values: dict[str, str]) -> None:
        import mlflow

        values = dict(values)
        self._log({"call": "tags", "values": values}, lambda: mlflow.set_tags(values))

    def artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        import mlflow

        path = str(Path(path).resolve())
        self._log(
            {"call": "artifact", "path": path, "artifact_path": artifact_path},
            lambda: mlflow.log_artifact(path, artifact_path=artifact_path),
        )

    # -- queries (no open run needed) -------------------------------------------
    def get_run(self, run_id: str):
        """The MLflow run, or a SelbenchError naming the id when there is none."""
        return Store().run(run_id)

    @staticmethod
    def experiment_name(experiment_id: str) -> str:
        """The name of the experiment with id ``experiment_id``."""
        import mlflow

        return mlflow.get_experiment(experiment_id).name

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


class Store:
    """The read side of selbench's MLflow store: experiments, finished runs as a frame,
    one run, a run's artifacts. The leaderboard and its plots read runs through this, as
    runs are written through :class:`Recorder`; together they are every MLflow call
    selbench makes. Each call points MLflow at :func:`tracking_uri` first."""

    @staticmethod
    def _mlflow():
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        return mlflow

    def has_experiment(self, name: str) -> bool:
        """Whether the store has an experiment called ``name`` (creates nothing)."""
        return self._mlflow().get_experiment_by_name(name) is not None

    def experiments(self) -> list[str]:
        """The names of the store's experiments."""
        return sorted(e.name for e in self._mlflow().search_experiments())

    def experiment(self, name: str):
        """The MLflow experiment called ``name``, or None."""
        return self._mlflow().get_experiment_by_name(name)

    def finished_runs(
        self, experiment: str = DEFAULT_EXPERIMENT, params: dict[str, str] | None = None
    ):
        """The FINISHED runs of ``experiment`` as MLflow's ``search_runs`` frame (columns
        ``run_id``, ``params.*``, ``metrics.*``, ``tags.*``); with ``params``, only those
        whose param of each name has that value, filtered by the store's query. Like every
        command that opens an experiment (:func:`setup`), this creates it when the store
        has none, empty."""
        import mlflow

        setup(experiment)
        clauses = ["attributes.status = 'FINISHED'"]
        for name, value in (params or {}).items():
            if "'" in str(value) or not re.fullmatch(r"[\w.\-]+", name):
                raise SelbenchError(f"cannot query runs by param {name}={value!r}")
            clauses.append(f"params.`{name}` = '{value}'")
        return mlflow.search_runs(
            experiment_names=[experiment],
            filter_string=" and ".join(clauses),
            output_format="pandas",
        )

    def experiment_name(self, experiment_id: str) -> str:
        """The name of the experiment with id ``experiment_id``."""
        return self._mlflow().get_experiment(experiment_id).name

    def run(self, run_id: str):
        """The MLflow run ``run_id``, or a SelbenchError naming the id when there is none."""
        mlflow = self._mlflow()
        try:
            return mlflow.MlflowClient().get_run(run_id)
        except Exception as exc:
            if unreachable(exc):
                raise unreachable_error(exc) from None
            raise SelbenchError(
                f"no MLflow run {run_id!r} in the store {tracking_uri()}; "
                "`mlflow ui` or `selbench leaderboard` lists runs"
            ) from None

    def download(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        """Copy run ``run_id``'s artifact ``artifact_path`` into the folder ``dst`` and return
        the copy; FileNotFoundError, naming where the run's artifacts live, when the run has
        no such artifact (its artifact store lost the file)."""
        mlflow = self._mlflow()
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)
            )
        except mlflow.exceptions.MlflowException as exc:
            uri = mlflow.get_run(run_id).info.artifact_uri
            raise FileNotFoundError(f"no {artifact_path} under {uri} ({exc})") from None
        return Path(path)
