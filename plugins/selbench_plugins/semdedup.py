"""SemDeDup (Abbas et al., "SemDeDup: Data-efficient learning at web-scale through semantic
deduplication", 2023, arXiv 2303.09540, Sec. 3 and Algorithm 1).

Cluster the image embeddings with k-means; inside each cluster, visit the points in a fixed
order (by default farthest from the centroid first) and mark a point as a semantic
duplicate when its cosine similarity to some point visited before it exceeds ``1 - eps``.
Removing the marked points keeps one member of every group of semantic duplicates: the one
visited first, i.e. (by default) the one with the lowest cosine similarity to the centroid.

Algorithm 1 in matrix form, per cluster with rows in visiting order::

    S = X X^T;  M_j = max_{i < j} S_ij;  keep j  iff  M_j <= 1 - eps

``M_j`` does not depend on ``eps``, so the number of kept points is a non-increasing step
function of ``eps`` and the ``eps`` that meets a budget is an order statistic of ``M``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from selbench.toolbox import (
    Executor,
    LocalExecutor,
    Selection,
    SelectionContext,
    SharedArray,
    Strategy,
    cluster_members,
    hookimpl,
    kmeans_scaled,
    one_blas_thread,
    release_rows,
    unit_rows,
)

log = logging.getLogger(__name__)

# Small pools: at least this many points per cluster on average.
MIN_POINTS_PER_CLUSTER = 100
# Columns of a cluster's similarity matrix computed at once (bounds memory for big clusters).
BLOCK = 2048
# Rows of a column block computed at once once a cluster is larger than this: a task's
# matrix stays ROW_BLOCK x BLOCK float32 (64 MiB) whatever the cluster's size.
ROW_BLOCK = 8192
# M of the first point visited in a cluster: it has no earlier point, so it is never a
# duplicate for any eps in [0, 2] (the test is strict: -1 > 1 - eps never holds).
NO_EARLIER_POINT = -1.0


def order_within_cluster(
    dist_to_centroid: np.ndarray,
    keep: Literal["farthest", "closest", "random"],
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The order in which Algorithm 1 visits a cluster's points (a permutation of indices).

    The first-visited member of a duplicate group is the one kept. ``farthest``: decreasing
    cosine distance to the centroid (the paper: "keep the image with the lowest cosine
    similarity to the cluster centroid"; also the released code's default ``keep_hard``);
    ``closest``: increasing distance; ``random``: a permutation drawn from ``rng``. Ties go
    to the earlier position (the input is in pool order).
    """
    dist = np.asarray(dist_to_centroid, dtype=np.float64)
    positions = np.arange(len(dist))
    if keep == "farthest":
        return np.lexsort((positions, -dist))
    if keep == "closest":
        return np.lexsort((positions, dist))
    if keep == "random":
        if rng is None:
            raise ValueError("keep='random' needs an rng")
        return rng.permutation(len(dist))
    raise ValueError(f"keep must be 'farthest', 'closest' or 'random', got {keep!r}")


def max_similarity_to_earlier(sim: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Algorithm 1's ``M``: for every point, its maximum similarity to a point visited earlier.

    ``sim`` is one cluster's pairwise cosine-similarity matrix, ``order`` the visiting order
    (:func:`order_within_cluster`). Returned in the rows' own order (not visiting order); the
    first-visited point gets ``-1``. The earlier point may itself be a duplicate: Algorithm 1
    compares with every earlier point, not only with kept ones.
    """
    sim = np.asarray(sim)
    order = np.asarray(order, dtype=np.int64)
    ordered = sim[np.ix_(order, order)]
    earlier = np.triu(np.ones(ordered.shape, dtype=bool), k=1)  # (i, j) with i visited before j
    best = np.where(earlier, ordered, -np.inf).max(axis=0, initial=-np.inf)
    result = np.empty(len(order), dtype=np.float64)
    result[order] = np.maximum(best, NO_EARLIER_POINT)
    return result


def duplicate_mask(sim: np.ndarray, order: np.ndarray, epsilon: float) -> np.ndarray:
    """Algorithm 1 on one cluster: True for the points it removes (``M_j > 1 - epsilon``)."""
    return max_similarity_to_earlier(sim, order) > 1.0 - float(epsilon)


def _cluster_max_similarity(members: np.ndarray, order: np.ndarray) -> np.ndarray:
    """:func:`max_similarity_to_earlier` from a cluster's unit embeddings, in blocks.

    Same result as building the whole similarity matrix, with at most
    ``ROW_BLOCK * BLOCK`` similarities in memory at once: :data:`BLOCK` columns (points)
    at a time, and for a cluster of more than :data:`ROW_BLOCK` points the rows (earlier
    points) of a column block :data:`ROW_BLOCK` at a time, the column maxima carried over.
    A maximum is exact in any order, but a BLAS may round a dot product of a product of
    another shape differently in the last place (one ulp, rarely, on OpenBLAS), so such
    a cluster's ``M`` may differ from the one-product path's by that much; clusters of at
    most ``ROW_BLOCK`` points take the one-product path as before, so small pools' selections
    are unchanged. A cluster grows with the pool at a fixed number of clusters, and Ray
    runs a task per CPU, so a task's matrix is bounded by these, not by the largest
    cluster. Both executors run this same code, so their selections stay equal.
    """
    return _in_pool_order(_ordered_max_similarity(members[order]), order)


def _in_pool_order(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``values`` of the points visited in ``order``, put back at their own positions."""
    result = np.empty(len(order), dtype=np.float64)
    result[order] = values
    return result


def _ordered_max_similarity(xs: np.ndarray) -> np.ndarray:
    """:func:`_cluster_max_similarity` of rows already in visiting order, in that order.
    Each block is dropped before the next is computed: two blocks at once were the
    largest part of a task's memory."""
    m = len(xs)
    best = np.full(m, NO_EARLIER_POINT, dtype=np.float64)
    later = np.tri(min(m, BLOCK), dtype=bool)  # (i, j) with i visited at or after j
    for start in range(0, m, BLOCK):
        stop = min(start + BLOCK, m)
        width = stop - start
        if stop <= ROW_BLOCK:  # one product: the first `stop` points against the block
            block = xs[:stop] @ xs[start:stop].T
            # Rows before `start` are all visited earlier; in the square below, only i < j.
            np.copyto(block[start:stop], -np.inf, where=later[:width, :width])
            best[start:stop] = np.maximum(block.max(axis=0), NO_EARLIER_POINT)
            del block
            continue
        column = xs[start:stop].T
        found = np.full(width, -np.inf, dtype=np.float32)
        for lo in range(0, start, ROW_BLOCK):  # points all visited before the block
            hi = min(lo + ROW_BLOCK, start)
            np.maximum(found, (xs[lo:hi] @ column).max(axis=0), out=found)
        square = xs[start:stop] @ column
        np.copyto(square, -np.inf, where=later[:width, :width])
        np.maximum(found, square.max(axis=0), out=found)
        best[start:stop] = np.maximum(found, NO_EARLIER_POINT)
        del square
    return best


def semdedup_scores(
    x: np.ndarray,
    centroids: np.ndarray,
    assignment: np.ndarray,
    keep: Literal["farthest", "closest", "random"],
    rng: np.random.Generator | None = None,
    normalized: bool = False,
    executor: Executor | None = None,
) -> np.ndarray:
    """``M`` for every row of ``x``: Algorithm 1 run on every k-means cluster.

    ``x`` are embeddings (normalised, as in Algorithm 1, a cluster's rows at a time in
    its task, unless ``normalized`` says they are unit float32 rows already; either way
    no float32 copy of the pool is made: :func:`unit_rows` is row-wise, so a cluster's
    rows get the floats they would get in a copy of the whole), ``assignment`` the
    cluster of every row,
    ``centroids`` the cluster centres (for the visiting order). ``keep="random"`` draws
    every cluster's visiting order from ``rng`` here, in increasing cluster id, so it
    reproduces. ``executor`` runs groups of whole clusters (:data:`ROWS_PER_TASK` rows a
    group; default: here, in order); each cluster's ``M`` is the same wherever it runs.
    """
    executor = executor or LocalExecutor()
    protos = unit_rows(centroids)
    # Held while the clusters run: the scores in float32 (every M is a float32 similarity
    # or -1, so exact; float64 at the end) and the rows in int32 below 2**30 rows (4 bytes
    # a row each, not 8: the driver's share of issue 32's growth per row).
    scores = np.full(len(x), NO_EARLIER_POINT, dtype=np.float32)
    positions = np.arange(len(x), dtype=np.int32 if len(x) < 2**30 else np.int64)
    members = cluster_members(positions, assignment, len(protos))  # pool order
    del positions
    clusters = [(c, idx) for c, idx in enumerate(members) if len(idx) >= 2]
    drawn = [  # the visiting orders keep=random draws, in cluster order
        order_within_cluster(np.zeros(len(idx)), keep, rng) if keep == "random" else None
        for _, idx in clusters
    ]
    groups = _cluster_groups([(c, idx, o) for (c, idx), o in zip(clusters, drawn, strict=True)])
    shared = executor.share(np.asarray(x)), executor.share(protos)
    tasks = [(*shared, group, keep, normalized) for group in groups]
    found = executor.map(_group_max_similarity, tasks)
    for group, parts in zip(groups, found, strict=True):
        for (_, idx, _), part in zip(group, parts, strict=True):
            scores[idx] = part
    del members, clusters, groups, tasks, found
    return scores.astype(np.float64)


# Rows of the clusters one task of semdedup_scores takes (a larger cluster is one task).
ROWS_PER_TASK = 65536
Cluster = tuple[int, np.ndarray, "np.ndarray | None"]  # id, member rows, drawn order


def _cluster_groups(clusters: list[Cluster]) -> list[list[Cluster]]:
    """Consecutive clusters in groups of about :data:`ROWS_PER_TASK` rows."""
    groups: list[list[Cluster]] = []
    rows = ROWS_PER_TASK
    for cluster in clusters:
        if rows >= ROWS_PER_TASK:
            groups.append([])
            rows = 0
        groups[-1].append(cluster)
        rows += len(cluster[1])
    return groups


def _group_max_similarity(
    unit: SharedArray,
    protos: SharedArray,
    group: list[Cluster],
    keep: Literal["farthest", "closest", "random"],
    normalized: bool = True,
) -> list[np.ndarray]:
    """Algorithm 1's ``M`` of every cluster of ``group``, in its members' order: one task.
    ``normalized``: ``rows`` are unit float32 rows already; else each cluster's rows are
    made so here (:func:`unit_rows`, row-wise: the floats of normalising the whole pool)."""
    rows, centres = unit.get(), protos.get()
    found = []
    with one_blas_thread():  # many small products: one thread each is faster
        for c, idx, drawn in group:
            members = _gather_rows(rows, idx, normalized)
            dist = 1.0 - members @ centres[c]
            order = drawn if drawn is not None else order_within_cluster(dist, keep)
            members = members[order]  # visiting order; the gathered copy goes
            found.append(_in_pool_order(_ordered_max_similarity(members), order))
    return found


# A part of a cluster's rows gathered at once: at most this many rows, from at most this
# many bytes of ``rows`` (a memory map's pages are released after each part).
GATHER_ROWS = 4096
GATHER_BYTES = 64 << 20


def _gather_rows(rows: np.ndarray, idx: np.ndarray, normalized: bool) -> np.ndarray:
    """``rows[idx]`` (``idx`` increasing), made unit float32 rows unless ``normalized``,
    a part at a time (:data:`GATHER_ROWS`, :data:`GATHER_BYTES`). A read of a memory
    map's scattered row maps more than its page (the kernel maps around a fault, a whole
    large folio of the page cache), so a cluster gathered at once left about its whole
    span of the file, the pool's size, resident; each part's pages leave the resident set
    before the next. Row-wise, so the same floats as gathering at once."""
    found = np.empty((len(idx), *rows.shape[1:]), rows.dtype if normalized else np.float32)
    span = max(1, GATHER_BYTES // max(1, rows.strides[0]))  # rows of the pool a part spans
    lo = 0
    while lo < len(idx):
        hi = int(np.searchsorted(idx, idx[lo] + span))
        hi = min(max(hi, lo + 1), lo + GATHER_ROWS)
        part = idx[lo:hi]
        found[lo:hi] = rows[part] if normalized else unit_rows(rows[part])
        release_rows(rows, 0, len(rows))  # all of the map: pages around the part's too
        lo = hi
    return found


def kept_mask(scores: np.ndarray, epsilon: float) -> np.ndarray:
    """Points Algorithm 1 keeps at ``epsilon``: ``M_j <= 1 - epsilon``."""
    return np.asarray(scores, dtype=np.float64) <= 1.0 - float(epsilon)


def choose_epsilon(scores: np.ndarray, budget: int) -> float:
    """The largest ``eps`` in ``[0, 2]`` whose kept set still holds ``budget`` points.

    The number kept, ``#{M_j <= 1 - eps}``, falls as ``eps`` grows, so this is the end of a
    binary search over ``[0, 2]``, found directly: ``1 - m_(budget)`` with ``m_(b)`` the
    ``b``-th smallest ``M``. Every ``eps`` in ``(1 - m_(budget+1), 1 - m_(budget)]`` keeps
    the same points; the top of that interval is returned. More than ``budget`` points are
    kept only when ``M`` ties at ``m_(budget)``; fewer only when the result is clipped to 0
    (exact duplicates whose similarity rounds above 1).
    """
    values = np.sort(np.asarray(scores, dtype=np.float64))
    if not 1 <= budget <= len(values):
        raise ValueError(f"budget must be in [1, {len(values)}], got {budget}")
    epsilon = float(np.clip(1.0 - values[budget - 1], 0.0, 2.0))
    # 1 - (1 - m) can round below m; step eps down until the budget-th value is kept.
    while epsilon > 0.0 and np.count_nonzero(values <= 1.0 - epsilon) < budget:
        epsilon = float(np.nextafter(epsilon, 0.0))
    return epsilon


def exact_budget(scores: np.ndarray, kept: np.ndarray, budget: int) -> np.ndarray:
    """Indices (sorted) of exactly ``budget`` points, starting from the ``kept`` mask.

    Too many kept: drop the kept points with the highest ``M`` (the most redundant) first,
    ties by pool position (the later one goes first). Too few: add back removed points with
    the lowest ``M`` first, ties by pool position (the earlier one comes back first).
    """
    scores = np.asarray(scores, dtype=np.float64)
    kept = np.asarray(kept, dtype=bool)
    positions = np.arange(len(scores))
    inside = positions[kept][np.lexsort((positions[kept], scores[kept]))]
    if len(inside) >= budget:
        return np.sort(inside[:budget])
    outside = positions[~kept][np.lexsort((positions[~kept], scores[~kept]))]
    return np.sort(np.concatenate([inside, outside[: budget - len(inside)]]))


class SemDeDupParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedder: str = Field(
        default="reference",
        description="embedder spec for the image embeddings; the paper used a pre-trained "
        "(Open)CLIP image encoder for LAION; on SynthWeb the default is its reference CLIP "
        "(selbench reference build), proxy the CLIP trained on the pool itself",
    )
    clusters: int = Field(
        default=50000,
        ge=1,
        description="k-means clusters; the paper used 50,000 for LAION-440M (Sec. 3); scaled "
        "down to pool_size // 100 (at least 1) on small pools",
    )
    niter: int = Field(
        default=100,
        ge=1,
        description="k-means iterations (the released code's clustering config: niter 100)",
    )
    kmeans_seed: int = Field(
        default=1234,
        description="k-means seed (the released code's config: 1234); fixed so the selection "
        "does not change with the run seed, as in the released pipeline",
    )
    max_train_points: int | None = Field(
        default=None,
        ge=1,
        description="k-means trains on at most this many rows: a larger pool trains on a "
        "seeded sample of that many (faiss's permutation, the k-means seed) and every row is "
        "then assigned in blocks (docs/scale-out.md). None: faiss's own cap alone, 256 "
        "rows per cluster, which selbench draws exactly as faiss does (identical results)",
    )
    keep: Literal["farthest", "closest", "random"] = Field(
        default="farthest",
        description="which member of a duplicate group is kept: farthest from the centroid "
        "(the paper, Sec. 3, and the released code's keep_hard), closest, or random",
    )

    @field_validator("max_train_points", mode="before")
    @classmethod
    def _no_cap(cls, value: Any) -> Any:
        # -p max_train_points=none (or null, as the default reads in MLflow or JSON)
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
            return None
        return value


class SemDeDup(Strategy):
    """Remove semantic duplicates within k-means clusters until the budget is met.

    ``eps`` is chosen per run so the kept set is the smallest one that still holds the
    budget (:func:`choose_epsilon`); :func:`exact_budget` then trims ties.
    ``Selection.metrics`` holds that ``eps`` (``epsilon_used``), the number of clusters
    (``clusters_used``) and how many samples ``eps`` keeps before the trim
    (``kept_at_epsilon``); ``Selection.scores`` holds every sample's ``M``.
    """

    name = "semdedup"
    summary = "SemDeDup: drop semantic near-duplicates inside k-means clusters"
    reference = (
        "Abbas et al., SemDeDup: Data-efficient learning at web-scale through semantic "
        "deduplication (arXiv 2303.09540), Sec. 3, Algorithm 1"
    )
    stochastic = False  # k-means uses kmeans_seed, not the run seed
    needs = frozenset({"embeddings"})
    Params = SemDeDupParams

    def is_stochastic(self) -> bool:
        return self.params.keep == "random"  # the visiting order draws from ctx.rng

    def _redundancy(self, ctx: SelectionContext) -> tuple[np.ndarray, int]:
        """Algorithm 1's ``M`` for every sample (:func:`semdedup_scores`) and the number of
        k-means clusters it ran on."""
        found = ctx.embeddings(self.params.embedder)
        # No unit float32 copy of the pool (2 KB a row at 512-d): k-means makes the rows
        # it reads unit vectors (unit=True), and so does every cluster's task for its own
        # rows (unit_rows is row-wise: the same floats as normalising the whole pool).
        image = np.asarray(found.image)
        centroids, assignment = kmeans_scaled(
            image,
            self.params.clusters,
            MIN_POINTS_PER_CLUSTER,
            self.params.kmeans_seed,
            self.params.niter,
            "semdedup",
            max_train_points=self.params.max_train_points,
            unit=True,
            executor=ctx.executor,
        )
        scores = semdedup_scores(
            image, centroids, assignment, self.params.keep, ctx.rng, executor=ctx.executor
        )
        return scores, len(centroids)

    def score(self, ctx: SelectionContext) -> np.ndarray:
        """Minus Algorithm 1's ``M`` (Abbas et al. 2023, Sec. 3, Algorithm 1): for every
        sample, ``-M_j = -max_{i < j} <x_i, x_j>``, minus its highest cosine similarity to
        a member of its k-means cluster visited before it (``keep`` sets the visiting
        order; the first-visited member has ``M = -1``, so scores ``1``). Higher means keep:
        the least redundant samples first.

        The top ``budget`` of this score, ties to the earlier pool position, is exactly
        :meth:`select`'s selection. Algorithm 1 keeps ``{j : M_j <= 1 - eps}``, a set of
        the lowest ``M``; :func:`choose_epsilon` picks the ``eps`` that keeps the budget
        and :func:`exact_budget` trims or tops up by ``M`` (ties by pool position), so
        every case ends at the ``budget`` lowest ``M``. With ``keep=random`` the visiting
        order, and so the score, follows ``ctx.rng``."""
        return -self._redundancy(ctx)[0]

    def select(self, ctx: SelectionContext) -> Selection:
        scores, clusters_used = self._redundancy(ctx)
        n = len(scores)
        epsilon = choose_epsilon(scores, ctx.budget_count)
        kept = kept_mask(scores, epsilon)
        chosen = exact_budget(scores, kept, ctx.budget_count)
        log.info(
            "semdedup: eps=%.6g keeps %d of %d samples (budget %d)",
            epsilon,
            int(kept.sum()),
            n,
            ctx.budget_count,
        )
        return Selection.from_positions(
            ctx,
            chosen,
            scores=scores,
            metrics={
                "epsilon_used": epsilon,
                "clusters_used": float(clusters_used),
                "kept_at_epsilon": float(kept.sum()),
            },
        )


@hookimpl
def register_strategies(register):
    register(SemDeDup)
