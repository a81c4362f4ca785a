"""CLIP-score filtering (DataComp; Gadre et al., NeurIPS 2023 Datasets & Benchmarks).

Score each pair by the cosine similarity of its image and caption embeddings and keep
the best-aligned pairs. DataComp found it the strongest simple baseline at small scale
(its Table 3: "CLIP score (L/14 30%)" tops the small-scale filtering baselines).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from selbench.toolbox import (
    PluginError,
    Selection,
    SelectionContext,
    Strategy,
    clip_scores,
    hookimpl,
    top_k,
)


class ClipScoreParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedder: str = Field(
        default="reference",
        description="embedder spec; DataComp used OpenAI CLIP ViT-L/14 "
        "(open_clip:ViT-L-14:/path/to/weights.pt); on SynthWeb the default is its "
        "reference CLIP, trained on a separate clean corpus (selbench reference build); "
        "proxy:scorer is a CLIP trained 10 epochs on the pool itself",
    )
    mode: Literal["top_k", "threshold"] = Field(
        default="top_k",
        description="top_k: keep the budget's best scores (DataComp's percentile form); "
        "threshold: keep pairs scoring >= threshold, then sample the budget uniformly",
    )
    threshold: float = Field(
        default=0.3,
        description="cosine threshold for mode=threshold (DataComp: 0.3 with ViT-B/32; "
        "calibrate for another embedder)",
    )


class ClipScore(Strategy):
    """Keep the pairs whose image and caption embeddings agree most."""

    name = "clip_score"
    summary = "CLIP-score filtering: keep the best-aligned image-text pairs"
    reference = (
        "Gadre et al., DataComp (NeurIPS 2023), Sec. 4 and Table 3; Schuhmann et al., LAION-400M"
    )
    stochastic = False  # top_k (the default) is deterministic
    needs = frozenset({"embeddings"})
    Params = ClipScoreParams

    def is_stochastic(self) -> bool:
        return self.params.mode == "threshold"  # samples the budget with ctx.rng

    def score(self, ctx: SelectionContext) -> np.ndarray:
        """The CLIP score of every pair, ``s_i = <f_img(x_i), f_txt(t_i)>`` with
        L2-normalised embeddings (DataComp, Gadre et al. 2023, Sec. 4; :func:`clip_scores`),
        float32 in pool order. Higher means keep: ``mode=top_k`` keeps the budget's best."""
        found = ctx.embeddings(self.params.embedder)
        return clip_scores(np.asarray(found.image), np.asarray(found.text), executor=ctx.executor)

    def _passing(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores >= self.params.threshold)

    def select(self, ctx: SelectionContext) -> Selection:
        scores = self.score(ctx)
        if self.params.mode == "top_k":
            chosen = top_k(scores, ctx.budget_count)
        else:
            passing = np.flatnonzero(self._passing(scores))
            if len(passing) < ctx.budget_count:
                raise PluginError(
                    f"clip_score: only {len(passing)} pairs score >= {self.params.threshold}, "
                    f"the budget is {ctx.budget_count}; lower the threshold or the budget"
                )
            chosen = np.sort(ctx.rng.choice(passing, size=ctx.budget_count, replace=False))
        # Rows and a score array: no Python object per pool sample (selbench.positions).
        return Selection.from_positions(ctx, chosen, scores=scores)


@hookimpl
def register_strategies(register):
    register(ClipScore)
