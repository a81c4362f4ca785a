"""Density-Based Pruning (DBP; Abbas, Rusak, Tirumala, Brendel, Chaudhuri & Morcos,
"Effective pruning of web-scale datasets based on complexity of concept clusters",
ICLR 2024, arXiv 2401.04578; released code ``amro-kamal/effective_pruning``).

The pipeline the paper applies to LAION (Fig. 1; the README's step-by-step overview):

1. **SemDeDup** (Abbas et al., 2023) removes semantic near-duplicates first (LAION-440M
   to 277M: 37% of the pool). Here :mod:`selbench_plugins.semdedup` does it with its own
   defaults, its ``eps`` chosen to remove ``dedup_share`` of the pool.
2. **k-means** on the deduplicated image embeddings (README: k = 500 on LAION-DeDup-280M,
   k = 100 on DataComp Medium).
3. Per cluster ``j``, the **intra-cluster distance** ``d_intra_j`` (mean cosine distance of
   its members to its centroid: its density) and the **inter-cluster distance**
   ``d_inter_j`` (mean cosine distance of its centroid to its ``l`` nearest other
   centroids), combined into the **complexity** ``C_j = d_inter_j * d_intra_j``
   (released ``compute_avg_dist_to_cluster_centroid.py``, ``compute_centroid_distances.py``
   with ``l = 20``; the paper's Table 5 per the README).
4. The complexity becomes a share of the budget by a **softmax with temperature**,
   ``p_j = softmax(C / tau)_j``, and the quotas ``N_j`` solve the quadratic program of
   the paper's Table 4 (released ``prune.py``, ``pruning_qp``):
   ``min sum_j (N_j - B p_j)^2`` subject to ``sum_j N_j = B`` and
   ``lo_j <= N_j <= |cluster j|``, with ``lo_j = min(floor(min_share * B / k),
   |cluster j|)`` (the release's ``cls_bal_ratio``, default 0.5). Its solution is
   ``N_j = clip(B p_j + lam, lo_j, |cluster j|)`` for the ``lam`` that meets ``B``
   (:func:`water_fill`): a cluster too small for its share keeps all its members and the
   overflow is spread evenly (one shift ``lam``) over the clusters not at a bound.
   The release rounds with ``np.rint``; here quotas are rounded by largest remainder so
   they sum to the budget exactly (:func:`round_quotas`).
5. Within each cluster the quota is filled with the **hardest** members, the farthest from
   the centroid (SSP-Pruning's rule, Sorscher et al. 2022, which DBP extends; the
   release's ``which_to_keep`` choices ``hard``, ``easy``, ``random``).

Dense clusters (small ``d_intra``) and clusters close to others (small ``d_inter``) are
the least complex and give up the most samples.

Sources: the pipeline, k and the encoder are the released README's; ``l = 20``,
``tau = 0.5``, ``min_share = 0.5`` and ``keep = hard`` are the released scripts' defaults
(the README says the scripts are the paper's Tables 4 and 5). The paper's full text was
not readable in the sources available when this was written, so no equation numbers are
cited and the optional CLIP-score prefilter (DataComp-style) is off by default
(docs/strategies/density.md).

Small pools: both k-means runs use :mod:`selbench_plugins.semdedup`'s rule, at most
``n // MIN_POINTS_PER_CLUSTER`` clusters (100 points per cluster on average; at least 1),
``n`` being the points clustered. On SynthWeb's 16,000 pairs at budget 0.25 SemDeDup keeps
10,080, and DBP runs with ``min(500, 100) = 100`` clusters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from selbench.toolbox import (
    Selection,
    SelectionContext,
    Strategy,
    clip_scores,
    cluster_members,
    hookimpl,
    kmeans_scaled,
    knn,
    top_k,
    unit_rows,
)
from selbench_plugins import semdedup

log = logging.getLogger(__name__)

#: LAION-440M (LAIONCAT) deduplicated by SemDeDup to 277M before DBP (Fig. 1): 37% removed.
LAION_DEDUP_SHARE = 0.37
#: Bisection steps for the QP's multiplier: far below one sample at any pool size.
BISECTION_STEPS = 200

Keep = Literal["hard", "easy", "random"]


class DensityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedder: str = Field(
        default="reference",
        description="embedder spec for the image embeddings; the paper's best encoder was a "
        "distilled DINOv2-L/14 (released README); on SynthWeb the default is its reference "
        "CLIP (as semdedup and prototypes), proxy the CLIP trained on the pool itself",
    )
    dedup_share: float = Field(
        default=LAION_DEDUP_SHARE,
        ge=0.0,
        lt=1.0,
        description="share of the pool SemDeDup removes first (semdedup's eps searched to "
        "meet it); 0.37: LAION-440M deduplicated to 277M before DBP (Fig. 1); never "
        "removes so much that fewer than the budget remain; 0 skips deduplication",
    )
    clusters: int = Field(
        default=500,
        ge=1,
        description="DBP k-means clusters; the released README: k=500 on LAION-DeDup-280M "
        "(k=100 on DataComp Medium); scaled down to n // 100 (at least 1) on small pools, "
        "n the deduplicated pool (semdedup's rule)",
    )
    niter: int = Field(
        default=100,
        ge=1,
        description="k-means iterations; the release clusters with the SemDeDup codebase "
        "(its config: niter 100)",
    )
    temperature: float = Field(
        default=0.5,
        gt=0.0,
        description="softmax temperature turning complexities into budget shares; the "
        "released prune.py default (--temperature 0.5); large: uniform quotas, small: the "
        "most complex clusters first",
    )
    nearest_centroids: int = Field(
        default=20,
        ge=1,
        description="l, the nearest other centroids averaged in d_inter; the released "
        "compute_centroid_distances.py default (--num_NNs 20); at most clusters - 1",
    )
    min_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="lower bound of every quota as a share of the uniform one, "
        "floor(min_share * budget / clusters) (capped by the cluster's size); the released "
        "prune.py's --cls-bal-ratio default 0.5; 0: no lower bound",
    )
    keep: Keep = Field(
        default="hard",
        description="which members fill a cluster's quota: hard, the farthest from the "
        "centroid (SSP-Pruning's rule, the release's default which_to_keep); easy, the "
        "closest; random, drawn from the run's seed",
    )
    clip_prefilter: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="optional CLIP-score prefilter before SemDeDup: keep this share of the "
        "pool by image-text cosine (never fewer than the budget); 0 (default) is off, the "
        "LAION pipeline (LAION is CLIP-score filtered by its builders); a DataComp-style "
        "variant (docs/strategies/density.md)",
    )


# -- quotas ----------------------------------------------------------------------------------
def softmax_shares(complexity: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(C / tau)`` in float64, shifted by the maximum so it never overflows."""
    z = np.asarray(complexity, dtype=np.float64) / float(temperature)
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def water_fill(target: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: int) -> np.ndarray:
    """The solution of Table 4's QP: ``min ||x - target||^2`` s.t. ``sum x = total``,
    ``lower <= x <= upper``.

    By the KKT conditions ``x = clip(target + lam, lower, upper)`` for one ``lam``; the sum
    is non-decreasing in ``lam``, so bisection finds it. Needs
    ``sum(lower) <= total <= sum(upper)``.
    """
    target = np.asarray(target, dtype=np.float64)
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    if not lower.sum() <= total <= upper.sum():
        raise ValueError(f"no quotas in [{lower.sum()}, {upper.sum()}] sum to {total}")
    lo, hi = float((lower - target).min()), float((upper - target).max())
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if np.clip(target + mid, lower, upper).sum() < total:
            lo = mid
        else:
            hi = mid
    return np.clip(target + hi, lower, upper)


def round_quotas(x: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: int) -> np.ndarray:
    """Integers within ``[lower, upper]`` summing to ``total``, by largest remainder: floor
    every ``x``, then one more to the clusters with the largest fractional parts (ties to
    the lower cluster id) that still have room."""
    x = np.asarray(x, dtype=np.float64)
    lower = np.asarray(lower, dtype=np.int64)
    upper = np.asarray(upper, dtype=np.int64)
    if not lower.sum() <= total <= upper.sum():
        raise ValueError(f"no quotas in [{lower.sum()}, {upper.sum()}] sum to {total}")
    quotas = np.clip(np.floor(x), lower, upper).astype(np.int64)
    frac = x - quotas
    ids = np.arange(len(x))
    remainder = int(total) - int(quotas.sum())
    while remainder > 0:  # one pass suffices unless x is off by rounding
        room = ids[quotas < upper]
        take = room[np.lexsort((room, -frac[room]))][:remainder]
        quotas[take] += 1
        frac[take] -= 1.0
        remainder -= len(take)
    while remainder < 0:
        spare = ids[quotas > lower]
        take = spare[np.lexsort((spare, frac[spare]))][:-remainder]
        quotas[take] -= 1
        frac[take] += 1.0
        remainder += len(take)
    return quotas


def cluster_quotas(
    complexity: np.ndarray,
    sizes: np.ndarray,
    budget: int,
    temperature: float,
    min_share: float,
) -> np.ndarray:
    """``N_j``: the budget over the clusters (Table 4's QP), exact integers.

    Shares ``softmax(C / tau)``; bounds ``[min(floor(min_share * budget / k), size_j),
    size_j]``; the QP's solution (:func:`water_fill`) rounded by largest remainder
    (:func:`round_quotas`). ``sum(sizes) >= budget`` is required.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    k = len(sizes)
    if sizes.sum() < budget:
        raise ValueError(f"clusters hold {sizes.sum()} samples, fewer than the budget {budget}")
    floor_share = int(np.floor(float(min_share) * budget / k))
    lower = np.minimum(floor_share, sizes)
    target = budget * softmax_shares(complexity, temperature)
    return round_quotas(water_fill(target, lower, sizes, budget), lower, sizes, budget)


# -- cluster complexity ----------------------------------------------------------------------
def intra_distances(distances: np.ndarray, assignment: np.ndarray, k: int) -> np.ndarray:
    """``d_intra``: each cluster's mean cosine distance of its members to its centroid
    (released ``compute_avg_dist_to_cluster_centroid.py``); NaN for an empty cluster."""
    assignment = np.asarray(assignment, dtype=np.int64)
    sizes = np.bincount(assignment, minlength=k).astype(np.float64)
    sums = np.bincount(assignment, weights=np.asarray(distances, np.float64), minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / sizes


def inter_distances(centroids: np.ndarray, nearest: int) -> np.ndarray:
    """``d_inter``: each centroid's mean cosine distance ``1 - cos`` to its ``nearest``
    nearest other centroids (released ``compute_centroid_distances.py``: an inner-product
    search over the unit centroids, itself left out). One centroid: zeros."""
    unit = unit_rows(centroids)
    k = len(unit)
    if k < 2:
        return np.zeros(k)
    l_used = min(int(nearest), k - 1)
    sims, idx = knn(unit, unit, l_used + 1)
    is_self = idx == np.arange(k)[:, None]
    # The other centroids first, best first; a row whose own index tied out of the
    # search (duplicate centroids) keeps its first l_used.
    order = np.argsort(is_self, axis=1, kind="stable")[:, :l_used]
    others = np.take_along_axis(sims.astype(np.float64), order, axis=1)
    return np.mean(1.0 - others, axis=1)


def complexity_of(d_inter: np.ndarray, d_intra: np.ndarray) -> np.ndarray:
    """``C_j = d_inter_j * d_intra_j``; NaN (an empty cluster) becomes the mean of the
    others, as the release does (0 if every value is NaN)."""
    c = np.asarray(d_inter, np.float64) * np.asarray(d_intra, np.float64)
    missing = np.isnan(c)
    if missing.any():
        c[missing] = float(np.mean(c[~missing])) if (~missing).any() else 0.0
    return c


# -- the stages ------------------------------------------------------------------------------
def survivors_count(n: int, budget: int, share: float) -> int:
    """How many samples a stage removing ``share`` of ``n`` keeps: ``n - round(share * n)``,
    never fewer than the ``budget``."""
    return max(int(budget), n - int(round(float(share) * n)))


def clip_prefilter(image: np.ndarray, text: np.ndarray, keep_count: int) -> np.ndarray:
    """Positions (sorted) of the ``keep_count`` best CLIP scores, ties to the earlier one."""
    return top_k(clip_scores(image, text), keep_count)


@dataclass
class DedupResult:
    kept: np.ndarray  # positions into the rows given, sorted
    epsilon: float
    clusters: int


def semdedup_stage(unit: np.ndarray, keep_count: int, rng: np.random.Generator) -> DedupResult:
    """SemDeDup with :class:`semdedup.SemDeDupParams`' defaults on unit rows, ``eps`` chosen
    to keep ``keep_count`` of them (:func:`semdedup.choose_epsilon`, then
    :func:`semdedup.exact_budget`): one member of each near-duplicate group stays."""
    n = len(unit)
    if keep_count >= n:
        return DedupResult(np.arange(n), 0.0, 0)
    cfg = semdedup.SemDeDupParams()
    centroids, assignment = kmeans_scaled(
        unit,
        cfg.clusters,
        semdedup.MIN_POINTS_PER_CLUSTER,
        cfg.kmeans_seed,
        cfg.niter,
        "density (semdedup stage)",
    )
    scores = semdedup.semdedup_scores(unit, centroids, assignment, cfg.keep, rng, normalized=True)
    epsilon = semdedup.choose_epsilon(scores, keep_count)
    kept = semdedup.exact_budget(scores, semdedup.kept_mask(scores, epsilon), keep_count)
    return DedupResult(kept, epsilon, len(centroids))


@dataclass
class Clusters:
    """DBP's clustering of the deduplicated samples and the quotas it gives them."""

    assignment: np.ndarray
    distances: np.ndarray  # cosine distance of each sample to its centroid
    complexity: np.ndarray
    quotas: np.ndarray


def dbp_quotas(unit: np.ndarray, budget: int, params: DensityParams, seed: int) -> Clusters:
    """Spherical k-means of ``unit`` (seed ``seed``), complexities and quotas."""
    centroids, assignment, similarity = kmeans_scaled(
        unit,
        params.clusters,
        semdedup.MIN_POINTS_PER_CLUSTER,
        seed,
        params.niter,
        "density",
        return_scores=True,
    )
    k = len(centroids)
    distances = 1.0 - np.asarray(similarity, dtype=np.float64)
    d_intra = intra_distances(distances, assignment, k)
    d_inter = inter_distances(centroids, params.nearest_centroids)
    complexity = complexity_of(d_inter, d_intra)
    sizes = np.bincount(assignment, minlength=k)
    quotas = cluster_quotas(complexity, sizes, budget, params.temperature, params.min_share)
    return Clusters(assignment, distances, complexity, quotas)


def fill_quotas(found: Clusters, keep: Keep, rng: np.random.Generator) -> np.ndarray:
    """Positions (sorted) filling every cluster's quota with its hard (farthest from the
    centroid), easy (closest) or random members; ties to the earlier position; random
    draws cluster by cluster in increasing id."""
    k = len(found.quotas)
    members = cluster_members(np.arange(len(found.assignment)), found.assignment, k)
    chosen = []
    for c, idx in enumerate(members):
        quota = int(found.quotas[c])
        if quota == 0:
            continue
        if keep == "random":
            chosen.append(idx[rng.permutation(len(idx))[:quota]])
        else:
            chosen.append(top_k(found.distances, quota, among=idx, largest=keep == "hard"))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


class Density(Strategy):
    """SemDeDup, then k-means and per-cluster quotas from each cluster's complexity
    (``d_inter * d_intra``, softmax with temperature), filled with the hardest members.

    ``Selection.scores``: for the samples that survive SemDeDup, the cosine distance to
    their DBP centroid. ``Selection.metrics``: ``dedup_epsilon``, ``dedup_kept``,
    ``prefilter_kept``, ``clusters_used``, ``quota_min``, ``quota_max``,
    ``complexity_min``, ``complexity_max``.
    """

    name = "density"
    summary = (
        "Density-based pruning: SemDeDup, then k-means quotas by cluster complexity "
        "(softmax of d_inter x d_intra), hardest members first"
    )
    reference = (
        "Abbas, Rusak et al., Effective pruning of web-scale datasets based on complexity "
        "of concept clusters (ICLR 2024, arXiv 2401.04578), Fig. 1-2 and Tables 4-5 (as "
        "released in amro-kamal/effective_pruning)"
    )
    stochastic = True  # DBP's k-means is seeded with ctx.seed
    needs = frozenset({"embeddings"})
    Params = DensityParams

    @property
    def settings(self) -> DensityParams:
        """``params``, typed."""
        return cast(DensityParams, self.params)

    def expected_failures(self) -> dict[str, str]:
        if self.settings.keep == "random":
            return {}
        return {
            "check_seed": "the kit's pools of 40 and 157 samples get one DBP cluster "
            "(n // 100, at least 1), whose centroid does not depend on the k-means seed; "
            "tests/test_density.py checks that the seed moves the selection on a pool of "
            "600"
        }

    def select(self, ctx: SelectionContext) -> Selection:
        params = self.settings
        found = ctx.embeddings(params.embedder)
        image = unit_rows(np.asarray(found.image))
        n, budget = len(image), ctx.budget_count
        pool_rows = np.arange(n)
        if params.clip_prefilter > 0:
            keep = max(budget, int(round(params.clip_prefilter * n)))
            pool_rows = clip_prefilter(image, np.asarray(found.text), keep)
        dedup = semdedup_stage(
            image[pool_rows],
            survivors_count(len(pool_rows), budget, params.dedup_share),
            ctx.rng,
        )
        rows = pool_rows[dedup.kept]
        clusters = dbp_quotas(image[rows], budget, params, ctx.seed)
        chosen = rows[fill_quotas(clusters, params.keep, ctx.rng)]
        log.info(
            "density: %d of %d after the prefilter, %d after SemDeDup (eps=%.4g), "
            "%d clusters, quotas %d..%d",
            len(pool_rows),
            n,
            len(rows),
            dedup.epsilon,
            len(clusters.quotas),
            int(clusters.quotas.min()),
            int(clusters.quotas.max()),
        )
        uids = list(ctx.pool.uids)
        return Selection(
            uids=[uids[i] for i in chosen],
            scores={uids[r]: float(d) for r, d in zip(rows, clusters.distances, strict=True)},
            metrics={
                "prefilter_kept": float(len(pool_rows)),
                "dedup_epsilon": float(dedup.epsilon),
                "dedup_kept": float(len(rows)),
                "clusters_used": float(len(clusters.quotas)),
                "quota_min": float(clusters.quotas.min()),
                "quota_max": float(clusters.quotas.max()),
                "complexity_min": float(clusters.complexity.min()),
                "complexity_max": float(clusters.complexity.max()),
            },
        )


@hookimpl
def register_strategies(register):
    register(Density)
