"""hkmeans: hierarchical k-means balanced sampling (Vo et al., TMLR 2024, arXiv 2405.15613)."""

from __future__ import annotations

import numpy as np
import pytest
from selbench_plugins import hkmeans
from selbench_plugins.hkmeans import (
    Hierarchy,
    HKMeans,
    default_cluster_counts,
    first_in_cluster,
    leaf_quotas,
    resample_size,
    split_budget,
)

from selbench.errors import ConfigError
from selbench.strategy import validate_selection
from selbench.testing import context_with_embeddings, parametrize_with_checks


def concepts(sizes: list[int], dim: int = 16, noise: float = 0.15, seed: int = 0):
    """Unit vectors around orthogonal directions, ``sizes[c]`` of them for concept ``c``
    (float16, as the embedding cache stores them), and each row's concept."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = np.eye(dim, dtype=np.float32)[labels]
    x += noise * rng.standard_normal(x.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16), labels


def run(image: np.ndarray, count: int, tmp_path, seed: int = 0, **params):
    ctx = context_with_embeddings(image, count, tmp_path, seed=seed)
    uids = list(ctx.pool.uids)
    selection = HKMeans(params).select(ctx)
    checked = validate_selection(selection, set(uids), count, "hkmeans")
    return checked, np.array([uids.index(u) for u in checked.uids])


# -- the budget split ------------------------------------------------------------------
def test_even_split_with_surplus_of_small_clusters():
    assert split_budget(np.array([10, 10, 10]), 12).tolist() == [4, 4, 4]
    # 2 is below the share of 31 / 3: its surplus goes to the others (cut 14: 3 + 14 + 14)
    assert split_budget(np.array([3, 40, 40]), 31).tolist() == [3, 14, 14]
    # cut 3 (2 + 3 + 3 + 3 = 11), one left over for a cluster larger than 3: the first
    assert split_budget(np.array([2, 10, 10, 3]), 12).tolist() == [2, 4, 3, 3]
    assert split_budget(np.array([5, 7]), 12).tolist() == [5, 7]  # everything
    assert split_budget(np.array([5, 7]), 0).tolist() == [0, 0]


def test_remainder_goes_to_a_random_larger_cluster():
    seen = set()
    for seed in range(20):
        quotas = split_budget(np.array([2, 10, 10, 3]), 12, np.random.default_rng(seed))
        assert quotas.sum() == 12 and quotas[0] == 2 and quotas[3] == 3
        seen.add(tuple(quotas.tolist()))
    assert seen == {(2, 4, 3, 3), (2, 3, 4, 3)}


def test_hierarchical_split_matches_a_hand_computation():
    # Level 1: six clusters of 3 | 2, 8, 30 | 20, 20 points; level 2: A = {0}, B = {1, 2, 3},
    # C = {4, 5} of 3, 40 and 40 points. Budget 31 over A, B, C: A has only 3, so B and C
    # get 14 each (3 + 14 + 14). B's 14 over 2, 8, 30: 2 is small, cut 6 -> 2, 6, 6.
    # C's 14 over 20, 20 -> 7, 7.
    sizes = [3, 2, 8, 30, 20, 20]
    points = np.repeat(np.arange(6), sizes)
    hierarchy = Hierarchy([points, np.array([0, 1, 1, 1, 2, 2])], [6, 3])
    assert [s.tolist() for s in hierarchy.sizes()] == [sizes, [3, 40, 40]]
    assert leaf_quotas(hierarchy, 31).tolist() == [3, 2, 6, 6, 7, 7]
    # Three levels: a root pair over the same tree, {A, B} and {C}: 31 -> 16 and 15;
    # 16 over A, B (3, 40) -> 3, 13; B's 13 over 2, 8, 30 -> cut 5 (12) + 1 for the 8.
    three = Hierarchy([points, np.array([0, 1, 1, 1, 2, 2]), np.array([0, 0, 1])], [6, 3, 2])
    assert leaf_quotas(three, 31).tolist() == [3, 2, 6, 5, 8, 7]
    for seed in range(5):
        quotas = leaf_quotas(three, 31, np.random.default_rng(seed))
        assert quotas.sum() == 31 and (quotas <= np.array(sizes)).all()


def test_first_in_cluster_takes_each_clusters_quota_by_key():
    assignment = np.array([1, 0, 1, 0, 1, 2])
    keys = np.array([0.5, 0.9, 0.1, 0.2, 0.3, 0.0])
    assert first_in_cluster(assignment, keys, np.array([1, 2, 0])).tolist() == [2, 3, 4]


# -- defaults -----------------------------------------------------------------------
def test_cluster_counts_scale_the_papers_hierarchy():
    assert default_cluster_counts(16_000, 4) == [800, 40, 4]  # SynthWeb: / 20, / 20, / 10
    assert default_cluster_counts(2_400, 4) == [120, 6]  # 6 // 5 < 2: level 3 left out
    assert default_cluster_counts(40, 4) == [2]
    assert default_cluster_counts(10, 4) == [1]
    assert default_cluster_counts(10**9, 4) == list(hkmeans.PAPER_CLUSTERS)
    assert default_cluster_counts(16_000, 2) == [800, 40]
    # the release configs' sample sizes, "roughly half the average cluster size"
    assert [resample_size(n, k) for n, k in [(10**7, 500_000), (500_000, 50_000)]] == [10, 5]
    assert [resample_size(50_000, 10_000), resample_size(29_700, 1_000)] == [3, 15]


def test_params_parse_cluster_lists():
    assert HKMeans({"clusters": "[12, 3]"}).params.clusters == [12, 3]
    assert HKMeans({"clusters": "12:3"}).params.clusters == [12, 3]
    assert HKMeans({"clusters": "auto"}).params.clusters is None
    with pytest.raises(ConfigError):
        HKMeans({"clusters": "[0]"})


# -- the strategy -------------------------------------------------------------------------
def test_selection_balances_a_dominant_concept(tmp_path):
    # One concept has 20x the points of each of the other four: 83% of the pool.
    image, labels = concepts([2000, 100, 100, 100, 100])
    for seed in (0, 1):
        checked, chosen = run(image, 200, tmp_path, seed=seed)
        kept = np.bincount(labels[chosen], minlength=5)
        assert kept.sum() == 200
        # level 2 has 6 clusters for 5 concepts: every concept gets 1/6 to 2/6 of the budget
        assert kept.min() >= 30 and kept.max() <= 70, kept
        assert kept[0] <= 2.5 * kept[1:].mean(), kept  # 20:1 in the pool
        assert checked.metrics["levels_used"] == 2.0


@pytest.mark.parametrize("count", [1, 37, 150, 300])
def test_exact_budget_without_duplicates(tmp_path, count):
    image, _ = concepts([150, 100, 50], seed=3)
    checked, chosen = run(image, count, tmp_path, resampling_steps=2)
    assert len(chosen) == count == len(set(chosen.tolist()))


def test_faiss_random_seeding_meets_the_budget_too(tmp_path):
    image, _ = concepts([150, 100, 50], seed=3)
    checked, chosen = run(image, 60, tmp_path, init="random", resample="random")
    assert len(set(chosen.tolist())) == 60
    assert checked.metrics["clusters_level1"] == 15.0  # 300 // 20; 15 // 20 < 2: one level


def test_closest_selection_takes_points_near_the_centroids(tmp_path):
    image, labels = concepts([200, 20], seed=4)
    _, chosen = run(image, 20, tmp_path, selection="closest", clusters=[2], resampling_steps=0)
    kept = np.bincount(labels[chosen], minlength=2)
    assert kept.tolist() == [10, 10]
    # within each concept, the kept points are the closest to the concept's mean
    x = image.astype(np.float32)
    for concept in (0, 1):
        members = np.flatnonzero(labels == concept)
        centre = x[members].mean(axis=0)
        dist = np.linalg.norm(x[members] - centre, axis=1)
        picked = np.isin(members, chosen)
        assert dist[picked].max() <= np.sort(dist)[len(members) // 2]


def test_same_seed_same_selection_other_seed_differs(tmp_path):
    image, _ = concepts([300, 60, 40], seed=5)
    first, _ = run(image, 80, tmp_path, seed=7)
    again, _ = run(image, 80, tmp_path, seed=7)
    other, _ = run(image, 80, tmp_path, seed=8)
    assert first.uids == again.uids
    assert first.uids != other.uids


@parametrize_with_checks([HKMeans()], pool_sizes=(40,))
def test_conforms(strategy, check):
    check(strategy)
