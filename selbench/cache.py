"""Embedding cache: one embedding pass per (pool fingerprint, embedder id), shared by all runs.

Layout under the cache root (``$SELBENCH_HOME/embeddings`` by default)::

    <entry_id>/                 a complete entry: image.npy, text.npy, manifest.json
    <entry_id>.partial/         an interrupted computation: partial.json, chunk-000000.npz, ...
    <entry_id>.lock             the entry's file lock (kept; an empty file)
    .tmp-<entry_id>-<token>/    an entry being assembled (renamed to <entry_id>/ when complete)
    .sha256-memo.json           memoised sha256 digests of .npy files, keyed by path+size+mtime

Files only ever appear under their final names when complete (write to a temp name, then
``os.replace``/``os.rename``), so a process killed at any point leaves complete chunks, a
complete entry, or nothing. A computation resumes from the first missing chunk. Every load
validates the entry (manifest, shapes, dtype, sha256) and removes a damaged one, which is
then recomputed: a bad entry is never used silently. See ``docs/cache.md``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock
import numpy as np

from selbench.errors import ConfigError, SelbenchError
from selbench.fileutil import atomic_write_text, file_sha256, memoised_sha256, storage_error
from selbench.paths import selbench_home

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
DTYPE = np.float16
ARRAY_NAMES = ("image", "text")
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
TMP_PREFIX = ".tmp-"
PARTIAL_INFO = "partial.json"
MANIFEST = "manifest.json"
MEMO_NAME = ".sha256-memo.json"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Manifest keys the cache owns; ``meta`` may not override them ("versions" is merged).
_CORE_KEYS = frozenset(
    {
        "format",
        "entry_id",
        "pool_fingerprint",
        "embedder_id",
        "n_samples",
        "dim",
        "dtype",
        "normalised",
        "chunk_size",
        "created",
        "versions",
        "sha256",
        "status",
        "path",
        "size_mb",
    }
)

Produce = Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]]


@dataclass
class CacheEntry:
    """A complete, validated cache entry.

    ``image`` and ``text`` are read-only float16 memory maps of shape ``(n_samples, dim)``
    in pool order, with L2-normalised rows.
    """

    entry_id: str
    path: Path
    image: np.ndarray
    text: np.ndarray
    manifest: dict


@dataclass
class CacheResult:
    """What :meth:`EmbeddingCache.get_or_compute` did.

    ``hit`` is True when the entry was already complete and valid; ``seconds`` is the wall
    time of the call (load or compute, lock wait included); ``resumed_from`` is the number
    of samples taken from an interrupted earlier attempt (0 if none).
    """

    entry: CacheEntry
    hit: bool
    seconds: float
    resumed_from: int


@dataclass
class Ranks:
    """This process's place among ``world_size`` processes computing one entry together.

    ``all_gather(value)`` must return every rank's ``value`` in rank order (a collective
    call: every rank calls it the same number of times), e.g. torch.distributed's
    ``all_gather_object``; :mod:`selbench.embed_ranks` builds one under torchrun. Rank
    ``r`` computes the missing chunks of its contiguous share (:func:`rank_chunks`).
    """

    rank: int
    world_size: int
    all_gather: Callable[[Any], list[Any]]

    def __post_init__(self) -> None:
        if not (_is_int(self.world_size) and _is_int(self.rank, 0) and self.rank < self.world_size):
            raise SelbenchError(
                f"rank {self.rank!r} is not in range for a world of {self.world_size!r} ranks"
            )


class _ProduceError(SelbenchError):
    """``produce`` broke its contract (shape, count, non-finite values): partial data is dropped."""


class _DimChanged(Exception):
    """Resumed batches have another dim than the interrupted attempt's chunks."""


# -- small pure helpers ------------------------------------------------------------------
def embedder_hash(embedder_id: str) -> str:
    """The short, stable hash of an embedder id used in entry ids."""
    return hashlib.sha256(embedder_id.encode("utf-8")).hexdigest()[:12]


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


def chunk_rows(index: int, n_samples: int, chunk_size: int) -> int:
    """Number of rows in chunk ``index`` (the last chunk may be short)."""
    return min(chunk_size, n_samples - index * chunk_size)


def n_chunks(n_samples: int, chunk_size: int) -> int:
    """Number of chunks an entry of ``n_samples`` is written in."""
    return math.ceil(n_samples / chunk_size)


def chunk_name(index: int) -> str:
    """File name of chunk ``index`` inside a ``.partial`` directory."""
    return f"chunk-{index:06d}.npz"


def _chunk_index(name: str) -> int | None:
    """The index in a chunk file name, or None for other names."""
    match = re.fullmatch(r"chunk-(\d+)\.npz", name)
    return int(match.group(1)) if match else None


def rank_chunks(rank: int, world_size: int, total: int) -> range:
    """The contiguous, balanced share of ``total`` chunks that ``rank`` of ``world_size``
    computes (empty when there are more ranks than chunks)."""
    return range(total * rank // world_size, total * (rank + 1) // world_size)


def _temp_chunk_index(name: str) -> int | None:
    """The chunk index in a temp file name written by :func:`_write_chunk`, else None."""
    match = re.match(r"\.chunk-(\d+)\.npz\.", name)
    return int(match.group(1)) if match else None


def _missing_runs(indices: range, present: set[int]) -> list[range]:
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


def _token() -> str:
    """A name component unique to this process, thread and call (for temp files)."""
    return f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"


def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None if missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove(path: Path) -> None:
    """Remove a directory tree, or a file or symlink standing where one was expected."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _size_mb(n_bytes: int) -> float:
    return round(n_bytes / 1e6, 3)


def _is_int(value: Any, minimum: int = 1) -> bool:
    return type(value) is int and value >= minimum


def _versions() -> dict[str, str]:
    import selbench  # late: selbench/__init__ may import modules that use the cache

    return {
        "numpy": np.__version__,
        "selbench": selbench.__version__,
        "python": platform.python_version(),
    }


def _write_chunk(path: Path, image: np.ndarray, text: np.ndarray) -> None:
    """Write one chunk so that ``path`` exists only once it is complete; a failed write
    (a full disk) removes its temporary file and raises StorageError."""
    tmp = path.with_name(f".{path.name}.{_token()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, image=image, text=text)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise storage_error("embedding cache chunk", path, exc) from exc
        raise


def _read_chunk(path: Path, rows: int, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
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


def _as_batch(
    batch: Any, dim: int | None, embedder_id: str, first_sample: int
) -> tuple[np.ndarray, np.ndarray]:
    """Check one ``(image, text)`` batch from ``produce``; return both as float32 arrays."""
    try:
        image, text = batch
    except (TypeError, ValueError):
        raise _ProduceError(
            f"embedder {embedder_id!r}: produce must yield (image_batch, text_batch) pairs, "
            f"got {type(batch).__name__}"
        ) from None
    arrays = []
    for kind, value in (("image", image), ("text", text)):
        array = np.asarray(value)
        if array.ndim != 2 or array.dtype.kind != "f":
            raise _ProduceError(
                f"embedder {embedder_id!r}: {kind} batch must be a 2-d float array, "
                f"got shape {array.shape} dtype {array.dtype}"
            )
        if array.shape[1] < 1:
            raise _ProduceError(f"embedder {embedder_id!r}: {kind} batch has 0 columns")
        with np.errstate(over="ignore"):
            array = array.astype(np.float32)
        finite = np.isfinite(array).all(axis=1)
        if not finite.all():
            sample = first_sample + int(np.argmin(finite))
            raise _ProduceError(
                f"embedder {embedder_id!r} produced non-finite values (NaN/inf, or beyond "
                f"float32 range) in the {kind} embedding of sample {sample} (pool order); "
                "nothing was cached"
            )
        arrays.append(array)
    image, text = arrays
    if image.shape[0] != text.shape[0]:
        raise _ProduceError(
            f"embedder {embedder_id!r}: image batch has {image.shape[0]} rows but text batch "
            f"has {text.shape[0]}"
        )
    if image.shape[1] != text.shape[1]:
        raise _ProduceError(
            f"embedder {embedder_id!r}: image embeddings have {image.shape[1]} columns but "
            f"text embeddings {text.shape[1]}; both must have the same dim"
        )
    if dim is not None and image.shape[1] != dim:
        raise _ProduceError(
            f"embedder {embedder_id!r}: batch starting at sample {first_sample} has "
            f"{image.shape[1]} columns, earlier batches had {dim}"
        )
    return image, text


def _check_meta(meta: dict | None) -> dict:
    """Validate extra manifest fields before any work is done."""
    meta = dict(meta or {})
    clash = sorted(k for k in meta if k in _CORE_KEYS and k != "versions")
    if clash:
        raise SelbenchError(f"cache meta may not set reserved manifest fields {clash}")
    if "versions" in meta and not isinstance(meta["versions"], dict):
        raise SelbenchError("cache meta 'versions' must be a dict of package -> version")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise SelbenchError(f"cache meta must be JSON-serialisable: {exc}") from None
    return meta


# -- the cache ---------------------------------------------------------------------------
class EmbeddingCache:
    """Image and text embeddings of a pool, computed once per (pool, embedder) and reused."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else selbench_home() / "embeddings"

    # -- naming ----------------------------------------------------------------------
    def entry_id(self, pool_fingerprint: str, embedder_id: str) -> str:
        """``f"{pool_fingerprint}-{short hash of embedder_id}"``: stable and filesystem-safe."""
        if not isinstance(pool_fingerprint, str) or not _SAFE_NAME.match(pool_fingerprint):
            raise SelbenchError(
                f"pool fingerprint {pool_fingerprint!r} is not usable in a cache entry name "
                "(letters, digits, '.', '_', '-' only)"
            )
        if not isinstance(embedder_id, str) or not embedder_id:
            raise SelbenchError(f"embedder id must be a non-empty string, got {embedder_id!r}")
        return f"{pool_fingerprint}-{embedder_hash(embedder_id)}"

    def _entry_dir(self, entry_id: str) -> Path:
        return self.root / entry_id

    def _partial_dir(self, entry_id: str) -> Path:
        return self.root / f"{entry_id}{PARTIAL_SUFFIX}"

    def _lock(self, entry_id: str, timeout: float = -1) -> filelock.FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(self.root / f"{entry_id}{LOCK_SUFFIX}"), timeout=timeout)

    def _known_id(self, entry_id: str) -> str:
        """``entry_id`` if it names an entry (complete or partial); else ConfigError."""
        if (
            isinstance(entry_id, str)
            and _SAFE_NAME.match(entry_id)
            and not entry_id.endswith((PARTIAL_SUFFIX, LOCK_SUFFIX))
            and (self._entry_dir(entry_id).is_dir() or self._partial_dir(entry_id).is_dir())
        ):
            return entry_id
        raise ConfigError(f"no cache entry {entry_id!r}; `selbench cache ls` lists them")

    # -- sha256 memo -----------------------------------------------------------------
    def _digest(self, path: Path) -> str:
        """sha256 of ``path``, memoised by (path, size, mtime_ns) in the cache root."""
        return memoised_sha256(path, self.root / MEMO_NAME)

    # -- validation ------------------------------------------------------------------
    def _validate(
        self,
        entry_id: str,
        pool_fingerprint: str,
        embedder_id: str,
        n_samples: int | None = None,
    ) -> tuple[CacheEntry | None, str | None]:
        """Check an entry: ``(entry, None)`` if valid, ``(None, problem)`` if damaged or
        foreign, ``(None, None)`` if absent."""
        path = self._entry_dir(entry_id)
        if not os.path.lexists(path):
            return None, None
        if not path.is_dir():
            return None, "it is not a directory"
        manifest = _read_json(path / MANIFEST)
        if manifest is None:
            return None, f"{MANIFEST} is missing or unreadable"
        expected = {
            "format": CACHE_FORMAT,
            "entry_id": entry_id,
            "pool_fingerprint": pool_fingerprint,
            "embedder_id": embedder_id,
            "dtype": "float16",
            "normalised": True,
        }
        for key, want in expected.items():
            if manifest.get(key) != want:
                return None, f"manifest {key} is {manifest.get(key)!r}, expected {want!r}"
        n, dim = manifest.get("n_samples"), manifest.get("dim")
        if not (_is_int(n) and _is_int(dim)):
            return None, f"manifest n_samples/dim are not positive integers ({n!r}, {dim!r})"
        if n_samples is not None and n != n_samples:
            return None, f"entry holds {n} samples but the pool now has {n_samples}"
        digests = manifest.get("sha256")
        if not isinstance(digests, dict):
            return None, "manifest has no sha256 digests"
        arrays: dict[str, np.ndarray] = {}
        for name in ARRAY_NAMES:
            file = path / f"{name}.npy"
            if not file.is_file():
                return None, f"{file.name} is missing"
            try:
                array = np.load(file, mmap_mode="r", allow_pickle=False)
            except Exception as exc:  # truncated header or data, not an .npy file, ...
                return None, f"{file.name} cannot be read ({type(exc).__name__}: {exc})"
            if array.dtype != DTYPE:
                return None, f"{file.name} has dtype {array.dtype}, expected float16"
            if array.shape != (n, dim):
                return None, f"{file.name} has shape {array.shape}, manifest says {(n, dim)}"
            if self._digest(file) != digests.get(name):
                return None, f"{file.name} sha256 does not match the manifest (changed or corrupt)"
            arrays[name] = array
        return CacheEntry(entry_id, path, arrays["image"], arrays["text"], manifest), None

    def _discard(self, entry_id: str, problem: str) -> None:
        path = self._entry_dir(entry_id)
        log.warning(
            "embedding cache entry %s at %s is damaged: %s; removing it", entry_id, path, problem
        )
        _remove(path)

    # -- public API ------------------------------------------------------------------
    def load(self, pool_fingerprint: str, embedder_id: str) -> CacheEntry | None:
        """The complete, validated entry, or None.

        A damaged or foreign entry is logged (``logging.warning`` naming the problem),
        removed and None returned; if another process holds the entry's lock (it is
        computing it), the damaged entry is left for that process to replace.
        """
        entry_id = self.entry_id(pool_fingerprint, embedder_id)
        entry, problem = self._validate(entry_id, pool_fingerprint, embedder_id)
        if problem is None:
            return entry
        try:
            with self._lock(entry_id, timeout=0):
                entry, problem = self._validate(entry_id, pool_fingerprint, embedder_id)
                if problem is None:
                    return entry
                self._discard(entry_id, problem)
        except filelock.Timeout:
            log.warning(
                "embedding cache entry %s is damaged (%s); another process is computing it",
                entry_id,
                problem,
            )
        return None

    def get_or_compute(
        self,
        pool_fingerprint: str,
        embedder_id: str,
        n_samples: int,
        produce: Produce,
        chunk_size: int = 4096,
        meta: dict | None = None,
        progress: Callable[[int, int], None] | None = None,
        ranks: Ranks | None = None,
    ) -> CacheResult:
        """Load the entry for (pool, embedder), computing (or resuming) it if needed.

        ``produce(start)`` must yield consecutive ``(image_batch, text_batch)`` float arrays
        (any float dtype, any batch sizes) for samples ``start, start + 1, ...`` up to
        ``n_samples`` in pool order. Batches are re-chunked into ``chunk_size`` rows,
        L2-normalised row by row (float32 math) and stored as float16; every completed chunk
        is on disk, so an interrupted computation resumes from the first missing chunk.
        ``meta`` adds fields to the manifest; ``progress(done, n_samples)`` is called as
        chunks complete. The entry's file lock is held throughout, so concurrent callers
        compute an entry once: the others wait and then load it.

        Raises SelbenchError if ``produce`` yields malformed batches, too few or too many
        rows, or non-finite values (its partial data is then discarded).

        With ``ranks`` (one call per rank, all with the same arguments), the ranks share the
        work: rank 0 takes the entry's lock and checks for a hit, each rank computes the
        missing chunks of its share (:func:`rank_chunks`), and once every rank reports its
        share done, rank 0 assembles the entry and the others load it. ``progress`` then
        counts this rank's share, and ``resumed_from`` is the ranks' total.
        """
        started = time.perf_counter()
        entry_id = self.entry_id(pool_fingerprint, embedder_id)
        if not _is_int(n_samples):
            raise SelbenchError(f"n_samples must be a positive integer, got {n_samples!r}")
        if not _is_int(chunk_size):
            raise SelbenchError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        extra = _check_meta(meta)
        spec = {
            "format": CACHE_FORMAT,
            "entry_id": entry_id,
            "pool_fingerprint": pool_fingerprint,
            "embedder_id": embedder_id,
            "n_samples": n_samples,
            "chunk_size": chunk_size,
        }
        if ranks is not None and ranks.world_size > 1:
            return self._get_or_compute_ranks(spec, produce, extra, progress, ranks, started)
        with self._lock(entry_id):
            for stale in self.root.glob(f"{TMP_PREFIX}{entry_id}-*"):
                _remove(stale)  # left by a killed assembly
            entry, problem = self._validate(entry_id, pool_fingerprint, embedder_id, n_samples)
            if problem is not None:
                self._discard(entry_id, problem)
            elif entry is not None:
                _remove(self._partial_dir(entry_id))
                return CacheResult(entry, True, time.perf_counter() - started, 0)
            resumed_from, dim = self._compute(spec, produce, progress)
            entry = self._assemble(spec, dim, extra)
        return CacheResult(entry, False, time.perf_counter() - started, resumed_from)

    def _get_or_compute_ranks(
        self,
        spec: dict,
        produce: Produce,
        extra: dict,
        progress: Callable[[int, int], None] | None,
        ranks: Ranks,
        started: float,
    ) -> CacheResult:
        """:meth:`get_or_compute` for one of several ranks (see there).

        Rank 0 holds the entry's lock from the hit check to the assembly, so a process
        outside the group waits as it would for a single computer. Every rank reaches every
        collective step even when its own part fails (it reports the error and then raises
        it), so no rank is left waiting on one that gave up.
        """
        for rank, other in enumerate(ranks.all_gather(spec)):
            differ = sorted(k for k in spec if other.get(k) != spec[k])
            if differ:
                raise SelbenchError(
                    f"embedding ranks disagree on {', '.join(differ)}: rank {ranks.rank} has "
                    f"{ {k: spec[k] for k in differ} }, rank {rank} has "
                    f"{ {k: other.get(k) for k in differ} } (same pool, embedder and options "
                    "on every rank?)"
                )
        entry_id = spec["entry_id"]
        pool_fingerprint, embedder_id = spec["pool_fingerprint"], spec["embedder_id"]
        leader = ranks.rank == 0
        lock = self._lock(entry_id)
        if leader:
            lock.acquire()
        try:

            def check() -> str:
                for stale in self.root.glob(f"{TMP_PREFIX}{entry_id}-*"):
                    _remove(stale)  # left by a killed assembly
                entry, problem = self._validate(
                    entry_id, pool_fingerprint, embedder_id, spec["n_samples"]
                )
                if problem is not None:
                    self._discard(entry_id, problem)
                elif entry is not None:
                    _remove(self._partial_dir(entry_id))
                    return "hit"
                self._partial_dim(self._partial_dir(entry_id), spec)  # drops a foreign one
                return "compute"

            if self._step(ranks, check if leader else None, "checking the entry") == "hit":
                entry = self._load_assembled(spec)
                return CacheResult(entry, True, time.perf_counter() - started, 0)
            shares = self._step(
                ranks,
                lambda: self._compute_share(spec, produce, progress, ranks),
                "computing its share of the chunks",
                every_rank=True,
            )
            dim = next(d for _, d in shares if d is not None)

            def assemble() -> None:
                self._assemble(spec, dim, extra)

            self._step(ranks, assemble if leader else None, "assembling the entry")
            entry = self._load_assembled(spec)
        finally:
            if leader:
                lock.release()
        resumed_from = sum(resumed for resumed, _ in shares)
        return CacheResult(entry, False, time.perf_counter() - started, resumed_from)

    @staticmethod
    def _step(
        ranks: Ranks, work: Callable[[], Any] | None, what: str, every_rank: bool = False
    ) -> Any:
        """Run ``work`` on this rank (if given) and share the outcome: rank 0's result,
        or every rank's (``every_rank``). A failure on any rank raises on every rank:
        the original exception where it happened, a SelbenchError naming it elsewhere."""
        result: Any = None
        failure: BaseException | None = None
        if work is not None:
            try:
                result = work()
            except Exception as exc:  # reported to the other ranks, then re-raised
                failure = exc
        message = None if failure is None else f"{type(failure).__name__}: {failure}"
        outcomes = ranks.all_gather((result, message))
        if failure is not None:
            raise failure
        for rank, (_, other) in enumerate(outcomes):
            if other is not None:
                raise SelbenchError(f"embedding rank {rank} failed while {what}: {other}")
        return [value for value, _ in outcomes] if every_rank else outcomes[0][0]

    def _load_assembled(self, spec: dict) -> CacheEntry:
        """The entry rank 0 reported complete, validated."""
        entry, problem = self._validate(
            spec["entry_id"], spec["pool_fingerprint"], spec["embedder_id"], spec["n_samples"]
        )
        if entry is None:
            raise SelbenchError(
                f"cache entry {spec['entry_id']} was reported complete by rank 0 but is "
                f"{problem or 'missing'} here (is {self.root} on a filesystem every rank shares?)"
            )
        return entry

    def ls(self) -> list[dict]:
        """All entries, sorted by id.

        Complete entries: their manifest plus ``entry_id``, ``status: "complete"``, ``path``
        (str) and ``size_mb``. Interrupted computations: ``{"entry_id", "status": "partial",
        "done", "n_samples", "embedder_id", "pool_fingerprint", "path", "size_mb"}``.
        An entry directory without a readable manifest is listed with ``status: "damaged"``.
        Nothing is validated beyond reading manifests (cheap).
        """
        if not self.root.is_dir():
            return []
        rows = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            if path.name.endswith(PARTIAL_SUFFIX):
                rows.append(self._partial_summary(path))
            else:
                rows.append(self._complete_summary(path))
        return rows

    def info(self, entry_id: str) -> dict:
        """Manifest and sizes of one entry (as in :meth:`ls`), with per-file sizes in bytes.

        If an interrupted computation exists too, it is under ``"partial"``. Raises
        ConfigError for an unknown id.
        """
        entry_id = self._known_id(entry_id)
        complete, partial = self._entry_dir(entry_id), self._partial_dir(entry_id)
        if not complete.is_dir():
            return self._partial_summary(partial)
        info = self._complete_summary(complete)
        info["files"] = {p.name: p.stat().st_size for p in sorted(complete.iterdir())}
        if partial.is_dir():
            info["partial"] = self._partial_summary(partial)
        return info

    def rm(self, entry_id: str) -> None:
        """Remove an entry's complete and partial data. Raises ConfigError for an unknown id,
        SelbenchError if another process is computing it right now."""
        entry_id = self._known_id(entry_id)
        try:
            with self._lock(entry_id, timeout=0):
                _remove(self._entry_dir(entry_id))
                _remove(self._partial_dir(entry_id))
                for stale in self.root.glob(f"{TMP_PREFIX}{entry_id}-*"):
                    _remove(stale)
        except filelock.Timeout:
            raise SelbenchError(
                f"cache entry {entry_id!r} is being computed by another process; try again later"
            ) from None

    # -- summaries -------------------------------------------------------------------
    def _complete_summary(self, path: Path) -> dict:
        manifest = _read_json(path / MANIFEST)
        base = {
            "status": "complete" if manifest else "damaged",
            "path": str(path),
            "size_mb": _size_mb(_dir_size(path)),
        }
        return {**(manifest or {}), "entry_id": path.name, **base}

    def _partial_summary(self, path: Path) -> dict:
        info = _read_json(path / PARTIAL_INFO) or {}
        n, chunk = info.get("n_samples"), info.get("chunk_size")
        done = 0
        if _is_int(n) and _is_int(chunk):
            chunks = 0
            while (path / chunk_name(chunks)).is_file():
                chunks += 1
            done = min(chunks * chunk, n)
        return {
            "entry_id": path.name[: -len(PARTIAL_SUFFIX)],
            "status": "partial",
            "done": done,
            "n_samples": n,
            "embedder_id": info.get("embedder_id"),
            "pool_fingerprint": info.get("pool_fingerprint"),
            "path": str(path),
            "size_mb": _size_mb(_dir_size(path)),
        }

    # -- computing -------------------------------------------------------------------
    def _partial_dim(self, partial: Path, spec: dict) -> int | None:
        """The dim recorded by an interrupted computation of this request, or None.

        Partial data written for another request (``partial.json`` differs) is discarded.
        """
        if not partial.is_dir():
            return None
        info = _read_json(partial / PARTIAL_INFO)
        dim = info.get("dim") if info else None
        if info is None or any(info.get(k) != v for k, v in spec.items()) or not _is_int(dim):
            log.warning(
                "discarding partial embeddings in %s: written for another request (%s)",
                partial,
                info,
            )
            _remove(partial)
            return None
        return dim

    def _present_chunks(self, partial: Path, spec: dict, dim: int, indices: range) -> set[int]:
        """The intact chunks among ``indices``; damaged ones, and temp files of chunks in
        ``indices`` (left by a killed writer), are removed. Files of other chunks are left
        alone: other ranks may be writing them."""
        n, chunk = spec["n_samples"], spec["chunk_size"]
        present = set()
        for index in indices:
            path = partial / chunk_name(index)
            if path.exists():
                if _read_chunk(path, chunk_rows(index, n, chunk), dim) is not None:
                    present.add(index)
                else:
                    path.unlink(missing_ok=True)
        if partial.is_dir():
            for path in partial.iterdir():
                if _temp_chunk_index(path.name) in indices:
                    path.unlink(missing_ok=True)
        return present

    def _compute(
        self, spec: dict, produce: Produce, progress: Callable[[int, int], None] | None
    ) -> tuple[int, int]:
        """Write all missing chunks to the partial dir; return (samples resumed, dim)."""
        partial = self._partial_dir(spec["entry_id"])
        total = n_chunks(spec["n_samples"], spec["chunk_size"])
        dim = self._partial_dim(partial, spec)
        present = self._present_chunks(partial, spec, dim, range(total)) if dim else set()
        if not present:
            _remove(partial)  # also drops stray files of an attempt that wrote no chunk
            dim = None
        for path in partial.iterdir() if partial.is_dir() else ():
            if path.name.startswith(".") and path.is_file():
                path.unlink(missing_ok=True)  # temp files of a killed writer
        try:
            try:
                return self._fill(spec, partial, produce, range(total), present, dim, progress)
            except _DimChanged as exc:
                log.warning(
                    "discarding partial embeddings in %s: %s; restarting from 0", partial, exc
                )
                _remove(partial)
                return self._fill(spec, partial, produce, range(total), set(), None, progress)
        except _ProduceError:
            _remove(partial)
            raise

    def _compute_share(
        self,
        spec: dict,
        produce: Produce,
        progress: Callable[[int, int], None] | None,
        ranks: Ranks,
    ) -> tuple[int, int | None]:
        """Write the missing chunks of this rank's share; return (samples resumed, dim)."""
        partial = self._partial_dir(spec["entry_id"])
        total = n_chunks(spec["n_samples"], spec["chunk_size"])
        share = rank_chunks(ranks.rank, ranks.world_size, total)
        info = _read_json(partial / PARTIAL_INFO) or {}  # rank 0 checked it is this request's
        dim = info.get("dim") if _is_int(info.get("dim")) else None
        present = self._present_chunks(partial, spec, dim, share) if dim else set()
        try:
            return self._fill(spec, partial, produce, share, present, dim, progress)
        except _DimChanged as exc:
            raise SelbenchError(
                f"embedder {spec['embedder_id']!r}: {exc} in {partial}; the embedder changed "
                f"under the same id. Remove the partial data (`selbench cache rm "
                f"{spec['entry_id']}`) and embed again"
            ) from None
        except _ProduceError:
            for index in share:  # this rank's chunks came from a misbehaving embedder
                (partial / chunk_name(index)).unlink(missing_ok=True)
            raise

    def _fill(
        self,
        spec: dict,
        partial: Path,
        produce: Produce,
        indices: range,
        present: set[int],
        dim: int | None,
        progress: Callable[[int, int], None] | None,
    ) -> tuple[int, int | None]:
        """Compute the chunks of ``indices`` not in ``present``, one ``produce`` call per
        run of consecutive missing chunks; return (samples resumed, dim)."""
        n, chunk = spec["n_samples"], spec["chunk_size"]
        rows_in = sum(chunk_rows(i, n, chunk) for i in indices)
        resumed = sum(chunk_rows(i, n, chunk) for i in present)
        done = [resumed]

        def advance(rows: int) -> None:
            done[0] += rows
            if progress is not None:
                progress(done[0], rows_in)

        if progress is not None:
            progress(resumed, rows_in)
        runs = _missing_runs(indices, present)
        if resumed and runs:
            log.info(
                "resuming embeddings %s: %d of %d samples done", spec["entry_id"], resumed, rows_in
            )
        for run in runs:
            dim = self._write_chunks(spec, partial, produce, run, dim, advance)
        return resumed, dim

    def _write_chunks(
        self,
        spec: dict,
        partial: Path,
        produce: Produce,
        run: range,
        dim: int | None,
        advance: Callable[[int], None],
    ) -> int:
        """Consume ``produce(first sample of run)`` and write the chunks of ``run``; return
        the dim. A run that ends before the pool does stops reading once it has its rows;
        one that ends with the pool reads ``produce`` to the end (too many rows is an error).
        """
        n, chunk, embedder_id = spec["n_samples"], spec["chunk_size"], spec["embedder_id"]
        index = run.start
        start = run.start * chunk
        end = min(run.stop * chunk, n)
        produced = start
        buffer: list[tuple[np.ndarray, np.ndarray]] = []
        buffered = 0
        batches = produce(start)
        try:
            for batch in batches:
                if produced == start and dim is not None:
                    got = _batch_dim(batch)
                    if got is not None and got != dim:
                        raise _DimChanged(f"embedder now yields dim {got}, chunks have {dim}")
                image, text = _as_batch(batch, dim, embedder_id, produced)
                dim = image.shape[1]
                rows = image.shape[0]
                if produced + rows > n:
                    raise _ProduceError(
                        f"embedder {embedder_id!r} produced more than n_samples={n} samples "
                        f"(batch of {rows} rows after {produced})"
                    )
                if produced + rows > end:  # the run ends inside this batch
                    rows = end - produced
                    image, text = image[:rows], text[:rows]
                produced += rows
                buffer.append((image, text))
                buffered += rows
                while index < run.stop and buffered >= chunk_rows(index, n, chunk):
                    rows_needed = chunk_rows(index, n, chunk)
                    chunk_image, chunk_text, buffer = _take_rows(buffer, rows_needed)
                    buffered -= rows_needed
                    if not (partial / PARTIAL_INFO).exists():
                        atomic_write_text(partial / PARTIAL_INFO, json.dumps({**spec, "dim": dim}))
                    _write_chunk(
                        partial / chunk_name(index),
                        normalise_rows(chunk_image),
                        normalise_rows(chunk_text),
                    )
                    index += 1
                    advance(rows_needed)
                if produced == end and end < n:
                    break  # the rest of the pool belongs to other runs or ranks
        finally:
            close = getattr(batches, "close", None)
            if callable(close):
                close()
        if produced < end:
            raise _ProduceError(
                f"embedder {embedder_id!r} stopped after sample {produced}: expected "
                f"n_samples={n} (produce({start}) yielded {produced - start} samples)"
            )
        assert dim is not None
        return dim

    def _assemble(self, spec: dict, dim: int, extra: dict) -> CacheEntry:
        """Build the complete entry from the chunks in a temp dir, then rename it into place."""
        entry_id, n, chunk = spec["entry_id"], spec["n_samples"], spec["chunk_size"]
        partial = self._partial_dir(entry_id)
        tmp = self.root / f"{TMP_PREFIX}{entry_id}-{_token()}"
        final_path = self._entry_dir(entry_id)
        tmp.mkdir(parents=True)
        try:
            outputs = {
                name: np.lib.format.open_memmap(
                    tmp / f"{name}.npy", mode="w+", dtype=DTYPE, shape=(n, dim)
                )
                for name in ARRAY_NAMES
            }
            for name in ARRAY_NAMES:
                _reserve(tmp / f"{name}.npy")
            for index in range(n_chunks(n, chunk)):
                loaded = _read_chunk(partial / chunk_name(index), chunk_rows(index, n, chunk), dim)
                if loaded is None:
                    raise SelbenchError(
                        f"chunk {partial / chunk_name(index)} vanished or is "
                        "damaged while assembling the cache entry"
                    )
                lo = index * chunk
                for name, array in zip(ARRAY_NAMES, loaded, strict=True):
                    outputs[name][lo : lo + len(array)] = array
            for name in ARRAY_NAMES:
                outputs[name].flush()
            outputs.clear()  # drops the memory maps, closing the files
            manifest = {
                "format": CACHE_FORMAT,
                "entry_id": entry_id,
                "pool_fingerprint": spec["pool_fingerprint"],
                "embedder_id": spec["embedder_id"],
                "n_samples": n,
                "dim": dim,
                "dtype": "float16",
                "normalised": True,
                "chunk_size": chunk,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": {**extra.get("versions", {}), **_versions()},
                "sha256": {name: file_sha256(tmp / f"{name}.npy") for name in ARRAY_NAMES},
                **{k: v for k, v in extra.items() if k != "versions"},
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            final = self._entry_dir(entry_id)
            _remove(final)
            os.rename(tmp, final)
        except BaseException as exc:
            _remove(tmp)
            if isinstance(exc, OSError):
                raise storage_error("embedding cache entry", final_path, exc) from exc
            raise
        _remove(partial)
        image, text = (np.load(final / f"{name}.npy", mmap_mode="r") for name in ARRAY_NAMES)
        return CacheEntry(entry_id, final, image, text, manifest)


def _reserve(path: Path) -> None:
    """Allocate the blocks of the sparse file ``path`` now, where the system supports it.

    A memory map writing into a hole of a full disk does not get an error: the kernel
    kills the process with SIGBUS. Reserved first, a full disk is an OSError here instead.
    """
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None:
        return
    with open(path, "r+b") as handle:
        try:
            allocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return  # a filesystem without fallocate: the map writes as before
            raise


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
