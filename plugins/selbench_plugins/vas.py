"""VAS and VAS-D (Wang et al., "Variance Alignment Score: A Simple But Tough-to-Beat Data
Selection Method for Multimodal Contrastive Learning", arXiv 2402.02055).

The variance alignment score of a pool sample is ``VAS_i = f_i^T Sigma f_i``, the inner
product ``<Sigma, f_i f_i^T>`` of a target (second-moment) matrix with the sample's own,
on L2-normalised *image* embeddings (the paper's ablation finds image embeddings better
than text or both). Two-stage selection, as in the paper's experiments: keep the best
pairs by CLIP score first (VAS alone does not look at the caption), then the best of
those by VAS.

- ``vas``: ``Sigma`` is the target's ``1/|T| sum_t f_t f_t^T`` (the paper's
  VAS(ImageNet-1k); on SynthWeb the pool's clean target split).
- ``vas_d``: no target; ``Sigma`` is the second moment of the data still selected,
  updated as samples are removed in ``steps`` equal chunks (VAS-D, "dynamic").

Defaults from the released code (github.com/ypwang61/VAS, ``baselines/vas.py`` and the run
scripts): CLIP score keeps 0.45 of DataComp-small then VAS 0.3 (medium: 0.3 then 0.2), a
1.5 ratio either way; VAS-D takes 168 steps on DataComp-small (500 on medium) and
computes its first ``Sigma`` over the whole pool, before the CLIP-score filter. The
PDF's equation numbers were not available offline.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from selbench.toolbox import (
    ConfigError,
    Selection,
    SelectionContext,
    Strategy,
    clip_scores,
    hookimpl,
    top_k,
)


def second_moment(rows: np.ndarray) -> np.ndarray:
    """``1/n sum_i f_i f_i^T`` (uncentred, as in the paper and its released code)."""
    rows = np.asarray(rows, dtype=np.float64)
    return rows.T @ rows / len(rows)


def variance_alignment(rows: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``VAS_i = f_i^T Sigma f_i`` for every row."""
    rows = np.asarray(rows, dtype=np.float64)
    return np.einsum("ij,ij->i", rows @ sigma, rows)


def vas_d(
    rows: np.ndarray, candidates: np.ndarray, k: int, steps: int, sigma: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """VAS-D: from ``candidates`` (indices into ``rows``), remove ``ceil((n - k) / steps)``
    samples per step, the lowest by VAS against ``sigma``, then set ``sigma`` to the second
    moment of the samples kept; the last step keeps exactly ``k``. Returns the kept indices
    (sorted) and the final VAS of every candidate (against the last ``sigma``)."""
    kept = np.sort(np.asarray(candidates))
    if steps < 1:
        raise ConfigError(f"vas_d: steps must be >= 1, got {steps}")
    chunk = max(1, math.ceil((len(kept) - k) / steps))
    while len(kept) > k:
        size = max(k, len(kept) - chunk)
        # kept is ascending, so ties among its positions go to the earlier pool position
        kept = kept[top_k(variance_alignment(rows[kept], sigma), size)]
        sigma = second_moment(rows[kept])
    return kept, variance_alignment(rows, sigma)


class VasParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedder: str = Field(
        default="reference",
        description="embedder spec for the CLIP score and the image embeddings; the paper used "
        "OpenAI CLIP ViT-L/14; on SynthWeb the default is its reference CLIP (clip_score's)",
    )
    prefilter_ratio: float = Field(
        default=1.5,
        description="the CLIP-score filter keeps this many times the budget (released "
        "scripts: 45% then 30% on DataComp-small, 30% then 20% on medium); capped at the pool",
    )


class VasDParams(VasParams):
    steps: int = Field(
        default=168,
        description="removal steps (released DataComp-small script: num_iters 168; medium 500); "
        "each removes an equal share of prefiltered - budget samples",
    )
    initial_sigma: Literal["pool", "prefiltered"] = Field(
        default="pool",
        description="data of the first Sigma: pool (released code: the whole pool, before the "
        "CLIP-score filter) or prefiltered (the samples the filter kept)",
    )


def _prefilter(ctx: SelectionContext, ratio: float, image: np.ndarray, text: np.ndarray):
    if ratio < 1:
        raise ConfigError(f"prefilter_ratio must be >= 1 (keep at least the budget), got {ratio}")
    keep = min(len(image), max(ctx.budget_count, round(ratio * ctx.budget_count)))
    return top_k(clip_scores(image, text), keep)


class Vas(Strategy):
    """CLIP-score filter, then the samples whose image embeddings align best with the
    target's second moment."""

    name = "vas"
    summary = "Variance Alignment Score against the target's covariance, after a CLIP-score filter"
    reference = (
        "Wang et al., Variance Alignment Score (arXiv 2402.02055), VAS(target) with the "
        "CLIP-score filter; defaults from the released scripts (ratio 0.45/0.3)"
    )
    stochastic = False
    needs = frozenset({"embeddings", "target"})
    Params = VasParams

    def _aligned(self, ctx: SelectionContext, image: np.ndarray) -> tuple[np.ndarray, int]:
        """:meth:`score` of the pool's image rows ``image`` and the number of target images."""
        target = ctx.embed_images(ctx.target().images, self.params.embedder)
        return variance_alignment(image, second_moment(target)), len(target)

    def score(self, ctx: SelectionContext) -> np.ndarray:
        """The variance alignment score of every pool image against the target (Wang et al.
        2024, VAS): ``VAS_i = f_i^T Sigma_T f_i`` with ``Sigma_T = 1/|T| sum_t f_t f_t^T``
        the target's second moment, on L2-normalised image embeddings
        (:func:`variance_alignment`, :func:`second_moment`). Float64; higher means keep.

        Only the VAS step: the CLIP-score prefilter keeps ``prefilter_ratio`` times the
        budget, so it depends on the budget and is not part of the score. :meth:`select`
        keeps the top ``budget`` of this score among the prefilter's survivors, so it is
        the top ``budget`` of the score only when the prefilter keeps the whole pool."""
        image = np.asarray(ctx.embeddings(self.params.embedder).image, dtype=np.float32)
        return self._aligned(ctx, image)[0]

    def select(self, ctx: SelectionContext) -> Selection:
        found = ctx.embeddings(self.params.embedder)
        image = np.asarray(found.image, dtype=np.float32)
        candidates = _prefilter(ctx, self.params.prefilter_ratio, image, np.asarray(found.text))
        scores, target_size = self._aligned(ctx, image)
        chosen = top_k(scores, ctx.budget_count, candidates)
        uids = list(ctx.pool.uids)
        return Selection(
            uids=[uids[i] for i in chosen],
            scores={u: float(s) for u, s in zip(uids, scores, strict=True)},
            metrics={"prefilter_kept": float(len(candidates)), "target_size": float(target_size)},
        )


class VasD(Strategy):
    """CLIP-score filter, then VAS against the selection's own second moment, updated as
    samples are removed step by step (VAS-D)."""

    name = "vas_d"
    summary = "VAS-D: variance alignment with the selection itself, updated stepwise"
    reference = (
        "Wang et al., Variance Alignment Score (arXiv 2402.02055), VAS-D; defaults from the "
        "released code and scripts (168 steps, first Sigma over the pool, ratio 0.45/0.3)"
    )
    stochastic = False
    needs = frozenset({"embeddings"})
    Params = VasDParams

    def score(self, ctx: SelectionContext) -> np.ndarray:
        """The variance alignment score of every pool image against the pool's own second
        moment (Wang et al. 2024, VAS-D's first step): ``VAS_i = f_i^T Sigma_0 f_i`` with
        ``Sigma_0 = 1/N sum_j f_j f_j^T`` over the whole pool, on L2-normalised image
        embeddings. Float64; higher means keep (the samples best aligned with the data's
        dominant directions).

        VAS-D itself is not the top ``budget`` of any fixed score: after each of ``steps``
        removals it recomputes ``Sigma`` over the samples still kept, and it ranks only the
        CLIP-score prefilter's survivors (``prefilter_ratio`` times the budget). Both
        depend on the budget, which a score may not, so this is the ranking of its first
        removal step with ``initial_sigma=pool`` (the default); with
        ``initial_sigma=prefiltered`` the first ``Sigma`` is over the budget-dependent
        prefiltered set, and the score still uses the whole pool's. :meth:`select` equals
        the top ``budget`` of this score only when ``steps=1`` and the prefilter keeps the
        whole pool."""
        image = np.asarray(ctx.embeddings(self.params.embedder).image, dtype=np.float32)
        return variance_alignment(image, second_moment(image))

    def select(self, ctx: SelectionContext) -> Selection:
        p = self.params
        found = ctx.embeddings(p.embedder)
        image = np.asarray(found.image, dtype=np.float32)
        candidates = _prefilter(ctx, p.prefilter_ratio, image, np.asarray(found.text))
        first = image if p.initial_sigma == "pool" else image[candidates]
        # With initial_sigma=pool, second_moment(first) is score()'s Sigma_0.
        chosen, scores = vas_d(image, candidates, ctx.budget_count, p.steps, second_moment(first))
        uids = list(ctx.pool.uids)
        return Selection(
            uids=[uids[i] for i in chosen],
            scores={u: float(s) for u, s in zip(uids, scores, strict=True)},
            metrics={"prefilter_kept": float(len(candidates))},
        )


@hookimpl
def register_strategies(register):
    register(Vas)
    register(VasD)
