"""Chunks of an entry being computed: ``produce``'s batches checked, re-cut into chunks of
``chunk_size`` rows, normalised and written under their final names only when complete.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Generator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from selbench.cache.layout import (
    DTYPE,
    PARTIAL_INFO,
    EntrySpec,
    Produce,
    ProgressCallback,
    chunk_name,
    temp_chunk_index,
    token,
)
from selbench.errors import SelbenchError
from selbench.fileutil import atomic_write_text, storage_error

log = logging.getLogger("selbench.cache")


class ProduceError(SelbenchError):
    """``produce`` broke its contract (shape, count, non-finite values): partial data is dropped."""


class DimChanged(Exception):
    """Resumed batches have another dim than the interrupted attempt's chunks."""


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise the rows of ``x`` in float32 and return them as float16.

    Rows are first scaled by their largest absolute value so that squaring cannot overflow.
    All-zero rows stay zero.
    """
    x = np.asarray(x, dtype=np.float32)
    scale = np.max(np.abs(x), axis=1, keepdims=True)
    scale[scale == 0] = 1.0
    scaled = x / scale
    norms = np.sqrt(np.sum(scaled * scaled, axis=1, keepdims=True, dtype=np.float32))
    norms[norms == 0] = 1.0
    return (scaled / norms).astype(DTYPE)


def _write_chunk(path: Path, image: np.ndarray, text: np.ndarray) -> None:
    """Write one chunk so that ``path`` exists only once it is complete; a failed write
    (a full disk) removes its temporary file and raises StorageError."""
    tmp = path.with_name(f".{path.name}.{token()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, image=image, text=text)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise storage_error("embedding cache chunk", path, exc) from exc
        raise


def read_chunk(path: Path, rows: int, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The (image, text) arrays of a chunk, or None if it is missing or not as expected."""
    try:
        with np.load(path, allow_pickle=False) as data:
            image, text = data["image"], data["text"]
    except Exception:  # any failure to parse means the chunk is unusable
        return None
    for array in (image, text):
        if array.dtype != DTYPE or array.shape != (rows, dim):
            return None
    return image, text


def present_chunks(partial: Path, spec: EntrySpec, dim: int, indices: range) -> set[int]:
    """The intact chunks among ``indices``; damaged ones, and temp files of chunks in
    ``indices`` (left by a killed writer), are removed. Files of other chunks are left
    alone: other ranks may be writing them."""
    present = set()
    for index in indices:
        path = partial / chunk_name(index)
        if path.exists():
            if read_chunk(path, spec.chunk_rows(index), dim) is not None:
                present.add(index)
            else:
                path.unlink(missing_ok=True)
    if partial.is_dir():
        for path in partial.iterdir():
            if temp_chunk_index(path.name) in indices:
                path.unlink(missing_ok=True)
    return present


def missing_runs(indices: range, present: set[int]) -> list[range]:
    """The runs of consecutive chunk indices in ``indices`` that are not ``present``."""
    runs: list[range] = []
    first = None
    for index in [*indices, None]:
        missing = index is not None and index not in present
        if missing and first is None:
            first = index
        elif not missing and first is not None:
            runs.append(range(first, index if index is not None else indices.stop))
            first = None
    return runs


def fill(
    spec: EntrySpec,
    partial: Path,
    produce: Produce,
    indices: range,
    present: set[int],
    dim: int | None,
    progress: ProgressCallback | None,
) -> tuple[int, int | None]:
    """Compute the chunks of ``indices`` not in ``present``, one ``produce`` call per
    run of consecutive missing chunks; return (samples resumed, dim)."""
    rows_in = spec.rows(indices)
    resumed = spec.rows(present)
    done = [resumed]

    def advance(rows: int) -> None:
        done[0] += rows
        if progress is not None:
            progress(done[0], rows_in)

    if progress is not None:
        progress(resumed, rows_in)
    runs = missing_runs(indices, present)
    if resumed and runs:
        log.info("resuming embeddings %s: %d of %d samples done", spec.entry_id, resumed, rows_in)
    for run in runs:
        dim = _write_run(spec, partial, produce, run, dim, advance)
    return resumed, dim


def _write_run(
    spec: EntrySpec,
    partial: Path,
    produce: Produce,
    run: range,
    dim: int | None,
    advance: Callable[[int], None],
) -> int:
    """Write the chunks of ``run`` from ``produce(first sample of run)``; return the dim."""
    index = run.start
    buffer: list[tuple[np.ndarray, np.ndarray]] = []
    buffered = 0
    with closing(_run_batches(spec, produce, run, dim)) as batches:
        for image, text in batches:
            dim = image.shape[1]
            buffer.append((image, text))
            buffered += image.shape[0]
            while index < run.stop and buffered >= spec.chunk_rows(index):
                rows_needed = spec.chunk_rows(index)
                chunk_image, chunk_text, buffer = _take_rows(buffer, rows_needed)
                buffered -= rows_needed
                if not (partial / PARTIAL_INFO).exists():
                    atomic_write_text(
                        partial / PARTIAL_INFO, json.dumps({**spec.as_dict(), "dim": dim})
                    )
                _write_chunk(
                    partial / chunk_name(index),
                    normalise_rows(chunk_image),
                    normalise_rows(chunk_text),
                )
                index += 1
                advance(rows_needed)
    assert dim is not None
    return dim


def _run_batches(
    spec: EntrySpec, produce: Produce, run: range, dim: int | None
) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
    """The checked float32 batches of ``produce(first sample of run)``, cut at the run's end.

    A run that ends before the pool does stops reading once it has its rows; one that ends
    with the pool reads ``produce`` to the end (too many rows is an error). ``produce``'s
    iterator is closed however this one ends.
    """
    n, embedder_id = spec.n_samples, spec.embedder_id
    start = run.start * spec.chunk_size
    end = min(run.stop * spec.chunk_size, n)
    produced = start
    batches = produce(start)
    try:
        for batch in batches:
            if produced == start and dim is not None:
                got = _batch_dim(batch)
                if got is not None and got != dim:
                    raise DimChanged(f"embedder now yields dim {got}, chunks have {dim}")
            image, text = _as_batch(batch, dim, embedder_id, produced)
            dim = image.shape[1]
            rows = image.shape[0]
            if produced + rows > n:
                raise ProduceError(
                    f"embedder {embedder_id!r} produced more than n_samples={n} samples "
                    f"(batch of {rows} rows after {produced})"
                )
            if produced + rows > end:  # the run ends inside this batch
                rows = end - produced
                image, text = image[:rows], text[:rows]
            produced += rows
            yield image, text
            if produced == end and end < n:
                break  # the rest of the pool belongs to other runs or ranks
    finally:
        close = getattr(batches, "close", None)
        if callable(close):
            close()
    if produced < end:
        raise ProduceError(
            f"embedder {embedder_id!r} stopped after sample {produced}: expected "
            f"n_samples={n} (produce({start}) yielded {produced - start} samples)"
        )


def _as_batch(
    batch: Any, dim: int | None, embedder_id: str, first_sample: int
) -> tuple[np.ndarray, np.ndarray]:
    """Check one ``(image, text)`` batch from ``produce``; return both as float32 arrays."""
    try:
        image, text = batch
    except (TypeError, ValueError):
        raise ProduceError(
            f"embedder {embedder_id!r}: produce must yield (image_batch, text_batch) pairs, "
            f"got {type(batch).__name__}"
        ) from None
    image = _as_float_rows(image, "image", embedder_id, first_sample)
    text = _as_float_rows(text, "text", embedder_id, first_sample)
    if image.shape[0] != text.shape[0]:
        raise ProduceError(
            f"embedder {embedder_id!r}: image batch has {image.shape[0]} rows but text batch "
            f"has {text.shape[0]}"
        )
    if image.shape[1] != text.shape[1]:
        raise ProduceError(
            f"embedder {embedder_id!r}: image embeddings have {image.shape[1]} columns but "
            f"text embeddings {text.shape[1]}; both must have the same dim"
        )
    if dim is not None and image.shape[1] != dim:
        raise ProduceError(
            f"embedder {embedder_id!r}: batch starting at sample {first_sample} has "
            f"{image.shape[1]} columns, earlier batches had {dim}"
        )
    return image, text


def _as_float_rows(value: Any, kind: str, embedder_id: str, first_sample: int) -> np.ndarray:
    """One side of a batch as a finite 2-d float32 array; else ProduceError."""
    array = np.asarray(value)
    if array.ndim != 2 or array.dtype.kind != "f":
        raise ProduceError(
            f"embedder {embedder_id!r}: {kind} batch must be a 2-d float array, "
            f"got shape {array.shape} dtype {array.dtype}"
        )
    if array.shape[1] < 1:
        raise ProduceError(f"embedder {embedder_id!r}: {kind} batch has 0 columns")
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        sample = first_sample + int(np.argmin(finite))
        raise ProduceError(
            f"embedder {embedder_id!r} produced non-finite values (NaN/inf, or beyond "
            f"float32 range) in the {kind} embedding of sample {sample} (pool order); "
            "nothing was cached"
        )
    return array


def _batch_dim(batch: Any) -> int | None:
    """The column count of a batch's image array, if it looks like a 2-d array."""
    try:
        shape = np.shape(batch[0])
    except (TypeError, IndexError, ValueError):
        return None
    return shape[1] if len(shape) == 2 else None


def _take_rows(
    buffer: list[tuple[np.ndarray, np.ndarray]], rows: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Split the first ``rows`` rows off a buffer of batches: (image, text, rest).

    Only the rows taken are copied; the rest stays as views of the batches.
    """
    taken: list[tuple[np.ndarray, np.ndarray]] = []
    need = rows
    rest = list(buffer)
    while need:
        image, text = rest.pop(0)
        if len(image) > need:
            rest.insert(0, (image[need:], text[need:]))
            image, text = image[:need], text[:need]
        taken.append((image, text))
        need -= len(image)
    image = np.concatenate([t[0] for t in taken])
    text = np.concatenate([t[1] for t in taken])
    return image, text, rest
