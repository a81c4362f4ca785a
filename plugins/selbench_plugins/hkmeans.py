"""Hierarchical k-means balanced sampling (Vo, Khalidov, Darcet, Moutakanni, Smetanin,
Szafraniec, Touvron, Couprie, Oquab, Joulin, Jegou, Labatut & Bojanowski, "Automatic Data
Curation for Self-Supervised Learning: A Clustering-Based Approach", TMLR 2024, arXiv
2405.15613; released code: facebookresearch/ssl-data-curation).

The paper's curation in two stages, both on the pool's image embeddings:

1. **Hierarchical k-means with resampling** (Sec. 3.3, Algorithm 1). Level 1 runs k-means
   on the embeddings, level ``t + 1`` runs k-means on the centroids of level ``t``. Inside
   every level, ``m`` resampling-clustering steps move the centroids towards a uniform
   coverage of the level's input: take the ``r_t`` inputs closest to each centroid (a set
   in which dense regions no longer dominate), run k-means on that set, and reassign the
   whole input to the new centroids (the release's ``hierarchical_kmeans_with_resampling``).
2. **Balanced hierarchical sampling** (Sec. 3.3; the release's ``hierarchical_sampling``
   with ``multiplier=1``). The budget is split evenly over the top-level clusters; a
   cluster with fewer points than its share keeps all of them and its surplus goes to the
   others (the largest cut ``c`` with ``sum_i min(c, |C_i|) <= budget``; the remainder,
   one point each, to clusters larger than ``c``). Each cluster's share is split the
   same way over its children, down to level 1, where the share is drawn from the
   cluster's points: at random (``selection=random``, the paper's choice in its ablation
   of the sampling rule, Sec. 4.2, and the default ``-ss r`` of the release's
   ``run_hierarchical_sampling.py``) or the points closest to the centroid
   (``selection=closest``, the release's ``c``).

Defaults and how they scale to selbench pools (SynthWeb: 16,000 pairs):

* **levels and clusters.** The paper's web-image curation (the release's
  ``configs/4levels_web_based_images.yaml``) uses 4 levels of 10M, 500k, 50k and 10k
  clusters: between levels the count falls by 20, 10 and 5. Here level 1 gets at most
  ``pool_size // 20`` clusters (at least 20 points per cluster on average: the rule and
  constant of ``prototypes``, and the release's small-data config,
  ``configs/2levels_random_embeddings.yaml``: 5,000 clusters for 100,000 points), every
  next level the previous count divided by the paper's factor (20, 10, 5), never more
  than the paper's count; a level that would get fewer than 2 clusters is left out, as
  one cluster splits nothing. A 16,000-pair pool gets 800, 40 and 4 clusters (3 levels).
* **resampling.** ``m = 10`` steps per level (Algorithm 1's value, which the paper's
  ablation in Sec. 4.2 keeps over 0 and 100; the release's configs use 10 at every level
  except level 1 of the 4-level web config, skipped there for efficiency at 10M clusters,
  which does not apply to 16,000 points). ``r_t = ceil(average cluster size / 2)``: the
  release configs' "roughly half the average cluster size in each level" (20 -> 10,
  10 -> 5, 5 -> 3; the README's toy run 29.7 -> 15, 3.3 -> 2). A level with ``r_t <= 1``
  is not resampled (as the release). Resampled points are the closest to their centroid
  (Algorithm 1, the release's ``sampling_strategy: c``); ``resample=random`` draws them.
* **k-means.** L2 (the release's ``dist="l2"``), 50 Lloyd iterations (the release's
  ``n_iters: 50``) in faiss, seeded with greedy k-means++ as the release seeds it
  (scikit-learn's ``kmeans_plusplus``: the same 2 + ln k candidates per centre). Seeding
  goes one centre at a time and costs more than the Lloyd iterations (16,000 x 800 in
  256-d on one core: 5.8 s against 1.8 s); where points x clusters exceeds 3e7 (pools
  above about 24,000 at level 1) it would take minutes per k-means, and there are 11 per
  level, so the toolbox's ``kmeans`` (faiss's random seeding) runs instead, as it always
  does with ``init=random``. Random seeding balances worse: on 2,400 points of five
  concepts at 20:1:1:1:1 it often merges two small concepts at level 2, because most of
  its seeds fall in the dominant one.

Exact budget: the top-level split assigns exactly ``budget_count`` points, every lower
split exactly its parent's share, and no cluster more points than it has, so the
selection has exactly ``budget_count`` distinct samples. Every random choice (k-means
seeds, remainders, draws) comes from ``ctx.rng``: the same seed gives the same selection.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from selbench.toolbox import (
    Selection,
    SelectionContext,
    Strategy,
    cluster_members,
    faiss_gpu_count,
    hookimpl,
    kmeans,
    knn,
    scaled_cluster_count,
    unit_rows,
)

log = logging.getLogger(__name__)

#: Clusters per level of the paper's web-image curation (release config
#: ``4levels_web_based_images.yaml``: 100k clusters split 100 ways, then 500k, 50k, 10k).
PAPER_CLUSTERS = (10_000_000, 500_000, 50_000, 10_000)
#: Small pools: at least this many points per level-1 cluster on average (prototypes'
#: constant; the release's 2-level config has 100,000 / 5,000 = 20).
MIN_POINTS_PER_CLUSTER = 20
#: A level with fewer clusters than this splits nothing and is left out.
MIN_CLUSTERS = 2

#: Above this many points x clusters, k-means++ seeding (one centre at a time, each a pass
#: over the points) would take minutes per k-means: faiss's random seeding instead.
#: SynthWeb's level 1 is 16,000 x 800 = 1.28e7.
KMEANS_PP_MAX_WORK = 3 * 10**7
#: Rows at once where a float64 copy of the rows is made (bounds memory, not the math).
ROWS_AT_ONCE = 65536

Rule = Literal["random", "closest"]
Init = Literal["kmeans++", "random"]


def default_cluster_counts(n: int, levels: int) -> list[int]:
    """Clusters per level for a pool of ``n`` (the module docstring's scaling rule): level 1
    ``min(10M, n // 20)`` (at least 1), then each level the previous count divided by the
    paper's factor between those levels (20, 10, 5), capped at the paper's count; levels
    with fewer than 2 clusters are left out (level 1 always stays)."""
    if not 1 <= levels <= len(PAPER_CLUSTERS):
        raise ValueError(f"levels must be in [1, {len(PAPER_CLUSTERS)}], got {levels}")
    counts = [scaled_cluster_count(PAPER_CLUSTERS[0], n, MIN_POINTS_PER_CLUSTER)]
    for level in range(1, levels):
        factor = PAPER_CLUSTERS[level - 1] // PAPER_CLUSTERS[level]
        k = min(PAPER_CLUSTERS[level], counts[-1] // factor)
        if k < MIN_CLUSTERS:
            break
        counts.append(k)
    return counts


def resample_size(n_inputs: int, k: int) -> int:
    """``r_t``: half the level's average cluster size, rounded up (the release configs)."""
    return math.ceil(n_inputs / max(k, 1) / 2)


def split_budget(
    sizes: np.ndarray, target: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """``target`` split as evenly as possible over clusters of ``sizes`` points, none given
    more than it has: the largest cut ``c`` with ``sum_i min(c, sizes_i) <= target``, each
    cluster ``min(c, sizes_i)``, and the remainder one point each to clusters larger than
    ``c`` (drawn from ``rng``, as the release draws them; without ``rng``, the first ones).
    A target of at least ``sizes.sum()`` takes every point."""
    sizes = np.asarray(sizes, dtype=np.int64)
    target = int(target)
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    if target >= sizes.sum():
        return sizes.copy()
    low, high = 0, int(sizes.max())  # sum(min(low)) <= target < sum(min(high))
    while high - low > 1:
        middle = (low + high) // 2
        if np.minimum(middle, sizes).sum() <= target:
            low = middle
        else:
            high = middle
    quotas = np.minimum(low, sizes)
    remainder = target - int(quotas.sum())
    larger = np.flatnonzero(sizes > low)  # more of them than the remainder, as c is largest
    if rng is None:
        chosen = larger[:remainder]
    else:
        chosen = rng.choice(larger, remainder, replace=False)
    quotas[chosen] += 1
    return quotas


@dataclass
class Hierarchy:
    """A hierarchical clustering: ``assignments[0]`` maps every point to its level-1
    cluster, ``assignments[t]`` every level-``t`` cluster to its level-``t + 1`` cluster;
    ``counts[t]`` is the number of clusters of level ``t + 1``."""

    assignments: list[np.ndarray]
    counts: list[int]

    def sizes(self) -> list[np.ndarray]:
        """Points under every cluster, per level (level 1 first)."""
        found: list[np.ndarray] = []
        weights: np.ndarray | None = None
        for assignment, count in zip(self.assignments, self.counts, strict=True):
            sized = np.bincount(assignment, weights=weights, minlength=count)
            found.append(np.rint(sized).astype(np.int64))
            weights = found[-1].astype(np.float64)
        return found


def leaf_quotas(
    hierarchy: Hierarchy, budget: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """How many points every level-1 cluster gives: ``budget`` split over the top-level
    clusters by :func:`split_budget`, every share split the same way over the cluster's
    children, down to level 1 (the release's ``hierarchical_sampling``)."""
    sizes = hierarchy.sizes()
    quota = split_budget(sizes[-1], budget, rng)
    for level in range(len(hierarchy.counts) - 1, 0, -1):  # level index of the parents
        children_of = cluster_members(
            np.arange(hierarchy.counts[level - 1]),
            hierarchy.assignments[level],
            hierarchy.counts[level],
        )
        below = np.zeros(hierarchy.counts[level - 1], dtype=np.int64)
        for parent, children in enumerate(children_of):
            if quota[parent] > 0:
                below[children] = split_budget(sizes[level - 1][children], quota[parent], rng)
        quota = below
    return quota


def first_in_cluster(assignment: np.ndarray, keys: np.ndarray, quotas: np.ndarray) -> np.ndarray:
    """Indices (sorted) of the first ``quotas[c]`` members of every cluster ``c`` in order
    of increasing ``keys`` (ties to the lower index)."""
    assignment = np.asarray(assignment, dtype=np.int64)
    positions = np.arange(len(assignment))
    order = np.lexsort((positions, keys, assignment))
    grouped = assignment[order]
    starts = np.searchsorted(grouped, np.arange(len(quotas)))
    rank = np.arange(len(order)) - starts[grouped]
    return np.sort(order[rank < np.asarray(quotas)[grouped]])


def squared_distances(x: np.ndarray, centroids: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """``|x_i - c_{a_i}|^2`` for every row (float64; in blocks of rows, so no copy of the
    whole pool is made)."""
    result = np.empty(len(x), dtype=np.float64)
    for lo in range(0, len(x), ROWS_AT_ONCE):
        rows = np.asarray(x[lo : lo + ROWS_AT_ONCE], dtype=np.float64)
        diff = rows - centroids[assignment[lo : lo + ROWS_AT_ONCE]]
        result[lo : lo + len(rows)] = np.einsum("ij,ij->i", diff, diff)
    return result


def nearest_l2(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Every row's nearest centroid in L2, by faiss inner-product search on augmented rows:
    ``argmin |x - c|^2 = argmax <[x, 1], [c, -|c|^2 / 2]>``."""
    half_norms = 0.5 * np.einsum("ij,ij->i", centroids, centroids)
    queries = np.hstack([x, np.ones((len(x), 1), dtype=np.float32)])
    base = np.hstack([centroids, -half_norms[:, None]]).astype(np.float32)
    return knn(queries, base, 1)[1][:, 0]


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31 - 1))


def seeded_kmeans(
    x: np.ndarray, k: int, niter: int, init: Init, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """L2 k-means of the rows of ``x``: ``(centroids, assignment)``. ``init=kmeans++``:
    greedy k-means++ seeds (scikit-learn's ``kmeans_plusplus``, 2 + ln k trials per centre,
    the release's ``kmeans_plusplus``), then faiss's Lloyd iterations from them; where
    ``n * k`` exceeds :data:`KMEANS_PP_MAX_WORK`, and for ``init=random``, the toolbox's
    :func:`~selbench.toolbox.kmeans` (faiss: a random subset of the rows seeds it)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = max(1, min(int(k), len(x)))
    if init == "random" or len(x) * k > KMEANS_PP_MAX_WORK:
        if init != "random":
            log.debug("hkmeans: %d points x %d clusters; faiss's random seeding", len(x), k)
        centroids, assignment = kmeans(x, k, seed=_seed(rng), niter=niter)
        return centroids, assignment
    from sklearn.cluster import kmeans_plusplus  # here: scikit-learn is slow to import

    seeds, _ = kmeans_plusplus(x, k, random_state=_seed(rng))
    import faiss  # here, not at module level: the plugin loads without faiss

    clustering = faiss.Kmeans(
        x.shape[1],
        k,
        niter=int(niter),
        seed=_seed(rng),
        gpu=faiss_gpu_count() > 0,
        verbose=False,
        min_points_per_centroid=1,  # silences faiss's "too few points" warning only
    )
    clustering.train(x, init_centroids=np.ascontiguousarray(seeds, dtype=np.float32))
    centroids = np.ascontiguousarray(clustering.centroids, dtype=np.float32)
    return centroids, nearest_l2(x, centroids)


def resampled_kmeans(
    x: np.ndarray,
    k: int,
    sample_size: int,
    params: HKMeansParams,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One level of Algorithm 1: k-means on ``x``, then ``params.resampling_steps``
    resampling-clustering steps (``sample_size`` points per cluster, closest to its
    centroid or at random, k-means on them, every row of ``x`` reassigned to the nearest
    new centroid). Returns ``(centroids, assignment)``; no resampling when
    ``sample_size <= 1`` (as the release)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids, assignment = seeded_kmeans(x, k, params.niter, params.init, rng)
    if sample_size <= 1:
        return centroids, assignment
    for _ in range(params.resampling_steps):
        if params.resample == "closest":
            keys = squared_distances(x, centroids, assignment)
        else:
            keys = rng.random(len(x))
        quotas = np.full(len(centroids), sample_size)
        picked = first_in_cluster(assignment, keys, quotas)
        centroids, _ = seeded_kmeans(x[picked], k, params.niter, params.init, rng)
        assignment = nearest_l2(x, centroids)
    return centroids, assignment


def compact(centroids: np.ndarray, assignment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop clusters with no member: the centroids of the rest, and the assignment
    renumbered ``0..k'-1`` in the old order."""
    used = np.unique(assignment)
    renumber = np.full(len(centroids), -1, dtype=np.int64)
    renumber[used] = np.arange(len(used))
    return centroids[used], renumber[assignment]


def build_hierarchy(
    x: np.ndarray, counts: list[int], params: HKMeansParams, rng: np.random.Generator
) -> tuple[Hierarchy, list[np.ndarray], list[int]]:
    """Hierarchical k-means with resampling (Algorithm 1) with ``counts[t]`` clusters at
    level ``t + 1`` (each at most the level's number of inputs). Returns the hierarchy
    (empty clusters dropped), every level's centroids and ``r_t`` per level."""
    inputs = np.ascontiguousarray(x, dtype=np.float32)
    assignments: list[np.ndarray] = []
    all_centroids: list[np.ndarray] = []
    sample_sizes: list[int] = []
    for requested in counts:
        k = max(1, min(int(requested), len(inputs)))
        size = resample_size(len(inputs), k)
        centroids, assignment = resampled_kmeans(inputs, k, size, params, rng)
        centroids, assignment = compact(centroids, assignment)
        assignments.append(assignment)
        all_centroids.append(centroids)
        sample_sizes.append(size)
        inputs = centroids
    hierarchy = Hierarchy(assignments, [len(c) for c in all_centroids])
    return hierarchy, all_centroids, sample_sizes


class HKMeansParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedder: str = Field(
        default="reference",
        description="embedder spec for the image embeddings; the paper clustered DINOv2 "
        "features (self-supervised, trained on other data); on SynthWeb the default is its "
        "reference CLIP's image tower, proxy the CLIP trained on the pool itself",
    )
    levels: int = Field(
        default=4,
        ge=1,
        le=len(PAPER_CLUSTERS),
        description="levels of hierarchical k-means: 4, the paper's web-image curation "
        "(release config 4levels_web_based_images.yaml); on small pools levels that would "
        "get fewer than 2 clusters are left out (SynthWeb's 16,000 pairs: 3)",
    )
    clusters: list[int] | None = Field(
        default=None,
        description="clusters per level, level 1 first (sets the levels); none/auto: the "
        "paper's 10M, 500k, 50k, 10k scaled to the pool: level 1 at most pool_size // 20, "
        "then / 20, / 10, / 5 (the paper's ratios), e.g. 800, 40, 4 for 16,000 pairs",
    )
    resampling_steps: int = Field(
        default=10,
        ge=0,
        description="resampling-clustering steps per level: 10, Algorithm 1's value kept "
        "by the paper's ablation (Sec. 4.2) and the release configs' n_resampling_steps",
    )
    resample: Rule = Field(
        default="closest",
        description="which points of a cluster the resampling steps keep: closest to the "
        "centroid (Algorithm 1; release sampling_strategy c) or random; how many: half "
        "the level's average cluster size, rounded up (release configs' sample_size)",
    )
    selection: Rule = Field(
        default="random",
        description="how a level-1 cluster's share is drawn: random (the paper's choice "
        "in its ablation, Sec. 4.2; release run_hierarchical_sampling.py default r) or "
        "closest to the centroid (release c)",
    )
    niter: int = Field(
        default=50, ge=1, description="k-means iterations (the release configs' n_iters: 50)"
    )
    init: Init = Field(
        default="kmeans++",
        description="k-means seeding: kmeans++ (greedy, as the release's kmeans; faiss's "
        "random seeding above 3e7 points x clusters, where seeding would take minutes) or "
        "random (faiss's default, selbench.toolbox.kmeans)",
    )

    @field_validator("clusters", mode="before")
    @classmethod
    def _parse_clusters(cls, value: Any) -> Any:
        # -p clusters=auto / none, a JSON list, or "800:40:4" (as strings arrive from the CLI)
        if isinstance(value, str):
            text = value.strip()
            if text.lower() in ("", "auto", "none", "null"):
                return None
            if text.startswith("["):
                return json.loads(text)
            return [int(part) for part in text.replace(":", " ").replace(",", " ").split()]
        return value

    @field_validator("clusters")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError("clusters must be a non-empty list of positive counts")
        return value


class HKMeans(Strategy):
    """Balanced sampling from a hierarchical k-means with resampling (Vo et al., 2024)."""

    name = "hkmeans"
    summary = (
        "Hierarchical k-means with resampling, then the budget split evenly down the "
        "cluster tree (balanced over concepts)"
    )
    reference = (
        "Vo et al., Automatic Data Curation for Self-Supervised Learning: A Clustering-Based "
        "Approach (TMLR 2024, arXiv 2405.15613), Sec. 3.3, Algorithm 1 and hierarchical "
        "sampling; defaults from facebookresearch/ssl-data-curation's configs"
    )
    stochastic = True  # k-means seeds, remainders and (by default) the draws use ctx.rng
    needs = frozenset({"embeddings"})
    Params = HKMeansParams
    params: HKMeansParams

    def cluster_counts(self, n: int) -> list[int]:
        """The requested clusters per level, or the scaled defaults for a pool of ``n``."""
        p = self.params
        if p.clusters is not None:
            return list(p.clusters)
        counts = default_cluster_counts(n, p.levels)
        if counts[0] < PAPER_CLUSTERS[0] or len(counts) < p.levels:
            log.info(
                "hkmeans: pool of %d samples; clusters per level %s instead of %s",
                n,
                counts,
                list(PAPER_CLUSTERS[: p.levels]),
            )
        return counts

    def select(self, ctx: SelectionContext) -> Selection:
        p = self.params
        image = unit_rows(np.asarray(ctx.embeddings(p.embedder).image))
        n = len(image)
        hierarchy, centroids, sample_sizes = build_hierarchy(
            image, self.cluster_counts(n), p, ctx.rng
        )
        quotas = leaf_quotas(hierarchy, ctx.budget_count, ctx.rng)
        leaves = hierarchy.assignments[0]
        if p.selection == "closest":
            keys = squared_distances(image, centroids[0], leaves)
        else:
            keys = ctx.rng.random(n)
        chosen = first_in_cluster(leaves, keys, quotas)
        uids = list(ctx.pool.uids)
        metrics = {"levels_used": float(len(hierarchy.counts))}
        for level, count in enumerate(hierarchy.counts, start=1):
            metrics[f"clusters_level{level}"] = float(count)
            metrics[f"resample_size_level{level}"] = float(sample_sizes[level - 1])
        return Selection(uids=[uids[i] for i in chosen], metrics=metrics)


@hookimpl
def register_strategies(register):
    register(HKMeans)
