"""Embedding-cache throughput vs. the encoder alone, measured side by side.

End to end: read shards, decode, preprocess, encode, normalise, write the fp16 cache
entry (``EmbeddingService.embeddings`` into a fresh cache). Encoder only: the same
embedder's ``encode`` call the cache makes (tokenise the captions, ``encode_image``,
``encode_text``) on the same images, already decoded and preprocessed in memory, in the
same batch size. So the ratio is what the cache's reading, decoding, preprocessing and
writing cost on top of the model. Both are repeated, interleaved; each repeat gives one
ratio from two passes run back to back, so a slow spell of a shared machine hits both
sides of it. One end-to-end warm-up pass comes first, like the encoder's: it starts the
decoding helper processes, which then serve every later pass of the process, as they
serve every embedding pass of a `selbench run` (SELBENCH_DECODE_HELPERS=0 measures the
in-process decoding instead). The last line is the median of those paired ratios
(goal >= 0.9). The line before the ratios gives the seconds a pass spends outside
``encode`` -- the overhead itself, steadier than the ratio, which also moves with the
encoder's speed.

    python benchmarks/embed_throughput.py                 # default SynthWeb, tiny model
    python benchmarks/embed_throughput.py --pool DIR --repeats 5
    python benchmarks/embed_throughput.py --device cuda --json figures.json   # also as JSON

``--json`` writes the figures to a file as well (benchmarks/gpu_check.sh reads them).
``--reader tar`` reads a pool directory's tar shards with :class:`TarShards` instead of
selbench.pools' indexed reader, whose index needs pyarrow: what benchmarks/gpu_check.sh
runs on the GPU machine, which is given no pyarrow (docs/gpu-check.md). The images are
read the same way (slices of the memory-mapped shard at recorded offsets), then go
through the same cache, decoding and encoder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import statistics
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from selbench.cache import EmbeddingCache
from selbench.decoding import decode_image_bytes, helpers_enabled, png_decoder
from selbench.embedders import (
    ENCODE_BATCH,
    EmbeddingService,
    decode_helper_count,
    decode_workers,
    pool_batches,
)
from selbench.registry import get_registry
from selbench.train import build_model

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # as selbench.pools.shards


class TarShards:
    """A pool read from the tar shards of a directory (``DIR/pool/*.tar`` of a SynthWeb
    dataset, or ``DIR/*.tar``) with what the embedding service and the cache read of a
    pool: its length, uids, captions, fingerprint, name, ``iter_image_bytes``,
    ``iter_images`` and ``locate``. One ``tarfile`` scan records each sample's uid (its
    json's ``uid``, else its key), caption and image offset in memory, so no pyarrow is
    needed; a sample without an image or a caption is left out. Trusted shards only (made
    by the generator on the same machine): none of selbench.pools' checks of hostile or
    corrupt shards."""

    kind = "shards"
    reference = None
    metadata = None

    def __init__(self, root: Path) -> None:
        folder = root / "pool" if (root / "pool").is_dir() else root
        self.shards = sorted(folder.glob("*.tar"))
        if not self.shards:
            raise SystemExit(f"no tar shards in {folder}")
        self.name = root.name
        self.uids: list[str] = []
        self.captions: list[str] = []
        self._where: list[tuple[int, int, int, str, str]] = []  # shard, offset, size, ext, key
        digest = hashlib.sha256()
        for shard_id, shard in enumerate(self.shards):
            digest.update(
                f"{shard.name}:{hashlib.sha256(shard.read_bytes()).hexdigest()}\n".encode()
            )
            self._scan(shard_id, shard)
        self.fingerprint = "tar-" + digest.hexdigest()[:16]

    def _scan(self, shard_id: int, shard: Path) -> None:
        with tarfile.open(shard) as tar:
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar.getmembers():
                key, dot, ext = os.path.basename(member.name).partition(".")
                if member.isfile() and dot:
                    samples.setdefault(key, {})[ext.lower()] = member
            for key, parts in samples.items():
                ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
                text = parts.get("txt")
                caption = "" if text is None else _read(tar, text).decode(errors="replace")
                if ext is None or not caption.strip():
                    continue
                meta = json.loads(_read(tar, parts["json"])) if "json" in parts else {}
                uid = meta.get("uid") if isinstance(meta, dict) else None
                self.uids.append(uid if isinstance(uid, str) and uid else key)
                self.captions.append(caption.strip())
                image = parts[ext]
                self._where.append((shard_id, image.offset_data, image.size, ext, key))

    def __len__(self) -> int:
        return len(self.uids)

    def iter_image_bytes(
        self, uids: Iterable[str] | None = None, start: int = 0
    ) -> Iterator[tuple[str, bytes, str]]:
        """``(uid, encoded image bytes, extension)`` in pool order from ``start`` (only
        ``uids`` when given): slices of the memory-mapped shard, as ShardPool reads."""
        wanted = None if uids is None else set(uids)
        mapped: mmap.mmap | None = None
        open_shard = -1
        try:
            for uid, (shard_id, offset, size, ext, _) in zip(
                self.uids[start:], self._where[start:], strict=True
            ):
                if wanted is not None and uid not in wanted:
                    continue
                if mapped is None or shard_id != open_shard:
                    if mapped is not None:
                        mapped.close()
                    with open(self.shards[shard_id], "rb") as handle:
                        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                    open_shard = shard_id
                yield uid, mapped[offset : offset + size], ext
        finally:
            if mapped is not None:
                mapped.close()

    def iter_images(self, uids: Iterable[str] | None = None, start: int = 0) -> Iterator[Any]:
        for uid, data, _ in self.iter_image_bytes(uids, start):
            yield uid, decode_image_bytes(data)

    def locate(self, uid: str) -> str:
        if uid not in self.uids:
            return f"not in the shards of {self.name}"
        shard_id, _, _, ext, key = self._where[self.uids.index(uid)]
        return f"member {key}.{ext} of shard {self.shards[shard_id]}"


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    return b"" if handle is None else handle.read()


def open_pool(spec: str, reader: str) -> Any:
    """The strategy view of pool ``spec`` (as for ``selbench run``; ``reader`` "index"),
    or :class:`TarShards` over the directory ``spec`` (``reader`` "tar")."""
    if reader == "tar":
        return TarShards(Path(spec))
    from selbench.pools import resolve_pool  # the indexed reader: pyarrow

    return resolve_pool(spec).pool.strategy_view()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="synthweb", help="pool spec (as for selbench run)")
    parser.add_argument("--model", default="selbench-tiny", help="open_clip architecture")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument(
        "--reader",
        choices=("index", "tar"),
        default="index",
        help="index: selbench.pools (default); tar: the tar shards of the directory --pool, "
        "without pyarrow (benchmarks/gpu_check.sh)",
    )
    args = parser.parse_args()

    pool = open_pool(args.pool, args.reader)
    n = len(pool)
    with tempfile.TemporaryDirectory() as tmp:
        model, _, _ = build_model(args.model, seed=0)
        weights = Path(tmp) / "weights.pt"
        torch.save(model.state_dict(), weights)
        spec = f"open_clip:{args.model}:{weights}"
        registry = get_registry()

        embedder = registry.make_embedder(spec)
        embedder.prepare(pool, args.device, None)
        batches = list(pool_batches(pool, embedder.preprocess, 0, ENCODE_BATCH))

        def encoder_only() -> float:
            start = time.perf_counter()
            for images, texts in batches:
                embedder.encode(images, texts)
            return time.perf_counter() - start

        encode = embedder.encode
        in_encoder: list[float] = []

        def timed_encode(images, texts):
            start = time.perf_counter()
            try:
                return encode(images, texts)
            finally:
                in_encoder.append(time.perf_counter() - start)

        def end_to_end(i: int) -> float:
            service = EmbeddingService(
                pool,
                args.device,
                registry.make_embedder,
                cache=EmbeddingCache(Path(tmp) / f"cache-{i}"),
            )
            service._embedders[spec] = embedder  # same prepared model, not a reload
            in_encoder.clear()
            embedder.encode = timed_encode  # what the pass spends outside encode() is overhead
            start = time.perf_counter()
            try:
                service.embeddings(spec)
                elapsed = time.perf_counter() - start
            finally:
                del embedder.encode
            outside.append(elapsed - sum(in_encoder))
            return elapsed

        enc, e2e, outside = [], [], []
        encoder_only()  # warm-up; the end-to-end warm-up also starts the decoding helpers,
        end_to_end(-1)  # which live as long as the process, as in a `selbench run`
        outside.clear()
        for i in range(args.repeats):
            if i % 2:  # alternate which side goes first
                t_e2e, t_enc = end_to_end(i), encoder_only()
            else:
                t_enc, t_e2e = encoder_only(), end_to_end(i)
            enc.append(t_enc)
            e2e.append(t_e2e)
    enc_rate, e2e_rate = n / statistics.median(enc), n / statistics.median(e2e)
    paired = [a / b for a, b in zip(enc, e2e, strict=True)]
    helpers = decode_helper_count(args.device)
    decoding = (
        f"{helpers} helper process{'es' if helpers > 1 else ''}"
        if helpers_enabled()
        else f"{decode_workers()} thread(s) in-process"
    ) + f", PNG by {png_decoder()}"
    print(
        f"pool: {args.pool} ({n} samples), model: {args.model}, device: {args.device}, "
        f"threads: {torch.get_num_threads()}, batch: {ENCODE_BATCH}, decoding: {decoding}"
    )
    print(f"encoder only : {enc_rate:10.0f} samples/s  (median of {args.repeats})")
    print(f"end to end   : {e2e_rate:10.0f} samples/s  (read, decode, preprocess, encode, write)")
    print(
        f"outside the encoder: {statistics.median(outside):.3f} s per pass "
        "(reading, decoding, preprocessing, cache writes; median)"
    )
    print("paired ratios: " + " ".join(f"{r:.3f}" for r in paired))
    print(f"ratio end-to-end / encoder-only: {statistics.median(paired):.3f}")
    if args.json:
        figures = {
            "pool": args.pool,
            "reader": args.reader,
            "pool_samples": n,
            "model": args.model,
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "batch": ENCODE_BATCH,
            "decoding": decoding,
            "repeats": args.repeats,
            "encoder_only_per_s": enc_rate,
            "end_to_end_per_s": e2e_rate,
            "outside_encoder_s": statistics.median(outside),
            "paired_ratios": paired,
            "ratio": statistics.median(paired),
        }
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
