"""TL;DR stage 2 (Wang et al., ICCV 2023, Sec. 3.2): cluster the code-index vectors,
sample a fraction of every cluster, refine the captions of the chosen samples.

Pure functions on arrays, so each step is tested on cases worked out by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from selbench.toolbox import centroid_distances, kmeans, rank, top_k, unit_rows

WITHIN_CLUSTER_RULES = ("uniform", "hard", "far", "caption_loss", "stride")


def largest_remainder_quotas(sizes: Sequence[int], total: int) -> np.ndarray:
    """Split ``total`` picks over clusters of ``sizes`` in proportion to their sizes,
    exactly, without giving any cluster more than it holds.

    Each cluster's ideal share is ``total * size / sum(sizes)``; every cluster gets the
    integer part and the leftover picks go one each to the largest fractional parts
    (Hamilton's largest-remainder method; ties to the lower cluster index). A cluster
    capped at its size hands its excess to the others by the same rule, repeated until
    everything is placed. ``sum(result) == total`` whenever ``0 <= total <= sum(sizes)``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if (sizes < 0).any():
        raise ValueError("cluster sizes must be non-negative")
    if not 0 <= total <= int(sizes.sum()):
        raise ValueError(f"cannot take {total} samples from clusters holding {int(sizes.sum())}")
    quotas = np.zeros(len(sizes), dtype=np.int64)
    remaining = int(total)
    while remaining > 0:
        room = sizes - quotas
        open_ = room > 0
        weight = np.where(open_, sizes, 0).astype(np.float64)
        ideal = remaining * weight / weight.sum()
        share = np.minimum(np.floor(ideal).astype(np.int64), room)
        left = remaining - int(share.sum())
        if left > 0:
            fraction = np.where(open_ & (share < room), ideal - np.floor(ideal), -1.0)
            order = rank(fraction)
            for index in order[:left]:
                if fraction[index] < 0:
                    break
                share[index] += 1
        quotas += share
        remaining -= int(share.sum())
    return quotas


def pick_within_cluster(
    members: np.ndarray,
    quota: int,
    rule: str,
    rng: np.random.Generator,
    hardness: np.ndarray | None = None,
    distance: np.ndarray | None = None,
    caption_loss: np.ndarray | None = None,
) -> np.ndarray:
    """``quota`` of ``members`` (pool indices, ascending) by the within-cluster rule.

    - ``uniform``: a uniform random sample (the paper's default, Table 2b);
    - ``hard``: the largest ``hardness``, the cosine distance of a sample's image embedding
      to its cluster's prototype (the paper's "hard samples" cite Sorscher et al., NeurIPS
      2022, whose hardness is exactly this prototype distance);
    - ``far``: the largest ``distance`` from the k-means centre in the clustered space
      (Table 2b "large distance");
    - ``caption_loss``: the highest captioner caption loss (selbench's own variant; neither
      the paper nor the release ranks by it);
    - ``stride``: evenly spaced members in pool order (the released code keeps every 5th
      member, ``range(0, n, 5)``; here the step is ``n / quota`` so the quota is exact).
    Ties go to the earlier pool position.
    """
    if quota <= 0:
        return np.empty(0, dtype=np.int64)
    if quota >= len(members):
        return members.copy()
    if rule == "uniform":
        return np.sort(rng.choice(members, size=quota, replace=False))
    if rule == "stride":
        positions = np.floor(np.arange(quota) * (len(members) / quota)).astype(np.int64)
        return members[positions]
    if rule not in WITHIN_CLUSTER_RULES:
        raise ValueError(f"unknown within-cluster rule {rule!r}")
    values = {"hard": hardness, "far": distance, "caption_loss": caption_loss}[rule]
    if values is None:
        raise ValueError(f"within-cluster rule {rule!r} needs per-sample values")
    return top_k(values, quota, among=members)


def sample_then_filter(
    cluster_members: Sequence[np.ndarray],
    eligible: np.ndarray,
    budget: int,
    pick: Callable[[np.ndarray, int], np.ndarray],
) -> tuple[np.ndarray, int]:
    """The release's order (``codebook_cluster.py``: sample every cluster of the whole
    pool, then keep only what the matching filter lets through), at an exact budget.

    ``cluster_members``: the pool indices of every cluster (ascending); ``eligible``: a
    boolean mask over the pool (the matching filter); ``pick(members, quota)``: the
    within-cluster rule. The release samples a fixed fraction of every cluster and keeps
    whatever of it is eligible; here the number sampled before the filter starts at
    ``budget * n / eligible`` (so that, with the eligible share of every cluster equal,
    the filter leaves the budget), split over clusters by largest remainder, and grows
    until at least ``budget`` samples pass the filter. Any excess is trimmed by sampling
    the passed members of each cluster again with the same rule, their quotas split by
    largest remainder. Returns ``(selected pool indices, number sampled before the
    filter)``.
    """
    eligible = np.asarray(eligible, dtype=bool)
    sizes = np.array([len(m) for m in cluster_members], dtype=np.int64)
    n, n_eligible = int(sizes.sum()), int(eligible.sum())
    if not 0 <= budget <= n_eligible:
        raise ValueError(f"cannot take {budget} samples when {n_eligible} pass the filter")
    if budget == 0:
        return np.empty(0, dtype=np.int64), 0
    sampled = min(n, math.ceil(budget * n / n_eligible))
    while True:
        quotas = largest_remainder_quotas(sizes, sampled)
        passed = []
        for members, quota in zip(cluster_members, quotas, strict=True):
            picked = pick(members, int(quota))
            passed.append(picked[eligible[picked]])
        count = sum(len(p) for p in passed)
        if count >= budget or sampled == n:  # all sampled: every eligible sample passed
            break
        sampled = min(n, sampled + math.ceil((budget - count) * n / n_eligible))
    trims = largest_remainder_quotas([len(p) for p in passed], budget)
    chosen = [pick(p, int(q)) for p, q in zip(passed, trims, strict=True)]
    return np.sort(np.concatenate(chosen)).astype(np.int64), sampled


def kmeans_all_points(
    x: np.ndarray,
    k: int,
    seed: int,
    niter: int = 20,
    max_points_per_centroid: int = 256,
) -> tuple[np.ndarray, np.ndarray, int]:
    """faiss k-means (:func:`selbench.toolbox.kmeans`) that trains on at most
    ``max_points_per_centroid * k`` points (faiss draws a seeded subsample above that;
    faiss's default is 256 per centroid, the release's ``fast_cluster.py`` sets 10,000,000
    so that every point is used). Returns ``(centroids, assignment of every row, number of
    training points)``.
    """
    k = max(1, min(int(k), len(x)))
    centroids, assignment = kmeans(
        x, k, seed=seed, niter=niter, max_points_per_centroid=max_points_per_centroid
    )
    return centroids, assignment, min(len(x), k * max_points_per_centroid)


def whiten(features: np.ndarray, dim: int) -> tuple[np.ndarray, int]:
    """PCA-whiten, then L2-normalise rows, as the released code does before k-means
    (``fast_cluster.py``: faiss ``PCAMatrix(d, 256, eigen_power=-0.5)``). faiss cannot
    output more dimensions than it gets, so the output has ``min(dim, d)``; on the
    release's own 197-long index vectors its request for 256 could not have run as
    written. Returns ``(rows, effective dimension)``."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    out_dim = max(1, min(int(dim), x.shape[1]))
    import faiss  # here, not at module level: the plugin loads without faiss

    pca = faiss.PCAMatrix(x.shape[1], out_dim, -0.5)
    pca.train(x)
    rows = unit_rows(np.nan_to_num(pca.apply(x), nan=0.0, posinf=0.0, neginf=0.0))
    return rows, out_dim


def cluster_prototype_distances(
    embeddings: np.ndarray, assignment: np.ndarray, n_clusters: int
) -> np.ndarray:
    """Cosine distance of every row of ``embeddings`` to its cluster's prototype, the mean
    of the cluster's unit-normalised rows: Sorscher et al.'s (NeurIPS 2022, Sec. 5)
    self-supervised prototype metric, with TL;DR's clusters as the prototypes' clusters."""
    assignment = np.asarray(assignment, dtype=np.int64)
    sums = np.zeros((n_clusters, embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, assignment, unit_rows(embeddings))
    return centroid_distances(embeddings, sums.astype(np.float32), assignment).astype(np.float64)


ROWS_AT_ONCE = 65_536  # row block of centre_distances: its temporaries stay a few MiB


def centre_distances(
    features: np.ndarray, centroids: np.ndarray, assignment: np.ndarray
) -> np.ndarray:
    """Euclidean distance of every row to its own cluster's centroid.

    Computed in blocks of rows: the whole-array form (``features - centroids[assignment]``)
    holds two float32 temporaries the size of ``features``, 4x a float16 cache entry at
    1M x 256 (docs/scale-out-embedding.md)."""
    features = np.asarray(features)
    centroids = np.asarray(centroids, dtype=np.float32)
    out = np.empty(len(features), dtype=np.float32)
    for lo in range(0, len(features), ROWS_AT_ONCE):
        hi = lo + ROWS_AT_ONCE
        diff = np.asarray(features[lo:hi], dtype=np.float32) - centroids[assignment[lo:hi]]
        out[lo:hi] = np.linalg.norm(diff, axis=1)
    return out


def top_keywords(captions: Sequence[str], k: int) -> list[str]:
    """The ``k`` most frequent keywords and two-word keyphrases of ``captions`` (English
    stop words removed; ties in alphabetical order) -- the paper's codebook initialisation
    (Sec. 3.1; it used NLTK; scikit-learn's counter and stop-word list here)."""
    # Imported here: scikit-learn takes about a second to import, and every selbench
    # command loads this plugin (docs/design.md, "Start-up").
    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(ngram_range=(1, 2), stop_words="english", lowercase=True)
    try:
        counts = vectorizer.fit_transform(list(captions))
    except ValueError:  # only stop words, or no captions
        return []
    frequency = np.asarray(counts.sum(axis=0)).ravel()
    terms = vectorizer.get_feature_names_out()
    order = np.lexsort((terms, -frequency))
    return [str(terms[i]) for i in order[:k]]


def refine_caption(original: str, generated: str, separator: str = "; ") -> str:
    """The paper's T = T_o + T_g: the original caption followed by the generated one
    (joined with the released code's ``"; "``). A blank generated caption leaves the
    original unchanged."""
    generated = generated.strip()
    if not generated:
        return original
    return f"{original}{separator}{generated}" if original.strip() else generated


def truncate_to_context(text: str, tokenizer: Any, context_length: int) -> str:
    """The longest word prefix of ``text`` whose tokens fit the model's context
    (``context_length - 2``, leaving room for the start and end tokens) -- what the
    trainer would have kept, kept as readable text for the selection artifact."""
    room = context_length - 2
    if len(tokenizer.encode(text)) <= room:
        return text
    words = text.split(" ")
    lo, hi = 0, len(words)
    while lo < hi:  # binary search on the number of words
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid]))) <= room:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]) if lo else text  # one over-long word: leave it to the tokenizer


def cluster_size_histogram(work_dir: Path, sizes: np.ndarray) -> Path:
    """A histogram of the cluster sizes, ``tldr_cluster_sizes.png`` in ``work_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.hist(sizes, bins=min(50, max(5, len(sizes) // 4)), color="#4477aa")
    ax.set_xlabel("samples per cluster")
    ax.set_ylabel("clusters")
    ax.set_title(f"TL;DR cluster sizes ({len(sizes)} clusters)")
    fig.tight_layout()
    path = work_dir / "tldr_cluster_sizes.png"
    fig.savefig(path)
    plt.close(fig)
    return path
