"""Materialize a selection: the selected samples written out as webdataset shards.

This is the hand-off between selection and training. It follows the semantics of
DataComp's resharder (``resharder.py`` in mlfoundations/datacomp): every sample is
looked up by uid, a uid listed k times is written k times, and the output is cut into
shards of a fixed number of samples (10,000 by default, the resharder's default), named
``00000.tar, 00001.tar, ...``. Shards are written in parallel over processes, each one to
a temporary name and renamed when complete, so a run killed halfway resumes shard by
shard and never leaves a torn shard behind.

Each output sample carries the image bytes exactly as the pool stored them (no
re-encoding), the *training* caption in ``.txt`` (a caption rewrite such as TL;DR's
replaces the original there) and, in ``.json``, the pool uid and the original caption.
Keys are the sample's position in the subset (``000000000``, ...), unique even when a
uid repeats. Samples are written in pool order, so the subset reads sequentially from
the pool and the same selection always gives byte-identical shards (tar headers carry
no time stamps or owners).

Beside the shards: ``sizes.json`` (samples per shard, the file open_clip_train reads
when ``--train-num-samples`` is not given) and ``manifest.json``, written last: the
directory is complete exactly when ``manifest.json`` exists.

The tar writing is a few lines of ``tarfile`` rather than webdataset's ``ShardWriter``:
the writer must rename each shard into place atomically and fix the header fields for
reproducible bytes, neither of which ShardWriter does.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selbench.errors import PoolError, SelbenchError
from selbench.fileutil import atomic_write_text, read_member, tar_member, temp_sibling

if TYPE_CHECKING:
    from selbench.pools import MetadataPool, ShardPool

DEFAULT_SHARD_SIZE = 10_000  # DataComp resharder's --shard-size default
MANIFEST = "manifest.json"
PLAN = "plan.json"
FORMAT = 1


@dataclass(frozen=True)
class Subset:
    """A materialized subset: its shard files and sample counts."""

    root: Path
    shards: tuple[Path, ...]
    sizes: dict[str, int]
    selection_sha256: str

    @property
    def n_samples(self) -> int:
        return sum(self.sizes.values())

    def shard_pattern(self) -> str:
        """The brace pattern webdataset and open_clip_train's ``--train-data`` take."""
        last = len(self.shards) - 1
        if last == 0:
            return str(self.shards[0])
        return str(self.root / f"{{00000..{last:05d}}}.tar")

    def iter_samples(self) -> Iterator[tuple[str, bytes, str, str]]:
        """``(uid, image bytes, extension, training caption)`` in subset order."""
        for shard in self.shards:
            with tarfile.open(shard) as tar:
                group: dict[str, bytes] = {}
                current = None
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if current is not None and key != current:
                        yield _sample(group)
                        group = {}
                    current = key
                    group[ext] = read_member(tar, member)
                if group:
                    yield _sample(group)


def _sample(group: dict[str, bytes]) -> tuple[str, bytes, str, str]:
    meta = json.loads(group["json"])
    ext = next(e for e in group if e not in ("json", "txt"))
    return meta["uid"], group[ext], ext, group["txt"].decode("utf-8")


def load_subset(root: Path) -> Subset | None:
    """The complete subset under ``root``, or None when it is absent or unfinished."""
    manifest_path = Path(root) / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    sizes = manifest["sizes"]
    shards = tuple(Path(root) / name for name in sorted(sizes))
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise PoolError(f"materialized subset {root} lost shards {missing}; remove {root}")
    return Subset(Path(root), shards, sizes, manifest["selection_sha256"])


def _digest(rows: Sequence[tuple], shard_size: int) -> str:
    payload = json.dumps([FORMAT, shard_size, [list(r) for r in rows]], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def plan_rows(
    index: Any, uids: Sequence[str], train_captions: Sequence[str], captions: Sequence[str]
) -> list[tuple[int, int, int, int, str, str, str, str]]:
    """One row per sample to write, in pool order (ties keep listing order):
    ``(pool position, source shard, offset, size, ext, uid, training caption, caption)``.

    ``index`` is the pool index (uid, shard, offset, size, ext per sample). A uid listed k
    times gives k rows; an unknown uid is an error naming it.
    """
    position = {uid: i for i, uid in enumerate(index["uid"].tolist())}
    shard_col, offset_col = index["shard"].tolist(), index["offset"].tolist()
    size_col, ext_col = index["size"].tolist(), index["ext"].tolist()
    rows = []
    for order, (uid, train_caption, caption) in enumerate(
        zip(uids, train_captions, captions, strict=True)
    ):
        pos = position.get(uid)
        if pos is None:
            raise SelbenchError(f"cannot materialize uid {uid!r}: it is not in the pool")
        rows.append((pos, order, uid, train_caption, caption))
    rows.sort()
    return [
        (
            pos,
            int(shard_col[pos]),
            int(offset_col[pos]),
            int(size_col[pos]),
            str(ext_col[pos]),
            uid,
            train_caption,
            caption,
        )
        for pos, _, uid, train_caption, caption in rows
    ]


def write_shard(out_path: str, sources: Sequence[str], rows: Sequence[tuple], first_key: int):
    """Write one output shard from ``rows`` (see :func:`plan_rows`); returns its size.

    Runs in a worker process: plain arguments, and only the standard library.
    """
    out = Path(out_path)
    tmp = temp_sibling(out)
    mapped: dict[int, mmap.mmap] = {}
    try:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for i, (_, shard, offset, size, ext, uid, train_caption, caption) in enumerate(rows):
                if shard not in mapped:
                    with open(sources[shard], "rb") as handle:
                        mapped[shard] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                data = mapped[shard][offset : offset + size]
                if len(data) != size:
                    raise PoolError(f"shard {sources[shard]} changed since it was indexed")
                key = f"{first_key + i:09d}"
                meta = json.dumps({"uid": uid, "key": key, "caption": caption}, sort_keys=True)
                for name, payload in (
                    (f"{key}.{ext}", data),
                    (f"{key}.txt", train_caption.encode("utf-8")),
                    (f"{key}.json", meta.encode("utf-8")),
                ):
                    tar.addfile(tar_member(name, payload), io.BytesIO(payload))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for mapping in mapped.values():
            mapping.close()
    return len(rows)


def default_workers(n_shards: int) -> int:
    return max(1, min(os.cpu_count() or 1, n_shards, 8))


def _resume_plan(out_dir: Path, digest: str, shard_size: int) -> Subset | None:
    """The finished subset when ``out_dir`` holds one of this plan; otherwise prepare
    ``out_dir`` for it (another plan's leftovers are removed, this plan's kept for a
    shard-by-shard resume) and return None."""
    done = load_subset(out_dir)
    if done is not None and json.loads((out_dir / MANIFEST).read_text()).get("plan") == digest:
        return done
    if out_dir.exists():
        try:
            previous = json.loads((out_dir / PLAN).read_text()).get("plan")
        except (OSError, ValueError):
            previous = None
        if previous != digest:  # another plan's leftovers: start over
            shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / PLAN, json.dumps({"plan": digest, "shard_size": shard_size}))
    return None


def _finish(
    out_dir: Path,
    names: list[str],
    chunks: list,
    digest: str,
    selection_sha256: str,
    shard_size: int,
    extra: dict,
) -> Subset:
    """Write ``sizes.json`` and, last, the manifest that marks the subset complete."""
    sizes = {name: len(chunk) for name, chunk in zip(names, chunks, strict=True)}
    atomic_write_text(out_dir / "sizes.json", json.dumps(sizes, sort_keys=True))
    manifest = {
        "format": FORMAT,
        "plan": digest,
        "selection_sha256": selection_sha256,
        "shard_size": shard_size,
        "n_samples": sum(sizes.values()),
        "sizes": sizes,
        **extra,
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, sort_keys=True, indent=1))
    return Subset(out_dir, tuple(out_dir / n for n in names), sizes, selection_sha256)


def materialize(
    pool: ShardPool | MetadataPool,
    uids: Sequence[str],
    train_captions: Sequence[str],
    captions: Sequence[str],
    out_dir: Path,
    selection_sha256: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Subset:
    """Write the samples ``uids`` of ``pool`` (a :class:`selbench.pools.ShardPool`, or a
    :class:`selbench.pools.MetadataPool`'s ``shards:``) as shards under ``out_dir``; resume
    a previous attempt at the same plan shard by shard.

    ``train_captions`` and ``captions`` are parallel to ``uids``. Returns the subset.
    """
    if shard_size < 1:
        raise SelbenchError(f"shard size must be at least 1, got {shard_size}")
    out_dir = Path(out_dir)
    rows = plan_rows(pool.index, uids, train_captions, captions)
    digest = _digest(rows, shard_size)
    done = _resume_plan(out_dir, digest, shard_size)
    if done is not None:
        return done

    chunks = [rows[i : i + shard_size] for i in range(0, len(rows), shard_size)]
    names = [f"{i:05d}.tar" for i in range(len(chunks))]
    sources = [str(p) for p in pool.shards]
    todo = [i for i, name in enumerate(names) if not (out_dir / name).is_file()]
    finished = len(names) - len(todo)
    progress = progress or (lambda done, total: None)
    progress(finished, len(names))
    workers = workers or default_workers(len(todo))
    if workers > 1 and len(todo) > 1:
        import multiprocessing

        # spawn: the parent holds torch and MLflow threads that must not be forked.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as executor:
            futures = [
                executor.submit(
                    write_shard, str(out_dir / names[i]), sources, chunks[i], i * shard_size
                )
                for i in todo
            ]
            for future in futures:
                future.result()
                finished += 1
                progress(finished, len(names))
    else:
        for i in todo:
            write_shard(str(out_dir / names[i]), sources, chunks[i], i * shard_size)
            finished += 1
            progress(finished, len(names))

    extra = {"pool_fingerprint": getattr(pool, "fingerprint", None)}
    return _finish(out_dir, names, chunks, digest, selection_sha256, shard_size, extra)


def materialize_synthesized(
    pixels: Any,
    uids: Sequence[str],
    captions: Sequence[str],
    out_dir: Path,
    selection_sha256: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> Subset:
    """Write synthesized pairs (``pixels``: uint8 ``(N, H, W, 3)``, a strategy's
    :class:`~selbench.strategy.Synthesized` after validation) as shards under ``out_dir``,
    in the layout :func:`materialize` writes: each image a lossless PNG, the caption in
    ``.txt``, the synthetic uid and caption in ``.json``. Resumes shard by shard like
    :func:`materialize`; the same pixels and captions give byte-identical shards.
    """
    import numpy as np
    from PIL import Image

    if shard_size < 1:
        raise SelbenchError(f"shard size must be at least 1, got {shard_size}")
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or len(pixels) != len(uids):
        raise SelbenchError(
            f"synthesized pixels must be uint8 (N, H, W, 3) with one row per uid, got "
            f"{pixels.dtype} {pixels.shape} for {len(uids)} uids"
        )
    out_dir = Path(out_dir)
    content = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
    rows = [(i, uid, caption) for i, (uid, caption) in enumerate(zip(uids, captions, strict=True))]
    digest = _digest([("synthesized", content, *r) for r in rows], shard_size)
    done = _resume_plan(out_dir, digest, shard_size)
    if done is not None:
        return done
    chunks = [rows[i : i + shard_size] for i in range(0, len(rows), shard_size)]
    names = [f"{i:05d}.tar" for i in range(len(chunks))]
    progress = progress or (lambda done, total: None)
    for number, (name, chunk) in enumerate(zip(names, chunks, strict=True)):
        out = out_dir / name
        if not out.is_file():
            tmp = temp_sibling(out)
            try:
                with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
                    for i, uid, caption in chunk:
                        buffer = io.BytesIO()
                        Image.fromarray(pixels[i], "RGB").save(buffer, format="PNG")
                        key = f"{i:09d}"
                        meta = {"uid": uid, "key": key, "caption": caption, "synthesized": True}
                        for member, payload in (
                            (f"{key}.png", buffer.getvalue()),
                            (f"{key}.txt", caption.encode("utf-8")),
                            (f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8")),
                        ):
                            tar.addfile(tar_member(member, payload), io.BytesIO(payload))
                os.replace(tmp, out)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        progress(number + 1, len(names))
    return _finish(
        out_dir, names, chunks, digest, selection_sha256, shard_size, {"synthesized": True}
    )
