"""density: Density-Based Pruning (Abbas, Rusak et al., ICLR 2024, arXiv 2401.04578)."""

from __future__ import annotations

import numpy as np
import pytest
from selbench_plugins.density import (
    Density,
    DensityParams,
    cluster_quotas,
    complexity_of,
    inter_distances,
    intra_distances,
    round_quotas,
    semdedup_stage,
    softmax_shares,
    survivors_count,
    water_fill,
)

from selbench.strategy import validate_selection
from selbench.testing import context_with_embeddings, parametrize_with_checks
from selbench.toolbox import kmeans_scaled, unit_rows


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def blob(rng, centre: np.ndarray, n: int, spread: float) -> np.ndarray:
    """``n`` unit vectors around the unit vector ``centre``, ``spread`` the noise scale."""
    return unit(centre + spread * rng.standard_normal((n, len(centre))))


def four_concepts(n_each: int = 200, dim: int = 16, seed: int = 0):
    """Four clusters of ``n_each`` (rows in label order): 0 and 1 tight and neighbours
    (cosine 0.94 apart), 2 tight and alone, 3 diffuse and alone. Float16, as the cache."""
    rng = np.random.default_rng(seed)
    e = np.eye(dim)
    near = unit(e[[0]] + 0.35 * e[[1]])[0]
    centres, spreads = [e[0], near, e[2], -e[0]], [0.03, 0.03, 0.03, 0.1]
    x = np.concatenate([blob(rng, c, n_each, s) for c, s in zip(centres, spreads, strict=True)])
    return x.astype(np.float16), np.repeat(np.arange(4), n_each)


def recovering_seed(x: np.ndarray, label: np.ndarray) -> int:
    """The first run seed whose DBP k-means (as the strategy runs it, without SemDeDup)
    finds the planted clusters: from a random start k-means may merge two of them."""
    k = len(np.unique(label))
    for seed in range(20):
        _, assignment = kmeans_scaled(unit_rows(x), k, 100, seed, 100, "test")
        if all(len(np.unique(assignment[label == c])) == 1 for c in range(k)):
            if len(np.unique(assignment)) == k:
                return seed
    raise AssertionError("no seed recovered the planted clusters")


def run(image, count, tmp_path, seed=0, **params):
    ctx = context_with_embeddings(np.asarray(image, np.float16), count, tmp_path, seed=seed)
    selection = Density(params).select(ctx)
    checked = validate_selection(selection, set(ctx.pool.uids), count, "density")
    positions = [int(u[1:]) for u in checked.uids]
    return checked, np.array(positions)


# --- the quota rule ------------------------------------------------------------------------


def test_softmax_of_complexities_by_hand():
    shares = softmax_shares(np.array([0.1, 0.2, 0.4]), temperature=0.1)
    e = np.exp([1.0, 2.0, 4.0])
    assert np.allclose(shares, e / e.sum())
    assert np.allclose(softmax_shares(np.array([1000.0, 1000.0]), 1e-3), [0.5, 0.5])  # stable


def test_water_fill_solves_the_papers_qp_by_hand():
    # min ||x - t||^2, sum x = B, lo <= x <= hi has x = clip(t + lam, lo, hi) (KKT).
    t = np.array([50.0, 30.0, 15.0, 5.0])
    x = water_fill(t, np.zeros(4), np.array([20, 100, 100, 100]), 100)
    # Cluster 0 is too small for its share: it keeps all 20, and its overflow of 30 is
    # spread evenly over the others (lam = 10): 20 + 40 + 25 + 15.
    assert np.allclose(x, [20, 40, 25, 15])
    # A lower bound that binds: 20 + (30 + lam) + (15 + lam) + 30 = 100, lam = 2.5.
    lo, hi = np.array([0, 0, 0, 30]), np.array([20, 100, 100, 100])
    x = water_fill(np.array([50.0, 30.0, 15.0, 0.0]), lo, hi, 100)
    assert np.allclose(x, [20, 32.5, 17.5, 30])
    with pytest.raises(ValueError):
        water_fill(t, np.zeros(4), np.full(4, 10), 100)  # 40 samples cannot meet 100


def test_round_quotas_is_largest_remainder_within_bounds():
    q = round_quotas(np.array([2.5, 2.5, 3.0, 2.0]), np.zeros(4), np.array([9, 9, 9, 9]), 10)
    assert q.tolist() == [3, 2, 3, 2]  # one extra sample, tie to the lower id
    q = round_quotas(np.array([1.9, 1.8, 6.3]), np.zeros(3), np.array([1, 5, 9]), 9)
    assert q.tolist() == [1, 2, 6] and q.sum() == 9  # cluster 0 has no room for its .9


@pytest.mark.parametrize("seed", range(5))
def test_quotas_sum_to_the_budget_and_respect_the_bounds(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 40))
    sizes = rng.integers(1, 60, size=k)
    budget = int(rng.integers(1, sizes.sum() + 1))
    for temperature in (0.01, 0.5, 100.0):
        for min_share in (0.0, 0.5, 1.0):
            q = cluster_quotas(rng.random(k), sizes, budget, temperature, min_share)
            assert q.dtype.kind == "i" and q.sum() == budget
            assert (q >= 0).all() and (q <= sizes).all()
            assert (q >= np.minimum(int(min_share * budget / k), sizes)).all()


def test_less_complex_clusters_get_fewer_samples():
    complexity = np.array([0.05, 0.10, 0.20, 0.40])
    sizes = np.full(4, 1000)
    q = cluster_quotas(complexity, sizes, 400, temperature=0.1, min_share=0.0)
    assert (np.diff(q) > 0).all()
    # The rule in numbers: the QP's target is the budget times the softmax share.
    assert np.allclose(q, 400 * softmax_shares(complexity, 0.1), atol=1)


def test_temperature_limits():
    complexity = np.array([0.05, 0.10, 0.20, 0.40])
    sizes = np.full(4, 1000)
    hot = cluster_quotas(complexity, sizes, 400, temperature=1e6, min_share=0.0)
    assert hot.tolist() == [100, 100, 100, 100]  # very high temperature: uniform
    cold = cluster_quotas(complexity, sizes, 400, temperature=1e-4, min_share=0.0)
    assert cold.tolist() == [0, 0, 0, 400]  # very low: all to the most complex cluster
    capped = cluster_quotas(complexity, np.array([1000, 1000, 1000, 150]), 400, 1e-4, 0.0)
    # The QP spreads its overflow of 250 evenly (one shift lam for every free cluster),
    # the extra sample to the lowest id.
    assert capped.tolist() == [84, 83, 83, 150]


def test_min_share_is_a_floor_under_every_quota():
    complexity = np.array([0.0, 0.0, 0.0, 1.0])
    q = cluster_quotas(complexity, np.full(4, 1000), 400, 1e-4, min_share=0.5)
    assert q.tolist() == [50, 50, 50, 250]  # floor(0.5 * 400 / 4) = 50 each


# --- cluster complexity --------------------------------------------------------------------


def test_intra_and_inter_distances_by_hand():
    d_intra = intra_distances(np.array([0.1, 0.3, 0.5, 0.0]), np.array([0, 0, 1, 1]), 3)
    assert np.allclose(d_intra[:2], [0.2, 0.25]) and np.isnan(d_intra[2])  # 2 is empty
    # Centroids at 0, 60 and 180 degrees in a plane: with l = 1 each averages its nearest.
    angles = np.deg2rad([0.0, 60.0, 180.0])
    c = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    assert np.allclose(inter_distances(c, 1), [0.5, 0.5, 1.5])  # 1 - cos 60, 1 - cos 120
    assert np.allclose(inter_distances(c, 20), [1.25, 1.0, 1.75])  # l clipped to k - 1 = 2
    assert complexity_of(np.array([1.0, 2.0, 3.0]), d_intra).tolist() == pytest.approx(
        [0.2, 0.5, 0.35]  # the empty cluster's NaN becomes the others' mean
    )


def test_dense_clusters_and_clusters_near_others_give_up_the_most(tmp_path):
    x, label = four_concepts()
    seed = recovering_seed(x, label)
    rule = {"dedup_share": 0.0, "clusters": 4, "min_share": 0.0, "nearest_centroids": 1}
    _, chosen = run(x, 200, tmp_path, seed=seed, temperature=0.05, **rule)
    counts = np.bincount(label[chosen], minlength=4)
    # d_intra: 3 is diffuse, the others tight; d_inter (l = 1): 0 and 1 are each other's
    # neighbour, 2 and 3 far from everything. Complexity 3 > 2 > 0 = 1.
    assert counts[3] > counts[2] > max(counts[0], counts[1]), counts
    _, hot = run(x, 200, tmp_path, seed=seed, temperature=1e6, **rule)
    assert np.bincount(label[hot], minlength=4).tolist() == [50, 50, 50, 50]


def test_hard_keeps_the_members_farthest_from_the_centroid(tmp_path):
    x, label = four_concepts()
    seed = recovering_seed(x, label)
    rule = {"dedup_share": 0.0, "clusters": 4}
    selection, chosen = run(x, 200, tmp_path, seed=seed, **rule)
    distance = np.array([selection.scores[f"u{i:04d}"] for i in range(len(x))])
    kept = np.isin(np.arange(len(x)), chosen)
    for c in range(4):
        mine = label == c
        assert distance[mine & kept].min() >= distance[mine & ~kept].max()
    easy = run(x, 200, tmp_path, seed=seed, keep="easy", **rule)[1]
    assert not set(easy.tolist()) & set(chosen.tolist())  # quotas under half of each


# --- SemDeDup first ------------------------------------------------------------------------


def test_survivors_never_fewer_than_the_budget():
    assert survivors_count(16000, 4000, 0.37) == 10080
    assert survivors_count(16000, 14400, 0.37) == 14400  # budget 0.9: dedup removes 10%
    assert survivors_count(100, 10, 0.0) == 100


def test_near_duplicates_are_removed_first(tmp_path):
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((300, 32)))
    x[[10, 50, 120, 200, 290]] = unit(x[10] + 1e-4 * rng.standard_normal((5, 32)))
    group = [10, 50, 120, 200, 290]
    dedup = semdedup_stage(x.astype(np.float32), survivors_count(300, 60, 0.37), rng)
    assert len(dedup.kept) == 189
    assert len(set(dedup.kept.tolist()) & set(group)) == 1  # the group keeps one member
    _, chosen = run(x, 60, tmp_path)
    assert len(set(chosen.tolist()) & set(group)) <= 1


# --- the contract --------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 37, 150, 420, 800])
def test_exact_budget_without_duplicates(tmp_path, count):
    x, _ = four_concepts()
    _, chosen = run(x, count, tmp_path)
    assert len(chosen) == count == len(set(chosen.tolist()))


def test_same_seed_same_selection_other_seed_different(tmp_path):
    x = unit(np.random.default_rng(7).standard_normal((600, 16)))  # 6 clusters of noise
    first = run(x, 150, tmp_path, seed=0)[1]
    assert np.array_equal(first, run(x, 150, tmp_path, seed=0)[1])
    assert not np.array_equal(first, run(x, 150, tmp_path, seed=1)[1])


def test_defaults_and_their_limits():
    p = DensityParams()
    assert (p.clusters, p.temperature, p.nearest_centroids, p.dedup_share) == (500, 0.5, 20, 0.37)
    assert (p.min_share, p.keep, p.clip_prefilter) == (0.5, "hard", 0.0)
    assert Density({"keep": "random"}).expected_failures() == {}


def test_clip_prefilter_drops_the_worst_aligned_pairs(tmp_path):
    x, _ = four_concepts()
    text = x.copy()
    text[:400] = -text[:400]  # half of the pairs disagree with their caption
    ctx = context_with_embeddings(x, 100, tmp_path, text=text)
    selection = Density({"clip_prefilter": 0.5}).select(ctx)
    assert all(int(u[1:]) >= 400 for u in selection.uids)
    assert selection.metrics is not None and selection.metrics["prefilter_kept"] == 400


@parametrize_with_checks([Density()], pool_sizes=(40,))
def test_conforms(strategy, check):
    check(strategy)
