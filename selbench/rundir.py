"""A run's directory: the on-disk hand-offs between its stages.

``selbench run`` is four stages, each of which reads the previous one's files and
writes its own, so any of them can be resumed, rerun or run on another machine:

    select       -> the selection (selbench.run.selection_io names and writes it)
    materialize  -> subset/ (webdataset shards, selbench.materialize)
    train        -> train/ (a checkpoint; open_clip_train's own directory for that engine)
    evaluate     -> metrics.json

``unlogged.jsonl``, when present, holds the MLflow calls the run could not make while
its tracking server was unreachable; ``--resume`` makes them (:mod:`selbench.tracking`).

The directory is ``$SELBENCH_RUN_HOME/work/<MLflow run id>/``. ``request.json`` holds
what was asked; ``stages.json`` records each finished stage (written after the stage's
outputs are in place, atomically), so a crash between the two only repeats work.
A lock file is held while a process works on the run: a second process is refused, and
a run left RUNNING in MLflow whose lock is free belongs to a process that died.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import filelock

from selbench.errors import SelbenchError
from selbench.fileutil import atomic_write_text
from selbench.paths import run_home

STAGES = ("select", "materialize", "train", "evaluate")


class RunBusyError(SelbenchError):
    """Another process is working on this run."""


def runs_root() -> Path:
    return run_home() / "work"


class RunDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def for_run(cls, run_id: str) -> RunDir:
        return cls(runs_root() / run_id)

    # -- files ---------------------------------------------------------------------
    @property
    def request_path(self) -> Path:
        return self.root / "request.json"

    @property
    def select_dir(self) -> Path:
        """Scratch space of the strategy (``SelectionContext.work_dir``)."""
        return self.root / "select"

    @property
    def subset_dir(self) -> Path:
        return self.root / "subset"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def journal_path(self) -> Path:
        """MLflow calls the run could not make while its server was unreachable."""
        return self.root / "unlogged.jsonl"

    def exists(self) -> bool:
        return self.request_path.is_file()

    def write_request(self, request: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.request_path, json.dumps(request, indent=1, sort_keys=True))

    def read_request(self) -> dict[str, Any]:
        try:
            return json.loads(self.request_path.read_text())
        except FileNotFoundError:
            raise SelbenchError(
                f"run directory {self.root} has no request.json: the run was not started by "
                f"this machine's selbench, or its directory was removed"
            ) from None

    # -- stage bookkeeping ---------------------------------------------------------
    def _state_path(self) -> Path:
        return self.root / "stages.json"

    def stages(self) -> dict[str, dict[str, Any]]:
        """``{stage: record}`` of the finished stages."""
        try:
            return json.loads(self._state_path().read_text())
        except FileNotFoundError:
            return {}

    def done(self, stage: str) -> bool:
        return stage in self.stages()

    def mark_done(self, stage: str, record: dict[str, Any]) -> None:
        state = self.stages()
        state[stage] = record
        atomic_write_text(self._state_path(), json.dumps(state, indent=1, sort_keys=True))

    def next_stage(self) -> str | None:
        state = self.stages()
        return next((s for s in STAGES if s not in state), None)

    # -- ownership -----------------------------------------------------------------
    def lock(self) -> filelock.FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(self.root / ".lock"), timeout=0)

    def acquire(self, run_id: str) -> filelock.FileLock:
        lock = self.lock()
        try:
            lock.acquire()
        except filelock.Timeout:
            raise RunBusyError(
                f"run {run_id} is being worked on by another process (lock {lock.lock_file})"
            ) from None
        return lock

    def owner_alive(self) -> bool:
        """True while some process holds this run's lock."""
        if not (self.root / ".lock").exists():
            return False
        lock = self.lock()
        try:
            lock.acquire()
        except filelock.Timeout:
            return True
        lock.release()
        return False


def host() -> str:
    return socket.gethostname()
