"""The array form of a Selection (selbench/positions.py): pool rows and a score array in
pool order, checked, written and hashed without a Python object per pool sample, and
equal in every output to the list form of the same selection."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from selbench.errors import PluginError
from selbench.pools.arrow import ArrowStrings
from selbench.positions import PoolScores, PoolUids
from selbench.run.selection_io import positions_frame, selection_frame
from selbench.run.spec import selection_hash
from selbench.strategy import Selection, SelectionContext, validate_selection


class _Pool:
    """A pool view over Arrow columns, as a metadata pool's."""

    def __init__(self, uids: list[str]) -> None:
        self.uids = ArrowStrings(pa.chunked_array([pa.array(uids[:3]), pa.array(uids[3:])]))
        self.captions = ArrowStrings(pa.array([f"caption of {u}" for u in uids]))
        self.fingerprint = "test"

    def __len__(self) -> int:
        return len(self.uids)


UIDS = [hashlib.md5(str(i).encode()).hexdigest() for i in range(8)]


def _ctx(tmp_path: Path, pool: _Pool | None = None) -> SelectionContext:
    return SelectionContext(
        pool=pool or _Pool(UIDS),  # type: ignore[arg-type]
        budget_count=3,
        budget_fraction=3 / 8,
        seed=0,
        device="cpu",
        work_dir=tmp_path,
    )


def _check(selection: Selection, ctx: SelectionContext) -> Selection:
    return validate_selection(selection, ctx.pool.uids, 3, "arrays", pool=ctx.pool)


def test_positions_read_as_the_list_form(tmp_path):
    ctx = _ctx(tmp_path)
    scores = np.linspace(0.0, 0.7, 8).astype(np.float32)
    checked = _check(Selection.from_positions(ctx, np.array([5, 0, 2]), scores=scores), ctx)
    assert isinstance(checked.uids, PoolUids) and isinstance(checked.scores, PoolScores)
    assert checked.uids == [UIDS[5], UIDS[0], UIDS[2]] and len(checked.uids) == 3
    assert list(checked.uids[1:]) == [UIDS[0], UIDS[2]]
    assert checked.scores[UIDS[7]] == pytest.approx(0.7) and len(checked.scores) == 8
    assert UIDS[1] in checked.scores and "nope" not in checked.scores


def test_frame_and_hash_equal_those_of_the_list_form(tmp_path):
    ctx = _ctx(tmp_path)
    scores = np.arange(8, dtype=np.float32) / 3
    rows = np.array([6, 1, 3])
    rewrites = {UIDS[1]: "rewritten"}
    arrays = _check(
        Selection.from_positions(ctx, rows, scores=scores, captions=rewrites, metrics={"m": 1.0}),
        ctx,
    )
    listed = _check(
        Selection(
            uids=[UIDS[i] for i in rows],
            scores={u: float(s) for u, s in zip(UIDS, scores, strict=True)},
            captions=rewrites,
        ),
        ctx,
    )

    class Resolved:
        pool = ctx.pool

    mine = selection_frame(Resolved(), arrays)  # type: ignore[arg-type]
    theirs = selection_frame(Resolved(), listed)  # type: ignore[arg-type]
    pd.testing.assert_frame_equal(mine, theirs)
    assert mine["train_caption"].tolist()[1] == "rewritten"
    assert selection_hash(arrays.uids) == selection_hash(list(listed.uids))
    assert arrays.metrics == {"m": 1.0}


def test_frame_without_scores_has_nan(tmp_path):
    ctx = _ctx(tmp_path)
    checked = _check(Selection.from_positions(ctx, [1, 2, 4]), ctx)
    frame = positions_frame(checked.uids, None, None)  # type: ignore[arg-type]
    assert frame["score"].isna().all() and frame["uid"].tolist() == [UIDS[i] for i in (1, 2, 4)]


def test_arrow_hash_equals_python_sorted_for_non_ascii():
    uids = ["b", "a\u00e9", "\U0001f600", "Z", "a", "\u4e2d", "ab", "\uffff", ""]
    pool = _Pool(uids)
    everything = PoolUids(pool, np.arange(len(uids)))  # type: ignore[arg-type]
    assert selection_hash(everything) == selection_hash(list(uids))
    assert selection_hash(pool.uids) == selection_hash(list(uids))


@pytest.mark.parametrize(
    ("rows", "scores", "message"),
    [
        ([1, 1, 2], None, "returned 1 duplicate uids, e.g. ['" + UIDS[1]),
        ([0, 8, 2], None, "returned 1 positions outside the pool (0 to 7), e.g. [8]"),
        ([-1, 0, 2], None, "positions outside the pool"),
        ([0, 1], None, "returned 2 uids, the budget is exactly 3"),
        ([0, 1, 2, 3], None, "returned 4 uids, the budget is exactly 3"),
        ([0.0, 1.0, 2.0], None, "expected a 1-d integer array"),
        ([[0, 1, 2]], None, "expected a 1-d integer array"),
        ([0, 1, 2], np.zeros(7), "score array of shape (7,)"),
        ([0, 1, 2], np.array(["x"] * 8), "expected (8,) numbers"),
    ],
)
def test_invalid_positions_are_rejected_naming_the_plugin(tmp_path, rows, scores, message):
    ctx = _ctx(tmp_path)
    with pytest.raises(PluginError, match="strategy 'arrays'") as raised:
        _check(Selection.from_positions(ctx, np.asarray(rows), scores=scores), ctx)
    assert message in str(raised.value)


def test_caption_rewrites_beside_positions_are_checked(tmp_path):
    ctx = _ctx(tmp_path)
    selection = Selection.from_positions(ctx, [0, 1, 2], captions={UIDS[5]: "x"})
    with pytest.raises(PluginError, match="'arrays' rewrote captions of 1 unselected uids"):
        _check(selection, ctx)


def test_positions_without_their_pool_are_refused(tmp_path):
    selection = Selection(uids=[], positions=np.array([0, 1, 2]))
    with pytest.raises(PluginError, match="Selection.from_positions"):
        validate_selection(selection, UIDS, 3, "arrays")


def test_positions_given_as_fields_use_the_context_pool(tmp_path):
    ctx = _ctx(tmp_path)
    selection = Selection(uids=[], positions=np.array([2, 0, 1]), score_array=np.ones(8))
    checked = _check(selection, ctx)
    assert checked.uids == [UIDS[2], UIDS[0], UIDS[1]] and checked.scores[UIDS[3]] == 1.0
