"""kNN-target: keep the pool samples whose images are nearest to the target images.

The retrieval form of target-aware selection: DataComp's image-based baseline (Gadre et
al., NeurIPS 2023, Sec. 4 "Image-based filtering") keeps pool samples close in CLIP
image space to ImageNet training images; Neural Data Server (Yan et al., CVPR 2020)
retrieves transfer data for a target task. DataComp reaches closeness through 100k
k-means clusters of the pool and keeps whole clusters, which cannot meet an exact
budget; selbench ranks pool samples by image-embedding similarity to the target instead.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from selbench.toolbox import Selection, SelectionContext, Strategy, hookimpl, knn, rank


def round_robin(neighbours: np.ndarray, budget: int) -> np.ndarray | None:
    """Take rank 1 of every target, then rank 2 of every target, ... skipping samples
    already taken, until ``budget`` distinct pool indices are chosen.

    ``neighbours`` is (targets, k) pool indices, nearest first. Returns None when the
    lists run out first (ask for a larger k).
    """
    chosen: list[int] = []
    taken: set[int] = set()
    for column in range(neighbours.shape[1]):
        for index in neighbours[:, column].tolist():
            if index not in taken:
                taken.add(index)
                chosen.append(index)
                if len(chosen) == budget:
                    return np.array(chosen, dtype=np.int64)
    return None


def max_similarity(pool: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each pool row's highest cosine similarity to any target row (rows L2-normalised)."""
    scores, _ = knn(pool, target, 1)
    return scores[:, 0]


class KnnTargetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedder: str = Field(
        default="reference",
        description="embedder spec for pool and target images; DataComp used OpenAI CLIP "
        "ViT-L/14; on SynthWeb the default is its reference CLIP, proxy the pool's own",
    )
    rule: Literal["round_robin", "max_similarity"] = Field(
        default="round_robin",
        description="round_robin: nearest neighbours of every target in turn, so every "
        "target is covered (selbench default); max_similarity: rank pool samples by their "
        "best similarity to any target",
    )


class KnnTarget(Strategy):
    """Keep the pool images nearest to the target images (exact budget)."""

    name = "knn_target"
    summary = "Target-aware retrieval: pool samples nearest to target-image embeddings"
    reference = (
        "Gadre et al., DataComp (NeurIPS 2023), Sec. 4 image-based filtering; "
        "Yan et al., Neural Data Server (CVPR 2020)"
    )
    stochastic = False
    needs = frozenset({"embeddings", "target"})
    Params = KnnTargetParams

    def _scored(self, ctx: SelectionContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pool's and the target's image embeddings (float32, rows L2-normalised) and
        :meth:`score`, computed from them."""
        pool = np.asarray(ctx.embeddings(self.params.embedder).image, dtype=np.float32)
        target = ctx.embed_images(ctx.target().images, self.params.embedder)
        return pool, target, max_similarity(pool, target)

    def score(self, ctx: SelectionContext) -> np.ndarray:
        """Each pool image's highest cosine similarity to a target image,
        ``s_i = max_t <f(x_i), f(x_t)>`` (DataComp's image-based filtering, Gadre et al.
        2023, Sec. 4: keep pool samples close to the target in CLIP image space); higher
        means keep. ``rule=max_similarity`` selects exactly the top ``budget`` of it. The
        default ``rule=round_robin`` does not: it takes every target's nearest neighbour,
        then every target's second, and so on, so the nearest pool sample of an outlying
        target is kept even when its score is lower than that of a sample ranked second
        or later by a target in a crowded region."""
        return self._scored(ctx)[2]

    def select(self, ctx: SelectionContext) -> Selection:
        pool, target, best = self._scored(ctx)
        uids = list(ctx.pool.uids)
        if self.params.rule == "max_similarity":
            chosen = rank(best)[: ctx.budget_count]
        else:
            k = min(len(uids), max(1, -(-ctx.budget_count // len(target))))
            while (chosen := round_robin(knn(target, pool, k)[1], ctx.budget_count)) is None:
                k = min(len(uids), 2 * k)
        return Selection(
            uids=[uids[i] for i in np.sort(chosen)],
            scores={u: float(s) for u, s in zip(uids, best, strict=True)},
        )


@hookimpl
def register_strategies(register):
    register(KnnTarget)
