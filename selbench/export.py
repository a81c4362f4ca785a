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
``shards``
    The selected samples as webdataset shards, written by the run's own materialize
    stage (DataComp resharder semantics; ``selbench.materialize``) from the run's pool,
    which must still have the fingerprint the run recorded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from selbench.errors import SelbenchError
from selbench.fileutil import temp_sibling
from selbench.run.selection_io import SELECTION_COLUMNS, SELECTION_FILE, stored_selection

#: DataComp's subset dtype (``u16`` in its resharder.py): two little-endian uint64 fields.
DATACOMP_DTYPE = np.dtype("u8,u8")
FORMATS = ("datacomp", "parquet", "shards")
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


def _recorder():
    from selbench import tracking

    return tracking.Recorder()


def load_run_selection(run_id: str, recorder=None) -> pd.DataFrame:
    """The ``selection.parquet`` artifact of MLflow run ``run_id`` (selbench's store)."""
    recorder = recorder or _recorder()
    recorder.get_run(run_id)  # a SelbenchError naming the id when there is none
    try:
        return stored_selection(run_id)
    except FileNotFoundError:
        raise ExportError(
            f"run {run_id} has no {SELECTION_FILE} artifact "
            "(it stopped before its selection was logged)"
        ) from None


def write_selection_shards(run_id: str, selection: pd.DataFrame, out_dir: Path, recorder) -> Path:
    """The selected samples as webdataset shards (the run's materialize stage:
    :func:`selbench.materialize.materialize`, training captions in ``.txt``, uid and
    original caption in ``.json``) under ``out_dir``, read from the run's pool, which
    must still be the pool the run selected from (same fingerprint)."""
    from selbench.materialize import materialize
    from selbench.pools import resolve_pool
    from selbench.run.spec import selection_hash

    params = recorder.get_run(run_id).data.params
    spec = params.get("pool_spec")
    # A decontaminated run's pool_fingerprint names what decontamination left; its shards'
    # fingerprint is pool_source_fingerprint.
    fingerprint = params.get("pool_source_fingerprint") or params.get("pool_fingerprint")
    if not spec:
        raise ExportError(f"run {run_id} records no pool_spec; export it as parquet instead")
    pool = resolve_pool(spec).pool
    if fingerprint and pool.fingerprint != fingerprint:
        raise ExportError(
            f"pool {spec!r} changed since run {run_id} selected from it (fingerprint "
            f"{pool.fingerprint}, the run's {fingerprint}); --format shards needs the same pool"
        )
    uids = selection["uid"].tolist()
    subset = materialize(
        pool,
        uids,
        selection["train_caption"].tolist(),
        selection["caption"].tolist(),
        Path(out_dir),
        selection_sha256=selection_hash(uids),
    )
    return subset.root


def export_filename(run_id: str, fmt: str) -> str:
    return {"datacomp": f"{run_id}.npy", "parquet": f"{run_id}.parquet"}.get(fmt, run_id)


def export_command(run_id: str, fmt: str = "parquet") -> str:
    """The command that exports ``run_id``'s subset (for leaderboard rows)."""
    return f"selbench export {run_id} --format {fmt}"


def export_run(run_id: str, fmt: str, out_dir: Path) -> Path:
    """Export run ``run_id``'s selection as ``fmt`` into ``out_dir``; return the file
    (the shard directory for ``shards``)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    recorder = _recorder()
    selection = load_run_selection(run_id, recorder)
    path = Path(out_dir) / export_filename(run_id, fmt)
    if fmt == "datacomp":
        return write_datacomp_npy(selection["uid"].tolist(), path)
    if fmt == "shards":
        return write_selection_shards(run_id, selection, path, recorder)
    return write_selection_parquet(selection, path)
