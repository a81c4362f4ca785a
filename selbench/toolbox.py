"""The toolbox for strategy authors: everything a selection plugin needs beyond the pool,
in one documented module (``docs/plugins.md``). The built-in strategies use it too.

Ranking (ties always go to the earlier pool position, so selections reproduce):
    :func:`rank`, :func:`top_k`, :func:`clip_scores`
Normalisation and distances:
    :func:`unit_rows`, :func:`centroid_distances`
Where row blocks run (``ctx.executor``, passed as ``executor=`` to :func:`clip_scores`,
:func:`centroid_distances`, :func:`kmeans` and :func:`kmeans_scaled`; docs/scale-out.md):
    :class:`Executor`, :class:`LocalExecutor`, :class:`SharedArray`
faiss (on every GPU faiss sees, else CPU; deterministic for a seed):
    :func:`kmeans`, :func:`kmeans_scaled`, :func:`scaled_cluster_count`, :func:`knn`,
    :func:`faiss_gpu_count`, :func:`one_blas_thread`, :func:`cluster_members` (members of
    every cluster in one sort)
Images as tensors:
    :func:`pool_image_tensor`, :func:`image_batches`
Training a proxy or a small model with selbench's one training loop:
    :func:`build_model`, :func:`model_config`, :func:`load_scale`, :func:`load_training_data`,
    :func:`build_training_data`, :func:`train_clip`, :func:`training_loop`,
    :func:`weight_decay_groups`
Captioning (SynthWeb's reference captioner, or a local CoCa checkpoint on a real pool):
    :func:`reference_captioner` (a :class:`Captioner`), :class:`DecodeSettings`,
    ``SAMPLER_VERSION`` (for the key of a cache of sampled captions)
Caching:
    :func:`cached_directory` (a checkpoint folder built once, under a lock),
    :func:`checkpoint_in`, :func:`selbench_home` (where caches live),
    :func:`memoised_sha256`, :func:`file_sha256`
The contract's types:
    :class:`Strategy`, :class:`Selection`, :class:`Synthesized`, :class:`SelectionContext`,
    :class:`Embeddings`, :class:`TargetSet`, :class:`Embedder`, :data:`NEEDS`,
    :data:`hookimpl`, and the errors :class:`ConfigError` (bad parameters) and
    :class:`PluginError` (anything else).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from selbench.captioning import SAMPLER_VERSION, DecodeSettings
from selbench.configs import ScaleConfig, load_scale
from selbench.embedders import Embedder, Embeddings, image_batches
from selbench.errors import ConfigError, PluginError
from selbench.executors import Executor, LocalExecutor, SharedArray, local_or, release_rows
from selbench.fileutil import cached_directory, file_sha256, memoised_sha256
from selbench.hookspecs import hookimpl
from selbench.neighbours import (
    cluster_members,
    faiss_gpu_count,
    kmeans,
    kmeans_scaled,
    knn,
    one_blas_thread,
    scaled_cluster_count,
    unit_rows,
)
from selbench.paths import selbench_home
from selbench.progress import NullProgress, Tracker
from selbench.reference_captioner import Captioner, reference_captioner
from selbench.strategy import (
    NEEDS,
    PoolView,
    Selection,
    SelectionContext,
    Strategy,
    Synthesized,
)
from selbench.target import TargetSet
from selbench.train import (
    LoopResult,
    TrainingData,
    TrainResult,
    build_model,
    build_training_data,
    load_training_data,
    model_config,
    open_clip_no_decay,
    train_clip,
    training_loop,
    weight_decay_groups,
)

__all__ = [
    "NEEDS",
    "SAMPLER_VERSION",
    "Captioner",
    "ConfigError",
    "DecodeSettings",
    "Embedder",
    "Embeddings",
    "Executor",
    "LocalExecutor",
    "LoopResult",
    "PluginError",
    "ScaleConfig",
    "Selection",
    "SelectionContext",
    "SharedArray",
    "Strategy",
    "Synthesized",
    "TargetSet",
    "TrainResult",
    "TrainingData",
    "build_model",
    "build_training_data",
    "cached_directory",
    "checkpoint_in",
    "centroid_distances",
    "clip_scores",
    "cluster_members",
    "faiss_gpu_count",
    "file_sha256",
    "hookimpl",
    "image_batches",
    "kmeans",
    "kmeans_scaled",
    "knn",
    "load_scale",
    "load_training_data",
    "memoised_sha256",
    "model_config",
    "one_blas_thread",
    "open_clip_no_decay",
    "pool_image_tensor",
    "rank",
    "reference_captioner",
    "release_rows",
    "scaled_cluster_count",
    "selbench_home",
    "top_k",
    "train_clip",
    "training_loop",
    "unit_rows",
    "weight_decay_groups",
]

# Rows scored at once where scoring makes float32 copies: bounds memory, not the math.
ROWS_AT_ONCE = 65536


# -- ranking -------------------------------------------------------------------------
def rank(scores: np.ndarray, among: np.ndarray | None = None, largest: bool = True) -> np.ndarray:
    """Indices of ``scores`` best first (highest when ``largest``, else lowest); ties go to
    the earlier pool position. With ``among`` (indices), only those are ranked."""
    scores = np.asarray(scores)
    candidates = np.arange(len(scores)) if among is None else np.asarray(among, dtype=np.int64)
    values = scores[candidates]
    return candidates[np.lexsort((candidates, -values if largest else values))]


def top_k(
    scores: np.ndarray, k: int, among: np.ndarray | None = None, largest: bool = True
) -> np.ndarray:
    """The ``k`` best indices of :func:`rank`, in ascending (pool) order.

    Over a whole pool this does not sort it: the k-th best value comes from a partition,
    then every index strictly better than it and the earliest indices equal to it are
    kept, the same indices as :func:`rank`'s first ``k`` (tested). :func:`rank`'s lexsort
    holds about 40 bytes a sample at once (index, key and order arrays); this holds the
    partitioned copy (the scores' size) and the ``k`` indices, which keeps a budget's top-k
    over 8M CLIP scores from growing the select stage by the pool's size."""
    scores = np.asarray(scores)
    n = len(scores)
    if among is not None or not 0 < k < n or scores.ndim != 1 or np.isnan(scores).any():
        return np.sort(rank(scores, among, largest)[:k])
    pivot = n - k if largest else k - 1
    kth = np.partition(scores, pivot)[pivot]
    better = np.flatnonzero(scores > kth if largest else scores < kth)
    tied = np.flatnonzero(scores == kth)[: k - len(better)]
    return np.sort(np.concatenate([better, tied]))


def clip_scores(
    image: np.ndarray,
    text: np.ndarray,
    rows: int | None = None,
    executor: Executor | None = None,
) -> np.ndarray:
    """Per-pair cosine similarity ``<f_img(x_i), f_txt(t_i)>`` of L2-normalised rows
    (float32): the CLIP score of DataComp (Gadre et al., 2023, Sec. 4).

    Scored ``rows`` (default :data:`ROWS_AT_ONCE`) rows at a time, so with the cache's
    memory maps only the scores (4 bytes a row, twice while the blocks' scores are
    gathered) and one block's float32 copies are resident. Each score is the same
    row-wise dot product of the same float32 values whatever the block size
    (``tests/test_select_memory.py`` checks the blocks give identical floats).
    ``executor`` runs the blocks (default: here, in order; ``ctx.executor`` on Ray)."""
    image, text = np.asarray(image), np.asarray(text)
    if image.shape != text.shape or image.ndim != 2:
        raise ValueError(f"image {image.shape} and text {text.shape} must be one 2-d shape")
    executor = local_or(executor)
    step = max(1, int(ROWS_AT_ONCE if rows is None else rows))
    blocks = [(lo, min(lo + step, len(image))) for lo in range(0, len(image), step)]
    shared = executor.share(image), executor.share(text)
    parts = executor.map(_clip_block, [(*shared, lo, hi) for lo, hi in blocks])
    scores = np.empty(len(image), dtype=np.float32)
    for (lo, hi), part in zip(blocks, parts, strict=True):
        scores[lo:hi] = part
    return scores


def _clip_block(image: SharedArray, text: SharedArray, lo: int, hi: int) -> np.ndarray:
    """:func:`clip_scores` of rows ``lo:hi``: one task (the rows' pages of a memory-mapped
    cache leave the resident set after: :func:`release_rows`)."""
    rows, texts = image.get(), text.get()
    scores = np.einsum("ij,ij->i", rows[lo:hi].astype(np.float32), texts[lo:hi].astype(np.float32))
    release_rows(rows, lo, hi)
    release_rows(texts, lo, hi)
    return scores


# -- distances -----------------------------------------------------------------------
def centroid_distances(
    x: np.ndarray,
    centroids: np.ndarray,
    assignment: np.ndarray,
    executor: Executor | None = None,
) -> np.ndarray:
    """Cosine distance of every row of ``x`` to its assigned centroid (float32).

    ``d_i = 1 - <x_i, c_{a_i}> / (|x_i| |c_{a_i}|)``, in ``[0, 2]``: the self-supervised
    prototype metric of Sorscher et al. (NeurIPS 2022, Sec. 5), where ``a_i`` is the
    nearest prototype of ``x_i``. Rows and centroids need not be normalised. Computed in
    blocks of rows, which ``executor`` runs (default: here).
    """
    executor = local_or(executor)
    assignment = np.asarray(assignment, dtype=np.int64)
    unit_protos = unit_rows(centroids)
    n = len(x)
    blocks = [(lo, min(lo + ROWS_AT_ONCE, n)) for lo in range(0, n, ROWS_AT_ONCE)]
    shared = executor.share(np.asarray(x)), executor.share(unit_protos)
    tasks = [(*shared, assignment[lo:hi], lo, hi) for lo, hi in blocks]
    distances = np.empty(n, dtype=np.float32)
    for (lo, hi), part in zip(blocks, executor.map(_distance_block, tasks), strict=True):
        distances[lo:hi] = part
    return distances


def _distance_block(
    x: SharedArray, protos: SharedArray, assigned: np.ndarray, lo: int, hi: int
) -> np.ndarray:
    """:func:`centroid_distances` of rows ``lo:hi`` (row by row math: blocks bound the
    memory only)."""
    rows = unit_rows(x.get()[lo:hi])
    return 1.0 - np.einsum("ij,ij->i", rows, protos.get()[assigned])


# -- caching -------------------------------------------------------------------------
def checkpoint_in(folder: Path, name: str = "model.pt") -> Path | None:
    """``folder / name`` if that file exists, else None: the ``load`` of a
    :func:`cached_directory` entry that holds one checkpoint file."""
    path = folder / name
    return path if path.is_file() else None


# -- images --------------------------------------------------------------------------
def pool_image_tensor(
    pool: PoolView,
    preprocess: Any,
    progress: Tracker | None = None,
    description: str = "Loading pool",
) -> torch.Tensor:
    """Every pool image through ``preprocess`` (a model's, e.g. ``ctx.proxy().preprocess``),
    stacked as one ``(N, 3, H, W)`` tensor in pool order: what a model is trained on."""
    progress = progress or NullProgress()
    loading = progress.track(pool.iter_images(), description, total=len(pool))
    return torch.stack([preprocess(image) for _, image in loading])
