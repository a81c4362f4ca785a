"""MLflow: where runs are stored and how selbench records them.

The default store is a sqlite file under the run home (MLflow 3 refuses the old
``./mlruns`` file store); ``MLFLOW_TRACKING_URI`` overrides it.
"""

from __future__ import annotations

import os
import platform
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
