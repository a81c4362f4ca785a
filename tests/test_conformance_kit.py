"""selbench.testing.check_strategy: every built-in passes, broken strategies are caught."""

import pytest

import selbench
from selbench.registry import get_registry
from selbench.testing import check_strategy


@pytest.mark.parametrize("name", get_registry().names())
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
