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

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from selbench.toolbox import (
    Selection,
    SelectionContext,
    Strategy,
    hookimpl,
    kmeans_scaled,
    top_k,
)

# Small pools: at least this many points per prototype on average.
MIN_POINTS_PER_CLUSTER = 20


class PrototypesParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedder: str = Field(
        default="reference",
        description="embedder spec for the image embeddings; the paper used a self-supervised "
        "SwAV ResNet-50 trained on ImageNet, i.e. on other data; on SynthWeb the default is "
        "its reference CLIP's image tower, proxy the CLIP trained on the pool itself",
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
    max_train_points: int | None = Field(
        default=None,
        ge=1,
        description="k-means trains on at most this many rows: a larger pool trains on a "
        "seeded sample of that many (faiss's permutation, the k-means seed) and every row is "
        "then assigned in blocks (docs/scale-out.md). None: faiss's own cap alone, 256 "
        "rows per cluster, which selbench draws exactly as faiss does (identical results)",
    )
    keep: Literal["hard", "easy"] = Field(
        default="hard",
        description="hard: keep the examples farthest from their prototype (the paper's "
        "choice when data is abundant, i.e. large budgets); easy: keep the closest",
    )

    @field_validator("max_train_points", mode="before")
    @classmethod
    def _no_cap(cls, value: Any) -> Any:
        # -p max_train_points=none (or null, as the default reads in MLflow or JSON)
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
            return None
        return value


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

    def score(self, ctx: SelectionContext) -> np.ndarray:
        """The self-supervised prototype metric (Sorscher et al. 2022, Sec. 5), oriented so
        that higher means keep: every example's cosine distance to its nearest k-means
        prototype, ``d_i = 1 - <x_i, c_{a_i}> / (|x_i| |c_{a_i}|)`` (:func:`centroid_distances`),
        for ``keep=hard`` (far from the prototype first), and ``-d_i`` for ``keep=easy``.
        Float32; k-means is seeded with ``ctx.seed``. :meth:`select` keeps exactly the top
        ``budget``."""
        found = ctx.embeddings(self.params.embedder)
        # The assignment's search already computed each row's inner product with its
        # (unit) centroid: for unit rows, the cosine similarity of centroid_distances.
        # Reusing it saves three passes over the pool (benchmarks/cluster_scale.py).
        # unit=True: kmeans makes the rows unit vectors (unit_rows) as it reads them, so
        # the pool is never copied whole (the same floats as unit_rows of the whole pool).
        _, _, similarity = kmeans_scaled(
            np.asarray(found.image),
            self.params.clusters,
            MIN_POINTS_PER_CLUSTER,
            ctx.seed,
            self.params.niter,
            "prototypes",
            return_scores=True,
            max_train_points=self.params.max_train_points,
            unit=True,
            executor=ctx.executor,
        )
        distances = (1.0 - similarity).astype(np.float32)
        return distances if self.params.keep == "hard" else -distances

    def select(self, ctx: SelectionContext) -> Selection:
        oriented = self.score(ctx)
        # hard: the largest distances; easy: the smallest; ties to the earlier position.
        # (Negation is exact, so ranking -d from the top ranks d from the bottom.)
        chosen = top_k(oriented, ctx.budget_count)
        scores = oriented if self.params.keep == "hard" else -oriented  # the distances
        return Selection.from_positions(ctx, chosen, scores=scores)


@hookimpl
def register_strategies(register):
    register(Prototypes)
