"""The clean-only oracle: a uniform sample of the pairs the pool's ground truth calls clean.

Not a selection method one could deploy: it reads SynthWeb's recorded pathology labels,
which no web pool has. It is the upper bound a noise filter is measured against: on a
pool whose only planted difference between samples is their noise, a filter can at best
keep what this keeps.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from selbench import Selection, SelectionContext, Strategy, hookimpl
from selbench.errors import ConfigError


class OracleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep: str = Field(
        default="clean",
        description="Pathology labels counted as good, comma-separated (SynthWeb's "
        "`pathology` field, docs/synthweb.md), e.g. clean,near_duplicate. Default: clean "
        "pairs only, the 'clean-only oracle' of issue 16.",
    )

    @field_validator("keep")
    @classmethod
    def _labels(cls, value: str) -> str:
        labels = [v.strip() for v in value.split(",") if v.strip()]
        if not labels:
            raise ValueError("names no pathology label; the default is 'clean'")
        return ",".join(labels)


class OracleStrategy(Strategy):
    """Keep ``budget_count`` pairs drawn uniformly among those whose ground-truth
    pathology is in ``keep`` (default: clean).

    When the budget asks for more pairs than the pool has good ones, every good pair is
    kept and the rest is drawn uniformly from the others; the number drawn that way is
    logged as ``strategy/filled`` (0 whenever the budget fits, e.g. budget <= 0.5 on the
    default SynthWeb, half of which is clean).

    The draw is the one ``random`` makes, restricted to the good pairs, so ``oracle``
    minus ``random`` at the same budget and seed is what removing exactly the planted
    noise is worth. Pools without ground truth (anything but SynthWeb) are refused.
    """

    name = "oracle"
    summary = "Upper bound, not a method: uniform sample of the ground-truth clean pairs"
    reference = (
        "Upper bound for noise filters (issue 16, point 3: 'a clean-only 25% oracle beats "
        "the full pool'); reads SynthWeb's ground truth, which web pools lack"
    )
    stochastic = True
    needs = frozenset({"ground_truth"})
    Params = OracleParams

    def select(self, ctx: SelectionContext) -> Selection:
        truth = ctx.ground_truth()
        uids = list(ctx.pool.uids)
        missing = [u for u in uids if u not in truth]
        if missing:
            raise ConfigError(
                f"oracle: {len(missing)} of {len(uids)} pool samples have no ground truth "
                f"(e.g. {missing[0]!r}); it needs a label for every pair"
            )
        wanted = set(self.params.keep.split(","))
        good = np.array([truth[u].get("pathology") in wanted for u in uids])
        if not good.any():
            labels = sorted({str(t.get("pathology")) for t in truth.values()})
            raise ConfigError(
                f"oracle: no pair of pool {ctx.pool.name!r} has a pathology in "
                f"keep={sorted(wanted)}; the pool's labels are {labels}"
            )
        good_idx = np.flatnonzero(good)
        if len(good_idx) >= ctx.budget_count:
            chosen = ctx.rng.choice(good_idx, size=ctx.budget_count, replace=False)
            filled = 0
        else:  # every good pair, then a uniform fill from the rest
            rest = np.flatnonzero(~good)
            filled = ctx.budget_count - len(good_idx)
            chosen = np.concatenate([good_idx, ctx.rng.choice(rest, size=filled, replace=False)])
        return Selection(
            uids=[uids[i] for i in sorted(chosen.tolist())],
            metrics={"filled": float(filled), "good_in_pool": float(len(good_idx))},
        )


@hookimpl
def register_strategies(register):
    register(OracleStrategy)
