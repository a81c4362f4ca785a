from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

import selbench.neighbours as nb
from selbench.neighbours import cluster_members, faiss_gpu_count, kmeans, knn


def blobs(n_per: int = 60, k: int = 4, d: int = 8, seed: int = 0):
    """Clearly separated Gaussian blobs: (points, true labels)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(k, d) * 20.0
    labels = np.repeat(np.arange(k), n_per)
    points = centres[labels] + rng.standard_normal((len(labels), d))
    order = rng.permutation(len(labels))
    return points[order], labels[order]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labelings agree up to relabelling."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_gpu_count_on_faiss_cpu():
    assert faiss_gpu_count() == (faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
    assert isinstance(faiss_gpu_count(), int)


def test_gpu_count_without_the_attribute(monkeypatch):
    monkeypatch.delattr(faiss, "get_num_gpus", raising=False)
    assert faiss_gpu_count() == 0


def test_two_faiss_builds_in_one_environment_are_reported_once(monkeypatch, caplog):
    """faiss-cpu and faiss-gpu write the same module files; the user is told how to keep one."""
    monkeypatch.setattr(
        nb, "installed_faiss_distributions", lambda: ["faiss-cpu==1.15.1", "faiss-gpu==1.15.1"]
    )
    nb._warn_mixed_install.cache_clear()
    x, _ = blobs()
    with caplog.at_level(logging.WARNING, logger="selbench.neighbours"):
        kmeans(x, 4, seed=0)
        knn(x[:5], x, 3)
    nb._warn_mixed_install.cache_clear()
    warnings = [
        r.getMessage() for r in caplog.records if "share the faiss module" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert "pip uninstall -y faiss-cpu faiss-gpu && pip install faiss-gpu" in warnings[0]


def test_one_faiss_build_is_not_reported(caplog):
    nb._warn_mixed_install.cache_clear()
    with caplog.at_level(logging.WARNING, logger="selbench.neighbours"):
        kmeans(blobs()[0], 4, seed=0)
    assert len(nb.installed_faiss_distributions()) == 1
    assert "share the faiss module" not in caplog.text


def test_gpu_requested_without_gpu_runs_on_cpu(monkeypatch, caplog):
    monkeypatch.setattr(nb, "faiss_gpu_count", lambda: 0)
    x, _ = blobs()
    with caplog.at_level(logging.WARNING, logger="selbench.neighbours"):
        centroids, _ = kmeans(x, 4, seed=0, use_gpu=True)
        knn(x[:5], x, 3, use_gpu=True)
    assert centroids.shape == (4, 8) and "no GPU" in caplog.text


def test_kmeans_recovers_blobs():
    x, truth = blobs()
    centroids, assignment = kmeans(x, 4, seed=0)
    assert centroids.dtype == np.float32 and centroids.shape == (4, 8)
    assert assignment.dtype == np.int64 and assignment.shape == (len(x),)
    assert same_partition(assignment, truth)
    # every point is assigned to its nearest centroid
    distances = ((x[:, None, :] - centroids[None].astype(np.float64)) ** 2).sum(-1)
    assert np.array_equal(assignment, distances.argmin(1))


def test_spherical_kmeans_recovers_directions():
    x, truth = blobs()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    centroids, assignment = kmeans(x.astype(np.float16), 4, seed=3, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assert same_partition(assignment, truth)


def test_kmeans_is_deterministic():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 16)).astype(np.float32)  # subsampled: k * 256 < n
    first = kmeans(x, 8, seed=7, niter=5)
    second = kmeans(x.copy(), 8, seed=7, niter=5)
    other_seed = kmeans(x, 8, seed=8, niter=5)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert not np.array_equal(first[0], other_seed[0])


def test_kmeans_same_result_with_one_thread():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    default = kmeans(x, 5, seed=0, niter=5)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        single = kmeans(x, 5, seed=0, niter=5)
    finally:
        faiss.omp_set_num_threads(threads)
    assert np.array_equal(default[0], single[0]) and np.array_equal(default[1], single[1])


def test_kmeans_k_larger_than_n_is_clipped(caplog, capfd):
    x, _ = blobs(n_per=2, k=3)
    with caplog.at_level(logging.WARNING, logger="selbench.neighbours"):
        centroids, assignment = kmeans(x, 10, seed=0)
    assert centroids.shape == (6, 8) and sorted(assignment.tolist()) == list(range(6))
    assert "k=10" in caplog.text
    assert "WARNING clustering" not in capfd.readouterr().err  # faiss's stderr warning is off


def test_kmeans_rejects_bad_input():
    with pytest.raises(ValueError):
        kmeans(np.zeros((0, 4)), 2, seed=0)
    with pytest.raises(ValueError):
        kmeans(np.full((5, 4), np.nan), 2, seed=0)
    with pytest.raises(ValueError):
        kmeans(np.zeros((5, 4)), 0, seed=0)


def brute_force(queries: np.ndarray, base: np.ndarray, k: int):
    scores = queries.astype(np.float64) @ base.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("n_queries", [7, 300])  # faiss uses BLAS from 20 queries on
def test_knn_matches_brute_force(n_queries):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((500, 32)).astype(np.float32)
    queries = rng.standard_normal((n_queries, 32)).astype(np.float32)
    scores, indices = knn(queries, base, 10)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    assert scores.shape == indices.shape == (n_queries, 10)
    want_scores, want_indices = brute_force(queries, base, 11)
    np.testing.assert_allclose(scores, want_scores[:, :10], rtol=1e-5, atol=1e-4)
    # indices must agree exactly at every rank that is not a near-tie with a neighbour rank
    gaps = np.abs(np.diff(want_scores, axis=1))  # (nq, 10): gap between rank j and j + 1
    before = np.concatenate([np.full((n_queries, 1), np.inf), gaps[:, :-1]], axis=1)
    clear = (gaps > 1e-4) & (before > 1e-4)
    assert clear.mean() > 0.9
    assert np.array_equal(indices[clear], want_indices[:, :10][clear])


def test_knn_is_deterministic_and_clips_k():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((30, 8))
    first = knn(base, base, 100)
    second = knn(base, base, 100)
    assert first[0].shape == (30, 30)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    normalised = base / np.linalg.norm(base, axis=1, keepdims=True)
    _, nearest = knn(normalised, normalised, 1)
    assert np.array_equal(nearest[:, 0], np.arange(30))  # each point is its own best match


def test_knn_float16_memmap_input(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.standard_normal((200, 16)).astype(np.float16)
    np.save(tmp_path / "emb.npy", data)
    mapped = np.load(tmp_path / "emb.npy", mmap_mode="r")
    scores, indices = knn(mapped[:20], mapped, 5)
    want_scores, want_indices = knn(data[:20].astype(np.float32), data.astype(np.float32), 5)
    assert np.array_equal(indices, want_indices) and np.array_equal(scores, want_scores)
    centroids, assignment = kmeans(mapped, 3, seed=0)
    assert centroids.shape == (3, 16) and assignment.shape == (200,)


def test_knn_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="dim"):
        knn(np.zeros((2, 3)), np.zeros((4, 5)), 1)


def test_knn_gpu_path_is_taken_when_faiss_has_a_gpu(monkeypatch):
    moved = []
    monkeypatch.setattr(nb, "faiss_gpu_count", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: moved.append(1) or index)
    base = np.eye(4, dtype=np.float32)
    knn(base, base, 2)
    knn(base, base, 2, use_gpu=False)
    assert moved == [1]


def test_unit_rows_of_float16_equals_dividing_a_copy_and_leaves_the_input():
    rng = np.random.default_rng(3)
    half = (rng.standard_normal((50, 16)) * 4).astype(np.float16)
    half[7] = 0
    wide = half.astype(np.float32)
    expected = wide / np.maximum(
        np.linalg.norm(wide, axis=1, keepdims=True), np.finfo(np.float32).tiny
    )
    assert np.array_equal(nb.unit_rows(half), expected)
    assert not nb.unit_rows(half)[7].any()
    before = wide.copy()
    out = nb.unit_rows(wide)  # float32 input: a new array, the input untouched
    assert np.array_equal(out, expected) and np.array_equal(wide, before)
    assert not np.shares_memory(out, wide)


def test_one_blas_thread_limits_blas_only_inside():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {
            p["filepath"]: p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"
        }

    outside = blas_threads()
    with nb.one_blas_thread():
        assert set(blas_threads().values()) <= {1}
    assert blas_threads() == outside


def test_cluster_members_groups_in_candidate_order_including_empty_clusters():
    rng = np.random.default_rng(3)
    candidates = np.sort(rng.choice(1000, size=300, replace=False))
    assignment = rng.integers(0, 7, size=300)
    assignment[assignment == 4] = 5  # cluster 4 is empty
    members = cluster_members(candidates, assignment, 8)  # and 7 is past every label
    assert len(members) == 8
    for c in range(8):
        assert members[c].tolist() == candidates[assignment == c].tolist()
    assert len(members[4]) == 0 and len(members[7]) == 0
