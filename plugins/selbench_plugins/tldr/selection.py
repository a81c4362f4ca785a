"""TL;DR stage 2 (Wang et al., ICCV 2023, Sec. 3.2): cluster the code-index vectors,
sample a fraction of every cluster, refine the captions of the chosen samples.

Pure functions on arrays, so each step is tested on cases worked out by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
from sklearn.feature_extraction.text import CountVectorizer

from selbench.neighbours import unit_rows

WITHIN_CLUSTER_RULES = ("uniform", "hard", "far", "stride")


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
            order = np.lexsort((np.arange(len(sizes)), -fraction))
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
) -> np.ndarray:
    """``quota`` of ``members`` (pool indices, ascending) by the within-cluster rule.

    - ``uniform``: a uniform random sample (the paper's default, Table 2b);
    - ``hard``: the highest ``hardness`` (the captioner's caption loss; Table 2b
      "hard-sample");
    - ``far``: the largest ``distance`` from the cluster centre (Table 2b "large distance");
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
    values = hardness if rule == "hard" else distance
    if values is None:
        raise ValueError(f"within-cluster rule {rule!r} needs per-sample values")
    order = np.lexsort((members, -values[members]))
    return np.sort(members[order[:quota]])


def whiten(features: np.ndarray, dim: int) -> np.ndarray:
    """PCA-whiten to ``min(dim, d)`` dimensions, then L2-normalise rows, as the released
    code does before k-means (faiss ``PCAMatrix(d, dim, eigen_power=-0.5)``)."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    out_dim = max(1, min(int(dim), x.shape[1]))
    pca = faiss.PCAMatrix(x.shape[1], out_dim, -0.5)
    pca.train(x)
    return unit_rows(np.nan_to_num(pca.apply(x), nan=0.0, posinf=0.0, neginf=0.0))


def centre_distances(
    features: np.ndarray, centroids: np.ndarray, assignment: np.ndarray
) -> np.ndarray:
    """Euclidean distance of every row to its own cluster's centroid."""
    diff = np.asarray(features, dtype=np.float32) - centroids[assignment]
    return np.linalg.norm(diff, axis=1)


def top_keywords(captions: Sequence[str], k: int) -> list[str]:
    """The ``k`` most frequent keywords and two-word keyphrases of ``captions`` (English
    stop words removed; ties in alphabetical order) -- the paper's codebook initialisation
    (Sec. 3.1; it used NLTK; scikit-learn's counter and stop-word list here)."""
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
