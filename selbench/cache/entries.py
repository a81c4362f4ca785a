"""Complete entries: validating one on load, assembling one from its chunks, summarising
entries for ``selbench cache ls`` and ``info``."""

from __future__ import annotations

import errno
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from selbench.cache.chunks import read_chunk
from selbench.cache.layout import (
    ARRAY_NAMES,
    CACHE_FORMAT,
    DTYPE,
    MANIFEST,
    MEMO_NAME,
    PARTIAL_INFO,
    PARTIAL_SUFFIX,
    TMP_PREFIX,
    CacheEntry,
    EntrySpec,
    chunk_name,
    dir_size,
    entry_dir,
    is_int,
    partial_dir,
    read_json,
    remove,
    size_mb,
    token,
    versions,
)
from selbench.errors import SelbenchError
from selbench.fileutil import file_sha256, memoised_sha256, storage_error

log = logging.getLogger("selbench.cache")


def validate(
    root: Path,
    entry_id: str,
    pool_fingerprint: str,
    embedder_id: str,
    n_samples: int | None = None,
) -> tuple[CacheEntry | None, str | None]:
    """Check an entry: ``(entry, None)`` if valid, ``(None, problem)`` if damaged or
    foreign, ``(None, None)`` if absent."""
    path = entry_dir(root, entry_id)
    if not os.path.lexists(path):
        return None, None
    if not path.is_dir():
        return None, "it is not a directory"
    manifest = read_json(path / MANIFEST)
    if manifest is None:
        return None, f"{MANIFEST} is missing or unreadable"
    problem = _manifest_problem(manifest, entry_id, pool_fingerprint, embedder_id, n_samples)
    if problem is not None:
        return None, problem
    shape = (manifest["n_samples"], manifest["dim"])
    arrays: dict[str, np.ndarray] = {}
    for name in ARRAY_NAMES:
        file = path / f"{name}.npy"
        array, problem = _checked_array(file, shape, root / MEMO_NAME, manifest["sha256"].get(name))
        if array is None:
            return None, problem
        arrays[name] = array
    return CacheEntry(entry_id, path, arrays["image"], arrays["text"], manifest), None


def _manifest_problem(
    manifest: dict,
    entry_id: str,
    pool_fingerprint: str,
    embedder_id: str,
    n_samples: int | None,
) -> str | None:
    """What makes ``manifest`` unfit for this request, or None."""
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
            return f"manifest {key} is {manifest.get(key)!r}, expected {want!r}"
    n, dim = manifest.get("n_samples"), manifest.get("dim")
    if not (is_int(n) and is_int(dim)):
        return f"manifest n_samples/dim are not positive integers ({n!r}, {dim!r})"
    if n_samples is not None and n != n_samples:
        return f"entry holds {n} samples but the pool now has {n_samples}"
    if not isinstance(manifest.get("sha256"), dict):
        return "manifest has no sha256 digests"
    return None


def _checked_array(
    file: Path, shape: tuple[int, int], memo: Path, digest: object
) -> tuple[np.ndarray | None, str | None]:
    """``(memory map, None)`` if ``file`` is the array the manifest describes, else
    ``(None, problem)``."""
    if not file.is_file():
        return None, f"{file.name} is missing"
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # truncated header or data, not an .npy file, ...
        return None, f"{file.name} cannot be read ({type(exc).__name__}: {exc})"
    if array.dtype != DTYPE:
        return None, f"{file.name} has dtype {array.dtype}, expected float16"
    if array.shape != shape:
        return None, f"{file.name} has shape {array.shape}, manifest says {shape}"
    if memoised_sha256(file, memo) != digest:
        return None, f"{file.name} sha256 does not match the manifest (changed or corrupt)"
    return array, None


def discard(root: Path, entry_id: str, problem: str) -> None:
    path = entry_dir(root, entry_id)
    log.warning(
        "embedding cache entry %s at %s is damaged: %s; removing it", entry_id, path, problem
    )
    remove(path)


def assemble(root: Path, spec: EntrySpec, dim: int, extra: dict) -> CacheEntry:
    """Build the complete entry from the chunks in a temp dir, then rename it into place."""
    partial = partial_dir(root, spec.entry_id)
    tmp = root / f"{TMP_PREFIX}{spec.entry_id}-{token()}"
    final = entry_dir(root, spec.entry_id)
    tmp.mkdir(parents=True)
    try:
        _copy_chunks(partial, tmp, spec, dim)
        manifest = _manifest(spec, dim, extra, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        remove(final)
        os.rename(tmp, final)
    except BaseException as exc:
        remove(tmp)
        if isinstance(exc, OSError):
            raise storage_error("embedding cache entry", final, exc) from exc
        raise
    remove(partial)
    image, text = (np.load(final / f"{name}.npy", mmap_mode="r") for name in ARRAY_NAMES)
    return CacheEntry(spec.entry_id, final, image, text, manifest)


def _copy_chunks(partial: Path, tmp: Path, spec: EntrySpec, dim: int) -> None:
    """Write the arrays of the entry into ``tmp`` from the chunks in ``partial``."""
    n = spec.n_samples
    outputs = {
        name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=DTYPE, shape=(n, dim))
        for name in ARRAY_NAMES
    }
    for name in ARRAY_NAMES:
        _reserve(tmp / f"{name}.npy")
    for index in range(spec.n_chunks):
        loaded = read_chunk(partial / chunk_name(index), spec.chunk_rows(index), dim)
        if loaded is None:
            raise SelbenchError(
                f"chunk {partial / chunk_name(index)} vanished or is "
                "damaged while assembling the cache entry"
            )
        lo = index * spec.chunk_size
        for name, array in zip(ARRAY_NAMES, loaded, strict=True):
            outputs[name][lo : lo + len(array)] = array
    for name in ARRAY_NAMES:
        outputs[name].flush()
    outputs.clear()  # drops the memory maps, closing the files


def _manifest(spec: EntrySpec, dim: int, extra: dict, folder: Path) -> dict:
    """The manifest of the entry whose arrays are in ``folder`` (its keys in this order)."""
    return {
        "format": CACHE_FORMAT,
        "entry_id": spec.entry_id,
        "pool_fingerprint": spec.pool_fingerprint,
        "embedder_id": spec.embedder_id,
        "n_samples": spec.n_samples,
        "dim": dim,
        "dtype": "float16",
        "normalised": True,
        "chunk_size": spec.chunk_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {**extra.get("versions", {}), **versions()},
        "sha256": {name: file_sha256(folder / f"{name}.npy") for name in ARRAY_NAMES},
        **{k: v for k, v in extra.items() if k != "versions"},
    }


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


def complete_summary(path: Path) -> dict:
    """An entry folder as :meth:`EmbeddingCache.ls` lists it (its manifest, read only)."""
    manifest = read_json(path / MANIFEST)
    base = {
        "status": "complete" if manifest else "damaged",
        "path": str(path),
        "size_mb": size_mb(dir_size(path)),
    }
    return {**(manifest or {}), "entry_id": path.name, **base}


def partial_summary(path: Path) -> dict:
    """A ``.partial`` folder as :meth:`EmbeddingCache.ls` lists it."""
    info = read_json(path / PARTIAL_INFO) or {}
    n, chunk = info.get("n_samples"), info.get("chunk_size")
    done = 0
    if is_int(n) and is_int(chunk):
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
        "size_mb": size_mb(dir_size(path)),
    }
