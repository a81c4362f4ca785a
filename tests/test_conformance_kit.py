"""selbench.testing.check_strategy: every built-in passes, broken strategies are caught."""

import pytest

import selbench
from selbench.registry import get_registry
from selbench.testing import check_strategy

# TL;DR's presets run the kit in tests/test_tldr.py with a one-epoch captioner (the
# default three epochs, 24 times over, would dominate the suite) and, for the release
# preset, with the seed check on the uniform rule: its evenly spaced rule only varies
# with the seed through k-means, which finds the same clusters on pools this small.
# dfn runs it in tests/test_dfn.py: it trains on a captioned target set, which the kit's
# memory target (images only) is not, and a two-epoch recipe keeps it short.
OWN_KIT_TEST = {"tldr", "tldr-release", "dfn"}


@pytest.mark.parametrize("name", sorted(set(get_registry().names()) - OWN_KIT_TEST))
def test_every_installed_strategy_passes_the_kit(name):
    check_strategy(get_registry().get(name).cls)


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
