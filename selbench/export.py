"""Export a run's selected subset in the formats other people train on.

A run logs its selection as the MLflow artifact ``selection.parquet`` (columns ``uid``,
``caption``, ``train_caption``, ``score``). ``selbench export RUN_ID`` turns it into:

``datacomp``
    DataComp's subset file, as its README ("Selecting samples in the filtering track")
    and its ``resharder.py`` define it: a ``.npy`` array of dtype ``numpy.dtype("u8,u8")``
    (fields ``f0``, ``f1``: little-endian uint64), shape ``(n,)``, one record per uid, the
    128-bit hex uid split as ``(int(uid[:16], 16), int(uid[16:], 16))``, sorted
    lexicographically (``resharder.py`` looks uids up with ``np.searchsorted``, so an
    unsorted file silently drops samples).

    Only uids that are DataComp uids (exactly 32 hex digits, as in CommonPool's
    parquet and json) can be written. Other keys (SynthWeb's, or an img2dataset pool
    without a ``uid`` column) are refused with an error naming the first bad uid: there
    is no mapping to 128-bit hashes that DataComp's resharder would find in the pool's
    json, so any mapping would give a file that selects nothing. Use ``parquet`` for
    those pools.
``parquet``
    ``uid``, ``caption`` (the pool's), ``train_caption`` (after any rewrite) and
    ``score`` (NaN where the strategy gave none), in selection order.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from selbench.errors import SelbenchError
from selbench.fileutil import temp_sibling

#: DataComp's subset dtype (``u16`` in its resharder.py): two little-endian uint64 fields.
DATACOMP_DTYPE = np.dtype("u8,u8")
FORMATS = ("datacomp", "parquet")
SELECTION_ARTIFACT = "selection.parquet"
SELECTION_COLUMNS = ("uid", "caption", "train_caption", "score")
_DATACOMP_UID = re.compile(r"[0-9a-fA-F]{32}")


class ExportError(SelbenchError):
    """A selection cannot be exported: unknown run, missing artifact, uids of the wrong kind."""


def datacomp_uid_pair(uid: str) -> tuple[int, int]:
    """``(high, low)`` uint64 halves of a 32-hex-digit DataComp uid."""
    if not isinstance(uid, str) or not _DATACOMP_UID.fullmatch(uid):
        raise ExportError(
            f"uid {uid!r} is not a DataComp uid (32 hex digits); only pools whose samples "
            "carry DataComp uids (CommonPool, or img2dataset output with a 'uid' column) can "
            "be exported as --format datacomp; use --format parquet for this pool"
        )
    return int(uid[:16], 16), int(uid[16:], 16)


def datacomp_uid_array(uids: list[str]) -> np.ndarray:
    """The sorted ``u8,u8`` array DataComp's resharder reads; refuses non-DataComp uids and
    uids that appear twice (the resharder would copy such a sample twice)."""
    pairs = [datacomp_uid_pair(uid) for uid in uids]
    array = np.array(pairs, dtype=DATACOMP_DTYPE).reshape(-1)
    array.sort()  # structured arrays sort field by field: f0, then f1 (lexicographic)
    if len(array) > 1:
        same = array[1:] == array[:-1]
        if same.any():
            at = int(np.flatnonzero(same)[0])
            raise ExportError(f"uid {uid_from_pair(array[at])} appears twice in the selection")
    return array


def uid_from_pair(record: np.void | tuple[int, int]) -> str:
    """The 32-hex-digit uid of one ``u8,u8`` record (lower case, as CommonPool writes it)."""
    high, low = int(record[0]), int(record[1])
    return f"{high:016x}{low:016x}"


def write_datacomp_npy(uids: list[str], path: Path) -> Path:
    """Write ``uids`` as DataComp's subset ``.npy`` (atomically); return the path."""
    array = datacomp_uid_array(uids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(tmp, path)
    return path


def read_datacomp_npy(path: Path) -> list[str]:
    """The uids of a DataComp subset file (``.npy`` or raw memmap), in file order."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            is_npy = handle.read(6) == b"\x93NUMPY"
        if is_npy:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        else:  # DataComp also accepts a headerless memmap of the same records
            array = np.memmap(path, DATACOMP_DTYPE, mode="r")
    except (OSError, ValueError) as exc:
        raise ExportError(f"subset file {path} cannot be read: {exc}") from None
    if array.dtype != DATACOMP_DTYPE or array.ndim != 1:
        raise ExportError(
            f"subset file {path} holds {array.dtype} of shape {array.shape}, "
            f"not DataComp's {DATACOMP_DTYPE} records"
        )
    return [uid_from_pair(record) for record in array]


def write_selection_parquet(selection: pd.DataFrame, path: Path) -> Path:
    """Write the selection's uid, captions and score columns as parquet (atomically)."""
    missing = [c for c in SELECTION_COLUMNS if c not in selection.columns]
    if missing:
        raise ExportError(f"selection lacks columns {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    selection.loc[:, list(SELECTION_COLUMNS)].to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def load_run_selection(run_id: str) -> pd.DataFrame:
    """The ``selection.parquet`` artifact of MLflow run ``run_id`` (selbench's store)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from selbench import tracking

    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.get_run(run_id)
    except MlflowException:
        raise ExportError(f"run {run_id!r} not found in the MLflow store {uri}") from None
    with tempfile.TemporaryDirectory(prefix="selbench-export-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=SELECTION_ARTIFACT, dst_path=tmp
            )
        except (MlflowException, OSError):
            raise ExportError(
                f"run {run_id} has no {SELECTION_ARTIFACT} artifact "
                "(it stopped before its selection was logged)"
            ) from None
        return pd.read_parquet(local)


def export_filename(run_id: str, fmt: str) -> str:
    return f"{run_id}.npy" if fmt == "datacomp" else f"{run_id}.parquet"


def export_command(run_id: str, fmt: str = "datacomp") -> str:
    """The command that exports ``run_id``'s subset (shown on leaderboard rows)."""
    return f"selbench export {run_id} --format {fmt}"


def export_run(run_id: str, fmt: str, out_dir: Path) -> Path:
    """Export run ``run_id``'s selection as ``fmt`` into ``out_dir``; return the file."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    selection = load_run_selection(run_id)
    path = Path(out_dir) / export_filename(run_id, fmt)
    if fmt == "datacomp":
        return write_datacomp_npy(selection["uid"].tolist(), path)
    return write_selection_parquet(selection, path)
