"""Online selection against its controls, at equal learner steps and at equal total FLOPs
(issue 31; the figures docs/online.md quotes).

Reads the finished runs of an MLflow experiment (default ``online``, the sweep behind
``leaderboards/online.md``) and prints, per metric, paired by seed (95% Student-t CI):

1. **Equal learner steps.** Every online method against ``uniform`` at the same super-batch
   ratio, and against the full pool trained plainly (``random`` at budget 1, 1x): the same
   number of steps on batches of the same size; the online method also pays for scoring.
2. **Equal total FLOPs.** Every online run against the full pool's compute curve *of the
   same seed*: the full pool trained at several lengths (0.5x ... 4x) gives
   ``(flops/total, metric)`` points; the curve's metric at the online run's total FLOPs is
   read by linear interpolation in log FLOPs. A run beyond the curve's ends is reported
   as such, not extrapolated.

The sweep behind it, one seed at a time (resumable; ``SEED`` 0, 1, 2)::

    ONLINE='random >> online:uniform(ratio=2),random >> online:uniform,'\
    'random >> online:jest(ratio=2),random >> online:jest,random >> online:learnability,'\
    'random >> online:easy-reference,random >> online:hard-learner'
    selbench sweep --methods "$ONLINE" --budgets 1 --seeds $SEED --no-full-pool \
        --experiment online
    selbench sweep --methods random,clip_score --budgets 0.25 \
        --train-samples 0.5x,1x,2x --seeds $SEED --experiment online
    selbench sweep --methods random --budgets 1 --train-samples 4x --seeds $SEED \
        --no-full-pool --experiment online

Usage::

    SELBENCH_RUN_HOME=/path/to/runs python benchmarks/online_compare.py [--experiment online]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd

from selbench.leaderboard.load import load_runs
from selbench.leaderboard.stats import ci95
from selbench.run.spec import ONLINE_PREFIX, split_train_label

FULL_POOL = "random"


def runs_frame(experiment: str, metrics: list[str]) -> pd.DataFrame:
    """One row per finished run: base label, training length, budget, seed, FLOPs, metrics."""
    runs = load_runs(experiment)
    if "params.method_label" in runs.columns:  # a sweep's parent run is not a cell
        runs = runs[runs["params.method_label"].notna() & runs["params.seed"].notna()]
    if runs.empty:
        raise SystemExit(f"experiment {experiment!r} has no finished runs")
    frame = pd.DataFrame(
        {
            "label": runs["params.method_label"].astype(str),
            "budget": runs["params.budget"].astype(float),
            "seed": runs["params.seed"].astype(int),
            "flops": runs.get("metrics.flops/total", pd.Series(np.nan, index=runs.index)),
        }
    )
    parts = frame["label"].map(split_train_label)
    frame["base"] = parts.map(lambda p: p[0])
    frame["length"] = parts.map(lambda p: p[1])
    for metric in metrics:
        frame[metric] = runs.get(f"metrics.{metric}", pd.Series(np.nan, index=runs.index))
    return frame


def _paired_text(diff: pd.Series) -> str:
    values = diff.dropna().to_numpy(dtype=float)
    if not len(values):
        return "n/a"
    half = ci95(values)
    mark = ""
    if not math.isnan(half) and abs(values.mean()) > half:
        mark = " (beyond CI: " + ("better" if values.mean() > 0 else "worse") + ")"
    half_text = "n/a" if math.isnan(half) else f"{half:.3f}"
    return f"{values.mean():+.3f} ± {half_text} over {len(values)} seeds{mark}"


def _by_seed(frame: pd.DataFrame, base: str, length: float, metric: str) -> pd.Series:
    rows = frame[(frame["base"] == base) & (frame["length"] == length) & (frame["budget"] == 1)]
    return rows.set_index("seed")[metric]


def ratio_of(base: str) -> int:
    """The super-batch ratio an online label names (default 4)."""
    step = base.split(ONLINE_PREFIX, 1)[1]
    for part in step.rstrip(")").split("(", 1)[-1].split(","):
        key, _, value = part.partition("=")
        if key.strip() == "ratio":
            return int(value)
    return 4


def equal_steps(frame: pd.DataFrame, metric: str) -> None:
    print(f"\n## Equal learner steps (1x), {metric}: method - control, paired by seed")
    online = sorted(b for b in frame["base"].unique() if ONLINE_PREFIX in b)
    full = _by_seed(frame, FULL_POOL, 1.0, metric)
    for base in online:
        mine = _by_seed(frame, base, 1.0, metric)
        ratio = ratio_of(base)
        uniform = next((b for b in online if "online:uniform" in b and ratio_of(b) == ratio), None)
        line = f"- {base}: mean {mine.mean():.3f}; vs full pool {_paired_text(mine - full)}"
        if uniform is not None and uniform != base:
            control = _by_seed(frame, uniform, 1.0, metric)
            line += f"; vs {uniform} {_paired_text(mine - control)}"
        print(line)


def curve_at(points: pd.DataFrame, flops: float, metric: str) -> float:
    """The full pool's metric at ``flops`` (linear in log FLOPs between the two nearest
    training lengths); NaN outside the curve."""
    points = points.dropna(subset=["flops", metric]).sort_values("flops")
    x, y = np.log(points["flops"].to_numpy(float)), points[metric].to_numpy(float)
    if len(x) < 2 or not x[0] <= math.log(flops) <= x[-1]:
        return float("nan")
    return float(np.interp(math.log(flops), x, y))


def equal_flops(frame: pd.DataFrame, metric: str) -> None:
    print(f"\n## Equal total FLOPs, {metric}: method - full pool's curve at its FLOPs")
    full = frame[(frame["base"] == FULL_POOL) & (frame["budget"] == 1)]
    lengths = sorted(full["length"].unique())
    print(f"(full-pool curve: training lengths {', '.join(f'{t:g}x' for t in lengths)})")
    for base in sorted(frame["base"].unique()):
        rows = frame[(frame["base"] == base) & (frame["length"] == 1.0)]
        if ONLINE_PREFIX not in base or rows.empty:
            continue
        diffs, outside = {}, 0
        for _, row in rows.iterrows():
            curve = curve_at(full[full["seed"] == row["seed"]], row["flops"], metric)
            if math.isnan(curve):
                outside += 1
                continue
            diffs[row["seed"]] = row[metric] - curve
        ratio = rows["flops"].mean() / full[full["length"] == 1.0]["flops"].mean()
        note = f"; {outside} run(s) beyond the curve" if outside else ""
        print(f"- {base} ({ratio:.2f}x a 1x run's FLOPs): {_paired_text(pd.Series(diffs))}{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="online")
    parser.add_argument("--metric", action="append", default=None)
    args = parser.parse_args()
    metrics = args.metric or ["mean_R1", "zeroshot_acc1"]
    frame = runs_frame(args.experiment, metrics)
    seeds = sorted(int(s) for s in frame["seed"].unique())
    print(f"{len(frame)} finished runs of experiment {args.experiment!r}; seeds {seeds}")
    for metric in metrics:
        equal_steps(frame, metric)
        equal_flops(frame, metric)


if __name__ == "__main__":
    main()
