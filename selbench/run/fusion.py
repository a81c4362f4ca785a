"""How pipelines combine per-sample scores: ``&``, ``|`` and ``fuse`` (``docs/pipelines.md``).

Every operator works on the scores of its operands over one view (one float per sample,
higher means keep) and each operand's *members*: its top fraction (``keep=``), or the
samples its own rule keeps, or its top budget. Ties always go to the earlier pool
position (:func:`selbench.toolbox.rank`), so every result reproduces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from selbench.toolbox import rank


def percentiles(scores: np.ndarray) -> np.ndarray:
    """Each sample's rank as a fraction in ``(0, 1]``: 1 for the best score, ``1/n`` for
    the worst; ties by pool position (the earlier ranks higher)."""
    n = len(scores)
    order = rank(np.asarray(scores, dtype=np.float64))
    result = np.empty(n, dtype=np.float64)
    result[order] = (n - np.arange(n)) / max(n, 1)
    return result


def top_members(scores: np.ndarray, count: int) -> np.ndarray:
    """A mask of the ``count`` best samples."""
    mask = np.zeros(len(scores), dtype=bool)
    mask[rank(np.asarray(scores, dtype=np.float64))[:count]] = True
    return mask


def combine(op: str, scores: Sequence[np.ndarray], members: Sequence[np.ndarray]) -> np.ndarray:
    """The score of ``A & B & ...`` (``op="&"``) or ``A | B | ...`` (``op="|"``).

    ``&``: ``1[member of every operand] + min_i percentile_i``; ``|``: ``1[member of any
    operand] + max_i percentile_i``. The top ``k`` of this score is the intersection (the
    union) of the operands' members when it holds ``k`` samples or more, and otherwise all
    of it, filled with the samples whose worst (best) operand rank is highest: the
    definition in ``docs/pipelines.md``, as one score so that it nests."""
    ranks = np.stack([percentiles(s) for s in scores])
    inside = np.stack(members)
    if op == "&":
        return inside.all(axis=0) + ranks.min(axis=0)
    if op == "|":
        return inside.any(axis=0) + ranks.max(axis=0)
    raise ValueError(f"unknown operator {op!r}")


def zscores(scores: np.ndarray) -> np.ndarray:
    """``(s - mean) / std``; all zeros when every score is the same."""
    scores = np.asarray(scores, dtype=np.float64)
    spread = scores.std()
    return (scores - scores.mean()) / spread if spread > 0 else np.zeros_like(scores)


def weighted(how: str, scores: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``fuse(how=rank|zscore)``: ``sum_i w_i t(s_i) / sum_i w_i`` with ``t`` the percentile
    (``rank``, as reciprocal-rank-style fusions do) or the z-score (``zscore``)."""
    transform = percentiles if how == "rank" else zscores
    total = sum(w * transform(s) for w, s in zip(weights, scores, strict=True))
    return np.asarray(total, dtype=np.float64) / float(sum(weights))


@dataclass(frozen=True)
class LabelModel:
    """A fitted one-coin Dawid-Skene model of binary votes (keep or not)."""

    accuracy: np.ndarray  # per voter, P(vote == true label)
    prior: float  # P(true label == keep)
    log_odds: np.ndarray  # per sample, log P(keep | votes) / P(drop | votes)
    iterations: int

    @property
    def weights(self) -> np.ndarray:
        """The weight of each voter in the posterior log-odds, ``log(a / (1 - a))``."""
        return np.log(self.accuracy / (1.0 - self.accuracy))


def fit_label_model(
    votes: np.ndarray, prior: float | None = None, iterations: int = 100, tol: float = 1e-8
) -> LabelModel:
    """Fit a one-coin Dawid-Skene model (Dawid and Skene, 1979) to ``votes`` (samples x
    voters, True = keep) by EM, starting from the majority vote. ``prior``, the share of
    samples whose true label is keep, is fitted too unless given; a pipeline gives it (the
    fraction it keeps), which also rules out the degenerate fit in which every sample is
    a drop and the voters that say keep most are the least accurate.

    Each voter ``i`` is right with probability ``a_i`` whatever the true label; votes are
    independent given the label. The posterior log-odds of keeping a sample is
    ``logit(prior) + sum_i (2 v_i - 1) logit(a_i)``: a weighted vote whose weights are
    learned from how the voters agree, with no labels. This is the weak-supervision step
    EcoDatum uses to fuse its operators (Snorkel's label model is of this family); written
    here because the model is twenty lines and Snorkel would pin half the stack.
    """
    v = np.asarray(votes, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] < 2:
        raise ValueError("a label model needs a matrix of votes from at least two voters")
    posterior = v.mean(axis=1)  # the majority vote's share, to start
    eps = 1e-4
    accuracy = np.full(v.shape[1], 0.5)
    fixed = prior is not None
    share = float(np.clip(prior, eps, 1 - eps)) if prior is not None else 0.5
    done = 0
    for step in range(1, iterations + 1):
        done = step
        new_accuracy = (posterior[:, None] * v + (1 - posterior[:, None]) * (1 - v)).mean(axis=0)
        new_accuracy = np.clip(new_accuracy, eps, 1 - eps)
        if not fixed:
            share = float(np.clip(posterior.mean(), eps, 1 - eps))
        logit = np.log(new_accuracy / (1 - new_accuracy))
        log_odds = np.log(share / (1 - share)) + (2 * v - 1) @ logit
        posterior = 1.0 / (1.0 + np.exp(-log_odds))
        converged = np.abs(new_accuracy - accuracy).max() < tol
        accuracy = new_accuracy
        if converged:
            break
    logit = np.log(accuracy / (1 - accuracy))
    log_odds = np.log(share / (1 - share)) + (2 * v - 1) @ logit
    return LabelModel(accuracy=accuracy, prior=share, log_odds=log_odds, iterations=done)


def fitted(
    scores: Sequence[np.ndarray], members: Sequence[np.ndarray], share: float
) -> tuple[np.ndarray, LabelModel]:
    """``fuse(how=fit)``: order by the label model's posterior over the operands' votes
    (their members), with the prior fixed at ``share`` (the fraction the fuse keeps), ties
    (samples with the same votes) by the mean percentile; returned as the percentile of
    that order, so that it nests like any score."""
    model = fit_label_model(np.stack(members, axis=1), prior=share)
    mean_rank = np.mean([percentiles(s) for s in scores], axis=0)
    positions = np.arange(len(mean_rank))
    order = np.lexsort((positions, -mean_rank, -np.round(model.log_odds, 9)))
    n = len(order)
    result = np.empty(n, dtype=np.float64)
    result[order] = (n - np.arange(n)) / max(n, 1)
    return result, model
