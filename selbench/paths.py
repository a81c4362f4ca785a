"""Where selbench keeps data, caches and runs.

``SELBENCH_HOME`` (default ``~/.cache/selbench``) holds generated datasets and pool
indexes; ``SELBENCH_RUN_HOME`` (default ``$SELBENCH_HOME/runs``) holds the MLflow store
and per-run work dirs.
"""

from __future__ import annotations

import os
from pathlib import Path


def selbench_home() -> Path:
    """The data home: ``$SELBENCH_HOME`` or ``~/.cache/selbench``."""
    return Path(os.environ.get("SELBENCH_HOME", Path.home() / ".cache" / "selbench")).expanduser()


def data_home() -> Path:
    """Where generated datasets (SynthWeb) live."""
    return selbench_home() / "datasets"


def index_home() -> Path:
    """Where pool indexes (uids, captions, fingerprints) are cached."""
    return selbench_home() / "pool-index"


def run_home() -> Path:
    """The run home: MLflow's sqlite store, its artifacts and run work dirs."""
    default = selbench_home() / "runs"
    return Path(os.environ.get("SELBENCH_RUN_HOME", default)).expanduser()


def config_dir() -> Path:
    """The ``configs/`` directory: bundled in the wheel, or the source checkout's."""
    bundled = Path(__file__).parent / "_configs"
    if bundled.is_dir():
        return bundled
    return Path(__file__).resolve().parent.parent / "configs"


def committed_leaderboard_dir() -> Path | None:
    """The committed ``leaderboards/`` directory: bundled in the wheel (``_leaderboards``)
    or the source checkout's; None when neither is there (a wheel built without it)."""
    bundled = Path(__file__).parent / "_leaderboards"
    if bundled.is_dir():
        return bundled
    checkout = Path(__file__).resolve().parent.parent / "leaderboards"
    return checkout if checkout.is_dir() else None
