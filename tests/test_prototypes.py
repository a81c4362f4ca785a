"""prototypes: Sorscher et al. (NeurIPS 2022) self-supervised prototype pruning."""

from __future__ import annotations

import numpy as np
import pytest
import selbench_plugins.prototypes as prototypes
from selbench_plugins.prototypes import Prototypes

from selbench.neighbours import scaled_cluster_count
from selbench.strategy import validate_selection
from selbench.testing import context_with_embeddings
from selbench.toolbox import centroid_distances


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def run(image: np.ndarray, count: int, tmp_path, seed: int = 0, **params):
    ctx = context_with_embeddings(image, count, tmp_path, seed=seed)
    uids = list(ctx.pool.uids)
    selection = Prototypes(params).select(ctx)
    return validate_selection(selection, set(uids), count, "prototypes"), uids


def test_cluster_count_is_scaled_down_for_small_pools():
    assert (
        scaled_cluster_count(100, 16000, prototypes.MIN_POINTS_PER_CLUSTER) == 100
    )  # the paper's k fits a large pool
    assert scaled_cluster_count(100, 320, prototypes.MIN_POINTS_PER_CLUSTER) == 16  # 320 // 20
    assert (
        scaled_cluster_count(100, 19, prototypes.MIN_POINTS_PER_CLUSTER) == 1
    )  # never below one cluster
    assert (
        scaled_cluster_count(5, 1000, prototypes.MIN_POINTS_PER_CLUSTER) == 5
    )  # an explicit smaller k is kept


@pytest.mark.parametrize("count", [1, 13, 50, 199, 200])
def test_exact_budget_on_random_unit_vectors(tmp_path, count):
    image = unit_vectors(200, 16, seed=1)
    checked, uids = run(image, count, tmp_path)
    assert len(checked.uids) == count
    assert set(checked.scores) == set(uids)  # a score for every pool sample


def test_selection_is_the_far_or_near_end_of_the_logged_scores(tmp_path):
    image = unit_vectors(300, 16, seed=2)
    hard, _ = run(image, 60, tmp_path, keep="hard")
    easy, _ = run(image, 60, tmp_path, keep="easy")
    scores = hard.scores
    chosen = np.array([scores[u] for u in hard.uids])
    rest = np.array([s for u, s in scores.items() if u not in set(hard.uids)])
    assert chosen.min() >= rest.max()
    chosen_easy = np.array([easy.scores[u] for u in easy.uids])
    rest_easy = np.array([s for u, s in easy.scores.items() if u not in set(easy.uids)])
    assert chosen_easy.max() <= rest_easy.min()
    assert not set(hard.uids) & set(easy.uids)


def test_outliers_are_kept_first_with_keep_hard(tmp_path):
    # Four tight groups of 25 around orthogonal directions, plus 5 points halfway between
    # two groups: those are the farthest from every prototype.
    rng = np.random.default_rng(3)
    centres = np.eye(8, dtype=np.float32)[:4]
    groups = np.repeat(centres, 25, axis=0) + 0.02 * rng.standard_normal((100, 8))
    between = (centres[[0, 1, 2, 3, 0]] + centres[[1, 2, 3, 0, 2]]) / np.sqrt(2)
    x = np.concatenate([groups, between]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    checked, uids = run(x.astype(np.float16), 5, tmp_path, clusters=4)
    assert sorted(checked.uids) == uids[100:]


def test_same_seed_same_selection(tmp_path):
    image = unit_vectors(400, 16, seed=4)
    first, _ = run(image, 100, tmp_path, seed=7)
    again, _ = run(image, 100, tmp_path, seed=7)
    assert first.uids == again.uids
    assert first.scores == again.scores


def test_unknown_parameters_are_rejected():
    from selbench.errors import ConfigError

    with pytest.raises(ConfigError, match="keep"):
        Prototypes({"keep": "middle"})


@pytest.mark.slow
def test_end_to_end_on_tiny_synthweb(tiny):
    from selbench.run.lifecycle import execute
    from selbench.run.spec import RunRequest

    pool, scale = tiny
    outcome = execute(
        RunRequest(method="prototypes", budget=0.25, pool=str(pool), scale=str(scale))
    )
    assert len(outcome.selection.uids) == 80  # round(0.25 * 320)
    assert len(set(outcome.selection.uids)) == 80
    assert outcome.metrics["subset_size"] == 80


def test_logged_scores_are_the_papers_cosine_distance_to_the_prototype(tmp_path):
    """select reuses faiss's search scores; they equal centroid_distances (Sec. 5)."""
    from selbench.neighbours import kmeans_scaled, unit_rows

    image = unit_vectors(400, 16, seed=4)
    checked, uids = run(image, 100, tmp_path, seed=3)
    unit = unit_rows(image)
    centroids, assignment = kmeans_scaled(
        unit, 100, prototypes.MIN_POINTS_PER_CLUSTER, 3, 20, "test"
    )
    expected = centroid_distances(unit, centroids, assignment)
    logged = np.array([checked.scores[u] for u in uids])
    np.testing.assert_allclose(logged, expected, atol=1e-5)
