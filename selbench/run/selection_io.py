"""``selection.parquet``: the select stage's output, its name, its columns and its reader.

A run's selection is one parquet file in its run directory, also logged as the MLflow
artifact of the same name, with one row per selected sample in selection order:

``uid``
    the sample's pool uid, or ``synth:<digest>:<n>`` for a synthesized pair
``caption``
    the pool's caption (a synthesized pair: its caption)
``train_caption``
    the caption the model trains on (after any rewrite by the strategy)
``score``
    the strategy's score for the sample, NaN where it gave none

A pipeline's selection (``docs/pipelines.md``) adds ``selected`` (false for the rest of
the pool) and ``dropped_by`` (the step that removed a sample, ``"2: clip_score"``; null for
the selected), with a row for every pool sample: the selected first, in selection order,
then the dropped in pool order. :func:`read_selection` returns the selected rows unless
asked for all.

A selection of synthesized pairs adds ``synthesized`` (all true) and ``source_uid`` (the
pool uid a pair started from, or null), and keeps its pixels beside it in
``select/synthesized.npy`` (uint8 N x H x W x 3), written before the parquet so that a
parquet on disk always has its pixels.

This module is the only code that names, writes or reads these files; the export, the
leaderboard's overlap plots and the stages all come through it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from selbench import tracking
from selbench.errors import SelbenchError
from selbench.fileutil import writing
from selbench.pools import ResolvedPool
from selbench.positions import PoolUids, selected_scores
from selbench.rundir import RunDir
from selbench.strategy import Selection, Synthesized

#: The file name, in the run directory and as an MLflow artifact.
SELECTION_FILE = "selection.parquet"
#: The columns every selection has, in this order.
SELECTION_COLUMNS = ("uid", "caption", "train_caption", "score")
#: The pixels of synthesized pairs, in the run directory's ``select/``.
SYNTHESIZED_FILE = "synthesized.npy"


def stored_selection(run_id: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The selection that run ``run_id`` logged to the MLflow store (its artifact, not the
    run directory, which may be on another machine); FileNotFoundError when the store has
    no such artifact."""
    # Into a folder removed afterwards: without one, MLflow leaves a temporary directory
    # behind per download.
    with tempfile.TemporaryDirectory(prefix="selbench-selection-") as folder:
        path = tracking.Store().download(run_id, SELECTION_FILE, Path(folder))
        if columns is None:
            return only_selected(pd.read_parquet(path))
        if "selected" not in pq.read_schema(path).names:
            return pd.read_parquet(path, columns=columns)
        frame = pd.read_parquet(path, columns=[*columns, "selected"])
        return only_selected(frame)[columns]


def selection_path(rundir: RunDir) -> Path:
    """Where a run's selection lives in its run directory."""
    return rundir.root / SELECTION_FILE


def synthesized_path(rundir: RunDir) -> Path:
    """The pixels of a strategy's synthesized pairs (uint8 N x H x W x 3, ``.npy``)."""
    return rundir.select_dir / SYNTHESIZED_FILE


def selection_frame(resolved: ResolvedPool, selection: Selection) -> pd.DataFrame:
    """The rows of ``selection.parquet`` for a validated selection from ``resolved``."""
    if selection.synthesized is not None:
        made = list(selection.synthesized.captions)
        sources = selection.synthesized.sources or [None] * len(made)
        return pd.DataFrame(
            {
                "uid": selection.uids,
                "caption": made,
                "train_caption": made,
                "score": np.full(len(made), np.nan),
                "synthesized": np.ones(len(made), dtype=bool),
                "source_uid": pd.array(list(sources), dtype="string"),
            }
        )
    if isinstance(selection.uids, PoolUids) and selection.dropped is None:
        return positions_frame(selection.uids, selection.captions, selection.score_array)
    captions = dict(zip(resolved.pool.uids, resolved.pool.captions, strict=True))
    rewrites = selection.captions or {}
    scores = selection.scores or {}
    frame = pd.DataFrame(
        {
            "uid": selection.uids,
            "caption": [captions[u] for u in selection.uids],
            "train_caption": [rewrites.get(u, captions[u]) for u in selection.uids],
            "score": [float(scores[u]) if u in scores else np.nan for u in selection.uids],
        }
    )
    if selection.dropped is None:
        return frame
    dropped = [u for u in resolved.pool.uids if u in selection.dropped]
    rest = pd.DataFrame(
        {
            "uid": dropped,
            "caption": [captions[u] for u in dropped],
            "train_caption": [captions[u] for u in dropped],
            "score": np.full(len(dropped), np.nan),
        }
    )
    frame["selected"] = True
    frame["dropped_by"] = pd.array([None] * len(frame), dtype="string")
    rest["selected"] = False
    rest["dropped_by"] = pd.array([selection.dropped[u] for u in dropped], dtype="string")
    return pd.concat([frame, rest], ignore_index=True)


def positions_frame(
    uids: PoolUids, rewrites: dict[str, str] | None, scores: np.ndarray | None
) -> pd.DataFrame:
    """The rows of ``selection.parquet`` for a selection of pool positions: Arrow gathers
    from the pool's columns, pandas' Arrow-backed strings (no Python object per row but
    for the uids a caption rewrite names)."""
    uid, caption = uids.to_arrow(), uids.captions()
    train = caption
    if rewrites:
        pairs = zip(uid.to_pylist(), caption.to_pylist(), strict=True)
        rewritten = [rewrites.get(u, c) for u, c in pairs]
        train = pa.array(rewritten, caption.type)
    table = pa.table(
        {
            "uid": uid,
            "caption": caption,
            "train_caption": train,
            "score": selected_scores(scores, uids.positions),
        }
    )
    return table.to_pandas()


def write_selection(rundir: RunDir, resolved: ResolvedPool, selection: Selection) -> list[Path]:
    """Write the selection (and a synthesized selection's pixels, first) atomically; return
    the files written, in the order they should be logged."""
    written = []
    if selection.pixels is not None:  # synthesized pairs: their pixels, before the parquet
        path = synthesized_path(rundir)
        path.parent.mkdir(parents=True, exist_ok=True)
        with writing(path, "the synthesized images") as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, selection.pixels)
        written.append(path)
    frame = selection_frame(resolved, selection)
    with writing(selection_path(rundir), "the selection") as tmp:
        frame.to_parquet(tmp, index=False)
    del frame
    pa.default_memory_pool().release_unused()  # the gathers' pages: mimalloc would keep them
    return [selection_path(rundir), *written]


def read_selection(rundir: RunDir, dropped: bool = False) -> pd.DataFrame:
    """The run's ``selection.parquet``: its selected rows (with ``dropped``, a pipeline's
    dropped rows too); a SelbenchError when the select stage's output is gone."""
    path = selection_path(rundir)
    try:
        frame = pd.read_parquet(path)
    except FileNotFoundError:
        raise SelbenchError(f"{path} is missing: the select stage's output is gone") from None
    return frame if dropped else only_selected(frame)


def only_selected(frame: pd.DataFrame) -> pd.DataFrame:
    """The selected rows of a selection frame (a pipeline's keeps its dropped rows too)."""
    if "selected" not in frame.columns:
        return frame
    return frame[frame["selected"]].reset_index(drop=True)


def is_synthesized(frame: pd.DataFrame) -> bool:
    """Whether a selection holds synthesized pairs (its ``synthesized`` column)."""
    return "synthesized" in frame.columns and bool(frame["synthesized"].all())


def read_pixels(rundir: RunDir) -> np.ndarray:
    """The pixels of a synthesized selection; a SelbenchError when they are gone."""
    path = synthesized_path(rundir)
    try:
        return np.load(path)
    except FileNotFoundError:
        raise SelbenchError(
            f"{path} is missing: the select stage's synthesized images are gone"
        ) from None


def training_captions(frame: pd.DataFrame) -> dict[str, str]:
    """uid -> the caption the model trains on."""
    return dict(zip(frame["uid"], frame["train_caption"], strict=True))


def selection_from_file(rundir: RunDir) -> Selection:
    """The :class:`Selection` a finished select stage wrote (rewrites and scores included;
    a synthesized selection with its pixels)."""
    frame = read_selection(rundir)
    if is_synthesized(frame):
        pixels = np.load(synthesized_path(rundir))
        made = frame["train_caption"].tolist()
        return Selection(
            uids=frame["uid"].tolist(),
            synthesized=Synthesized(pixels, made, frame["source_uid"].tolist()),
            pixels=pixels,
        )
    columns = zip(frame["uid"], frame["train_caption"], frame["caption"], strict=True)
    rewrites = {u: t for u, t, c in columns if t != c}
    scored = zip(frame["uid"], frame["score"], strict=True)
    scores = {u: float(s) for u, s in scored if not pd.isna(s)}
    return Selection(uids=frame["uid"].tolist(), captions=rewrites or None, scores=scores or None)
