"""Shared faiss helpers for strategies: k-means and exact inner-product kNN.

Both are deterministic: the same inputs (and seed) give identical outputs. Faiss's CPU
k-means and flat search were checked to give bit-identical results run to run with the
default OpenMP thread count, and with 1 vs 2 threads (the centroid update splits work by
centroid, not by point, so no floating-point sum is reordered across threads), so no
thread pinning is done. GPU results are deterministic run to run on the same GPU but may
differ from CPU results in the last bits (and so in near-tied assignments).

Faiss k-means subsamples the training set to ``max_points_per_centroid`` (256) points per
centroid when ``n > 256 * k``; that default is kept (the subsampling is seeded). On CPU,
:func:`kmeans` draws that same subsample itself (faiss's ``rand_perm`` with the k-means
seed, the rows in its order), so only the sample is converted to float32, and then assigns
every row in blocks of :data:`ASSIGN_ROWS`: the same centroids, assignment and scores as
faiss given every row, bit for bit, without a float32 copy of the pool.
``max_train_points`` caps the training rows further (a seeded sample of that many, as
SemDeDup and TL;DR train at scale); it changes results only where it is below both the
pool and ``256 * k``. Its
"please provide at least ... training points" warning, which faiss prints to stderr when
``n < 39 * k``, is silenced by setting ``min_points_per_centroid=1`` (that parameter only
controls the warning). The "Sampling a subset" message is printed only in verbose mode.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from importlib import metadata
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from selbench.executors import Executor, LocalExecutor, SharedArray, local_or, release_rows

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)


def _faiss() -> ModuleType:
    """The ``faiss`` module, imported when first needed: importing this module (and so
    selbench.toolbox, which every plugin imports) needs no faiss, only calling what
    searches or clusters does (the GPU check's embedding part, docs/gpu-check.md)."""
    import faiss

    return faiss


# faiss GPU flat search handles k (and nprobe) up to this; larger k runs on CPU.
GPU_MAX_K = 2048
# Rows per block where a whole-array temporary would cost memory the size of the data.
ROWS_AT_ONCE = 65536
# Rows per faiss search when k-means assigns rows in blocks. faiss's flat search takes its
# BLAS path once queries x dim reach distance_compute_blas_threshold (128,000 in faiss
# 1.15: 131,072 queries take it at any dim) and runs it in blocks of 4,096 queries
# (distance_compute_blas_query_bs); BLAS's sums depend on a block's row count, so a block
# of 32 x 4,096 rows, the last block taking the rest (between 1x and 2x this), makes the
# very BLAS calls one search of every row makes: bit-identical scores (checked by
# tests/test_select_memory.py). A pool under twice this is searched at once.
ASSIGN_ROWS = 131072
# PyPI distributions that install the ``faiss`` module (they overwrite each other's files).
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11")


def installed_faiss_distributions() -> list[str]:
    """The distributions of :data:`FAISS_DISTRIBUTIONS` installed here, with versions."""
    found = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return found


@functools.cache
def _warn_mixed_install() -> None:
    """Warn once when two faiss builds share the ``faiss`` module: whichever pip wrote
    last is the one imported, and removing either breaks the other."""
    found = installed_faiss_distributions()
    if len(found) > 1:
        gpu = next((name.split("==")[0] for name in found if "gpu" in name), "faiss-gpu")
        log.warning(
            "%s are all installed and share the faiss module, so which one runs is down to "
            "install order (faiss sees %d GPU(s)). Keep one: pip uninstall -y %s && "
            "pip install %s (docs/scale-out-embedding.md)",
            " and ".join(found),
            faiss_gpu_count(),
            " ".join(name.split("==")[0] for name in found),
            gpu,
        )


def faiss_gpu_count() -> int:
    """GPUs faiss can use: ``faiss.get_num_gpus()`` where it exists, else 0.

    faiss-cpu reports 0. (``faiss.Kmeans(gpu=True)`` silently stays on CPU there, so the
    flag alone never says where the work runs.)
    """
    get_num_gpus = getattr(_faiss(), "get_num_gpus", None)
    if get_num_gpus is None:
        return 0
    try:
        return int(get_num_gpus())
    except Exception:  # a broken CUDA setup must not break CPU-only work
        return 0


def use_faiss_gpu(use_gpu: bool | None) -> bool:
    """Whether to run on GPU: ``None`` means "if faiss has one"; True without one warns."""
    _warn_mixed_install()
    available = faiss_gpu_count() > 0
    if use_gpu is None:
        return available
    if use_gpu and not available:
        log.warning("GPU requested but faiss sees no GPU (faiss-cpu?); running on CPU")
        return False
    return bool(use_gpu)


def as_float32_matrix(x: np.ndarray, name: str = "x") -> np.ndarray:
    """``x`` as a C-contiguous float32 2-d array (copies only if needed); checks it."""
    array = np.ascontiguousarray(x, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-d array, got shape {array.shape}")
    for lo in range(0, len(array), ROWS_AT_ONCE):  # a mask of the whole array is n*d bytes
        if not np.isfinite(array[lo : lo + ROWS_AT_ONCE]).all():
            raise ValueError(f"{name} contains NaN or inf values")
    return array


def faiss_seed(seed: int) -> int:
    """``seed`` reduced to faiss's non-negative 31-bit C int."""
    return int(seed) % (2**31)


def kmeans(
    x: np.ndarray,
    k: int,
    seed: int,
    niter: int = 20,
    spherical: bool = False,
    use_gpu: bool | None = None,
    return_scores: bool = False,
    max_points_per_centroid: int = 256,
    max_train_points: int | None = None,
    unit: bool = False,
    executor: Executor | None = None,
) -> tuple[np.ndarray, ...]:
    """Cluster the rows of ``x`` into ``k`` clusters with faiss k-means.

    Returns ``(centroids, assignment)``: float32 ``(k, d)`` and int64 ``(n,)``, the
    nearest centroid of every row (by the trained index: L2, or inner product when
    ``spherical``, whose centroids are L2-normalised). With ``return_scores``, also the
    float32 ``(n,)`` search score of that centroid, which the assignment computed anyway:
    the inner product with it when ``spherical`` (the cosine similarity, for unit rows),
    else the squared L2 distance to it. ``x`` may be any float array or
    memory map; it is converted to contiguous float32 (``unit``: to :func:`unit_rows`, as
    it is read). ``k`` larger than ``n`` is clipped to ``n`` with a warning.
    ``use_gpu=None`` uses a GPU when faiss has one. ``seed`` is taken modulo 2**31.

    faiss trains on a seeded subsample of ``max_points_per_centroid * k`` rows when there
    are more (faiss's default, 256); on CPU that subsample is drawn here, exactly as faiss
    draws it, and only it is converted, then every row is assigned in blocks (module
    docstring). ``max_train_points`` caps the training rows further: a pool larger than
    it trains on a seeded sample of that many rows (a prefix of the same permutation),
    then assigns every row in blocks. None (the default) keeps faiss's cap alone.
    ``executor`` runs the assignment's blocks (default: here); training runs here. A pool
    small enough to train on every row is searched at once here, and in
    :func:`assign_blocks` blocks elsewhere (bit-identical: :data:`ASSIGN_ROWS`).
    """
    x = np.asarray(x)  # a view of an array or memory map, never a copy of one
    n, d = _matrix_shape(x)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        log.warning("kmeans: k=%d is larger than the number of points %d; using k=%d", k, n, n)
        k = n
    gpu = use_faiss_gpu(use_gpu)
    executor = None if gpu else executor  # a GPU index searches here (it does not serialise)
    sample = _training_rows(n, int(k), int(max_points_per_centroid), max_train_points, gpu)
    clustering = _faiss().Kmeans(
        d,
        int(k),
        niter=int(niter),
        seed=faiss_seed(seed),
        spherical=bool(spherical),
        gpu=gpu,
        verbose=False,
        min_points_per_centroid=1,  # only silences faiss's "too few points" stderr warning
        max_points_per_centroid=int(max_points_per_centroid),
    )
    if sample is None:  # every row trains: one float32 copy, one search
        data = _float_rows(x, unit)
        clustering.train(data)
        if executor is None or isinstance(executor, LocalExecutor):
            scores, assignment = clustering.index.search(data, 1)
            scores, assignment = scores.reshape(-1), assignment.reshape(-1)
        else:
            scores, assignment = assign_in_blocks(clustering.index, data, executor=executor)
    else:
        picked = faiss_permutation(n, seed)[:sample]
        training = _sample_rows(x, picked, unit)
        clustering.train(training)
        del training
        scores, assignment = assign_in_blocks(clustering.index, x, unit, executor=executor)
    centroids = np.ascontiguousarray(clustering.centroids, dtype=np.float32)
    assignment = assignment.astype(np.int64, copy=False)
    if return_scores:
        return centroids, assignment, scores
    return centroids, assignment


def _matrix_shape(x: np.ndarray) -> tuple[int, int]:
    """``x``'s (rows, columns), without converting it; as_float32_matrix's shape check."""
    shape = np.shape(x)
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"x must be a non-empty 2-d array, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _float_rows(x: np.ndarray, unit: bool) -> np.ndarray:
    """Rows of ``x`` as checked contiguous float32, made unit vectors when ``unit``."""
    return as_float32_matrix(unit_rows(x) if unit else x)


def _sample_rows(x: np.ndarray, picked: np.ndarray, unit: bool) -> np.ndarray:
    """``_float_rows(x[picked], unit)``, gathered :data:`GATHER_ROWS` rows at a time: the
    pages of a memory map that each gather of scattered rows faults in leave the resident
    set after it (:func:`release_rows`), so the sample never maps the whole pool. Row-wise
    conversions: the same floats as one gather."""
    if not isinstance(x, np.memmap) and not isinstance(x.base, np.ndarray):
        return _float_rows(np.asarray(x[picked]), unit)
    out = np.empty((len(picked), x.shape[1]), dtype=np.float32)
    for lo in range(0, len(picked), GATHER_ROWS):
        block = np.asarray(x[picked[lo : lo + GATHER_ROWS]])
        out[lo : lo + len(block)] = unit_rows(block) if unit else block
        release_rows(x, 0, len(x))
    return as_float32_matrix(out)


# Rows of a k-means training sample gathered at once from a memory map (_sample_rows).
GATHER_ROWS = 4096


def _training_rows(
    n: int, k: int, max_points_per_centroid: int, max_train_points: int | None, gpu: bool
) -> int | None:
    """How many rows of faiss's permutation train k-means, or None for every row (and
    faiss's own subsampling, as on GPU, where the search is not split into blocks)."""
    if max_train_points is not None and max_train_points < k:
        raise ValueError(f"max_train_points must be >= k ({k}), got {max_train_points}")
    faiss_cap = k * max_points_per_centroid
    if max_train_points is not None and n > max_train_points:
        return min(max_train_points, faiss_cap)
    if n > faiss_cap and not gpu:
        return faiss_cap
    return None


def faiss_permutation(n: int, seed: int) -> np.ndarray:
    """The permutation of ``range(n)`` faiss's k-means draws its training subsample from
    (``faiss::rand_perm`` with the k-means seed; the sample is its first rows)."""
    if n >= 2**31:
        raise ValueError(f"faiss k-means samples at most 2**31 - 1 rows, got {n}")
    perm = np.empty(n, dtype=np.int32)
    lib = _faiss()
    lib.rand_perm(lib.swig_ptr(perm), n, faiss_seed(seed))
    return perm


def assign_blocks(n: int, rows: int = ASSIGN_ROWS) -> list[tuple[int, int]]:
    """``(start, stop)`` blocks of ``n`` rows: ``rows`` each, the last taking the rest
    (``rows`` to ``2 * rows - 1``); one block when ``n < 2 * rows``."""
    starts = list(range(0, n, rows)) or [0]
    if len(starts) > 1 and n - starts[-1] < rows:
        starts.pop()
    return list(zip(starts, [*starts[1:], n], strict=True))


def assign_in_blocks(
    index: faiss.Index,
    x: np.ndarray,
    unit: bool = False,
    rows: int | None = None,
    executor: Executor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, assignment)``: float32 and int64 ``(n,)``, every row of ``x``'s nearest
    entry of ``index``, searched :func:`assign_blocks` at a time (``rows``: default
    :data:`ASSIGN_ROWS`), so one block of ``x`` is in float32 at once. ``executor`` runs
    the blocks (default: here, in order); each searches a copy of ``index`` made from its
    serialised bytes, the same blocks whatever the executor (so the same floats)."""
    executor = local_or(executor)
    n = len(x)
    blocks = assign_blocks(n, ASSIGN_ROWS if rows is None else rows)
    if isinstance(executor, LocalExecutor):  # the index itself, not a copy
        found = [_search_block(index, x, lo, hi, unit) for lo, hi in blocks]
    else:
        serialised = executor.share(_faiss().serialize_index(index))
        shared = executor.share(np.asarray(x))
        tasks = [(serialised, shared, lo, hi, unit) for lo, hi in blocks]
        found = executor.map(_search_serialised_block, tasks)
    scores = np.empty(n, dtype=np.float32)
    assignment = np.empty(n, dtype=np.int64)
    for (lo, hi), (block_scores, nearest) in zip(blocks, found, strict=True):
        scores[lo:hi] = block_scores
        assignment[lo:hi] = nearest
    return scores, assignment


def _search_block(
    index: faiss.Index, x: np.ndarray, lo: int, hi: int, unit: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The nearest entry of ``index`` (score, position) for rows ``lo:hi`` of ``x``."""
    found, nearest = index.search(_float_rows(x[lo:hi], unit), 1)
    release_rows(x, lo, hi)  # a memory-mapped cache's pages: out of the resident set
    return found.reshape(-1), nearest.reshape(-1).astype(np.int64, copy=False)


def _search_serialised_block(
    serialised: SharedArray, x: SharedArray, lo: int, hi: int, unit: bool
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_search_block` in a task: the index rebuilt from its bytes, ``x`` mapped."""
    index = _faiss().deserialize_index(np.ascontiguousarray(serialised.get()))
    return _search_block(index, x.get(), lo, hi, unit)


def knn(
    queries: np.ndarray,
    base: np.ndarray,
    k: int,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product k-nearest neighbours of ``queries`` among the rows of ``base``.

    Returns ``(scores, indices)``: float32 and int64, both ``(n_queries, k)``, best first
    (faiss ``IndexFlatIP``; for cosine similarity pass L2-normalised rows). ``k`` is clipped
    to ``len(base)``. Runs on all GPUs when faiss has them (``use_gpu=None``) and
    ``k <= 2048``, else on CPU. Inputs may be any float arrays or memory maps (float16
    included); they are converted to float32, so ``base`` must fit in memory as float32.
    """
    q = as_float32_matrix(queries, "queries")
    b = as_float32_matrix(base, "base")
    if q.shape[1] != b.shape[1]:
        raise ValueError(f"queries have dim {q.shape[1]} but base has dim {b.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), b.shape[0])
    lib = _faiss()
    index: faiss.Index = lib.IndexFlatIP(b.shape[1])
    if use_faiss_gpu(use_gpu):
        if k <= GPU_MAX_K:
            index = lib.index_cpu_to_all_gpus(index)
        else:
            log.info("knn: k=%d exceeds faiss's GPU limit %d; searching on CPU", k, GPU_MAX_K)
    index.add(b)
    scores, indices = index.search(q, k)
    return scores.astype(np.float32, copy=False), indices.astype(np.int64, copy=False)


def scaled_cluster_count(requested: int, n_points: int, min_points_per_cluster: int) -> int:
    """``requested`` clusters, reduced so each has ``min_points_per_cluster`` points on
    average when the pool is small (never below one)."""
    return max(1, min(int(requested), n_points // min_points_per_cluster))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` as float32 unit vectors (all-zero rows stay zero).

    Always a new array. When ``x`` is not already float32 (the cache's float16, say) its
    float32 copy is divided in place, so the result is the only full-size array made:
    the same values as dividing into a new array, at half the peak memory.
    """
    source = x
    x = np.asarray(x, dtype=np.float32)
    norms = np.empty((len(x), 1), dtype=np.float32)
    for lo in range(0, len(x), ROWS_AT_ONCE):  # norm() squares into a temp: in blocks
        norms[lo : lo + ROWS_AT_ONCE] = np.linalg.norm(
            x[lo : lo + ROWS_AT_ONCE], axis=1, keepdims=True
        )
    np.maximum(norms, np.finfo(np.float32).tiny, out=norms)
    if x is source or np.shares_memory(x, source):
        return x / norms
    x /= norms
    return x


def cluster_members(candidates: np.ndarray, assignment: np.ndarray, k: int) -> list[np.ndarray]:
    """``candidates`` grouped by cluster, each group in the order of ``candidates``:
    ``[candidates[assignment == c] for c in range(k)]`` in O(n log n) (one stable argsort
    and ``searchsorted`` bounds) instead of O(n k) comparisons, 3e9 at 1M points and
    k = 3000 (TL;DR's stage 2, SemDeDup's clusters)."""
    assignment = np.asarray(assignment, dtype=np.int64)
    order = np.argsort(assignment, kind="stable")
    bounds = np.searchsorted(assignment[order], np.arange(k + 1))
    grouped = np.asarray(candidates)[order]
    return [grouped[bounds[c] : bounds[c + 1]] for c in range(k)]


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the enclosed numpy matrix products on one BLAS thread.

    For loops of many small products (one per cluster): waking BLAS threads for each
    costs more than the product, and after faiss's k-means its OpenMP threads still spin
    on the cores that numpy's BLAS threads then wait for. SemDeDup's per-cluster
    similarities on 50k points took 8 s with the default threads and 0.23 s with one
    (2 cores, benchmarks/cluster_scale.py). One thread also makes those products
    independent of the host's core count.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def kmeans_scaled(
    x: np.ndarray,
    requested: int,
    min_points_per_cluster: int,
    seed: int,
    niter: int,
    who: str,
    return_scores: bool = False,
    max_train_points: int | None = None,
    unit: bool = False,
    executor: Executor | None = None,
) -> tuple[np.ndarray, ...]:
    """Spherical k-means with :func:`scaled_cluster_count` clusters; logs (naming ``who``)
    when a small pool reduced the requested count. ``return_scores``, ``max_train_points``,
    ``unit`` and ``executor`` as in :func:`kmeans`."""
    k = scaled_cluster_count(requested, len(x), min_points_per_cluster)
    if k < requested:
        log.info(
            "%s: pool of %d samples; using %d clusters instead of %d (at most pool_size // %d)",
            who,
            len(x),
            k,
            requested,
            min_points_per_cluster,
        )
    return kmeans(
        x,
        k,
        seed=seed,
        niter=niter,
        spherical=True,
        return_scores=return_scores,
        max_train_points=max_train_points,
        unit=unit,
        executor=executor,
    )
