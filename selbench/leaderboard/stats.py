"""The numbers on a page: per (setting, method, budget) each metric's mean and 95% CI over
seeds, paired differences from the baseline and between every two methods, how many pairs
differ beyond their interval, and Kendall's tau against a second configuration."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from selbench.errors import SelbenchError
from selbench.leaderboard.keys import (
    COST_METRICS,
    DEFAULT_BASELINE,
    DEFAULT_METRICS,
    GROUP_KEYS,
    SETTING_KEYS,
    TOTAL_FLOPS,
    setting_text,
)


@dataclass
class Comparison:
    """The rank agreement of this board's methods with another configuration's."""

    name: str  # how the page names the other configuration, e.g. "pool `synthweb-b`"
    table: pd.DataFrame  # rank_agreement()'s rows


@dataclass
class Leaderboard:
    """One row per (pool, scale, protocol, method, budget); see :mod:`selbench.leaderboard`."""

    table: pd.DataFrame
    metrics: tuple[str, ...]
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # the per-run frame used
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)  # pairwise(): method pairs
    comparison: Comparison | None = None
    baseline: str = DEFAULT_BASELINE  # the method label every row is paired with


def ci95(values: np.ndarray) -> float:
    """Half-width of the 95% Student-t confidence interval of the mean (NaN for n < 2)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def paired(mine: pd.Series, theirs: pd.Series) -> tuple[float, float, int]:
    """Mean and 95% CI half-width of ``mine - theirs`` over the seeds (index) both have,
    and how many such pairs there are."""
    common = mine.index.intersection(theirs.index)
    if not len(common):
        return float("nan"), float("nan"), 0
    diff = (mine[common] - theirs[common]).to_numpy(dtype=float)
    return float(diff.mean()), ci95(diff), len(common)


def separated(mean: float, half: float) -> int:
    """+1 or -1 when the 95% CI of a paired difference lies above or below zero, else 0
    (also when there is no interval: fewer than two pairs)."""
    if pd.isna(mean) or pd.isna(half) or abs(mean) <= half:
        return 0
    return 1 if mean > 0 else -1


def per_run_frame(runs: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    """One row per run: grouping keys, seed, run id and the metrics present."""
    columns = [f"params.{k}" for k in GROUP_KEYS]
    if runs.empty or any(c not in runs.columns for c in columns):
        return pd.DataFrame()
    runs = runs.dropna(subset=columns)
    present = [m for m in metrics if f"metrics.{m}" in runs.columns]
    frame = runs[columns + ["params.seed", "run_id"] + [f"metrics.{m}" for m in present]].copy()
    frame.columns = list(GROUP_KEYS) + ["seed", "run_id"] + present
    frame["budget"] = frame["budget"].astype(float)
    frame["seed"] = frame["seed"].astype(int)
    return frame


def _row(
    key: tuple, group: pd.DataFrame, base_runs: pd.DataFrame, metrics: tuple, baseline: str
) -> dict:
    """One table row: the runs of one (setting, method, budget), paired with the baseline's
    runs at the same setting, budget and seed."""
    row = dict(zip(GROUP_KEYS, key, strict=True))
    row["seeds"] = int(group["seed"].nunique())
    row["runs"] = len(group)
    row["reference"] = row["method_label"] == baseline and row["budget"] == 1.0
    same = base_runs
    for k in SETTING_KEYS + ("budget",):
        same = same[same[k] == row[k]]
    for metric in metrics:
        values = group[metric].astype(float).to_numpy()
        row[f"{metric}_mean"] = values.mean()
        row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else float("nan")
        row[f"{metric}_ci95"] = ci95(values)
        # paired with the baseline at the same budget and seed (one run per seed each)
        mean, half, pairs = float("nan"), float("nan"), 0
        if row["method_label"] != baseline:
            mine = group.groupby("seed")[metric].mean()
            mean, half, pairs = paired(mine, same.groupby("seed")[metric].mean())
        vs = f"{metric}_vs_{baseline}"
        row[f"{vs}_mean"] = mean
        row[f"{vs}_ci95"] = half
        row[f"{vs}_pairs"] = pairs
        row[f"{vs}_separated"] = separated(mean, half)
    for cost in COST_METRICS:
        row[f"{cost}_mean"] = group[cost].mean() if cost in group else float("nan")
    train = row["training_seconds_mean"]
    row["selection_share"] = row["selection_seconds_mean"] / train if train else float("nan")
    if TOTAL_FLOPS in group:  # the mean over the seeds that logged it
        row[f"{TOTAL_FLOPS}_mean"] = group[TOTAL_FLOPS].astype(float).mean()
    return row


def summarise(
    runs: pd.DataFrame,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    baseline: str = DEFAULT_BASELINE,
) -> Leaderboard:
    """Aggregate runs per :data:`GROUP_KEYS` (see :mod:`selbench.leaderboard`); every row
    is paired with the runs of method label ``baseline`` (columns
    ``<metric>_vs_<baseline>_...``)."""
    wanted = tuple(dict.fromkeys(metrics + COST_METRICS + (TOTAL_FLOPS,)))
    frame = per_run_frame(runs, wanted)
    if frame.empty:
        return Leaderboard(pd.DataFrame(), metrics, baseline=baseline)
    metrics = tuple(m for m in metrics if m in frame.columns)
    base_runs = frame[frame["method_label"] == baseline]
    rows = [
        _row(key, group, base_runs, metrics, baseline)
        for key, group in frame.groupby(list(GROUP_KEYS), sort=True)
    ]
    table = pd.DataFrame(rows).rename(columns={"method_label": "method"})
    flops = f"{TOTAL_FLOPS}_mean"
    if flops in table and table[flops].isna().all():  # the store has it, none of these runs
        table = table.drop(columns=flops)
    sort_metric = f"{metrics[0]}_mean" if metrics else "budget"
    table = table.sort_values(
        ["pool", "scale", "protocol", "budget", sort_metric],
        ascending=[True, True, True, True, False],
    ).reset_index(drop=True)
    return Leaderboard(table, metrics, frame, pairwise(frame, metrics), baseline=baseline)


def pairwise(frame: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    """Every two methods at the same setting and budget, per metric: the paired
    difference ``method_a - method_b`` over the seeds both have (mean, 95% CI, pairs)
    and whether that interval excludes zero (``separated``: +1 a ahead, -1 b ahead)."""
    rows = []
    if frame.empty:
        return pd.DataFrame()
    for key, group in frame.groupby(list(SETTING_KEYS) + ["budget"], sort=True):
        per_method = {
            method: runs.groupby("seed")[list(metrics)].mean()
            for method, runs in group.groupby("method_label", sort=True)
        }
        for a, b in itertools.combinations(sorted(per_method), 2):
            for metric in metrics:
                mean, half, pairs = paired(per_method[a][metric], per_method[b][metric])
                rows.append(
                    {
                        **dict(zip(SETTING_KEYS + ("budget",), key, strict=True)),
                        "metric": metric,
                        "method_a": a,
                        "method_b": b,
                        "difference_mean": mean,
                        "difference_ci95": half,
                        "pairs": pairs,
                        "separated": separated(mean, half),
                    }
                )
    return pd.DataFrame(rows)


def separation_counts(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per setting, budget and metric: how many method pairs there are, how many have at
    least two seeds in common (so an interval), and how many differ beyond it."""
    keys = list(SETTING_KEYS) + ["budget", "metric"]
    if pairs.empty:
        return pd.DataFrame(columns=[*keys, "method_pairs", "testable", "separated"])
    return (
        pairs.assign(testable=pairs["pairs"] >= 2, separated=pairs["separated"] != 0)
        .groupby(keys, sort=True)
        .agg(
            method_pairs=("method_a", "size"),
            testable=("testable", "sum"),
            separated=("separated", "sum"),
        )
        .reset_index()
    )


# --- comparing two configurations ---------------------------------------------------


def rank_agreement(board: Leaderboard, other: Leaderboard) -> pd.DataFrame:
    """Kendall's tau between two configurations' rankings of the methods, per budget and
    metric, over the methods both ran at that budget (the full-pool reference left out).

    ``scipy.stats.kendalltau`` (tau-b, which allows ties) on the methods' mean metric
    values; ``p_value`` is its test of tau = 0. Fewer than three methods in common rank
    nothing worth a number: tau is NaN there.
    """
    mine, theirs = _ranked(board, "this page"), _ranked(other, "the comparison")
    rows = []
    for budget in sorted(set(mine["budget"]) & set(theirs["budget"])):
        a = mine[mine["budget"] == budget].set_index("method")
        b = theirs[theirs["budget"] == budget].set_index("method")
        common = sorted(set(a.index) & set(b.index))
        for metric in board.metrics:
            column = f"{metric}_mean"
            tau, p_value = float("nan"), float("nan")
            if len(common) >= 3 and column in b.columns:
                result = stats.kendalltau(a.loc[common, column], b.loc[common, column])
                tau, p_value = float(result.statistic), float(result.pvalue)
            rows.append(
                {
                    "budget": budget,
                    "metric": metric,
                    "methods": len(common),
                    "tau": tau,
                    "p_value": p_value,
                    "only_here": ", ".join(sorted(set(a.index) - set(b.index))),
                    "only_there": ", ".join(sorted(set(b.index) - set(a.index))),
                }
            )
    return pd.DataFrame(rows)


def _ranked(board: Leaderboard, side: str) -> pd.DataFrame:
    table = board.table
    if table.empty:
        raise SelbenchError(f"{side} has no finished runs to rank")
    settings = table[list(SETTING_KEYS)].drop_duplicates()
    if len(settings) > 1:
        listed = "; ".join(setting_text(row) for _, row in settings.iterrows())
        raise SelbenchError(
            f"{side} mixes {len(settings)} settings ({listed}), so a method has several "
            "rankings; keep one with --where (e.g. --where pool=NAME)"
        )
    return table[~table["reference"]]


def compare(board: Leaderboard, other_runs: pd.DataFrame, name: str) -> Leaderboard:
    """``board`` with :func:`rank_agreement` against ``other_runs`` attached."""
    other = summarise(other_runs, board.metrics, board.baseline)
    board.comparison = Comparison(name, rank_agreement(board, other))
    return board
