"""The cache's names and on-disk layout, the spec of one entry, and small file helpers.

Nothing here may change without a new :data:`CACHE_FORMAT`: entry ids, file names and the
``partial.json`` fields are what make entries written by earlier versions hit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from selbench.errors import SelbenchError

CACHE_FORMAT = 1
DTYPE = np.float16
ARRAY_NAMES = ("image", "text")
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
TMP_PREFIX = ".tmp-"
PARTIAL_INFO = "partial.json"
MANIFEST = "manifest.json"
MEMO_NAME = ".sha256-memo.json"

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Manifest keys the cache owns; ``meta`` may not override them ("versions" is merged).
CORE_KEYS = frozenset(
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
ProgressCallback = Callable[[int, int], None]


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


def embedder_hash(embedder_id: str) -> str:
    """The short, stable hash of an embedder id used in entry ids."""
    return hashlib.sha256(embedder_id.encode("utf-8")).hexdigest()[:12]


def make_entry_id(pool_fingerprint: str, embedder_id: str) -> str:
    """``f"{pool_fingerprint}-{short hash of embedder_id}"``: stable and filesystem-safe."""
    if not isinstance(pool_fingerprint, str) or not SAFE_NAME.match(pool_fingerprint):
        raise SelbenchError(
            f"pool fingerprint {pool_fingerprint!r} is not usable in a cache entry name "
            "(letters, digits, '.', '_', '-' only)"
        )
    if not isinstance(embedder_id, str) or not embedder_id:
        raise SelbenchError(f"embedder id must be a non-empty string, got {embedder_id!r}")
    return f"{pool_fingerprint}-{embedder_hash(embedder_id)}"


def chunk_rows(index: int, n_samples: int, chunk_size: int) -> int:
    """Number of rows in chunk ``index`` (the last chunk may be short)."""
    return min(chunk_size, n_samples - index * chunk_size)


def n_chunks(n_samples: int, chunk_size: int) -> int:
    """Number of chunks an entry of ``n_samples`` is written in."""
    return math.ceil(n_samples / chunk_size)


def chunk_name(index: int) -> str:
    """File name of chunk ``index`` inside a ``.partial`` directory."""
    return f"chunk-{index:06d}.npz"


def temp_chunk_index(name: str) -> int | None:
    """The chunk index in a temp file name written by the chunk writer, else None."""
    match = re.match(r"\.chunk-(\d+)\.npz\.", name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class EntrySpec:
    """What one computation of an entry is for: the request every step checks against.

    :meth:`as_dict` is the form written to ``partial.json`` (with the ``dim``) and
    compared between ranks; its keys and their order are part of the cache format.
    """

    entry_id: str
    pool_fingerprint: str
    embedder_id: str
    n_samples: int
    chunk_size: int
    format: int = CACHE_FORMAT

    @classmethod
    def build(
        cls, pool_fingerprint: str, embedder_id: str, n_samples: int, chunk_size: int
    ) -> EntrySpec:
        """The spec of a request; SelbenchError names the first argument that is unusable."""
        entry_id = make_entry_id(pool_fingerprint, embedder_id)
        if not is_int(n_samples):
            raise SelbenchError(f"n_samples must be a positive integer, got {n_samples!r}")
        if not is_int(chunk_size):
            raise SelbenchError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        return cls(entry_id, pool_fingerprint, embedder_id, n_samples, chunk_size)

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "entry_id": self.entry_id,
            "pool_fingerprint": self.pool_fingerprint,
            "embedder_id": self.embedder_id,
            "n_samples": self.n_samples,
            "chunk_size": self.chunk_size,
        }

    @property
    def n_chunks(self) -> int:
        return n_chunks(self.n_samples, self.chunk_size)

    def chunk_rows(self, index: int) -> int:
        return chunk_rows(index, self.n_samples, self.chunk_size)

    def rows(self, indices: Iterable[int]) -> int:
        """Number of rows in the chunks ``indices``."""
        return sum(self.chunk_rows(index) for index in indices)


def entry_dir(root: Path, entry_id: str) -> Path:
    return root / entry_id


def partial_dir(root: Path, entry_id: str) -> Path:
    return root / f"{entry_id}{PARTIAL_SUFFIX}"


def stale_assemblies(root: Path, entry_id: str) -> list[Path]:
    """Temp folders of assemblies of ``entry_id`` that never finished (a killed process)."""
    return list(root.glob(f"{TMP_PREFIX}{entry_id}-*"))


def token() -> str:
    """A name component unique to this process, thread and call (for temp files)."""
    return f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None if missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove(path: Path) -> None:
    """Remove a directory tree, or a file or symlink standing where one was expected."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def size_mb(n_bytes: int) -> float:
    return round(n_bytes / 1e6, 3)


def is_int(value: Any, minimum: int = 1) -> TypeGuard[int]:
    return type(value) is int and value >= minimum


def versions() -> dict[str, str]:
    """The versions a manifest records for the code that wrote it."""
    return {
        "numpy": np.__version__,
        "selbench": _selbench_version(),
        "python": platform.python_version(),
    }


def _selbench_version() -> str:
    # The installed distribution's version: ``import selbench`` would reach up from the
    # storage layer to the package's domain-level __init__. An uninstalled checkout has
    # no distribution; its package, always imported before this one, has the attribute.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("selbench")
    except PackageNotFoundError:
        return str(getattr(sys.modules.get("selbench"), "__version__", "unknown"))


def check_meta(meta: dict | None) -> dict:
    """Validate extra manifest fields before any work is done."""
    meta = dict(meta or {})
    clash = sorted(k for k in meta if k in CORE_KEYS and k != "versions")
    if clash:
        raise SelbenchError(f"cache meta may not set reserved manifest fields {clash}")
    if "versions" in meta and not isinstance(meta["versions"], dict):
        raise SelbenchError("cache meta 'versions' must be a dict of package -> version")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise SelbenchError(f"cache meta must be JSON-serialisable: {exc}") from None
    return meta
