"""Small file helpers shared by the pool reader, the caches and the embedders."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selbench.errors import StorageError


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


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path) as tmp:
        tmp.write_text(text)
