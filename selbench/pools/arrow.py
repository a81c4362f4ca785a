"""Pools' columns as Arrow: read-only string sequences backed by Arrow arrays
(:class:`ArrowStrings`), how pools hand strategies their uids and captions without one
Python object per row, and a parquet file's frame read through a memory-mapped Arrow IPC
copy of it (:func:`mapped_frame`), how a shard pool holds its index."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, overload

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from selbench.columns import take_rows
from selbench.errors import StorageError
from selbench.fileutil import writing

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("selbench.pools")


class ArrowStrings(Sequence[str]):
    """A read-only sequence of strings backed by an Arrow string array (chunked: one chunk
    per metadata file of a metadata pool; no Python object per row, and no 2 GiB limit of
    one array's 32-bit offsets): indexing gives ``str``, slicing another
    :class:`ArrowStrings`, iteration decodes a block at a time, and it equals a list of
    the same strings."""

    BLOCK = 65_536  # rows decoded to Python at a time while iterating

    def __init__(self, array: pa.Array | pa.ChunkedArray) -> None:
        if isinstance(array, pa.Array):
            array = pa.chunked_array([array], array.type)
        self.arrow: pa.ChunkedArray = array

    def __len__(self) -> int:
        return len(self.arrow)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> ArrowStrings: ...

    def __getitem__(self, index: int | slice) -> str | ArrowStrings:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return ArrowStrings(self.arrow.slice(start, max(stop - start, 0)))
            return ArrowStrings(take_rows(self.arrow, np.arange(start, stop, step)))
        n = len(self)
        if index < -n or index >= n:
            raise IndexError(f"index {index} out of range for {n} strings")
        return str(self.arrow[index % n].as_py())

    def __iter__(self) -> Iterator[str]:
        for first in range(0, len(self), self.BLOCK):
            yield from self.arrow.slice(first, self.BLOCK).to_pylist()

    def __eq__(self, other: object) -> bool:
        """Equal to a list (or another :class:`ArrowStrings`) of the same strings, as the
        ``list[str]`` it stands in for is; anything else compares as a list would."""
        if not isinstance(other, (list, ArrowStrings)):
            return NotImplemented
        if len(other) != len(self):
            return False
        return all(mine == theirs for mine, theirs in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable-sequence semantics, as a list

    def take(self, rows: np.ndarray | Sequence[int]) -> list[str]:
        """``[self[i] for i in rows]`` (non-negative ``rows``) in one Arrow gather."""
        return [str(value) for value in take_rows(self.arrow, rows).to_pylist()]

    def __repr__(self) -> str:
        return f"ArrowStrings({len(self)} strings)"

    def to_numpy(self) -> np.ndarray:
        """The strings as a NumPy object array (one Python string per row)."""
        return np.asarray(self.arrow.to_numpy(), dtype=object)


def arrow_strings(column: pd.Series) -> ArrowStrings:
    """A string column of a pandas frame as :class:`ArrowStrings`: pandas' own Arrow
    arrays where it holds them (pandas 3's ``str`` dtype; no copy), else converted."""
    to_arrow = getattr(column.array, "__arrow_array__", None)
    array = to_arrow() if to_arrow is not None else pa.array(column, type=pa.large_string())
    return ArrowStrings(array)


def mapped_frame(parquet: Path) -> pd.DataFrame:
    """The frame of ``parquet`` (equal to ``pd.read_parquet``'s, dtypes included), read
    from an Arrow IPC copy of it beside it (``NAME.arrow``), memory-mapped: its string
    columns are pandas' Arrow strings over the mapped file (no copy, no Python object per
    row), so only the numeric columns take memory. The copy is written once, atomically,
    from the parquet, and again when it is missing, unreadable or not the parquet's shape
    (rows and schema, from the parquet's footer); where it cannot be written (a full
    disk), the parquet is read as before. Raises what reading the parquet raises."""
    footer = pq.ParquetFile(parquet)
    rows, schema = footer.metadata.num_rows, footer.schema_arrow
    del footer
    copy = parquet.with_suffix(".arrow")
    table = _mapped_table(copy)
    if table is not None and table.num_rows == rows and table.schema.equals(schema):
        return table.to_pandas()
    table = pq.read_table(parquet)
    try:
        with writing(copy, "pool index (Arrow copy)") as tmp:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as out:
                out.write_table(table)
    except StorageError as exc:
        log.warning("%s; reading the pool index from %s instead", exc, parquet)
        return table.to_pandas()
    del table
    mapped = _mapped_table(copy)
    if mapped is None:  # unreadable right after writing: the filesystem misbehaves
        return pq.read_table(parquet).to_pandas()
    return mapped.to_pandas()


def mapped_strings(
    parquet: Path, copy: Path, columns: Sequence[str], nulls: str = ""
) -> pa.Table | None:
    """``columns`` of ``parquet`` as non-null Arrow strings (nulls as ``nulls``), read
    memory-mapped from an Arrow IPC copy of them at ``copy`` (one chunk per column): the
    characters stay in the page cache, not in the process's own memory. The copy is
    written once, atomically, and again when it is missing, unreadable or not the
    parquet's row count; None where it cannot be written (a read-only or full disk)."""
    rows = pq.ParquetFile(parquet).metadata.num_rows
    schema = pa.schema([(name, pa.string()) for name in columns])
    table = _mapped_table(copy)
    if table is not None and table.num_rows == rows and table.schema.equals(schema):
        return table
    read = pq.read_table(parquet, columns=list(columns))
    arrays = [read.column(c).cast(pa.string()).fill_null(nulls).combine_chunks() for c in columns]
    table = pa.Table.from_arrays(arrays, schema=schema)
    del read, arrays
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        with writing(copy, "pool columns (Arrow copy)") as tmp:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as out:
                out.write_table(table)
    except (StorageError, OSError) as exc:
        log.warning("%s; holding the columns of %s in memory instead", exc, parquet)
        return None
    del table
    return _mapped_table(copy)


def _mapped_table(path: Path) -> pa.Table | None:
    """The Arrow IPC file ``path`` memory-mapped (its buffers stay in the map), or None
    when it is missing or unreadable."""
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        table.validate()  # the cheap structural check: it reads no row
        return table
    except (OSError, ValueError):  # missing, torn, not an IPC file (ArrowInvalid)
        return None


def frame_rows(frame: pd.DataFrame, columns: Sequence[str], block: int = 65_536) -> Iterator[tuple]:
    """The ``columns`` of every row of ``frame`` as a tuple of plain Python values, in
    order, converted a ``block`` of rows at a time (``tolist`` of whole columns would hold
    one Python object per row and column of the pool)."""
    for first in range(0, len(frame), block):
        part = frame.iloc[first : first + block]
        yield from zip(*(part[name].tolist() for name in columns), strict=True)


# Rows per partition of :func:`repeated_string`'s check: its hash table (about 75 bytes a
# distinct string) holds about this many strings at a time.
UNIQUE_PARTITION_ROWS = 1 << 19


def repeated_string(strings: pa.ChunkedArray) -> str | None:
    """A string that occurs more than once in ``strings`` (nulls aside), or None.

    Arrow's ``count_distinct`` over the whole column holds a hash table of every string,
    about 75 bytes each: at 8M DataComp uids a gigabyte, the largest part of a metadata
    pool's memory (issue 32). Equal strings have equal last bytes, so the rows are split
    by a hash of their last 8 bytes (:func:`_tail_buckets`) into partitions of about
    :data:`UNIQUE_PARTITION_ROWS` rows, and each partition is checked on its own: the
    hash table holds one partition at a time. A column of one partition is checked as
    before. Arrow has no element-wise hash kernel, hence the buckets in numpy.
    """
    import pyarrow.compute as pc

    parts = min(256, -(-len(strings) // UNIQUE_PARTITION_ROWS))
    pieces: Iterable[pa.ChunkedArray]
    if parts <= 1:
        pieces = [strings]
    else:
        buckets = [_tail_buckets(chunk, parts) for chunk in strings.chunks]
        pieces = (
            pa.chunked_array(
                [c.filter(pa.array(b == p)) for c, b in zip(strings.chunks, buckets, strict=True)],
                strings.type,
            )
            for p in range(parts)
        )
    for piece in pieces:
        if pc.count_distinct(piece).as_py() != len(piece) - piece.null_count:
            counts = pc.value_counts(piece)
            repeated = counts.filter(pc.greater(counts.field("counts"), 1))
            return str(repeated[0]["values"].as_py())
    return None


def _tail_buckets(chunk: pa.Array, parts: int, block: int = 1 << 20) -> np.ndarray:
    """The partition, in ``range(parts)``, of every string of ``chunk`` (a ``string``
    or ``large_string`` array): its last 8 bytes (fewer for shorter strings, zeros before
    them) as an integer, Fibonacci-hashed. Read from the Arrow buffers ``block`` rows at a
    time."""
    wide = pa.types.is_large_string(chunk.type)
    offsets = np.frombuffer(chunk.buffers()[1], np.int64 if wide else np.int32)
    offsets = offsets[chunk.offset : chunk.offset + len(chunk) + 1]
    data_buffer = chunk.buffers()[2]
    data = (
        np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    )
    found = np.empty(len(chunk), np.uint8)  # parts <= 256 (repeated_string caps it)
    for lo in range(0, len(chunk), block):
        hi = min(lo + block, len(chunk))
        starts, ends = offsets[lo:hi], offsets[lo + 1 : hi + 1]
        key = np.zeros(len(starts), np.uint64)
        for back in range(1, 9):
            at = ends - back
            has = at >= starts
            byte = data[np.where(has, at, 0)] if len(data) else np.zeros(len(at), np.uint8)
            key |= np.where(has, byte, 0).astype(np.uint64) << np.uint64(8 * (back - 1))
        mixed = key * np.uint64(0x9E3779B97F4A7C15)  # wraps: Knuth's multiplicative hash
        found[lo:hi] = (mixed >> np.uint64(32)) % np.uint64(parts)
    return found
