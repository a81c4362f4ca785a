"""Uniform random selection: the baseline every selection method must beat."""

from __future__ import annotations

import numpy as np

from selbench import Selection, SelectionContext, Strategy, hookimpl


class RandomStrategy(Strategy):
    """Keep ``budget_count`` samples drawn uniformly without replacement.

    The reference point in every data-selection paper (e.g. TL;DR, Table 2a "random";
    DataComp's "no filtering" subsampled to the budget).
    """

    name = "random"
    summary = "Uniform random subset without replacement"
    reference = "Baseline in every selection paper, e.g. TL;DR (arXiv 2305.20087) Table 2a"
    stochastic = True

    def select(self, ctx: SelectionContext) -> Selection:
        chosen = ctx.rng.choice(len(ctx.pool), size=ctx.budget_count, replace=False)
        return Selection.from_positions(ctx, np.sort(chosen))


@hookimpl
def register_strategies(register):
    register(RandomStrategy)
