"""semdedup: SemDeDup (Abbas et al., 2023, arXiv 2303.09540, Algorithm 1)."""

from __future__ import annotations

import numpy as np
import pytest
from selbench_plugins import semdedup
from selbench_plugins.semdedup import (
    SemDeDup,
    choose_epsilon,
    duplicate_mask,
    exact_budget,
    kept_mask,
    max_similarity_to_earlier,
    order_within_cluster,
    semdedup_scores,
)

from selbench.neighbours import scaled_cluster_count
from selbench.strategy import validate_selection
from selbench.testing import context_with_embeddings

# One cluster of four points. 0~1 and 1~2 are near-duplicates, 0 and 2 are not (a chain).
SIM = np.array(
    [
        [1.00, 0.95, 0.30, 0.10],
        [0.95, 1.00, 0.92, 0.20],
        [0.30, 0.92, 1.00, 0.40],
        [0.10, 0.20, 0.40, 1.00],
    ]
)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, dim))).astype(np.float16)


def planted_pool(n_single: int, n_groups: int, copies: int, dim: int = 32, seed: int = 0):
    """Random unit vectors plus ``n_groups`` groups of ``copies`` near-identical points."""
    rng = np.random.default_rng(seed)
    singles = unit(rng.standard_normal((n_single, dim)))
    originals = unit(rng.standard_normal((n_groups, dim)))
    dupes = np.repeat(originals, copies, axis=0) + 1e-3 * rng.standard_normal(
        (n_groups * copies, dim)
    )
    x = np.concatenate([singles, unit(dupes)])
    group = np.concatenate([np.full(n_single, -1), np.repeat(np.arange(n_groups), copies)])
    order = rng.permutation(len(x))  # interleave duplicates with the rest of the pool
    return x[order].astype(np.float16), group[order]


def run(image: np.ndarray, count: int, tmp_path, seed: int = 0, **params):
    ctx = context_with_embeddings(image, count, tmp_path, seed=seed)
    uids = list(ctx.pool.uids)
    strategy = SemDeDup(params)
    selection = strategy.select(ctx)
    checked = validate_selection(selection, set(uids), count, "semdedup")
    return checked, uids, strategy


# --- Algorithm 1 on a hand-written cluster -------------------------------------------------


def test_max_similarity_to_earlier_points_by_hand():
    # Visiting order 0, 1, 2, 3: M0 has no earlier point (-1); M1 = s01 = 0.95;
    # M2 = max(s02, s12) = max(0.30, 0.92) = 0.92; M3 = max(0.10, 0.20, 0.40) = 0.40
    assert max_similarity_to_earlier(SIM, [0, 1, 2, 3]).tolist() == [-1.0, 0.95, 0.92, 0.40]
    # Visiting order 3, 2, 1, 0: M3 = -1; M2 = s32 = 0.40; M1 = max(s31, s21) = 0.92;
    # M0 = max(s30, s20, s10) = 0.95   (results are in the rows' order, not visiting order)
    assert max_similarity_to_earlier(SIM, [3, 2, 1, 0]).tolist() == [0.95, 0.92, 0.40, -1.0]


def test_duplicate_mask_follows_algorithm_1_by_hand():
    # eps = 0.1: threshold 0.9. Order 0,1,2,3: 1 (0.95) and 2 (0.92) are removed. Point 2 is
    # removed although its only near-duplicate, 1, is removed too: Algorithm 1 compares with
    # every earlier point of the cluster, kept or not.
    assert duplicate_mask(SIM, [0, 1, 2, 3], 0.1).tolist() == [False, True, True, False]
    # Reverse order: 3 and 2 are visited first and kept; 1 (0.92 to 2) and 0 (0.95 to 1) go.
    assert duplicate_mask(SIM, [3, 2, 1, 0], 0.1).tolist() == [True, True, False, False]
    # eps = 0.06: threshold 0.94. Only the 0.95 pair counts; the later of 0 and 1 goes.
    assert duplicate_mask(SIM, [0, 1, 2, 3], 0.06).tolist() == [False, True, False, False]
    assert duplicate_mask(SIM, [1, 0, 2, 3], 0.06).tolist() == [True, False, False, False]
    # eps = 0: only exact duplicates (similarity > 1) would go; nothing here.
    assert not duplicate_mask(SIM, [0, 1, 2, 3], 0.0).any()
    # eps = 2: threshold -1; every point but the first visited is a duplicate.
    assert duplicate_mask(SIM, [2, 0, 1, 3], 2.0).tolist() == [True, True, False, True]


def test_visiting_order_by_hand():
    dist = np.array([0.3, 0.1, 0.5, 0.1])
    # farthest first; the 0.1 tie goes to the earlier position
    assert order_within_cluster(dist, "farthest").tolist() == [2, 0, 1, 3]
    assert order_within_cluster(dist, "closest").tolist() == [1, 3, 0, 2]
    perm = order_within_cluster(dist, "random", np.random.default_rng(0))
    assert sorted(perm.tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        order_within_cluster(dist, "random")


def test_blockwise_cluster_scores_equal_the_full_similarity_matrix(monkeypatch):
    x = unit(np.random.default_rng(5).standard_normal((50, 8)))
    assignment = np.zeros(50, dtype=np.int64)
    centroid = unit(x.mean(axis=0, keepdims=True))
    monkeypatch.setattr(semdedup, "BLOCK", 7)  # several column blocks, one ragged
    blocked = semdedup_scores(x, centroid, assignment, "farthest")
    order = order_within_cluster(1.0 - x @ centroid[0], "farthest")
    full = max_similarity_to_earlier(x @ x.T, order)
    np.testing.assert_allclose(blocked, full, atol=1e-6)


@pytest.mark.parametrize("block, row_block", [(64, 100), (100, 64), (512, 300)])
def test_a_large_clusters_row_blocks_give_the_one_product_scores(monkeypatch, block, row_block):
    """A cluster larger than ROW_BLOCK is computed ROW_BLOCK earlier points at a time
    (issue 32: a task's matrix no longer grows with the cluster). Its M equals the
    one-product path's up to the BLAS's rounding of a product of another shape (one ulp,
    rarely, on OpenBLAS), and the duplicates it finds are the same."""
    rng = np.random.default_rng(11)
    x = unit(rng.standard_normal((1000, 48)))
    x[500:700] = unit(x[:200] + 0.02 * rng.standard_normal((200, 48)).astype(np.float32))
    order = order_within_cluster(rng.random(1000), "farthest")
    monkeypatch.setattr(semdedup, "BLOCK", block)
    whole = semdedup._cluster_max_similarity(x, order)  # ROW_BLOCK 8192: one product each
    monkeypatch.setattr(semdedup, "ROW_BLOCK", row_block)
    rows_blocked = semdedup._cluster_max_similarity(x, order)
    assert whole.dtype == rows_blocked.dtype == np.float64
    np.testing.assert_allclose(rows_blocked, whole, rtol=0, atol=2.5e-7)
    assert (whole > 0.98).sum() >= 190  # the near-copies are found
    assert ((rows_blocked > 0.98) == (whole > 0.98)).all()


def test_rows_already_unit_are_scored_without_a_second_copy_and_alike(monkeypatch):
    rng = np.random.default_rng(8)
    raw = rng.standard_normal((60, 8)).astype(np.float16)
    x = semdedup.unit_rows(raw)
    assignment = rng.integers(0, 3, size=60)
    centroids = unit(np.stack([x[assignment == c].mean(axis=0) for c in range(3)]))
    again = semdedup_scores(raw, centroids, assignment, "farthest")  # normalises a copy
    made = []
    monkeypatch.setattr(semdedup, "unit_rows", lambda rows: made.append(rows) or rows)
    scores = semdedup_scores(x, centroids, assignment, "farthest", normalized=True)
    assert len(made) == 1 and made[0] is centroids  # only the centroids are normalised
    np.testing.assert_allclose(scores, again, atol=1e-6)


def test_points_are_only_compared_within_their_cluster():
    x = unit(np.array([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0], [0.001, 1.0]]))
    centroids = unit(np.array([[1.0, 0.0], [0.0, 1.0]]))
    # 0 and 1 are duplicates, but put in different clusters, each beside a point at 90
    # degrees: no duplicate is found.
    split = semdedup_scores(x, centroids, np.array([0, 1, 1, 0]), "farthest")
    assert (split < 0.01).all()
    assert (split == -1.0).sum() == 2  # one first-visited point per cluster
    together = semdedup_scores(x, centroids, np.array([0, 0, 1, 1]), "farthest")
    assert (together > 0.99).sum() == 2  # one of each duplicate pair


# --- eps search and the exact budget ----------------------------------------------------------

M = np.array([-1.0, 0.95, 0.92, 0.40, 0.92, 0.99])


def test_epsilon_is_the_largest_that_keeps_the_budget_by_hand():
    # sorted M: -1, 0.40, 0.92, 0.92, 0.95, 0.99
    assert choose_epsilon(M, 4) == pytest.approx(0.08)  # keeps M <= 0.92: {0, 2, 3, 4}
    assert choose_epsilon(M, 3) == pytest.approx(0.08)  # the 0.92 tie: 4 kept, 1 too many
    assert choose_epsilon(M, 5) == pytest.approx(0.05)
    assert choose_epsilon(M, 6) == pytest.approx(0.01)
    assert choose_epsilon(M, 2) == pytest.approx(0.60)
    assert choose_epsilon(M, 1) == 2.0  # only the first-visited point: eps clipped to 2


def test_exact_budget_rule_by_hand():
    kept = np.array([True, False, True, True, True, False])  # M <= 0.92
    # too many (4 kept, budget 3): drop the highest M first; 2 and 4 tie at 0.92, the later
    # pool position (4) goes
    assert exact_budget(M, kept, 3).tolist() == [0, 2, 3]
    assert exact_budget(M, kept, 2).tolist() == [0, 3]
    assert exact_budget(M, kept, 4).tolist() == [0, 2, 3, 4]
    # too few (budget 5): add back the removed point with the lowest M, 1 (0.95) before 5
    assert exact_budget(M, kept, 5).tolist() == [0, 1, 2, 3, 4]
    # exact duplicates at eps = 0: M slightly above 1 removes them; they come back in order
    dup = np.array([1.0000002, -1.0, 1.0000001, 0.5])
    assert exact_budget(dup, kept_mask(dup, 0.0), 3).tolist() == [1, 2, 3]


def test_kept_count_never_grows_with_epsilon():
    scores = semdedup_scores(
        unit_vectors(300, 8, seed=6), unit(np.ones((1, 8))), np.zeros(300, int), "farthest"
    )
    grid = np.linspace(0.0, 2.0, 201)
    counts = [int(kept_mask(scores, e).sum()) for e in grid]
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))
    assert counts[0] == 300 and counts[-1] == 1
    for budget in (1, 10, 150, 299, 300):
        eps = choose_epsilon(scores, budget)
        assert kept_mask(scores, eps).sum() >= budget
        if eps < 2.0:  # no ties in random data: any larger eps keeps fewer
            assert kept_mask(scores, eps + 1e-6).sum() < budget


# --- the strategy through a SelectionContext --------------------------------------------------


@pytest.mark.parametrize("count", [1, 17, 120, 299, 300])
def test_exact_budget_on_random_unit_vectors(tmp_path, count):
    image = unit_vectors(300, 16, seed=1)
    checked, uids, strategy = run(image, count, tmp_path)
    assert len(checked.uids) == count
    assert set(checked.scores) == set(uids)
    assert 0.0 <= checked.metrics["epsilon_used"] <= 2.0
    assert checked.metrics["clusters_used"] == 3  # 300 // 100
    assert checked.metrics["kept_at_epsilon"] >= count


@pytest.mark.parametrize("keep", ["farthest", "closest", "random"])
def test_planted_near_duplicates_keep_at_most_one_per_group(tmp_path, keep):
    # 300 distinct points and 20 groups of 4 copies: 320 distinct contents in 380 samples.
    image, group = planted_pool(300, 20, 4)
    for count in (200, 320):
        checked, uids, strategy = run(image, count, tmp_path, keep=keep)
        chosen = np.isin(uids, checked.uids)
        per_group = np.bincount(group[chosen & (group >= 0)], minlength=20)
        assert per_group.max() <= 1, (count, per_group)
        if count == 320:  # room for every distinct content: exactly one copy of each group
            assert per_group.min() == 1
            # the threshold 1 - eps sits below the copies' similarity (about 0.9999)
            assert 1.0 - checked.metrics["epsilon_used"] < 0.99


def test_keep_farthest_and_closest_keep_opposite_ends_of_a_group(tmp_path):
    # One group of copies spread along a line through the group: farthest / closest from the
    # centroid are different members.
    rng = np.random.default_rng(8)
    singles = unit(rng.standard_normal((199, 16)))
    base = unit(rng.standard_normal((1, 16)))
    direction = unit(rng.standard_normal((1, 16)))
    copies = unit(base + np.linspace(-0.01, 0.01, 5)[:, None] * direction)
    image = np.concatenate([singles, copies]).astype(np.float16)
    # budget 200 = the 199 singles + one copy: exactly one copy survives
    far, uids, _ = run(image, 200, tmp_path, keep="farthest")
    near, _, _ = run(image, 200, tmp_path, keep="closest")
    far_kept = [u for u in far.uids if u in uids[199:]]
    near_kept = [u for u in near.uids if u in uids[199:]]
    assert len(far_kept) == 1 and len(near_kept) == 1
    assert far_kept != near_kept


def test_same_seed_same_selection_and_random_keep_follows_the_seed(tmp_path):
    image, group = planted_pool(300, 20, 4, seed=9)
    first, _, _ = run(image, 250, tmp_path, seed=3)
    again, _, _ = run(image, 250, tmp_path, seed=3)
    assert first.uids == again.uids and first.scores == again.scores
    other_seed, _, _ = run(image, 250, tmp_path, seed=4)
    assert other_seed.uids == first.uids  # default keep=farthest ignores the run seed
    a, _, _ = run(image, 250, tmp_path, seed=3, keep="random")
    b, _, _ = run(image, 250, tmp_path, seed=3, keep="random")
    c, _, _ = run(image, 250, tmp_path, seed=4, keep="random")
    assert a.uids == b.uids
    assert a.uids != c.uids  # which copy of a group survives is drawn from ctx.rng


def test_cluster_count_is_scaled_down_for_small_pools():
    assert scaled_cluster_count(50000, 16000, semdedup.MIN_POINTS_PER_CLUSTER) == 160
    assert scaled_cluster_count(50000, 320, semdedup.MIN_POINTS_PER_CLUSTER) == 3
    assert scaled_cluster_count(50000, 99, semdedup.MIN_POINTS_PER_CLUSTER) == 1
    assert scaled_cluster_count(10, 16000, semdedup.MIN_POINTS_PER_CLUSTER) == 10


@pytest.mark.slow
def test_end_to_end_on_tiny_synthweb(tiny):
    from selbench.run.lifecycle import execute
    from selbench.run.spec import RunRequest

    pool, scale = tiny
    outcome = execute(RunRequest(method="semdedup", budget=0.25, pool=str(pool), scale=str(scale)))
    assert len(outcome.selection.uids) == 80  # round(0.25 * 320)
    assert len(set(outcome.selection.uids)) == 80
    assert outcome.metrics["subset_size"] == 80


def test_clusters_normalised_in_their_tasks_give_the_whole_pool_unit_copy_floats():
    """No unit float32 copy of the pool: k-means (unit=True) and every cluster's task make
    their own rows unit vectors; row-wise, so the same floats bit for bit."""
    from selbench.neighbours import kmeans_scaled, unit_rows

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3000, 32)) * rng.uniform(0.5, 2, (3000, 1))).astype(np.float16)
    centroids, assignment = kmeans_scaled(unit_rows(x), 20, 100, 1234, 5, "t")
    again = kmeans_scaled(x, 20, 100, 1234, 5, "t", unit=True)
    assert np.array_equal(centroids, again[0]) and np.array_equal(assignment, again[1])
    whole = semdedup.semdedup_scores(
        unit_rows(x), centroids, assignment, "farthest", normalized=True
    )
    per_cluster = semdedup.semdedup_scores(x, centroids, assignment, "farthest")
    assert np.array_equal(whole, per_cluster)


def test_cluster_rows_gathered_in_parts_from_a_memory_map_give_the_same_floats(
    tmp_path, monkeypatch
):
    """A cluster's rows are read from the cache a part at a time (a bounded span of the
    file, its pages released after each): the same scores bit for bit as reading at once."""
    rng = np.random.default_rng(3)
    np.save(tmp_path / "x.npy", rng.standard_normal((400, 16)).astype(np.float16))
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    assignment = rng.integers(0, 3, size=400)
    centroids = unit(rng.standard_normal((3, 16)))
    at_once = semdedup.semdedup_scores(x, centroids, assignment, "farthest")
    monkeypatch.setattr(semdedup, "GATHER_ROWS", 7)  # parts of at most 7 rows
    monkeypatch.setattr(semdedup, "GATHER_BYTES", 32 * 20)  # ... within 20 rows of the file
    assert np.array_equal(semdedup.semdedup_scores(x, centroids, assignment, "farthest"), at_once)
