"""Small file helpers shared by the pool reader, the caches and the embedders."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import filelock

from selbench.errors import StorageError

T = TypeVar("T")

# A digest is memoised only for files whose mtime is this much older than the moment they
# were hashed (see memoised_sha256).
RACY_SECONDS = 3.0
_memo_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_sibling(path: Path) -> Path:
    """A hidden, unique temporary name next to ``path`` (same filesystem, so os.replace works)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextmanager
def writing(path: Path, what: str = "file") -> Iterator[Path]:
    """Write ``path`` atomically: the block writes the yielded temporary sibling, which is
    renamed to ``path`` when the block succeeds and removed when it fails. An OSError (a
    full disk, a quota, a file size limit) becomes a :class:`StorageError` naming ``what``
    and ``path``, so the user reads what could not be written rather than a traceback."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise storage_error(what, path, exc) from exc
        raise


def storage_error(what: str, path: Path, exc: OSError) -> StorageError:
    """The error for a failed write of ``what`` at ``path``."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = " (the disk is full, or a quota or file size limit is reached)"
    return StorageError(
        f"cannot write {what} {path}: {reason}{hint}; nothing half-written was kept, so "
        "free space and run the command again to redo it"
    )


def tar_member(name: str, data: bytes) -> tarfile.TarInfo:
    """A regular-file tar header for ``data`` with fixed metadata (mtime 0, root-less ids,
    mode 0644), so equal contents give byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The contents of ``member``, a regular file of ``tar``; a :class:`tarfile.TarError`
    for a member that has none (a directory, a device)."""
    handle = tar.extractfile(member)
    if handle is None:
        raise tarfile.TarError(f"tar member {member.name} is not a regular file")
    return handle.read()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path) as tmp:
        tmp.write_text(text)


def cached_directory(
    folder: Path, load: Callable[[Path], T | None], build: Callable[[Path], None]
) -> tuple[T, bool]:
    """A directory cache entry (a checkpoint and its metadata, say): ``(load(folder), hit)``.

    Under a file lock next to ``folder`` (two processes never build the same entry):
    when ``folder`` exists and ``load(folder)`` returns a value, that is a hit. Otherwise
    ``build(tmp)`` writes the entry's files into an empty temporary directory, which then
    replaces ``folder`` in one rename, so an entry exists only when complete; a damaged one
    (``load`` returned None) is rebuilt. ``load`` returning None after a build is an error.
    A build killed before its cleanup ran (SIGKILL, SIGTERM, a lost node) leaves its
    temporary directory behind; the next caller removes it under the lock, where no other
    process can be building this entry.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(folder) + ".lock"):
        ours = re.compile(rf"\.{re.escape(folder.name)}\.\d+-[0-9a-f]{{8}}\.tmp")  # temp_sibling's
        for stale in folder.parent.glob(f".{glob.escape(folder.name)}.*.tmp"):
            if ours.fullmatch(stale.name):
                shutil.rmtree(stale, ignore_errors=True)
        if folder.is_dir():
            value = load(folder)
            if value is not None:
                return value, True
        tmp = temp_sibling(folder)
        tmp.mkdir()
        try:
            build(tmp)
            if folder.exists():  # a damaged earlier entry
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        value = load(folder)
        if value is None:
            raise RuntimeError(f"cache entry {folder} did not load right after it was built")
        return value, False


def _memo_key_current(key: str) -> bool:
    """Whether a memo key still describes an existing, unchanged file."""
    try:
        path, size, mtime = key.rsplit("|", 2)
        st = os.stat(path)
    except (ValueError, OSError):
        return False
    return str(st.st_size) == size and str(st.st_mtime_ns) == mtime


def memoised_sha256(path: Path, memo_path: Path) -> str:
    """:func:`file_sha256` of ``path``, memoised in the JSON file ``memo_path`` by
    (resolved path, size, mtime_ns).

    A digest is stored only for a file last modified :data:`RACY_SECONDS` before it was
    hashed: a file rewritten within its mtime's granularity would otherwise keep a stale
    memo key (git's "racy" problem). Entries for files that changed or vanished are
    dropped when the memo is written. Thread-safe; concurrent processes at worst hash twice.
    """
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    with _memo_lock:
        memo = _read_json_dict(memo_path)
    if isinstance(memo.get(key), str):
        return memo[key]
    hashed_at = time.time()
    digest = file_sha256(path)
    if hashed_at - st.st_mtime_ns / 1e9 >= RACY_SECONDS:
        with _memo_lock:
            memo = _read_json_dict(memo_path)
            memo = {k: v for k, v in memo.items() if _memo_key_current(k)}
            memo[key] = digest
            atomic_write_text(memo_path, json.dumps(memo, indent=0))
    return digest


def _read_json_dict(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
