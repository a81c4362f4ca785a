"""Reader for image-text pools stored as webdataset shards in img2dataset layout.

A pool directory holds the files img2dataset writes per shard: ``NNNNN.tar`` with
``key.{jpg,png,webp}``, ``key.txt`` and ``key.json`` members, ``NNNNN.parquet`` (one row
per url tried, with its ``status``) and ``NNNNN_stats.json`` (``count``, ``successes``);
no ``sizes.json``. DataComp CommonPool shards (``NNNNNNNN.tar``) have the same layout.
The same reader serves SynthWeb, CC3M-style pools and CommonPool.

A sample's uid is the ``uid`` field of its json where present (DataComp's 128-bit hex
hash), else its key. Pool order is shard order, then member order inside the shard
(img2dataset's download threads write members out of key order; the reader keeps the
order as written, so the index is the same on every read). Failed downloads are absent
from the tars; the shard's parquet counts them (``skipped["failed_download"]``).
Unreadable images and empty captions are skipped and counted, never fatal, and so are
samples a hostile shard could use against a reader that extracts it: members with an
absolute or ``..`` name, symlinks and other non-files, and a member name written twice
(the cases and their outcomes are in docs/reliability.md). Members are only ever read
from the tar, never extracted. A shard that cannot be read at all (truncated, not a tar,
or holding a different number of samples than its ``_stats.json`` records) is corrupt:
a strict pool refuses it with an error naming the shard, any other leaves it out and
counts its samples (:mod:`selbench.pools.corrupt`).

Members are grouped into samples by key as webdataset does (the basename up to its first
dot). The scan is written with ``tarfile`` rather than webdataset's streaming iterator
because it records each image's byte offset in its shard: later reads (training subsets,
embedding passes) seek straight to the image bytes instead of re-parsing every tar
header, which was half the cost of an embedding pass on CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import multiprocessing
import os
import re
import shutil
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import filelock
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from selbench.decoding import decode_image_bytes
from selbench.errors import PoolError
from selbench.fileutil import atomic_write_text, memoised_sha256, read_member, writing
from selbench.paths import index_home
from selbench.pools.arrow import ArrowStrings, arrow_strings, frame_rows, mapped_frame
from selbench.pools.corrupt import (
    CORRUPT_SHARD,
    CorruptShardError,
    check_complete_tar,
    corrupt_sample_count,
    fingerprint_with_skipped,
    refuse_corrupt,
    warn_skipped,
)
from selbench.pools.view import PoolForStrategies

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
GROUND_TRUTH_KEY = "synthweb"
INDEX_FORMAT = 4  # 4: hostile members (unsafe names, links, duplicates) skipped
#: The index columns iter_image_bytes reads per sample.
READ_COLUMNS = ("uid", "shard", "offset", "size", "ext")
#: Below this many bytes of shards to scan, the default scan stays in-process: starting
#: a spawned worker (about a second) would cost more than decoding the images.
PARALLEL_MIN_BYTES = 64 << 20


#: Why a sample's members keep it out of the index (see :func:`_member_problem`).
UNSAFE_MEMBER, LINK_MEMBER, DUPLICATE_MEMBER = "unsafe_member", "link_member", "duplicate_member"


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why ``member`` cannot belong to a sample, or None for a plain file with a safe name.

    The name check is tarfile's own extraction filter (``tarfile.data_filter``, PEP 706),
    applied to a destination that is never written: it refuses names that climb out with
    ``..``. The filter would extract an absolute name below the destination; a sample
    member has no business with one, so it is refused here too. Links are refused
    whatever they point at: a pool's samples are files, and a link has no bytes of its own.
    """
    if not member.isreg():
        return LINK_MEMBER
    name = member.name.replace("\\", "/")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return UNSAFE_MEMBER
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is None:  # Python before 3.10.12 / 3.11.4: the filter's rule on names
        return UNSAFE_MEMBER if ".." in name.split("/") else None
    try:
        data_filter(member, "/selbench-never-extracted")
    except tarfile.FilterError:
        return UNSAFE_MEMBER
    return None


def _shard_samples(
    shard: Path,
) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile, str | None]]:
    """``(key, {extension: member}, tar, problem)`` per sample of one shard, in member
    order; ``problem`` names why the sample must be skipped (:func:`_member_problem`,
    or a member name written twice), else None."""
    check_complete_tar(shard)
    try:
        with tarfile.open(shard) as tar:
            grouped: dict[str, dict[str, tarfile.TarInfo]] = {}
            problems: dict[str, str] = {}
            for member in tar.getmembers():
                if member.isdir():
                    continue
                base = os.path.basename(member.name)
                key, dot, ext = base.partition(".")
                if not dot or key.startswith("__"):
                    continue
                prefix = member.name[: len(member.name) - len(base)]
                parts = grouped.setdefault(prefix + key, {})
                problem = _member_problem(member)
                if problem is None and ext.lower() in parts:
                    problem = DUPLICATE_MEMBER
                if problem is not None:
                    problems.setdefault(prefix + key, problem)
                parts[ext.lower()] = member
            for key, parts in grouped.items():
                yield os.path.basename(key), parts, tar, problems.get(key)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CorruptShardError(
            shard, f"is corrupt or unreadable: {type(exc).__name__}: {exc}"
        ) from exc


@dataclass
class ScanStats:
    """What the pool scan found: samples kept and samples skipped by reason.

    ``total`` counts the samples present in the tars; downloads that img2dataset
    recorded as failed (absent from the tars) are counted under
    ``skipped["failed_download"]`` and not in ``total``. ``corrupt`` maps each corrupt
    shard left out (file name) to its problem; its samples are ``skipped["corrupt_shard"]``.
    """

    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    corrupt: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        raw = {"total": self.total, "kept": self.kept, "skipped": dict(self.skipped)}
        return {**raw, "corrupt_shards": self.corrupt} if self.corrupt else raw

    @classmethod
    def from_dict(cls, raw: dict) -> ScanStats:
        corrupt = dict(raw.get("corrupt_shards", {}))
        return cls(int(raw["total"]), int(raw["kept"]), Counter(raw["skipped"]), corrupt)


INDEX_COLUMNS = ["uid", "key", "caption", "shard", "ground_truth", "offset", "size", "ext"]


def sample_uid(key: str, meta: dict | None) -> str:
    """A sample's uid: DataComp's ``uid`` from its json where the pool has one (CommonPool,
    or img2dataset run with ``save_additional_columns=["uid"]``), else its key."""
    if meta:
        uid = meta.get("uid")
        if isinstance(uid, str) and uid:
            return uid
    return key


def failed_downloads(shard: Path) -> int:
    """Samples of ``shard`` that img2dataset tried and did not write, from its records.

    img2dataset writes ``NNNNN.parquet`` next to each shard with one row per url and a
    ``status`` column (``success`` for the samples in the tar), and ``NNNNN_stats.json``
    with ``count`` and ``successes``. The parquet is read when present, else the stats.
    """
    records = shard.with_suffix(".parquet")
    if records.is_file():
        try:
            status = pd.read_parquet(records, columns=["status"])["status"]
        except (OSError, ValueError, KeyError) as exc:
            raise PoolError(f"shard record {records} cannot be read: {exc}") from None
        return int((status != "success").sum())
    stats = _shard_stats(shard)
    if stats and "count" in stats and "successes" in stats:
        return max(int(stats["count"]) - int(stats["successes"]), 0)
    return 0


def _shard_stats(shard: Path) -> dict | None:
    path = shard.with_name(shard.stem + "_stats.json")
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PoolError(f"shard stats {path} cannot be read: {exc}") from None


#: Why an image keeps its sample out of the index.
UNREADABLE_IMAGE, IMAGE_TOO_LARGE = "unreadable_image", "image_too_large"


def image_problem(data: bytes) -> str | None:
    """Why PIL cannot decode ``data`` whole (:data:`UNREADABLE_IMAGE`, or
    :data:`IMAGE_TOO_LARGE` past PIL's decompression-bomb limit ``Image.MAX_IMAGE_PIXELS``,
    about 89 million pixels), else None.

    The pixel count is checked from the header, before any pixel is decoded, so a
    20000 x 20000 PNG of a few kB costs nothing. PIL only warns between one and two
    times its limit; here that warning is an error too, so no image the scan keeps can
    make a later reader allocate gigabytes. JPEGs decode at 1/8 scale (``Image.draft``):
    libjpeg still reads every entropy-coded block, so a truncated or corrupt file fails
    as it would at full size, and only the inverse DCT and colour conversion get
    cheaper, which is most of the cost of checking a web-sized photo."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format == "JPEG":
                    image.draft("RGB", (1, 1))
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return IMAGE_TOO_LARGE
    except Exception:
        return UNREADABLE_IMAGE
    return None


def is_decodable(data: bytes) -> bool:
    """Whether PIL decodes ``data`` whole and it is not too large (:func:`image_problem`)."""
    return image_problem(data) is None


def scan_shard(shard: Path) -> tuple[pd.DataFrame, ScanStats]:
    """Index one shard: a row per readable sample, in member order, and the skip counts.

    Every image is decoded once here, so that an unreadable one is skipped and counted
    now rather than failing a training run later. Samples are checked against the
    shard's ``_stats.json``: a shard holding a different number of samples than its
    downloader wrote is corrupt (CorruptShardError, naming the shard).
    """
    rows: list[tuple] = []
    stats = ScanStats()
    for key, parts, tar, problem in _shard_samples(shard):
        stats.total += 1
        if problem is not None:
            stats.skipped[problem] += 1
            continue
        ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
        if ext is None:
            stats.skipped["missing_image"] += 1
            continue
        image = parts[ext]
        problem = image_problem(read_member(tar, image))
        if problem is not None:
            stats.skipped[problem] += 1
            continue
        text = read_member(tar, parts["txt"]) if "txt" in parts else b""
        caption = text.decode("utf-8", errors="replace").strip()
        if not caption:
            stats.skipped["empty_caption"] += 1
            continue
        meta, truth = None, None
        if "json" in parts:
            try:
                meta = json.loads(read_member(tar, parts["json"]))
            except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
                meta = None
            if isinstance(meta, dict) and GROUND_TRUTH_KEY in meta:
                truth = json.dumps(meta[GROUND_TRUTH_KEY], sort_keys=True)
        uid = sample_uid(key, meta if isinstance(meta, dict) else None)
        rows.append((uid, key, caption, -1, truth, image.offset_data, image.size, ext))
        stats.kept += 1
    written = _shard_stats(shard)
    if written is not None and "successes" in written and int(written["successes"]) != stats.total:
        raise CorruptShardError(
            shard,
            f"holds {stats.total} samples but its _stats.json records "
            f"{written['successes']} successes: the shard is not what its downloader wrote",
        )
    failed = failed_downloads(shard)
    if failed:
        stats.skipped["failed_download"] += failed
    return pd.DataFrame(rows, columns=INDEX_COLUMNS), stats


def _is_corrupt(shard: Path) -> bool:
    try:
        scan_shard(shard)
    except CorruptShardError:
        return True
    return False


def _scan_shard_to_file(shard: Path, part: Path) -> dict:
    """Worker: index ``shard`` into the partial index file ``part``; return its stats.
    A corrupt shard's part holds no rows, and its stats name it and count its samples
    (:func:`selbench.pools.corrupt.corrupt_sample_count`)."""
    try:
        frame, stats = scan_shard(shard)
    except CorruptShardError as exc:
        count = corrupt_sample_count(shard)
        frame = pd.DataFrame([], columns=INDEX_COLUMNS)
        stats = ScanStats(count, 0, Counter({CORRUPT_SHARD: count}), {shard.name: exc.problem})
    # The stats travel inside the parquet's metadata, so a part is one atomic file.
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"selbench.scan": json.dumps(stats.as_dict()).encode()}
    )
    with writing(part, "pool index part") as tmp:
        pq.write_table(table, tmp)
    return stats.as_dict()


def _read_part(part: Path) -> tuple[pd.DataFrame, ScanStats]:
    table = pq.read_table(part)
    stats = json.loads(table.schema.metadata[b"selbench.scan"])
    return table.to_pandas(), ScanStats.from_dict(stats)


def index_workers() -> int:
    """Processes that index a pool: ``$SELBENCH_INDEX_WORKERS``, default the CPU count."""
    raw = os.environ.get("SELBENCH_INDEX_WORKERS")
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise PoolError(f"SELBENCH_INDEX_WORKERS={raw!r} is not a whole number") from None
        if value < 1:
            raise PoolError(f"SELBENCH_INDEX_WORKERS={raw!r} must be at least 1")
        return value
    return max(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 1)


class ShardPool:
    """An img2dataset-layout pool. Builds (and caches) an index of readable samples.

    The index is built once per pool content (see :attr:`content_fingerprint`): shards
    are scanned by ``workers`` processes, each writing a partial index file per shard, so
    a scan that is killed resumes with the shards it had not finished. A corrupt shard
    (:mod:`selbench.pools.corrupt`) is refused while ``strict`` (the default here; the
    commands pass ``--strict``, default off, through :func:`selbench.pools.resolve_pool`),
    else left out with a warning naming it.
    """

    def __init__(
        self,
        root: Path | str,
        name: str | None = None,
        workers: int | None = None,
        strict: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise PoolError(f"pool directory {self.root} does not exist")
        self.shards = sorted(p for p in self.root.glob("*.tar") if not p.name.startswith("."))
        if not self.shards:
            raise PoolError(f"pool directory {self.root} holds no .tar shards")
        self.name = name or self.root.name
        #: "synthweb" for a generated SynthWeb pool (set by selbench.pools), else "shards"
        self.kind = "shards"
        #: the embedder spec `reference` means on a real pool (its pool YAML's `reference`)
        self.reference: str | None = None
        #: the metadata entries file its pool YAML names (``metadata``), if any
        self.metadata: str | None = None
        self.workers = workers
        self.strict = strict
        #: sha256 of the shards' names and bytes: names the index cache
        self.content_fingerprint = self._fingerprint()
        self._index: pd.DataFrame | None = None
        self.scan_stats = ScanStats()

    # -- fingerprint -----------------------------------------------------------------
    def _fingerprint(self) -> str:
        """sha256 over shard names and contents (content digests memoised by size+mtime)."""
        memo_path = index_home() / "shard-digests.json"
        digest = hashlib.sha256()
        for shard in self.shards:
            digest.update(f"{shard.name}:{memoised_sha256(shard, memo_path)}\n".encode())
        return digest.hexdigest()[:16]

    @property
    def fingerprint(self) -> str:
        """What caches and runs compare pools by: :attr:`content_fingerprint` when no shard
        was left out, else a digest of it and the names of the shards left out (reads the
        index to know which)."""
        return fingerprint_with_skipped(self.content_fingerprint, self.skipped_shards)

    @property
    def skipped_shards(self) -> list[str]:
        """File names of the corrupt shards left out of the index, in shard order."""
        _ = self.index
        return sorted(self.scan_stats.corrupt)

    # -- index -----------------------------------------------------------------------
    @property
    def index(self) -> pd.DataFrame:
        if self._index is None:
            index = self._load_or_build_index()
            if self.strict:
                refuse_corrupt(self.root, self.scan_stats.corrupt)
            warn_skipped(self.root, self.scan_stats.corrupt, self.scan_stats.skipped[CORRUPT_SHARD])
            self._index = index
        return self._index

    def _index_path(self) -> Path:
        return index_home() / f"{self.content_fingerprint}.v{INDEX_FORMAT}.parquet"

    def _parts_dir(self) -> Path:
        return index_home() / f"{self.content_fingerprint}.v{INDEX_FORMAT}.parts"

    def _load_index(self) -> pd.DataFrame | None:
        path = self._index_path()
        stats_path = path.with_suffix(".stats.json")
        if not (path.exists() and stats_path.exists()):
            return None
        try:
            index = mapped_frame(path)  # string columns stay in a memory-mapped file
            self.scan_stats = ScanStats.from_dict(json.loads(stats_path.read_text()))
        except (OSError, ValueError, KeyError):
            return None  # damaged cache entry: rebuilt by the caller
        if not all(_is_corrupt(self.root / name) for name in self.scan_stats.corrupt):
            return None  # a shard left out reads whole now (its _stats.json put right)
        return index

    def _load_or_build_index(self) -> pd.DataFrame:
        index = self._load_index()
        if index is not None:
            return index
        path = self._index_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        # One scan per pool at a time: a second process waits, then reads the first's index.
        with filelock.FileLock(str(path.with_suffix(".lock"))):
            index = self._load_index()
            if index is not None:
                return index
            index = self._scan()
            stats = json.dumps(self.scan_stats.as_dict())
            atomic_write_text(path.with_suffix(".stats.json"), stats)
            path.with_suffix(".arrow").unlink(missing_ok=True)  # an older index's mapped copy
            with writing(path, "pool index") as tmp:  # last: complete once it exists
                index.to_parquet(tmp, index=False)
            shutil.rmtree(self._parts_dir(), ignore_errors=True)
        return index

    def _scan(self) -> pd.DataFrame:
        """Index every shard (in parallel, resuming from finished partial files), then
        join the parts in shard order; a uid seen in an earlier sample is skipped, and a
        corrupt shard's part adds no rows."""
        parts_dir = self._parts_dir()
        parts_dir.mkdir(parents=True, exist_ok=True)
        parts = [parts_dir / f"{i:08d}.parquet" for i in range(len(self.shards))]
        self._scan_parts([i for i, part in enumerate(parts) if not part.is_file()], parts)
        frames, stats = [], ScanStats()
        for shard_id, part in enumerate(parts):
            frame, part_stats = _read_part(part)
            stats.total += part_stats.total
            stats.kept += part_stats.kept
            stats.skipped.update(part_stats.skipped)
            stats.corrupt.update(part_stats.corrupt)
            if not part_stats.corrupt:
                frame["shard"] = shard_id
                frames.append(frame)
        empty = pd.DataFrame([], columns=INDEX_COLUMNS)  # every shard corrupt
        index = pd.concat(frames or [empty], ignore_index=True)
        duplicate = index["uid"].duplicated(keep="first")
        if duplicate.any():
            stats.skipped["duplicate_uid"] += int(duplicate.sum())
            stats.kept -= int(duplicate.sum())
            index = index[~duplicate].reset_index(drop=True)
        if index.empty:
            if self.strict:
                refuse_corrupt(self.root, stats.corrupt)
            corrupt = f", corrupt shards {sorted(stats.corrupt)}" if stats.corrupt else ""
            raise PoolError(
                f"pool {self.root} has no readable samples ({dict(stats.skipped)}{corrupt})"
            )
        index["shard"] = index["shard"].astype("int64")
        self.scan_stats = stats
        return index

    def _scan_parts(self, todo: list[int], parts: list[Path]) -> None:
        """Write the partial index files ``parts[i]`` of the shards ``todo``."""
        if self.workers is not None:
            workers = self.workers
        elif sum(self.shards[i].stat().st_size for i in todo) < PARALLEL_MIN_BYTES:
            workers = 1  # starting processes would cost more than the scan
        else:
            workers = index_workers()
        workers = min(workers, max(len(todo), 1))
        if workers <= 1:
            for i in todo:
                _scan_shard_to_file(self.shards[i], parts[i])
            return
        # spawn, not fork: the parent may hold threads (MLflow, torch) that fork
        # would copy mid-lock.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as executor:
            futures = [executor.submit(_scan_shard_to_file, self.shards[i], parts[i]) for i in todo]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    # -- access ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    @property
    def uids(self) -> ArrowStrings:
        """The uids in pool order, as the index's own Arrow column (no list per call)."""
        return arrow_strings(self.index["uid"])

    @property
    def captions(self) -> ArrowStrings:
        """The captions in pool order, as the index's own Arrow column."""
        return arrow_strings(self.index["caption"])

    def iter_image_bytes(
        self, uids: Iterable[str] | None = None, start: int = 0
    ) -> Iterator[tuple[str, bytes, str]]:
        """``(uid, encoded image bytes, extension)`` in pool order: every sample from
        position ``start`` on, or only ``uids``. Reads by recorded offset (no tar parsing)."""
        rows = self.index.iloc[start:] if start else self.index
        if uids is not None:
            rows = rows[rows["uid"].isin(set(uids))]
        # Plain lists (a block of rows at a time) and a memory-mapped shard: iterating
        # pandas' Arrow columns and one seek+read per sample took 4x as long as the slices
        # (16,000 small PNGs: 0.04 s against 0.01 s), a tenth of a CPU embedding pass's
        # overhead (docs/embeddings.md).
        mapped: mmap.mmap | None = None
        open_shard = -1
        try:
            for uid, shard_id, offset, size, ext in frame_rows(rows, READ_COLUMNS):
                if mapped is None or shard_id != open_shard:
                    if mapped is not None:
                        mapped.close()
                    mapped, open_shard = _map_file(self.shards[shard_id]), shard_id
                data = mapped[offset : offset + size]
                if len(data) != size:
                    raise PoolError(f"shard {self.shards[shard_id]} changed since it was indexed")
                yield uid, data, ext
        except (OSError, ValueError) as exc:
            raise PoolError(f"pool {self.root} cannot be read: {exc}") from exc
        finally:
            if mapped is not None:
                mapped.close()

    def iter_images(
        self, uids: Iterable[str] | None = None, start: int = 0
    ) -> Iterator[tuple[str, Image.Image]]:
        """Stream ``(uid, RGB PIL image)`` in pool order (see :meth:`iter_image_bytes`)."""
        for uid, data, _ in self.iter_image_bytes(uids, start):
            yield uid, decode_image_bytes(data)

    def locate(self, uid: str) -> str:
        """Where sample ``uid`` lives: ``member KEY.EXT of shard PATH`` (for error messages)."""
        rows = self.index[self.index["uid"] == uid]
        if rows.empty:
            return f"not in pool {self.root}"
        row = rows.iloc[0]
        return f"member {row['key']}.{row['ext']} of shard {self.shards[int(row['shard'])]}"

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


def _map_file(path: Path) -> mmap.mmap:
    """``path`` memory-mapped read-only (the mapping outlives the file handle)."""
    with open(path, "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
