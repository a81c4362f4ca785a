"""Self-supervised prototype pruning (Sorscher et al., "Beyond neural scaling laws: beating
power law scaling via data pruning", NeurIPS 2022, Sec. 5).

The paper's self-supervised pruning metric: run k-means in the embedding space of a
self-supervised model (SwAV on ImageNet) and score every example by its cosine distance to
its nearest cluster centroid ("prototype"). Examples close to a prototype are easy /
prototypical, distant ones are hard. With abundant data (a large budget) the paper keeps
the hard examples; with scarce data, the easy ones (Sec. 3 and Fig. 1-2). Here the
embedding is the pool's image embedding (the proxy CLIP by default).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from selbench import Selection, SelectionContext, Strategy, hookimpl
from selbench.neighbours import kmeans_scaled, unit_rows

# Small pools: at least this many points per prototype on average.
MIN_POINTS_PER_CLUSTER = 20
# Rows scored at once: the scoring needs two float32 copies of these rows, not of the pool.
ROWS_AT_ONCE = 65536


def prototype_distances(x: np.ndarray, centroids: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """Cosine distance of every row of ``x`` to its assigned centroid (float32).

    ``d_i = 1 - <x_i, c_{a_i}> / (|x_i| |c_{a_i}|)``, in ``[0, 2]``: the self-supervised
    prototype metric of Sorscher et al. (NeurIPS 2022, Sec. 5), where ``a_i`` is the nearest
    prototype of ``x_i``. Rows and centroids need not be normalised.
    """
    assignment = np.asarray(assignment, dtype=np.int64)
    unit_protos = unit_rows(centroids)
    distances = np.empty(len(x), dtype=np.float32)
    for lo in range(0, len(x), ROWS_AT_ONCE):  # row by row math: blocks bound the memory only
        rows = unit_rows(x[lo : lo + ROWS_AT_ONCE])
        protos = unit_protos[assignment[lo : lo + ROWS_AT_ONCE]]
        distances[lo : lo + len(rows)] = 1.0 - np.einsum("ij,ij->i", rows, protos)
    return distances


def select_by_score(scores: np.ndarray, k: int, keep: Literal["hard", "easy"]) -> np.ndarray:
    """Indices (sorted) of the ``k`` largest (``keep="hard"``) or smallest (``"easy"``) scores.

    Ties go to the earlier pool position.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if keep not in ("hard", "easy"):
        raise ValueError(f"keep must be 'hard' or 'easy', got {keep!r}")
    key = -scores if keep == "hard" else scores
    order = np.lexsort((np.arange(len(scores)), key))
    return np.sort(order[:k])


class PrototypesParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedder: str = Field(
        default="proxy",
        description="embedder spec for the image embeddings; the paper used a self-supervised "
        "SwAV ResNet-50 trained on ImageNet, the offline default is the pool proxy",
    )
    clusters: int = Field(
        default=100,
        ge=1,
        description="number of k-means prototypes; Sorscher et al. (Sec. 5) used k=100 on "
        "ImageNet; scaled down to pool_size // 20 (at least 1) on small pools",
    )
    niter: int = Field(
        default=20,
        ge=1,
        description="k-means iterations (faiss's default, 20; the paper does not state one)",
    )
    keep: Literal["hard", "easy"] = Field(
        default="hard",
        description="hard: keep the examples farthest from their prototype (the paper's "
        "choice when data is abundant, i.e. large budgets); easy: keep the closest",
    )


class Prototypes(Strategy):
    """Keep the examples farthest from (or closest to) their k-means prototype."""

    name = "prototypes"
    summary = "Self-supervised prototype pruning: keep examples far from their k-means centroid"
    reference = (
        "Sorscher et al., Beyond neural scaling laws: beating power law scaling via data "
        "pruning (NeurIPS 2022), Sec. 5, self-supervised prototype metric"
    )
    stochastic = True  # k-means is seeded with ctx.seed; scoring and ranking are deterministic
    needs = frozenset({"embeddings"})
    Params = PrototypesParams

    def select(self, ctx: SelectionContext) -> Selection:
        found = ctx.embeddings(self.params.embedder)
        image = unit_rows(np.asarray(found.image))
        n = len(image)
        # The assignment's search already computed each row's inner product with its
        # (unit) centroid: for unit rows, the cosine similarity of prototype_distances.
        # Reusing it saves three passes over the pool (benchmarks/cluster_scale.py).
        _, _, similarity = kmeans_scaled(
            image,
            self.params.clusters,
            MIN_POINTS_PER_CLUSTER,
            ctx.seed,
            self.params.niter,
            "prototypes",
            return_scores=True,
        )
        scores = (1.0 - similarity).astype(np.float32)
        chosen = select_by_score(scores, ctx.budget_count, self.params.keep)
        uids = list(ctx.pool.uids)
        return Selection(
            uids=[uids[i] for i in chosen],
            scores={uids[i]: float(scores[i]) for i in range(n)},
        )


@hookimpl
def register_strategies(register):
    register(Prototypes)
