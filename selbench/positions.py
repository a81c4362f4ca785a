"""A selection as pool positions: the form of :class:`~selbench.strategy.Selection` that
holds no Python object per pool sample.

A strategy that ranks or filters arrays returns ``Selection.from_positions(ctx, rows,
scores=values)``: the chosen rows of ``ctx.pool`` as an integer array and, optionally, one
score per pool sample as a float array in pool order. The selection still reads as the
list form does (``selection.uids`` is a sequence of strings, ``selection.scores`` a
mapping uid -> float), lazily: :class:`PoolUids` and :class:`PoolScores` read the pool's
columns only when asked. The harness checks it (:func:`check_positions`), writes it
(``selection.parquet``, with Arrow gathers from the pool's columns) and hashes it
(:func:`selbench.run.spec.selection_hash`) without converting the pool to Python.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar, overload

import numpy as np

from selbench.errors import PluginError

if TYPE_CHECKING:
    import pyarrow as pa

    from selbench.strategy import PoolView, Selection

S = TypeVar("S", bound="Selection")

# Rows decoded to Python at a time while iterating.
BLOCK = 65_536


def take_strings(values: Sequence[str], rows: np.ndarray) -> pa.Array | pa.ChunkedArray:
    """``[values[i] for i in rows]`` as Arrow strings: a gather from the Arrow array behind
    ``values`` when it has one (a pool's :class:`ArrowStrings`; chunk by chunk,
    :func:`~selbench.columns.take_rows`, so no copy of the whole column), else from
    the Python sequence."""
    import pyarrow as pa  # here: `import selbench` needs no pyarrow (docs/gpu-check.md)

    from selbench.columns import take_rows

    rows = np.asarray(rows, dtype=np.int64)
    arrow = getattr(values, "arrow", None)
    if isinstance(arrow, (pa.ChunkedArray, pa.Array)):
        return take_rows(arrow, rows)
    return pa.array([values[int(i)] for i in rows], pa.string())


class PoolUids(Sequence[str]):
    """The uids of ``pool`` at ``positions``, in that order: a read-only sequence of
    strings that reads the pool's uids only when indexed or iterated (a block at a time),
    and equals a list of the same strings."""

    def __init__(self, pool: PoolView, positions: np.ndarray) -> None:
        self.pool = pool
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> PoolUids: ...

    def __getitem__(self, index: int | slice) -> str | PoolUids:
        if isinstance(index, slice):
            return PoolUids(self.pool, self.positions[index])
        return str(self.pool.uids[int(self.positions[index])])

    def __iter__(self) -> Iterator[str]:
        for first in range(0, len(self), BLOCK):
            yield from self.to_arrow(first, first + BLOCK).to_pylist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        if len(other) != len(self):
            return False
        return all(mine == theirs for mine, theirs in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # compares as the list it stands in for

    def __repr__(self) -> str:
        return f"PoolUids({len(self)} of {len(self.pool)} pool samples)"

    def to_arrow(self, start: int = 0, stop: int | None = None) -> pa.Array | pa.ChunkedArray:
        """The uids (rows ``start:stop`` of them) as Arrow strings (chunked when the pool's
        column is)."""
        return take_strings(self.pool.uids, self.positions[start:stop])

    def captions(self) -> pa.Array | pa.ChunkedArray:
        """The pool's captions of these samples, as Arrow strings (chunked when the pool's
        column is)."""
        return take_strings(self.pool.captions, self.positions)


class PoolScores(Mapping[str, float]):
    """uid -> score for every sample of ``pool``, from ``values`` in pool order: a
    read-only mapping whose uid index is built on the first lookup by uid (iteration,
    ``len`` and ``values()`` need none)."""

    def __init__(self, pool: PoolView, values: np.ndarray) -> None:
        self.pool = pool
        self.array = values
        self._index: dict[str, int] | None = None

    def _rows(self) -> dict[str, int]:
        if self._index is None:
            self._index = {uid: i for i, uid in enumerate(self.pool.uids)}
        return self._index

    def __getitem__(self, uid: str) -> float:
        return float(self.array[self._rows()[uid]])

    def __contains__(self, uid: object) -> bool:
        return uid in self._rows()

    def __iter__(self) -> Iterator[str]:
        return iter(self.pool.uids)

    def __len__(self) -> int:
        return len(self.array)

    def __repr__(self) -> str:
        return f"PoolScores({len(self)} pool samples)"


def check_positions(
    positions: object, scores: object, pool: PoolView, expected_count: int, plugin: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """A selection's ``positions`` (rows of ``pool``) and ``score_array`` checked against
    the contract, with numpy alone: a 1-d integer array, every row inside the pool, no
    row twice, exactly ``expected_count`` rows; the scores, when given, one number per
    pool sample. Returns them as ``int64`` and as given; else PluginError naming the
    plugin (duplicates by their uids, as the list form names them)."""
    rows = np.asarray(positions)
    if rows.ndim != 1 or not (rows.dtype.kind in "iu" or (rows.size == 0 and rows.dtype != bool)):
        raise PluginError(
            f"strategy {plugin!r} returned positions of shape {rows.shape} and dtype "
            f"{rows.dtype}; expected a 1-d integer array of rows of ctx.pool"
        )
    rows = rows.astype(np.int64, copy=False)
    n = len(pool)
    outside = rows[(rows < 0) | (rows >= n)]
    if len(outside):
        raise PluginError(
            f"strategy {plugin!r} returned {len(outside)} positions outside the pool "
            f"(0 to {n - 1}), e.g. {outside[:3].tolist()!r}"
        )
    ordered = np.sort(rows)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if len(repeated):
        shown = sorted(str(pool.uids[int(i)]) for i in repeated[:3])
        raise PluginError(
            f"strategy {plugin!r} returned {len(repeated)} duplicate uids, e.g. {shown!r}"
        )
    del ordered
    if len(rows) != expected_count:
        raise PluginError(
            f"strategy {plugin!r} returned {len(rows)} uids, the budget is exactly {expected_count}"
        )
    return rows, _checked_scores(scores, n, plugin)


def _checked_scores(scores: object, n: int, plugin: str) -> np.ndarray | None:
    if scores is None:
        return None
    values = np.asarray(scores)
    if values.shape != (n,) or values.dtype.kind not in "fiu":
        raise PluginError(
            f"strategy {plugin!r} returned a score array of shape {values.shape} and dtype "
            f"{values.dtype}; expected ({n},) numbers, one per sample of ctx.pool in its order"
        )
    return values


def selected_scores(scores: np.ndarray | None, positions: np.ndarray) -> np.ndarray:
    """The float64 scores of the selected rows (NaN for all when there are none)."""
    if scores is None:
        return np.full(len(positions), np.nan)
    return np.asarray(scores[positions], dtype=np.float64)


def pool_of(selection_uids: Any, fallback: PoolView | None) -> PoolView | None:
    """The pool a selection's positions index: the one :meth:`Selection.from_positions`
    recorded, else ``fallback`` (the context's)."""
    return selection_uids.pool if isinstance(selection_uids, PoolUids) else fallback


def validated_positions(selection: S, pool: PoolView | None, expected_count: int, plugin: str) -> S:
    """A selection of positions checked (:func:`check_positions`, then its caption
    rewrites, uid-keyed scores and dropped uids as the list form's), with ``uids`` and
    ``scores`` reading ``pool``; PluginError naming the plugin."""
    if pool is None:
        raise PluginError(
            f"strategy {plugin!r} returned positions without their pool: build the "
            "selection with Selection.from_positions(ctx, positions, scores=...)"
        )
    rows, values = check_positions(
        selection.positions, selection.score_array, pool, expected_count, plugin
    )
    uids = PoolUids(pool, rows)
    scores = selection.scores
    if values is not None:
        scores = PoolScores(pool, values)
    elif scores:  # uid-keyed scores beside positions: checked as the list form's
        stray = [u for u in scores if u not in _pool_set(pool)]
        _refuse(plugin, stray, "returned scores for {n} uids not in the pool")
    if selection.captions or selection.dropped:
        chosen = set(uids)
        captions = selection.captions or {}
        _refuse(
            plugin,
            [u for u in captions if u not in chosen],
            "rewrote captions of {n} unselected uids",
        )
        empty = [u for u, c in captions.items() if not isinstance(c, str) or not c]
        _refuse(plugin, empty, "returned {n} empty caption rewrites")
        dropped = selection.dropped or {}
        _refuse(plugin, [u for u in dropped if u in chosen], "marked {n} selected uids as dropped")
        _refuse(
            plugin,
            [u for u in dropped if u not in _pool_set(pool)],
            "dropped {n} uids not in the pool",
        )
    return replace(selection, uids=uids, scores=scores, positions=rows, score_array=values)


def _pool_set(pool: PoolView) -> set[str]:
    return set(pool.uids)


def _refuse(plugin: str, found: list, problem: str) -> None:
    """PluginError ``strategy 'x' <problem with {n}>, e.g. <three of them>`` if ``found``."""
    if found:
        raise PluginError(f"strategy {plugin!r} {problem.format(n=len(found))}, e.g. {found[:3]!r}")


def validate_scores(values: object, expected: int, plugin: str) -> np.ndarray:
    """A scorer's output as float64, checked: one finite number per sample of the view;
    else PluginError naming the plugin."""
    try:
        scores = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PluginError(
            f"strategy {plugin!r} returned scores that are not numbers: {exc}"
        ) from None
    if scores.shape != (expected,):
        raise PluginError(
            f"strategy {plugin!r} returned scores of shape {scores.shape}; expected one per "
            f"sample of its view, ({expected},)"
        )
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise PluginError(
            f"strategy {plugin!r} returned {len(bad)} non-finite scores, e.g. at row "
            f"{bad[:3].tolist()!r}"
        )
    return scores


def validate_mask(values: object, expected: int, plugin: str) -> np.ndarray:
    """A rule's output (:meth:`Strategy.passes`) as a bool array of the view's length."""
    mask = np.asarray(values)
    if mask.shape != (expected,) or mask.dtype != np.bool_:
        raise PluginError(
            f"strategy {plugin!r} returned a rule mask of shape {mask.shape} and dtype "
            f"{mask.dtype}; expected ({expected},) booleans, one per sample of its view"
        )
    return mask
