"""Corrupt shards: the shards a pool scan leaves out, and what a run records of them.

A shard is corrupt when it cannot be read as a whole (cut short, not a tar) or holds a
different number of samples than its ``_stats.json`` records. One such shard in a pool of
10,000 should not stop a run, so by default the pool leaves it out: none of its samples
reach the index (the scan builds each shard's rows in memory and writes its partial index
file whole, so a corrupt shard contributes an empty part and no rows), its samples are
counted under ``skipped["corrupt_shard"]``, a warning names it, and the pool's
fingerprint records it (:func:`fingerprint_with_skipped`). ``strict`` (``selbench run
--strict``) refuses the pool instead, with the error naming the shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from selbench.errors import PoolError

log = logging.getLogger("selbench.pools")

#: The ``pool_skipped`` reason under which a corrupt shard's samples are counted.
CORRUPT_SHARD = "corrupt_shard"
#: Longest ``pool_skipped_shards`` run param written (MLflow keeps 6,000 characters).
MAX_PARAM_CHARS = 5000


class CorruptShardError(PoolError):
    """Shard ``shard`` is corrupt; ``problem`` says how (the message is ``shard PATH
    PROBLEM``, so it can be rebuilt for the pool's current directory)."""

    def __init__(self, shard: Path, problem: str) -> None:
        super().__init__(f"shard {shard} {problem}")
        self.shard, self.problem = shard, problem


def check_complete_tar(shard: Path) -> None:
    """Raise CorruptShardError unless ``shard`` ends like a complete tar archive.

    Python's streaming tar reader (which webdataset uses) stops quietly at a truncation
    that falls on a header, so a cut-short shard would lose samples without a word. A
    complete archive is a whole number of 512-byte blocks ending in two zero blocks.
    """
    try:
        size = shard.stat().st_size
        with open(shard, "rb") as fh:
            fh.seek(max(size - 1024, 0))
            tail = fh.read(1024)
    except OSError as exc:
        raise CorruptShardError(shard, f"cannot be read: {exc}") from None
    if size < 1024 or size % 512 or tail.count(0) != len(tail):
        raise CorruptShardError(shard, f"is truncated or not a tar archive ({size} bytes)")


def corrupt_sample_count(shard: Path) -> int:
    """How many samples a corrupt ``shard`` is counted as: the ``successes`` its
    ``_stats.json`` records (the samples its downloader wrote) where that file is readable,
    else the samples that can still be listed from the tar before the damage."""
    try:
        written = json.loads(shard.with_name(shard.stem + "_stats.json").read_text())
        return max(int(written["successes"]), 0)
    except (OSError, ValueError, TypeError, KeyError):
        return readable_samples(shard)


def readable_samples(shard: Path) -> int:
    """Distinct sample keys among the file members a streaming read of ``shard`` lists
    before it fails (0 for a file that is not a tar)."""
    keys: set[str] = set()
    try:
        with tarfile.open(shard, "r|") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                key, dot, _ = base.partition(".")
                if member.isreg() and dot and not key.startswith("__"):
                    keys.add(member.name[: len(member.name) - len(base)] + key)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return len(keys)


def fingerprint_with_skipped(content_fingerprint: str, skipped: Sequence[str]) -> str:
    """The fingerprint of a pool whose shards ``skipped`` (file names) were left out: the
    content fingerprint itself when none were, so a clean pool keeps the fingerprint its
    caches and runs recorded; else a digest of it and the sorted names, so two scans that
    left out different shards never compare as the same pool."""
    if not skipped:
        return content_fingerprint
    described = f"{content_fingerprint}\nskipped:{','.join(sorted(skipped))}"
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def skipped_shards_param(skipped: Sequence[str], limit: int = MAX_PARAM_CHARS) -> str:
    """The skipped shards' file names, comma-separated, for the run's
    ``pool_skipped_shards`` param; past ``limit`` characters the list is cut at a name and
    ends ``... (+N more, M in all)``."""
    names = sorted(skipped)
    text = ",".join(names)
    if len(text) <= limit:
        return text
    kept: list[str] = []
    used = 0
    for name in names:
        tail = f",... (+{len(names) - len(kept) - 1} more, {len(names)} in all)"
        if used + len(name) + 1 + len(tail) > limit:
            break
        kept.append(name)
        used += len(name) + 1
    return ",".join(kept) + f",... (+{len(names) - len(kept)} more, {len(names)} in all)"


def refuse_corrupt(root: Path, corrupt: Mapping[str, str]) -> None:
    """Raise the error of the first corrupt shard (in shard order), if any: ``--strict``."""
    if corrupt:
        name = sorted(corrupt)[0]
        raise CorruptShardError(root / name, corrupt[name])


def warn_skipped(root: Path, corrupt: Mapping[str, str], samples: int) -> None:
    """Log a warning naming every shard left out of pool ``root``, with its problem."""
    if not corrupt:
        return
    described = "; ".join(f"{name} {corrupt[name]}" for name in sorted(corrupt))
    log.warning(
        "pool %s: left out %d corrupt shard(s), %d samples (counted as %s; --strict refuses "
        "the pool instead): %s",
        root,
        len(corrupt),
        samples,
        CORRUPT_SHARD,
        described,
    )
