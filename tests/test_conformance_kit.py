"""selbench.testing: every built-in passes the kit, one pytest item per check; broken
strategies are caught; expected failures are declared check by check."""

import pytest

import selbench
from selbench.registry import get_registry
from selbench.testing import CHECKS, check_strategy, parametrize_with_checks

# These run the kit in their own test modules with short-training parameters (a one-epoch
# captioner, a two-epoch filter, one EL2N run): their defaults train for minutes, dozens
# of times over. dfn also needs a captioned target set, which tests/test_dfn.py writes.
# distill trains experts and unrolls students: tests/test_distill.py, tiny parameters.
# sieve samples 8 captions of every pool image by default: tests/test_sieve.py runs the kit
# with 2 short captions (its defaults took about 4 minutes per check here).
FAST_KIT_ELSEWHERE = {"tldr", "tldr-release", "dfn", "el2n", "distill", "sieve"}


@parametrize_with_checks(
    [info.cls() for info in get_registry().infos() if info.name not in FAST_KIT_ELSEWHERE]
    + [get_registry().get("clip_score").cls({"mode": "threshold", "threshold": -1.0})]
    + [get_registry().get("semdedup").cls({"keep": "random"})]
)
def test_every_installed_strategy_passes_the_kit(strategy, check):
    check(strategy)


def test_one_item_per_check_with_its_own_id():
    mark = parametrize_with_checks([Duplicates])
    params = mark.args[1]
    assert [p.id.rsplit("-", 1)[1] for p in params] == [c.__name__ for c in CHECKS]


def test_stochastic_may_depend_on_parameters():
    clip_score = get_registry().get("clip_score").cls
    assert not clip_score().is_stochastic()
    assert clip_score({"mode": "threshold"}).is_stochastic()
    semdedup = get_registry().get("semdedup").cls
    assert not semdedup().is_stochastic()
    assert semdedup({"keep": "random"}).is_stochastic()


class Duplicates(selbench.Strategy):
    name = "dupes"

    def select(self, ctx):
        return selbench.Selection(uids=[ctx.pool.uids[0]] * ctx.budget_count)


class IgnoresSeed(selbench.Strategy):
    name = "ignores_seed"
    stochastic = True

    def select(self, ctx):
        return selbench.Selection(uids=list(ctx.pool.uids)[: ctx.budget_count])


class HiddenRandomness(selbench.Strategy):
    name = "hidden_randomness"
    stochastic = False

    def select(self, ctx):
        picks = ctx.rng.choice(len(ctx.pool), size=ctx.budget_count, replace=False)
        return selbench.Selection(uids=[ctx.pool.uids[i] for i in sorted(picks)])


class UndeclaredEmbeddings(selbench.Strategy):
    name = "sneaky"
    stochastic = False

    def select(self, ctx):
        ctx.embeddings()
        return selbench.Selection(uids=list(ctx.pool.uids)[: ctx.budget_count])


@pytest.mark.parametrize(
    "cls, message",
    [
        (Duplicates, "duplicate"),
        (IgnoresSeed, "declared stochastic, but no seed changed"),
        (HiddenRandomness, "not declared stochastic"),
        (UndeclaredEmbeddings, "without declaring it in `needs`"),
    ],
)
def test_broken_strategies_fail_with_a_message_naming_them(cls, message):
    with pytest.raises(AssertionError, match=message) as info:
        check_strategy(cls)
    assert cls.name in str(info.value)


class DeclaresIgnoringSeed(IgnoresSeed):
    name = "declares_ignoring_seed"
    expected_check_failures = {"check_seed": "reads only the pool order"}


@parametrize_with_checks([DeclaresIgnoringSeed])
def test_a_declared_expected_failure_is_an_xfail_item(strategy, check):
    check(strategy)


def test_expected_failures_are_strict():
    class Honest(DeclaresIgnoringSeed):
        name = "honest"
        stochastic = False  # now check_seed passes, so the declaration is stale

    with pytest.raises(AssertionError, match="check_seed was expected to fail"):
        check_strategy(Honest)
    mark = parametrize_with_checks([Honest])
    seed_case = next(p for p in mark.args[1] if p.id.endswith("check_seed"))
    assert seed_case.marks[0].kwargs == {"strict": True, "reason": "reads only the pool order"}


def test_expected_failures_must_name_a_check():
    class Typo(Duplicates):
        name = "typo"
        expected_check_failures = {"check_sead": "?"}

    with pytest.raises(AssertionError, match="unknown checks"):
        check_strategy(Typo)


def test_parameters_without_description_are_reported():
    from pydantic import BaseModel, ConfigDict

    class P(BaseModel):
        model_config = ConfigDict(extra="forbid")
        k: int = 3

    class NoDocs(selbench.Strategy):
        name = "nodocs"
        stochastic = False
        Params = P

        def select(self, ctx):
            return selbench.Selection(uids=list(ctx.pool.uids)[: ctx.budget_count])

    with pytest.raises(AssertionError, match="'k' has no description"):
        check_strategy(NoDocs)
