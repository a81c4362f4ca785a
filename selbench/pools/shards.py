"""Reader for image-text pools stored as webdataset shards in img2dataset layout.

A pool directory holds ``{shard:05d}.tar`` files, each with ``key.{jpg,png,webp}``,
``key.txt`` and ``key.json`` members, plus img2dataset's ``{shard:05d}_stats.json``.
The same reader serves SynthWeb and CC3M-style pools.

The uid of a sample is its key; pool order is shard order, then order inside the shard.
Unreadable images and empty captions are skipped and counted, never fatal. A shard
that cannot be read at all (truncated, not a tar) is an error naming the shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import webdataset as wds
from PIL import Image

from selbench.errors import PoolError
from selbench.paths import index_home

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
GROUND_TRUTH_KEY = "synthweb"
INDEX_FORMAT = 1


def _decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _check_complete_tar(shard: Path) -> None:
    """Raise PoolError unless ``shard`` ends like a complete tar archive.

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
        raise PoolError(f"shard {shard} cannot be read: {exc}") from None
    if size < 1024 or size % 512 or tail.count(0) != len(tail):
        raise PoolError(f"shard {shard} is truncated or not a tar archive ({size} bytes)")


def _iter_shard(shard: Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard as webdataset dicts; a broken shard raises PoolError naming it."""
    _check_complete_tar(shard)
    try:
        # Each shard is read alone so an error names the shard that caused it.
        dataset = wds.WebDataset(
            str(shard), shardshuffle=False, empty_check=False, nodesplitter=None
        )
        yield from dataset
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        raise PoolError(
            f"shard {shard} is corrupt or unreadable: {type(exc).__name__}: {exc}"
        ) from exc


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ScanStats:
    """What the pool scan found: samples kept and samples skipped by reason."""

    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)


class ShardPool:
    """An img2dataset-layout pool. Builds (and caches) an index of readable samples."""

    def __init__(self, root: Path | str, name: str | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise PoolError(f"pool directory {self.root} does not exist")
        self.shards = sorted(p for p in self.root.glob("*.tar") if not p.name.startswith("."))
        if not self.shards:
            raise PoolError(f"pool directory {self.root} holds no .tar shards")
        self.name = name or self.root.name
        self.fingerprint = self._fingerprint()
        self._index: pd.DataFrame | None = None
        self.scan_stats = ScanStats()

    # -- fingerprint -----------------------------------------------------------------
    def _fingerprint(self) -> str:
        """sha256 over shard names and contents (content digests memoised by size+mtime)."""
        memo_path = index_home() / "shard-digests.json"
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
        digest = hashlib.sha256()
        changed = False
        for shard in self.shards:
            st = shard.stat()
            memo_key = f"{shard.resolve()}|{st.st_size}|{st.st_mtime_ns}"
            if memo_key not in memo:
                memo[memo_key] = _file_sha256(shard)
                changed = True
            digest.update(f"{shard.name}:{memo[memo_key]}\n".encode())
        if changed:
            _atomic_write_text(memo_path, json.dumps(memo))
        return digest.hexdigest()[:16]

    # -- index -----------------------------------------------------------------------
    @property
    def index(self) -> pd.DataFrame:
        if self._index is None:
            self._index = self._load_or_build_index()
        return self._index

    def _index_path(self) -> Path:
        return index_home() / f"{self.fingerprint}.v{INDEX_FORMAT}.parquet"

    def _load_or_build_index(self) -> pd.DataFrame:
        path = self._index_path()
        stats_path = path.with_suffix(".stats.json")
        if path.exists() and stats_path.exists():
            try:
                index = pd.read_parquet(path)
                stats = json.loads(stats_path.read_text())
                self.scan_stats = ScanStats(
                    stats["total"], stats["kept"], Counter(stats["skipped"])
                )
                return index
            except (OSError, ValueError, KeyError):
                pass  # damaged cache entry: rebuild below
        index = self._scan()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        index.to_parquet(tmp, index=False)
        os.replace(tmp, path)
        stats = self.scan_stats
        _atomic_write_text(
            stats_path,
            json.dumps({"total": stats.total, "kept": stats.kept, "skipped": dict(stats.skipped)}),
        )
        return index

    def _scan(self) -> pd.DataFrame:
        rows: list[tuple[str, str, int, str | None]] = []
        stats = ScanStats()
        seen: set[str] = set()
        for shard_id, shard in enumerate(self.shards):
            for sample in _iter_shard(shard):
                stats.total += 1
                key = sample["__key__"]
                image_bytes = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
                if image_bytes is None:
                    stats.skipped["missing_image"] += 1
                    continue
                try:
                    _decode_image(image_bytes)
                except Exception:
                    stats.skipped["unreadable_image"] += 1
                    continue
                caption = sample.get("txt", b"").decode("utf-8", errors="replace").strip()
                if not caption:
                    stats.skipped["empty_caption"] += 1
                    continue
                if key in seen:
                    stats.skipped["duplicate_key"] += 1
                    continue
                seen.add(key)
                truth = None
                if "json" in sample:
                    try:
                        meta = json.loads(sample["json"])
                        if GROUND_TRUTH_KEY in meta:
                            truth = json.dumps(meta[GROUND_TRUTH_KEY], sort_keys=True)
                    except ValueError:
                        pass
                rows.append((key, caption, shard_id, truth))
                stats.kept += 1
        if not rows:
            raise PoolError(f"pool {self.root} has no readable samples ({dict(stats.skipped)})")
        self.scan_stats = stats
        return pd.DataFrame(rows, columns=["uid", "caption", "shard", "ground_truth"])

    # -- access ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    @property
    def uids(self) -> list[str]:
        return self.index["uid"].tolist()

    @property
    def captions(self) -> list[str]:
        return self.index["caption"].tolist()

    def iter_images(self, uids: Iterable[str] | None = None) -> Iterator[tuple[str, Image.Image]]:
        """Stream ``(uid, RGB image)`` in pool order, for all samples or only ``uids``."""
        wanted = None if uids is None else set(uids)
        index = self.index
        if wanted is not None:
            shards = sorted(set(index.loc[index["uid"].isin(wanted), "shard"].tolist()))
        else:
            shards = sorted(set(index["shard"].tolist()))
        valid = set(index["uid"])
        for shard_id in shards:
            for sample in _iter_shard(self.shards[shard_id]):
                key = sample["__key__"]
                if key not in valid or (wanted is not None and key not in wanted):
                    continue
                data = next(sample[e] for e in IMAGE_EXTENSIONS if e in sample)
                yield key, _decode_image(data)

    def has_ground_truth(self) -> bool:
        return bool(self.index["ground_truth"].notna().any())

    def ground_truth(self) -> dict[str, dict]:
        """SynthWeb ground truth per uid (harness diagnostics only; strategies never get it)."""
        return {
            uid: json.loads(gt)
            for uid, gt in zip(self.index["uid"], self.index["ground_truth"], strict=True)
            if isinstance(gt, str)
        }

    def strategy_view(self) -> PoolForStrategies:
        return PoolForStrategies(self)


class PoolForStrategies:
    """The read-only view of a pool handed to strategies: no ground truth."""

    def __init__(self, pool: ShardPool) -> None:
        self._pool = pool

    @property
    def uids(self) -> Sequence[str]:
        return self._pool.uids

    @property
    def captions(self) -> Sequence[str]:
        return self._pool.captions

    @property
    def fingerprint(self) -> str:
        return self._pool.fingerprint

    @property
    def name(self) -> str:
        return self._pool.name

    def __len__(self) -> int:
        return len(self._pool)

    def iter_images(self, uids: Iterable[str] | None = None) -> Iterator[tuple[str, Image.Image]]:
        return self._pool.iter_images(uids)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
