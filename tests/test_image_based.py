"""image_based: DataComp's image-based filtering (Gadre et al., NeurIPS 2023, Sec. 3.4)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from selbench_plugins.image_based import ImageBased, cluster_count

from selbench.embedders import Embeddings
from selbench.errors import ConfigError
from selbench.registry import get_registry
from selbench.strategy import SelectionContext, validate_selection
from selbench.target import TargetSet
from selbench.testing import MemoryPool, parametrize_with_checks
from selbench.toolbox import top_k


@dataclass
class Services:
    """Pool embeddings and target-image embeddings the test chose."""

    pool: MemoryPool
    image: np.ndarray
    target_rows: np.ndarray

    def embeddings(self, spec: str = "proxy") -> Embeddings:
        return Embeddings(self.image, self.image, self.pool.uids, f"fixed:{spec}", "fixed")

    def target(self) -> TargetSet:
        keys = [f"t{i}" for i in range(len(self.target_rows))]
        return TargetSet(Path("target"), list(range(len(keys))), keys, [])

    def embed_images(self, spec: str, images) -> np.ndarray:
        return self.target_rows[np.asarray(images, dtype=np.int64)]

    def embedder(self, spec: str = "proxy"):
        raise AssertionError("image_based needs no proxy model")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def groups(n_groups: int, size: int, dim: int = 16, spread: float = 0.05, seed: int = 0):
    """``n_groups`` tight groups of ``size`` unit vectors around orthogonal directions."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim, dtype=np.float32)[:n_groups]
    x = np.repeat(centres, size, axis=0) + spread * rng.standard_normal((n_groups * size, dim))
    return unit(x), np.repeat(np.arange(n_groups), size)


def context(image, target, count: int, tmp_path: Path, seed: int = 0) -> SelectionContext:
    uids = [f"u{i:05d}" for i in range(len(image))]
    pool = MemoryPool(uids, [f"caption {i}" for i in range(len(image))])
    return SelectionContext(
        pool=pool,
        budget_count=count,
        budget_fraction=count / len(image),
        seed=seed,
        device="cpu",
        work_dir=tmp_path,
        services=Services(pool, image.astype(np.float16), unit(target)),
        strategy="image_based",
        needs=ImageBased.needs,
    )


def test_default_cluster_count_is_one_per_128_samples():
    assert cluster_count(16_000, None) == 125  # default SynthWeb
    assert cluster_count(12_800_000, None) == 100_000  # DataComp's small pool, Sec. 3.4
    assert cluster_count(128_000_000, None) == 100_000  # DataComp kept 100k at every scale
    assert cluster_count(300, None) == 2  # at least two
    assert cluster_count(1, None) == 1  # never more than the pool
    assert cluster_count(1000, 7) == 7
    assert cluster_count(5, 7) == 5


def test_the_target_clusters_are_kept_first(tmp_path):
    # Four groups of 256; the targets are members of group 0, so every cluster of group 0
    # receives one. 64 clusters: each group gets several, no two groups share one.
    image, group = groups(4, 256)
    target = image[group == 0]
    ctx = context(image, target, 100, tmp_path)
    strategy = ImageBased({"clusters": 64})
    passes = strategy.passes(ctx)
    assert passes.tolist() == (group == 0).tolist()
    # the budget below, at and above the kept clusters' size
    for count in (100, 256, 300):
        ctx = context(image, target, count, tmp_path)
        checked = validate_selection(strategy.select(ctx), set(ctx.pool.uids), count, "image_based")
        chosen = np.isin(ctx.pool.uids, checked.uids)
        if count <= passes.sum():
            assert not (chosen & ~passes).any()
        else:
            assert not (passes & ~chosen).any()
        assert checked.metrics["hit_samples"] == 256


def test_passes_are_the_clusters_a_target_image_is_assigned_to(tmp_path):
    rng = np.random.default_rng(5)
    image = unit(rng.standard_normal((1000, 16)))
    target = unit(rng.standard_normal((6, 16)))
    ctx = context(image, target, 50, tmp_path, seed=2)
    strategy = ImageBased()
    found = strategy.clusters_hit(ctx)
    assert found.clusters == cluster_count(1000, None) == 7
    # DataComp's released code: nearest centroid = largest inner product, for both
    centroids = found.centroids
    pool16 = unit(image.astype(np.float16).astype(np.float32))  # what the context serves
    pool_cluster = np.argmax(pool16 @ centroids.T, axis=1)
    target_cluster = np.argmax(unit(target) @ centroids.T, axis=1)
    np.testing.assert_array_equal(found.assignment, pool_cluster)
    expected = np.isin(pool_cluster, target_cluster)
    np.testing.assert_array_equal(strategy.passes(ctx), expected)
    assert 0 < expected.sum() < len(image)  # a real filter here
    assert found.hit_clusters == len(np.unique(target_cluster))


def test_score_is_hit_plus_a_quarter_of_one_plus_the_nearest_target_cosine(tmp_path):
    rng = np.random.default_rng(6)
    image = unit(rng.standard_normal((800, 16)))
    target = unit(rng.standard_normal((5, 16)))
    ctx = context(image, target, 80, tmp_path)
    strategy = ImageBased()
    scores = strategy.score(ctx)
    assert scores.shape == (800,) and np.isfinite(scores).all()
    pool16 = image.astype(np.float16).astype(np.float32)
    cos = (unit(pool16) @ unit(target).T).max(axis=1)
    hit = strategy.passes(ctx)
    np.testing.assert_allclose(scores, hit + (1 + cos) / 4, atol=1e-5)
    assert scores[hit].min() >= 1.0 > 0.5 >= scores[~hit].max()
    # within each group the samples nearer a target come first
    checked = strategy.select(ctx)
    chosen = np.isin(ctx.pool.uids, checked.uids)
    if hit.sum() >= 80:
        assert cos[chosen].min() >= cos[hit & ~chosen].max()
    assert set(checked.scores) == set(ctx.pool.uids)


def test_select_is_the_top_budget_of_the_score(tmp_path):
    rng = np.random.default_rng(9)
    image = unit(rng.standard_normal((600, 16)))
    target = unit(rng.standard_normal((4, 16)))
    scores = ImageBased().score(context(image, target, 1, tmp_path, seed=4))
    for count in (1, 40, 299, 600):
        ctx = context(image, target, count, tmp_path, seed=4)
        picked = ImageBased().select(ctx).uids
        assert picked == [ctx.pool.uids[i] for i in top_k(scores, count)]


@pytest.mark.parametrize("count", [1, 17, 333, 1000])
def test_exact_budget(tmp_path, count):
    rng = np.random.default_rng(7)
    image = unit(rng.standard_normal((1000, 16)))
    target = unit(rng.standard_normal((10, 16)))
    ctx = context(image, target, count, tmp_path)
    checked = validate_selection(ImageBased().select(ctx), set(ctx.pool.uids), count, "image_based")
    assert len(checked.uids) == count


def test_same_seed_same_selection_and_the_seed_moves_the_clusters(tmp_path):
    rng = np.random.default_rng(8)
    image = unit(rng.standard_normal((2000, 16)))
    target = unit(rng.standard_normal((12, 16)))

    def run(seed):
        ctx = context(image, target, 300, tmp_path, seed=seed)
        return ImageBased().select(ctx).uids

    first = run(0)
    assert first == run(0)
    assert first != run(1)  # k-means is seeded with the run's seed


def test_clusters_parameter():
    assert ImageBased({"clusters": "auto"}).params.clusters is None
    assert ImageBased({"clusters": "null"}).params.clusters is None
    assert ImageBased({"clusters": "12"}).params.clusters == 12
    with pytest.raises(ConfigError, match="clusters"):
        ImageBased({"clusters": 0})
    assert ImageBased().expected_failures()  # the kit's pools are too small for the seed
    assert not ImageBased({"clusters": 8}).expected_failures()


def test_registered_as_a_scorer_with_a_rule():
    assert get_registry().get("image_based").cls is ImageBased
    assert ImageBased.is_scorer() and ImageBased.has_rule()
    assert ImageBased.needs == frozenset({"embeddings", "target"})


@parametrize_with_checks([ImageBased(), ImageBased({"clusters": 8})])
def test_conforms(strategy, check):
    check(strategy)
