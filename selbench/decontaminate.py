"""Pool-eval decontamination: find the pool samples that are near-duplicates of evaluation
images, count them per evaluation set, and take them out of the pool before selection.

Web pools hold evaluation images (COCO's are in LAION); DataComp removed near-duplicates
of its evaluation images from CommonPool before release (Gadre et al., NeurIPS 2023,
arXiv 2304.14108, its appendix on evaluation-set deduplication, with a model-based
near-duplicate detector). A run does the same on its own pool (``docs/decontamination.md``),
with two detectors that must agree on the same pair of images:

* a perceptual hash: ``imagehash.phash`` (256 bits: the signs of the 16x16 lowest
  frequencies of the DCT of a 64x64 grey thumbnail). Each pool sample's
  :data:`CANDIDATES` nearest evaluation images by Hamming distance (faiss
  ``IndexBinaryFlat``, exact) are its candidates; a candidate within
  :data:`HASH_DISTANCE` bits passes;
* embedding nearest neighbours: the pool's image embeddings by the ``reference`` embedder
  (the pool's pretrained model, through the embedding cache) against the evaluation
  images embedded by the same model (faiss exact inner product); a candidate passes when
  it is the sample's nearest evaluation image in embedding space (its cosine similarity
  within :data:`MARGIN` of the nearest one's) and its cosine similarity is at least
  :data:`COSINE`.

A pool sample is flagged when one candidate passes both. On SynthWeb either detector
alone either misses copies or flags the pool's own look-alikes of evaluation images
(renders of the same scene), while a pair that both call nearest is nearly always a copy.
The embedding test is relative (the nearest evaluation image, not a fixed cosine) because
absolute cosines differ between models: a fixed 0.96 flagged 0.5% of the pool with
SynthWeb's reference CLIP and 2.8% with the test suite's smaller one. The thresholds and
the measured recall and false positives are in ``docs/decontamination.md``. What the hash
alone would flag is logged too (``by_hash``: the nearest evaluation image within the hash
distance).

Pool hashes are cached per pool fingerprint, and a run's result per (pool, evaluation
images, embedder, settings), so resuming a run or running another method on the same
pool finds it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from selbench.configs import EvalSetConfig
from selbench.errors import ConfigError
from selbench.fileutil import atomic_write_text, writing
from selbench.paths import index_home
from selbench.progress import NullProgress, Progress

if TYPE_CHECKING:
    from selbench.pools import ResolvedPool
    from selbench.run.spec import RunRequest

#: Largest Hamming distance (of 256 bits) between the phashes of a copy and its original.
HASH_DISTANCE = 40
#: Smallest cosine similarity of the image embeddings of a copy and its original.
COSINE = 0.90
#: How far below the nearest evaluation image's cosine a candidate may be and still count
#: as the nearest (float16 cached embeddings round the scores by about 0.001).
MARGIN = 0.005
#: Evaluation images, nearest by hash, checked against each pool sample.
CANDIDATES = 8
#: The embedder both sides are embedded with: the pool's pretrained model (on SynthWeb, its
#: reference CLIP; on a real pool, the pool YAML's ``reference``).
EMBEDDER = "reference"
#: Bumped when what is flagged changes for the same inputs; part of every cache key.
VERSION = 1
HASH_SIZE = 16  # imagehash.phash's hash_size: 16 x 16 = 256 bits
HASH_BYTES = HASH_SIZE * HASH_SIZE // 8
BLOCK = 8192  # pool rows compared at once (x CANDIDATES embeddings in memory)
EVAL_BATCH = 256  # evaluation images embedded at once


@dataclass(frozen=True)
class Settings:
    """What decides which samples are flagged: the thresholds and the embedder."""

    hash_distance: int = HASH_DISTANCE
    cosine: float = COSINE
    margin: float = MARGIN
    candidates: int = CANDIDATES
    embedder: str = EMBEDDER

    def label(self) -> str:
        """``phash<=40@8&nearest(cos>=0.9,margin=0.005)|reference|v1``: for the run's params
        and cache keys."""
        return (
            f"phash<={self.hash_distance}@{self.candidates}&nearest(cos>={self.cosine:g},"
            f"margin={self.margin:g})|{self.embedder}|v{VERSION}"
        )


@dataclass
class SetCounts:
    """What one evaluation set has in the pool."""

    images: int  # the set's images
    by_hash: int  # pool samples within the hash distance of one of them (the hash alone)
    flagged: int  # pool samples that are copies of one of them (the rule)
    copied_images: int  # the set's images with at least one flagged pool sample


@dataclass
class Decontamination:
    """A pool's near-duplicates of the evaluation images, and the pool without them."""

    settings: Settings
    pool_size: int  # before
    removed: list[str]  # uids, in pool order
    per_set: dict[str, SetCounts]
    embedder_id: str
    kept_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def kept(self) -> int:
        return self.pool_size - len(self.removed)

    @property
    def removed_sha256(self) -> str:
        """sha256 of the sorted removed uids (as :func:`selbench.run.spec.selection_hash`)."""
        return hashlib.sha256("\n".join(sorted(self.removed)).encode()).hexdigest()

    def params(self, source_fingerprint: str) -> dict[str, Any]:
        """The run params that say what was removed, and from which pool."""
        return {
            "pool_source_fingerprint": source_fingerprint,
            "decontaminate.settings": self.settings.label(),
            "decontaminate.embedder_id": self.embedder_id,
            "decontaminate.removed": len(self.removed),
            "decontaminate.removed_sha256": self.removed_sha256,
            "pool_size_before_decontamination": self.pool_size,
        }

    def metrics(self) -> dict[str, float]:
        """``decontaminate/<set>/<count>`` per evaluation set, and the total removed."""
        found = {"decontaminate/removed": float(len(self.removed))}
        for name, counts in self.per_set.items():
            for key, value in asdict(counts).items():
                found[f"decontaminate/{name}/{key}"] = float(value)
        return found

    def summary(self) -> str:
        sets = ", ".join(f"{name} {c.flagged}" for name, c in self.per_set.items())
        return (
            f"Decontamination: {len(self.removed):,} of {self.pool_size:,} pool samples are "
            f"near-duplicates of evaluation images ({sets}) and were removed before selection"
        )


# -- perceptual hashes -------------------------------------------------------------------
def phash(image: Any) -> np.ndarray:
    """The 256-bit perceptual hash of a PIL image, as 32 bytes (faiss's binary layout)."""
    import imagehash

    return np.packbits(imagehash.phash(image, hash_size=HASH_SIZE).hash.reshape(-1))


def pool_hashes(pool: Any, progress: Progress | None = None) -> np.ndarray:
    """``(len(pool), 32)`` uint8 phashes of the pool's images, in pool order; computed once
    per pool fingerprint and cached next to its index."""
    path = index_home() / f"{pool.fingerprint}.phash-v{VERSION}.npy"
    if path.is_file():
        found = np.load(path)
        if found.shape == (len(pool), HASH_BYTES):
            return found
    hashes = np.zeros((len(pool), HASH_BYTES), dtype=np.uint8)
    report = (progress or NullProgress()).counter("Decontamination: hashing pool images")
    for i, (_, image) in enumerate(pool.iter_images()):
        hashes[i] = phash(image)
        if i % 256 == 0 or i == len(hashes) - 1:
            report(i + 1, len(hashes))
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path, "pool perceptual hashes") as tmp, open(tmp, "wb") as handle:
        np.save(handle, hashes)
    return hashes


def hamming_knn(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``queries`` (uint8 hashes), the Hamming distances to its ``k``
    nearest rows of ``base`` and their indices, nearest first (faiss ``IndexBinaryFlat``,
    exact). ``k`` is clipped to ``len(base)``."""
    import faiss

    k = min(int(k), len(base))
    index = faiss.IndexBinaryFlat(base.shape[1] * 8)
    index.add(np.ascontiguousarray(base))
    distances, indices = index.search(np.ascontiguousarray(queries), k)
    return distances.astype(np.int64), indices.astype(np.int64)


# -- the evaluation side -----------------------------------------------------------------
@dataclass
class EvalImages:
    """The images of one or more evaluation sets that read the same files."""

    names: list[str]
    hashes: np.ndarray  # (n, 32) uint8
    embeddings: np.ndarray  # (n, d) float32, unit rows


def _source(eval_set: EvalSetConfig) -> tuple[str, bool]:
    """Which images a set has: sets reading the same folder the same way share them (the
    SynthWeb retrieval set and its captioning set)."""
    return str(Path(eval_set.path).expanduser().resolve()), eval_set.task == "reasoning"


def _batches(images: Iterator[tuple[str, Any]]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for _, image in images:
        batch.append(image)
        if len(batch) == EVAL_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def eval_images(
    eval_sets: Sequence[EvalSetConfig], services: Any, spec: str, progress: Progress
) -> list[EvalImages]:
    """Hashes and embeddings of every evaluation set's images, one entry per source."""
    from selbench.neighbours import unit_rows
    from selbench.target import eval_set_images

    groups: dict[tuple[str, bool], list[EvalSetConfig]] = {}
    for eval_set in eval_sets:
        groups.setdefault(_source(eval_set), []).append(eval_set)
    found = []
    for members in groups.values():
        report = progress.counter(f"Decontamination: evaluation images of {members[0].name}")
        hashes, embedded, done = [], [], 0
        for batch in _batches(eval_set_images(members[0])):
            hashes += [phash(image) for image in batch]
            embedded.append(_embed(services, spec, batch))
            done += len(batch)
            report(done, done)
        dim = embedded[0].shape[1] if embedded else 1
        found.append(
            EvalImages(
                names=[m.name for m in members],
                hashes=np.array(hashes, dtype=np.uint8).reshape(-1, HASH_BYTES),
                embeddings=unit_rows(np.concatenate(embedded) if embedded else np.zeros((0, dim))),
            )
        )
    return found


def _embed(services: Any, spec: str, images: list[Any]) -> np.ndarray:
    try:
        return np.asarray(services.embed_images(spec, images), dtype=np.float32)
    except ConfigError as exc:
        raise ConfigError(
            f"decontamination embeds the evaluation images with the pool's {spec!r} embedder, "
            f"and cannot: {exc}. Name a model as the pool YAML's 'reference' "
            "(open_clip:ARCH:/path/to/weights.pt), or run with --no-decontaminate"
        ) from None


# -- comparing ---------------------------------------------------------------------------
def _flags(
    pool_hashes_: np.ndarray, pool_embeddings: np.ndarray, group: EvalImages, settings: Settings
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(by hash, by embedding, flagged, the evaluation image each flagged sample copies,
    -1 where none) for every pool sample against one group's images."""
    from selbench.neighbours import knn, unit_rows

    n = len(pool_hashes_)
    by_hash, by_embedding = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    flagged, matched = np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64)
    if len(group.hashes) == 0:
        return by_hash, by_embedding, flagged, matched
    distance, candidates = hamming_knn(pool_hashes_, group.hashes, settings.candidates)
    by_hash = distance[:, 0] <= settings.hash_distance
    for lo in range(0, n, BLOCK):
        hi = min(lo + BLOCK, n)
        block = unit_rows(pool_embeddings[lo:hi])
        scores, _ = knn(block, group.embeddings, 1, use_gpu=False)
        by_embedding[lo:hi] = scores[:, 0] >= settings.cosine
        cand = candidates[lo:hi]
        pair_cosine = np.einsum("nd,nkd->nk", block, group.embeddings[cand])
        floor = np.maximum(settings.cosine, scores[:, :1] - settings.margin)
        both = (distance[lo:hi] <= settings.hash_distance) & (pair_cosine >= floor)
        hit = both.any(axis=1)
        flagged[lo:hi] = hit
        rows = np.flatnonzero(hit)
        matched[lo + rows] = cand[rows, both[rows].argmax(axis=1)]
    return by_hash, by_embedding, flagged, matched


def measure(
    pool: Any,
    eval_sets: Sequence[EvalSetConfig],
    services: Any,
    settings: Settings = Settings(),  # noqa: B008 (frozen)
    progress: Progress | None = None,
) -> Decontamination:
    """Compare ``pool`` with every evaluation set's images: what each set has in the pool,
    and the pool's flagged samples (the union over sets). ``services`` embeds: an
    :class:`~selbench.embedders.EmbeddingService` of the whole pool."""
    progress = progress or NullProgress()
    embedder = services.embedder(settings.embedder)
    key = _cache_key(pool, eval_sets, embedder.embedder_id, settings)
    cached = _load(key, pool, settings)
    if cached is not None:
        return cached
    hashes = pool_hashes(pool, progress)
    image = services.embeddings(settings.embedder).image
    removed = np.zeros(len(pool), dtype=bool)
    per_set: dict[str, SetCounts] = {}
    for group in eval_images(eval_sets, services, settings.embedder, progress):
        by_hash, _, flagged, matched = _flags(hashes, image, group, settings)
        removed |= flagged
        counts = SetCounts(
            images=len(group.hashes),
            by_hash=int(by_hash.sum()),
            flagged=int(flagged.sum()),
            copied_images=len(np.unique(matched[flagged])),
        )
        per_set.update({name: counts for name in group.names})
    uids = pool.uids
    found = Decontamination(
        settings=settings,
        pool_size=len(pool),
        removed=[uids[i] for i in np.flatnonzero(removed)],
        per_set={e.name: per_set[e.name] for e in eval_sets},
        embedder_id=embedder.embedder_id,
        kept_rows=np.flatnonzero(~removed),
    )
    _save(key, found)
    return found


def decontaminate_run(
    request: RunRequest, resolved: ResolvedPool, device: str, progress: Progress
) -> tuple[RunRequest, Decontamination | None]:
    """The request with ``decontaminate`` resolved (None: the pool's default), and, when
    on, what the pool holds of the evaluation sets (logged, and left out of selection)."""
    from dataclasses import replace

    from selbench.embedders import EmbeddingService
    from selbench.pools import decontaminates_by_default
    from selbench.registry import get_registry

    wanted = request.decontaminate
    if wanted is None:
        wanted = decontaminates_by_default(request.pool)
    request = replace(request, decontaminate=bool(wanted))
    if not wanted:
        return request, None
    pool = resolved.pool
    if getattr(pool, "kind", None) == "datacomp-metadata":
        raise ConfigError(
            f"pool {request.pool!r} is DataComp metadata without images, so nothing can be "
            "compared with the evaluation images; run with --no-decontaminate (DataComp "
            "removed the evaluation sets' near-duplicates from its pool before release)"
        )
    services = EmbeddingService(
        pool.strategy_view(), device, get_registry().make_embedder, progress
    )
    found = measure(pool, resolved.eval_sets, services, progress=progress)
    progress.note(found.summary())
    if found.kept == 0:
        raise ConfigError(
            f"every sample of pool {request.pool!r} is a near-duplicate of an evaluation "
            "image, so decontamination leaves nothing to select; check the evaluation sets, "
            "or run with --no-decontaminate"
        )
    return request, found


# -- the result cache --------------------------------------------------------------------
def _files(root: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of every file under ``root``: what the set holds."""
    if root.is_file():
        stat = root.stat()
        return [(root.name, stat.st_size, stat.st_mtime_ns)]
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        found.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return found


def _cache_key(
    pool: Any, eval_sets: Sequence[EvalSetConfig], embedder_id: str, settings: Settings
) -> str:
    sets = [[e.name, e.task, str(e.path), _files(Path(e.path).expanduser())] for e in eval_sets]
    described = [pool.fingerprint, embedder_id, settings.label(), sets]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:24]


def _path(key: str) -> Path:
    return index_home() / "decontamination" / f"{key}.json"


def _load(key: str, pool: Any, settings: Settings) -> Decontamination | None:
    try:
        raw = json.loads(_path(key).read_text())
        per_set = {name: SetCounts(**counts) for name, counts in raw["per_set"].items()}
        removed = list(raw["removed"])
        embedder_id = raw["embedder_id"]
    except (OSError, ValueError, TypeError, KeyError):
        return None  # absent or unreadable: measured again
    gone = set(removed)
    kept = np.array([i for i, uid in enumerate(pool.uids) if uid not in gone], dtype=np.int64)
    return Decontamination(
        settings=settings,
        pool_size=len(pool),
        removed=removed,
        per_set=per_set,
        embedder_id=embedder_id,
        kept_rows=kept,
    )


def _save(key: str, found: Decontamination) -> None:
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = {
        "removed": found.removed,
        "per_set": {name: asdict(c) for name, c in found.per_set.items()},
        "embedder_id": found.embedder_id,
        "settings": found.settings.label(),
    }
    atomic_write_text(path, json.dumps(raw))
