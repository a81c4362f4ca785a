"""Scorers: the built-ins that rank or threshold a per-sample score expose it as
``score(ctx)`` (one finite number per sample, higher means keep), and where their
selection is the top of that score, ``select`` keeps exactly its top ``budget``; the
conformance kit's ``check_scores`` catches a broken scorer by name."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

import selbench
from selbench.registry import get_registry
from selbench.strategy import SelectionContext
from selbench.testing import (
    CHECKS,
    KitOptions,
    RecordingServices,
    check_scores,
    check_strategy,
    context_with_embeddings,
    make_memory_pool,
)
from selbench.toolbox import top_k

SCORERS = {
    "basic",
    "clip_score",
    "dfn",
    "image_based",
    "el2n",
    "knn_target",
    "negcliploss",
    "normsim",
    "prototypes",
    "semdedup",
    "tmars",
    "vas",
    "vas_d",
}
CHOOSERS = {"random", "tldr", "tldr-release", "distill", "oracle", "nds"}

# el2n with one short proxy run: seconds on a 40-sample pool (tests/test_el2n.py's FAST).
EL2N_FAST = {"runs": 1, "scoring_epochs": 0.5, "negatives": 15}
# Built-ins whose select, with these parameters, keeps exactly the top budget of score().
TOP_K = [
    ("clip_score", {}),
    ("negcliploss", {}),
    ("negcliploss", {"batch_size": 16}),  # several random partitions of the pool
    ("normsim", {"prefilter": "none"}),
    ("normsim", {"prefilter": "none", "norm": "2"}),
    ("knn_target", {"rule": "max_similarity"}),
    ("prototypes", {}),
    ("prototypes", {"keep": "easy"}),
    ("semdedup", {}),
    ("semdedup", {"keep": "closest"}),
    ("semdedup", {"keep": "random"}),
    ("tmars", {}),
    ("vas", {"prefilter_ratio": 1000.0}),  # the CLIP-score prefilter keeps the whole pool
    ("vas_d", {"prefilter_ratio": 1000.0, "steps": 1}),  # one step against the pool's Sigma
    ("el2n", EL2N_FAST),
    ("image_based", {}),
]
# Scorers whose select at these (default) parameters is not the top of the score: the
# score is still one finite number per sample.
NOT_TOP_K = [
    ("knn_target", {}),  # round robin over the targets
    ("normsim", {}),  # NormSim among a negCLIPLoss prefilter's survivors
    ("vas", {}),  # VAS among a CLIP-score prefilter's survivors
    ("vas_d", {}),  # Sigma re-estimated over 168 removal steps
    ("clip_score", {"mode": "threshold", "threshold": -1.0}),  # uniform among the passing
    ("basic", {}),  # uniform among the pairs that pass DataComp's rules
]


def strategy(name: str, params: dict | None = None) -> selbench.Strategy:
    return get_registry().get(name).cls(params or {})


def run(method: str, instance: selbench.Strategy, pool, budget: int, seed: int = 0):
    """``instance.<method>(ctx)`` in a fresh context (the kit's recording services), so
    a scorer that draws from ``ctx.rng`` sees the same stream in score and select."""
    with tempfile.TemporaryDirectory() as work:
        ctx = SelectionContext(
            pool=pool,
            budget_count=budget,
            budget_fraction=budget / len(pool),
            seed=seed,
            device="cpu",
            work_dir=Path(work),
            services=RecordingServices(pool),
        )
        return getattr(instance, method)(ctx)


def test_every_built_in_that_ranks_a_score_is_a_scorer_and_choosers_are_not():
    registry = {info.name: info.cls for info in get_registry().infos()}
    for name in SCORERS:
        assert registry[name].is_scorer(), name
    for name in CHOOSERS:
        assert not registry[name].is_scorer(), name
    # A rule is a strategy's own definition of what it keeps (DataComp's rules, the
    # target's clusters), not a threshold calibrated for another embedder.
    assert registry["basic"].has_rule() and registry["image_based"].has_rule()
    assert not registry["clip_score"].has_rule()
    assert not any(registry[name].has_rule() for name in CHOOSERS)


@pytest.mark.parametrize(
    "name, params",
    TOP_K,
    ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for n, p in TOP_K],
)
def test_select_keeps_the_top_budget_of_the_score(name, params):
    pool = make_memory_pool(40, seed=40)
    scores = run("score", strategy(name, params), pool, 4)
    assert isinstance(scores, np.ndarray) and scores.shape == (len(pool),)
    assert np.isfinite(scores).all()
    for budget in (1, 4, 13, 40):
        picked = run("select", strategy(name, params), pool, budget)
        best = {pool.uids[i] for i in top_k(scores, budget)}
        assert set(picked.uids) == best, (name, params, budget)


@pytest.mark.parametrize("name, params", NOT_TOP_K)
def test_scores_of_the_other_modes_are_one_finite_number_per_sample(name, params):
    pool = make_memory_pool(40, seed=40)
    scores = np.asarray(run("score", strategy(name, params), pool, 4), dtype=np.float64)
    assert scores.shape == (len(pool),) and np.isfinite(scores).all()
    # the score is the one select reports per sample, where select reports one
    reported = run("select", strategy(name, params), pool, 4).scores
    if name != "vas_d":  # VAS-D reports its last Sigma's scores, not the first
        assert np.allclose([reported[u] for u in pool.uids], scores)


def test_semdedup_top_k_equals_select_with_planted_duplicates_and_ties(tmp_path):
    """Exact duplicates (M rounds to 1 and ties), near duplicates and two clusters:
    every budget, the eps search and the trim or top-up end at the budget lowest M."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((150, 8)).astype(np.float32)
    copies = np.repeat(base[:30], 3, axis=0)  # 30 groups of exact duplicates
    near = base[30:60] + 1e-3 * rng.standard_normal((30, 8)).astype(np.float32)
    image = np.concatenate([base, copies, near])
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    semdedup = strategy("semdedup")
    scores = semdedup.score(context_with_embeddings(image, 1, tmp_path))
    assert scores.shape == (len(image),) and np.isfinite(scores).all()
    for budget in (1, 50, 149, 150, 151, 200, 239, 240, 241, 269, len(image)):
        picked = semdedup.select(context_with_embeddings(image, budget, tmp_path))
        expected = {f"u{i:04d}" for i in top_k(scores, budget)}
        assert set(picked.uids) == expected, budget
        assert picked.metrics["clusters_used"] == 2.0  # 270 // 100


def test_clip_score_threshold_mode_samples_among_the_pairs_above_it():
    pool = make_memory_pool(40, seed=40)
    scores = run("score", strategy("clip_score"), pool, 4)
    threshold = float(np.sort(scores)[-10])
    sampler = strategy("clip_score", {"mode": "threshold", "threshold": threshold})
    picked = run("select", sampler, pool, 5)
    assert set(picked.uids) <= {pool.uids[i] for i in np.flatnonzero(scores >= threshold)}


# -- the conformance kit's check_scores --------------------------------------------------


class FirstUids(selbench.Strategy):
    name = "first_uids"
    stochastic = False

    def select(self, ctx):
        return selbench.Selection(uids=list(ctx.pool.uids)[: ctx.budget_count])


class ReadsTheBudget(FirstUids):
    name = "reads_the_budget"

    def score(self, ctx):
        return -np.arange(len(ctx.pool), dtype=float) * ctx.budget_count


class Unseeded(FirstUids):
    name = "unseeded"

    def score(self, ctx):
        return np.random.default_rng().random(len(ctx.pool))


class OneShort(FirstUids):
    name = "one_short"

    def score(self, ctx):
        return np.zeros(len(ctx.pool) - 1)


class NotFinite(FirstUids):
    name = "not_finite"

    def score(self, ctx):
        values = np.zeros(len(ctx.pool))
        values[3] = np.nan
        return values


class BadRule(FirstUids):
    name = "bad_rule"

    def score(self, ctx):
        return np.zeros(len(ctx.pool))

    def passes(self, ctx):
        return np.ones(len(ctx.pool))  # floats, not booleans


class SneakyScorer(FirstUids):
    name = "sneaky_scorer"

    def score(self, ctx):
        return np.asarray(ctx.embeddings().image[:, 0], dtype=float)


class GoodScorer(FirstUids):
    name = "good_scorer"

    def score(self, ctx):
        return ctx.rng.random(len(ctx.pool))  # seeded: deterministic for a seed


@pytest.mark.parametrize(
    "cls, message",
    [
        (ReadsTheBudget, "depends on the budget"),
        (Unseeded, "not deterministic"),
        (OneShort, r"shape \(39,\)"),
        (NotFinite, "non-finite scores"),
        (BadRule, "rule mask"),
        (SneakyScorer, "without declaring it in `needs`"),
    ],
)
def test_a_broken_scorer_fails_check_scores_naming_it(cls, message):
    with pytest.raises(AssertionError, match=message) as info:
        check_scores(cls())
    assert cls.name in str(info.value)
    with pytest.raises(AssertionError, match=message):
        check_strategy(cls)


def test_with_one_budget_check_scores_still_compares_two_runs():
    with pytest.raises(AssertionError, match="unseeded: score.. is not deterministic"):
        check_scores(Unseeded(), KitOptions(budgets=(0.5,)))
    check_scores(ReadsTheBudget(), KitOptions(budgets=(0.5,)))  # cannot tell: one budget


def test_check_scores_is_a_kit_check_and_passes_good_scorers_and_choosers():
    assert check_scores in CHECKS
    check_strategy(GoodScorer)
    check_scores(FirstUids())  # not a scorer: nothing to check
    check_scores(strategy("clip_score"))  # a scorer with a rule


def test_a_declared_scores_failure_is_expected():
    class Declared(ReadsTheBudget):
        name = "declared"
        expected_check_failures = {"check_scores": "ranks by the budget on purpose"}

    check_strategy(Declared)
