"""Leaderboards built from MLflow runs.

Per (pool, scale, protocol) and method x budget: each metric's mean over seeds with a
95% confidence interval (Student's t over seeds), the paired difference from the baseline
method (``baseline``, default ``random``) at the same budget and seed (mean and 95% CI of
the per-seed differences), and the selection cost (seconds, and as a share of training
time). The full pool (the baseline at budget 1.0) is the reference row of every budget's
table.

Per budget, every two methods are compared the same paired way (:func:`pairwise`); the
page counts the pairs whose 95% CI excludes zero, i.e. how far the leaderboard separates
methods at all. Given a second configuration (another pool or experiment), the page
also reports how stable the ranking is: Kendall's tau between the two rankings of the
methods at each budget (:func:`rank_agreement`).

Output: rich tables, markdown, CSV, and a self-contained HTML page (sortable tables, the
plots of :mod:`selbench.plots` inlined).
"""

from __future__ import annotations

import base64
import html
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table
from scipy import stats

from selbench import tracking
from selbench.errors import SelbenchError
from selbench.fileutil import atomic_write_text

GROUP_KEYS = ("pool", "pool_fingerprint", "scale", "protocol", "method_label", "budget")
SETTING_KEYS = ("pool", "pool_fingerprint", "scale", "protocol")
DEFAULT_METRICS = ("mean_R1", "zeroshot_acc1")
COST_METRICS = ("selection_seconds", "training_seconds")
DEFAULT_BASELINE = "random"
# How the page names the metrics it knows; any other metric keeps its MLflow name.
METRIC_NAMES = {
    "mean_R1": "R@1",
    "zeroshot_acc1": "zero-shot top-1",
    "datacomp/imagenet": "ImageNet",
    "datacomp/imagenet_dist_shifts": "ImageNet dist. shifts",
    "datacomp/vtab": "VTAB",
    "datacomp/retrieval": "retrieval",
    "datacomp/average": "average (38)",
    "reasoning-probe/acc": "reasoning probe",
    "nlvr2-probe/acc": "NLVR2 probe",
    "captioning/bleu4": "BLEU@4",
    "captioning/cider": "CIDEr",
    "mscoco-captioning/bleu4": "COCO BLEU@4",
    "mscoco-captioning/cider": "COCO CIDEr",
}


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


@dataclass
class Comparison:
    """The rank agreement of this board's methods with another configuration's."""

    name: str  # how the page names the other configuration, e.g. "pool `synthweb-b`"
    table: pd.DataFrame  # rank_agreement()'s rows


@dataclass
class Leaderboard:
    """One row per (pool, scale, protocol, method, budget); see the module docstring."""

    table: pd.DataFrame
    metrics: tuple[str, ...]
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # the per-run frame used
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)  # pairwise(): method pairs
    comparison: Comparison | None = None
    baseline: str = DEFAULT_BASELINE  # the method label every row is paired with


def load_runs(
    experiment: str = tracking.DEFAULT_EXPERIMENT, where: dict[str, str] | None = None
) -> pd.DataFrame:
    """Finished selbench runs of ``experiment`` as MLflow's ``search_runs`` frame,
    optionally filtered by lineage: ``where={"git_commit": "abc123"}`` keeps runs whose
    param or ``selbench.*`` tag of that name equals the value."""
    import mlflow

    tracking.setup(experiment)
    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string="attributes.status = 'FINISHED'",
        output_format="pandas",
    )
    return mark_synthesized(split_mixed_parameters(filter_runs(runs, where or {})))


def default_metrics(runs: pd.DataFrame) -> tuple[str, ...]:
    """The columns a page shows when none are asked for: :data:`DEFAULT_METRICS`, the
    reasoning probes' accuracies the runs logged (``*-probe/acc``), captioning's
    ``*/bleu4`` and ``*/cider`` where runs logged them, then the ``summary``
    metrics of every evaluation suite the runs used (``params.eval_suite``;
    ``configs/evals/NAME.yaml``). A suite whose config is not on this machine adds nothing
    (its runs may come from elsewhere); its metrics can still be named with ``--metric``."""
    from selbench.configs import EvalSuiteConfig, find_config, load_yaml_model
    from selbench.errors import ConfigError

    metrics = list(DEFAULT_METRICS)
    # The reasoning probe's accuracy wherever runs logged one (SynthWeb's reasoning set).
    metrics += sorted(
        c.removeprefix("metrics.")
        for c in runs.columns
        if c.startswith("metrics.") and c.endswith("-probe/acc") and runs[c].notna().any()
    )
    # Captioning's BLEU@4 and CIDEr wherever runs logged them (CoCa scales).
    metrics += sorted(
        c.removeprefix("metrics.")
        for c in runs.columns
        if c.startswith("metrics.")
        and c.endswith(("/bleu4", "/cider"))
        and runs[c].notna().any()
        and c.removeprefix("metrics.") not in metrics
    )
    column = "params.eval_suite"
    suites = sorted(set(runs[column].dropna())) if column in runs.columns else []
    for suite in suites:
        if suite == "pool":  # the pool's own eval sets: no suite config
            continue
        try:
            config = load_yaml_model(find_config("evals", suite), EvalSuiteConfig)
        except ConfigError:
            continue
        metrics += [m for m in config.summary if m not in metrics]
    return tuple(metrics)


def export_commands(board: Leaderboard) -> dict[tuple, list[tuple[int, str]]]:
    """Per leaderboard row (its :data:`GROUP_KEYS` values, with ``method`` for
    ``method_label``), the command that exports each seed's subset, in seed order."""
    from selbench.export import export_command

    out: dict[tuple, list[tuple[int, str]]] = {}
    if board.runs.empty:
        return out
    for key, group in board.runs.groupby(list(GROUP_KEYS), sort=True):
        ordered = group.sort_values(["seed", "run_id"])
        out[key] = [(int(r.seed), export_command(r.run_id)) for r in ordered.itertuples()]
    return out


def _row_key(row: pd.Series) -> tuple:
    return tuple(row["method" if k == "method_label" else k] for k in GROUP_KEYS)


def export_lines(board: Leaderboard) -> list[str]:
    """One markdown line per row: its label and budget, then each seed's export command."""
    commands = export_commands(board)
    lines = []
    for _, row in board.table.iterrows():
        runs = commands.get(_row_key(row), [])
        if not runs:
            continue
        listed = ", ".join(f"`{cmd}` (seed {seed})" for seed, cmd in runs)
        lines.append(f"- {row['method']} at budget {row['budget']:g}: {listed}")
    return lines


# --- method labels ------------------------------------------------------------------

_LABEL = re.compile(r"^(?P<name>[^()]+?)\s*(?:\((?P<params>.*)\))?$")
_NEXT_PARAMETER = re.compile(r",\s*(?=[A-Za-z_][A-Za-z0-9_.]*=)")
UNSET = "unset"  # a parameter the run did not log (its version did not have it)


def label_parts(label: str) -> tuple[str, dict[str, str]]:
    """A run's label, ``name(k=v,k2=v2)`` as :func:`selbench.runner.method_label` writes
    it, as ``(name, {k: v, k2: v2})``."""
    match = _LABEL.match(label)
    if match is None or not match["params"]:
        return label, {}
    parts = [p.partition("=") for p in _NEXT_PARAMETER.split(match["params"])]
    return match["name"], {key.strip(): value for key, _, value in parts}


def _readable_value(value: str) -> str:
    """``10.0`` -> ``10``; anything else as logged."""
    try:
        number = float(value)
    except ValueError:
        return value
    if "." in value and "e" not in value.lower() and number.is_integer():
        return str(int(number))
    return value


def readable_label(name: str, params: dict[str, str]) -> str:
    """``tldr (captioner_epochs=10, refine=False)``: the method name and the parameters
    that tell its rows apart; a parameter the run never logged reads ``k not logged``."""
    if not params:
        return name
    parts = [
        f"{k} not logged" if v == UNSET else f"{k}={_readable_value(v)}"
        for k, v in sorted(params.items())
    ]
    return f"{name} (" + ", ".join(parts) + ")"


def _fewest_separating(values: pd.DataFrame) -> list[str]:
    """The fewest columns of ``values`` whose values still tell every distinct row apart,
    preferring columns every run logged, then by name."""
    distinct = len(values.drop_duplicates())
    order = sorted(values.columns, key=lambda c: ((values[c] == UNSET).any(), c))
    for size in range(1, len(order) + 1):
        for columns in itertools.combinations(order, size):
            if len(values[list(columns)].drop_duplicates()) == distinct:
                return list(columns)
    return order  # not reached: all columns together separate the distinct rows


def split_mixed_parameters(runs: pd.DataFrame) -> pd.DataFrame:
    """Give every run a readable method label that no other configuration shares.

    A run's label names only the parameters that differ from the defaults *of its own
    version*, ``tldr(refine=False)``; it reads ``tldr (refine=False)`` here. When a
    default changes (``tldr-release``'s ``match_embedder`` did), runs from before and
    after carry the same label without sharing a configuration, and would be averaged
    as one method. Every run logs all its parameters (``param.*``), so where the runs of
    one label differ, the label gains the fewest of the differing parameters that tell
    them apart, ``tldr-release (match_embedder=proxy)`` and ``tldr-release
    (match_embedder=proxy:scorer)``. A parameter a run did not log (added later) is
    ``unset`` and reads ``k not logged``; a parameter every run logged is preferred.
    """
    label_column = "params.method_label"
    if runs.empty or label_column not in runs.columns:
        return runs
    runs = runs.copy()
    columns = sorted(c for c in runs.columns if c.startswith("params.param."))
    has_label = runs[label_column].notna()
    parsed = {
        index: label_parts(str(label)) for index, label in runs.loc[has_label, label_column].items()
    }
    labels = pd.Series(
        {index: readable_label(name, params) for index, (name, params) in parsed.items()},
        dtype=object,
    )
    if columns:
        logged = runs[columns].astype(object).where(runs[columns].notna(), UNSET).astype(str)
        for _label, group in logged[has_label].groupby(labels):
            varying = group.loc[:, group.nunique() > 1]
            if varying.empty:
                continue
            varying = varying.rename(columns=lambda c: c.removeprefix("params.param."))
            chosen = _fewest_separating(varying)
            for index, row in varying.iterrows():
                name, params = parsed[index]
                labels[index] = readable_label(name, {**{k: row[k] for k in chosen}, **params})
    runs.loc[labels.index, label_column] = labels
    return runs


SYNTHESIZED_MARK = " [synthesized]"


def mark_synthesized(runs: pd.DataFrame) -> pd.DataFrame:
    """Label the runs that trained on pairs a strategy synthesized (their ``synthesized``
    param is true: dataset distillation) ``<label> [synthesized]``, so a table never shows
    them as a subset of the pool."""
    label_column, flag_column = "params.method_label", "params.synthesized"
    if runs.empty or label_column not in runs.columns or flag_column not in runs.columns:
        return runs
    runs = runs.copy()
    made = runs[flag_column].astype(str).str.lower().eq("true") & runs[label_column].notna()
    runs.loc[made, label_column] = runs.loc[made, label_column].astype(str) + SYNTHESIZED_MARK
    return runs


def filter_runs(runs: pd.DataFrame, where: dict[str, str]) -> pd.DataFrame:
    for key, value in where.items():
        candidates = [f"params.{key}", f"tags.selbench.{key}", f"tags.{key}"]
        column = next((c for c in candidates if c in runs.columns), None)
        if column is None:
            return runs.iloc[0:0]
        runs = runs[runs[column].astype(str) == str(value)]
    return runs


# --- statistics ---------------------------------------------------------------------


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


def summarise(
    runs: pd.DataFrame,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    baseline: str = DEFAULT_BASELINE,
) -> Leaderboard:
    """Aggregate runs per :data:`GROUP_KEYS` (module docstring); every row is paired with
    the runs of method label ``baseline`` (columns ``<metric>_vs_<baseline>_...``)."""
    wanted = tuple(dict.fromkeys(metrics + COST_METRICS))
    frame = per_run_frame(runs, wanted)
    if frame.empty:
        return Leaderboard(pd.DataFrame(), metrics, baseline=baseline)
    metrics = tuple(m for m in metrics if m in frame.columns)
    base_runs = frame[frame["method_label"] == baseline]
    rows = []
    for key, group in frame.groupby(list(GROUP_KEYS), sort=True):
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
        rows.append(row)
    table = pd.DataFrame(rows).rename(columns={"method_label": "method"})
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
        listed = "; ".join(_setting_text(row) for _, row in settings.iterrows())
        raise SelbenchError(
            f"{side} mixes {len(settings)} settings ({listed}), so a method has several "
            "rankings; keep one with --where (e.g. --where pool=NAME)"
        )
    return table[~table["reference"]]


def experiment_exists(name: str) -> bool:
    """Whether the MLflow store has an experiment called ``name`` (creates nothing)."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    return mlflow.get_experiment_by_name(name) is not None


def comparison_runs(
    target: str, experiment: str, where: dict[str, str], runs: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Resolve ``--compare-with TARGET``: ``experiment:NAME`` (the finished runs of that
    MLflow experiment), ``pool:NAME`` (this experiment's runs on that pool; the page
    keeps its other pools), or a bare NAME, which is an experiment if one exists and
    otherwise a pool. The ``where`` filters apply to the comparison too, except ``pool``.
    Returns this page's runs, the comparison's runs and how the page names it."""
    kind, name = "", target
    prefix, sep, rest = target.partition(":")
    if sep and prefix in ("experiment", "pool"):
        kind, name = prefix, rest
    if not name:
        raise SelbenchError(f"--compare-with {target!r} names nothing")
    # The comparison is another configuration: its pool may differ, other filters hold.
    where = {k: v for k, v in where.items() if k != "pool"}
    if kind in ("", "experiment") and name != experiment and experiment_exists(name):
        other = load_runs(name, where)
        if other.empty:
            raise SelbenchError(
                f"MLflow experiment {name!r} has no finished runs"
                + (f" matching {where}" if where else "")
            )
        return runs, other, f"experiment `{name}`"
    if kind == "experiment":
        raise SelbenchError(
            f"--compare-with {target!r}: no other MLflow experiment called {name!r} in "
            f"{tracking.tracking_uri()}"
        )
    everything = load_runs(experiment, where)
    on_pool = everything.get("params.pool", pd.Series(dtype=object)) == name
    other = everything[on_pool]
    if other.empty:
        pools = _unique(everything, "params.pool")
        raise SelbenchError(
            f"--compare-with {target!r}: no MLflow experiment of that name, and no finished "
            f"runs on a pool of that name in experiment {experiment!r} (its pools: "
            f"{', '.join(pools) or 'none'})"
        )
    mine = runs[runs.get("params.pool", pd.Series(dtype=object)) != name]
    return mine, other, f"pool `{name}`"


def compare(board: Leaderboard, other_runs: pd.DataFrame, name: str) -> Leaderboard:
    """``board`` with :func:`rank_agreement` against ``other_runs`` attached."""
    other = summarise(other_runs, board.metrics, board.baseline)
    board.comparison = Comparison(name, rank_agreement(board, other))
    return board


# --- rendering ----------------------------------------------------------------------


def _setting_text(row: pd.Series, markdown: bool = False) -> str:
    tick = "`" if markdown else ""
    return (
        f"pool {tick}{row['pool']}{tick} (fingerprint {tick}{str(row['pool_fingerprint'])[:12]}"
        f"{tick}), scale {tick}{row['scale']}{tick}, protocol {tick}{row['protocol']}{tick}"
    )


def _fmt(mean: float, half: float) -> str:
    if pd.isna(mean):
        return "—"
    return f"{mean:.3f}" if pd.isna(half) else f"{mean:.3f} ± {half:.3f}"


MARKS = {1: "▲", -1: "▼", 0: ""}


@dataclass
class Cell:
    text: str
    sort: float | str | None = None  # what the HTML table sorts by (None: last)
    mark: int = 0  # +1 / -1: a paired difference whose 95% CI excludes zero


def columns(board: Leaderboard) -> list[str]:
    """The headers of a budget table; ``seeds`` only when rows differ in it (otherwise
    the header above the tables states it once)."""
    out = ["method"] + (["seeds"] if board.table["seeds"].nunique() > 1 else [])
    for m in board.metrics:
        out += [
            f"{metric_name(m)} (mean ± 95% CI)",
            f"{metric_name(m)} vs {board.baseline} (paired)",
        ]
    return out + ["selection s", "selection / training"]


def cells(board: Leaderboard, row: pd.Series, with_seeds: bool) -> list[Cell]:
    """One row as display cells: the method, per metric mean ± 95% CI and the paired
    difference from the baseline (marked when it clears its interval), then the cost."""
    reference = f"full pool ({board.baseline}, budget 1)"
    method = reference if row.get("reference", False) else row["method"]
    out = [Cell(str(method), str(method))]
    if with_seeds:
        out.append(Cell(str(row["seeds"]), float(row["seeds"])))
    for m in board.metrics:
        mean = row[f"{m}_mean"]
        out.append(Cell(_fmt(mean, row[f"{m}_ci95"]), None if pd.isna(mean) else mean))
        vs = f"{m}_vs_{board.baseline}"
        delta = row.get(f"{vs}_mean", float("nan"))
        half = row.get(f"{vs}_ci95", float("nan"))
        mark = int(row.get(f"{vs}_separated", 0) or 0)
        if pd.isna(delta):
            out.append(Cell("—"))
        else:
            text = f"{delta:+.3f}" + ("" if pd.isna(half) else f" ± {half:.3f}")
            out.append(Cell(f"{MARKS[mark]} {text}".strip(), delta, mark))
    seconds, share = row.get("selection_seconds_mean"), row.get("selection_share")
    out.append(
        Cell("—" if pd.isna(seconds) else f"{seconds:.1f}", None if pd.isna(seconds) else seconds)
    )
    out.append(
        Cell("—" if pd.isna(share) else f"{100 * share:.0f}%", None if pd.isna(share) else share)
    )
    return out


@dataclass
class Section:
    """One budget's table of one setting, with its separation counts."""

    setting: pd.Series  # the SETTING_KEYS values
    budget: float
    rows: pd.DataFrame  # methods at this budget, best first, then the reference row(s)
    counts: pd.DataFrame  # separation_counts() rows of this setting and budget

    @property
    def heading(self) -> str:
        if self.budget == 1.0 and self.rows["reference"].all():
            return "Full pool"
        return f"Budget {self.budget:g} ({100 * self.budget:g}% of the pool)"


def sections(board: Leaderboard) -> list[tuple[pd.Series, list[Section]]]:
    """The board as one list of budget tables per setting (pool, scale, protocol). The
    full pool is the last row of every budget's table, and has a table of its own only
    when no other budget does."""
    table, out = board.table, []
    counts = separation_counts(board.pairs)
    for _, setting in table[list(SETTING_KEYS)].drop_duplicates().iterrows():
        mine = table[(table[list(SETTING_KEYS)] == setting).all(axis=1)]
        reference = mine[mine["reference"]]
        here = (
            counts[(counts[list(SETTING_KEYS)] == setting).all(axis=1)] if len(counts) else counts
        )
        budgets = sorted(mine.loc[~mine["reference"], "budget"].unique())
        parts = []
        for budget in budgets or [1.0]:
            rows = mine[(mine["budget"] == budget) & ~mine["reference"]]
            rows = pd.concat([rows, reference]) if len(rows) else reference
            parts.append(Section(setting, budget, rows, here[here["budget"] == budget]))
        out.append((setting, parts))
    return out


def shared_settings(board: Leaderboard, markdown: bool = True) -> str:
    """The settings every row shares, for the page's header."""
    table = board.table
    settings = table[list(SETTING_KEYS)].drop_duplicates()
    parts = []
    if len(settings) == 1:
        parts.append(_setting_text(settings.iloc[0], markdown))
    if table["seeds"].nunique() == 1:
        seeds = sorted(board.runs["seed"].unique()) if not board.runs.empty else []
        parts.append(
            f"{table['seeds'].iloc[0]} seeds per row"
            + (f" ({', '.join(map(str, seeds))})" if seeds else "")
        )
    return ("Every row: " + "; ".join(parts) + ".") if parts else ""


def separation_text(section: Section) -> str:
    """``R@1: 12 of 36 method pairs differ beyond their paired 95% CI; ...``"""
    counts = section.counts
    if counts.empty:
        return ""
    parts = []
    for _, c in counts.iterrows():
        untested = c["method_pairs"] - c["testable"]
        parts.append(
            f"{metric_name(c['metric'])} {c['separated']} of {c['method_pairs']}"
            + (f" ({untested} with fewer than 2 shared seeds)" if untested else "")
        )
    return "Method pairs that differ beyond their paired 95% CI: " + "; ".join(parts) + "."


def comparison_lines(board: Leaderboard) -> tuple[str, list[str], list[list[str]]]:
    """The rank-agreement section as (sentence, headers, rows)."""
    comparison = board.comparison
    assert comparison is not None
    sentence = (
        f"Kendall's τ between the methods' ranking on this page and on {comparison.name}, per "
        "budget, over the methods both ran (scipy.stats.kendalltau, τ-b; p: its test of "
        "τ = 0). τ = 1: the same order; 0: unrelated; −1: reversed."
    )
    header = (
        ["budget", "methods in both"]
        + [f"τ {metric_name(m)} (p)" for m in board.metrics]
        + ["only here", "only there"]
    )
    rows = []
    table = comparison.table
    for budget in sorted(table["budget"].unique()) if not table.empty else []:
        part = table[table["budget"] == budget]
        row = [f"{budget:g}", str(int(part["methods"].iloc[0]))]
        for m in board.metrics:
            found = part[part["metric"] == m]
            tau, p = (
                (found["tau"].iloc[0], found["p_value"].iloc[0]) if len(found) else (np.nan,) * 2
            )
            row.append("—" if pd.isna(tau) else f"{tau:+.2f} (p {p:.2f})")
        row += [part["only_here"].iloc[0] or "—", part["only_there"].iloc[0] or "—"]
        rows.append(row)
    return sentence, header, rows


def rich_tables(board: Leaderboard, title: str = "selbench leaderboard") -> list:
    """The terminal view: a line of the settings every row shares, then one table per
    setting and budget, with the separation counts as its caption; paired differences
    that clear their interval are green (ahead of the baseline) or red (behind)."""
    from rich.text import Text

    out: list = [Text(title, style="bold")]
    shared = shared_settings(board, markdown=False)
    if shared:
        out.append(Text(shared))
    several = len(sections(board)) > 1
    for setting, parts in sections(board):
        for section in parts:
            heading = section.heading + (f" — {_setting_text(setting)}" if several else "")
            header = columns(board)
            table = Table(title=heading, caption=separation_text(section) or None)
            for column in header:
                table.add_column(column, justify="left" if column == "method" else "right")
            for _, row in section.rows.iterrows():
                styles = {1: "green", -1: "red", 0: ""}
                table.add_row(
                    *(
                        Text(c.text, style=styles[c.mark])
                        for c in cells(board, row, "seeds" in header)
                    ),
                    style="dim" if row["reference"] else "",
                )
            out.append(table)
    if board.comparison is not None:
        sentence, header, rows = comparison_lines(board)
        table = Table(title=f"Ranking stability vs {board.comparison.name.replace('`', '')}")
        for column in header:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        out += [table, Text(sentence)]
    return out


FOOTNOTE = (
    "Mean over seeds ± half-width of the 95% Student-t confidence interval (one seed: "
    "its value alone). 'vs {baseline} (paired)': mean difference from `{baseline}` at the same "
    "budget and seed, ± its 95% CI; ▲ / ▼: that interval lies above / below zero. Method "
    "pairs are compared the same way (per-seed differences over the seeds both have). "
    "Selection cost: mean seconds spent choosing the "
    "subset (embeddings, proxies and captioners included when computed in that run, not "
    "when cached), and as a share of the training time. Generated by {source} from the "
    "MLflow runs."
)


def _unique(runs: pd.DataFrame, column: str) -> list[str]:
    if column not in runs.columns:
        return []
    return sorted({str(v) for v in runs[column].dropna() if str(v) != ""})


def provenance(runs: pd.DataFrame) -> list[str]:
    """What a table was computed from, read off its MLflow runs (``search_runs`` frame):
    how many runs and seeds, pool (name, size, fingerprint), scale, protocol and samples
    seen, code versions and git commits, and the summed compute."""
    if runs.empty or "params.pool" not in runs.columns:
        return []
    runs = runs.dropna(subset=["params.pool"])  # a sweep's parent run has no params
    seeds = sorted({int(float(s)) for s in runs.get("params.seed", pd.Series(dtype=str))})
    lines = [f"Runs: {len(runs)} finished MLflow runs; seeds {', '.join(map(str, seeds))}."]
    keys = [c for c in ("params.pool", "params.pool_fingerprint") if c in runs.columns]
    for _, row in runs.drop_duplicates(keys).iterrows():
        size = row.get("params.pool_size", "?")
        fingerprint = str(row.get("params.pool_fingerprint", "?"))[:12]
        lines.append(
            f"Pool: `{row['params.pool']}`, {size} image-text pairs (fingerprint `{fingerprint}`)."
        )
    seen = sorted({int(v) for v in runs.get("metrics.samples_seen", pd.Series()).dropna()})
    lines.append(
        f"Scale: {', '.join(f'`{v}`' for v in _unique(runs, 'params.scale'))}; protocol: "
        f"{', '.join(f'`{v}`' for v in _unique(runs, 'params.protocol'))}; samples seen per "
        f"training run: {', '.join(map(str, seen))}."
    )
    versions = _unique(runs, "params.version.selbench")
    commits = _unique(runs, "tags.selbench.git_commit")
    code = [f"selbench {', '.join(versions)}"] if versions else []
    code += [f"git commit {', '.join(c[:10] for c in commits)}"] if commits else []
    if code:
        lines.append(f"Code: {'; '.join(code)}.")
    cost = [
        c
        for c in ("metrics.selection_seconds", "metrics.training_seconds", "metrics.eval_seconds")
        if c in runs.columns
    ]
    if cost:
        total = float(runs[cost].sum().sum())
        lines.append(
            f"Compute: {total / 60:.1f} min of selection, training and evaluation summed over "
            f"the runs (device: {', '.join(_unique(runs, 'params.device')) or '?'})."
        )
    return lines


EXPORT_NOTE = (
    "Each command writes that run's subset (uid, caption, training caption, score) as "
    "parquet; `--format datacomp` writes DataComp's uid file and `--format shards` "
    "webdataset shards (docs/real-data.md)."
)
LEADERBOARD_SOURCE = "`selbench leaderboard`"  # the command named in a page's footnote


def footnote(source: str = LEADERBOARD_SOURCE, baseline: str = DEFAULT_BASELINE) -> str:
    """The note under a table, naming the command that wrote it and the baseline."""
    return FOOTNOTE.format(source=source, baseline=baseline)


def _md_row(values: list[str]) -> str:
    return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"


def to_markdown(
    board: Leaderboard,
    title: str,
    plots: dict[str, Path] | None = None,
    intro: list[str] | None = None,
    source: str = LEADERBOARD_SOURCE,
) -> str:
    lines = [f"# {title}", ""]
    shared = shared_settings(board)
    if shared:
        lines += [f"**{shared}**", ""]
    for paragraph in intro or []:
        lines += [paragraph, ""]
    all_sections = sections(board)
    several = len(all_sections) > 1
    for setting, parts in all_sections:
        if several:
            lines += [f"## {_setting_text(setting, markdown=True)}", ""]
        for section in parts:
            lines += [f"{'###' if several else '##'} {section.heading}", ""]
            if separation_text(section):
                lines += [separation_text(section), ""]
            header = columns(board)
            lines += [_md_row(header), "|" + "---|" * len(header)]
            for _, row in section.rows.iterrows():
                texts = [c.text for c in cells(board, row, "seeds" in header)]
                if row["reference"]:
                    texts = [f"*{t}*" for t in texts]
                lines.append(_md_row(texts))
            lines.append("")
    lines.append(footnote(source, board.baseline))
    exports = export_lines(board)
    if exports:
        lines += ["", "## Export a row's subset", "", EXPORT_NOTE, "", *exports]
    if board.comparison is not None:
        sentence, header, rows = comparison_lines(board)
        lines += ["", f"## Ranking stability vs {board.comparison.name}", "", sentence, ""]
        lines += [_md_row(header), "|" + "---|" * len(header)]
        lines += [_md_row(row) for row in rows]
    for caption, path in (plots or {}).items():
        lines += ["", f"![{caption}]({path.name})"]
    return "\n".join(lines) + "\n"


# Sorting by column is a few lines of script, written here so the page stays one
# self-contained, offline file (no CDN). Cells sort by their data-v value, numbers as
# numbers; empty cells ("—") go last in either direction.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var asc = th.getAttribute("data-order") !== "asc";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
    th.setAttribute("data-order", asc ? "asc" : "desc");
    function key(row) {
      var v = row.cells[col].getAttribute("data-v");
      if (v === null || v === "") return null;
      var n = Number(v);
      return isNaN(n) ? v : n;
    }
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null);
      var c = x < y ? -1 : x > y ? 1 : 0;
      return asc ? c : -c;
    }).forEach(function (row) { body.appendChild(row); });
  });
});
"""

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1em}
div.scroll{overflow-x:auto}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
td:first-child,th:first-child{text-align:left}
th{background:#f3f3f3;white-space:normal;vertical-align:bottom;max-width:11em}
ul.intro{padding-left:1.2em;color:#333}ul.intro li{margin:0.2em 0}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th::after{content:" \\2195";color:#aaa}
table.sortable th[data-order=asc]::after{content:" \\25B2";color:#222}
table.sortable th[data-order=desc]::after{content:" \\25BC";color:#222}
td.up{background:#dff3df}td.down{background:#f8dede}
tr.reference td{font-style:italic;color:#555;background:#fafafa}
p.shared{font-weight:bold}p.note{color:#555;max-width:70em}
img{max-width:100%}figure{margin:1.5em 0}
"""


def _html_table(header: list[str], rows: list[tuple[list[Cell], str]], sortable: bool) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row_cells, row_class in rows:
        tds = []
        for c in row_cells:
            value = f"{c.sort:.6g}" if isinstance(c.sort, float) else str(c.sort)
            attrs = "" if c.sort is None else f' data-v="{html.escape(value)}"'
            if c.mark:
                attrs += ' class="up"' if c.mark > 0 else ' class="down"'
            tds.append(f"<td{attrs}>{html.escape(c.text)}</td>")
        klass = f' class="{row_class}"' if row_class else ""
        body.append(f"<tr{klass}>{''.join(tds)}</tr>")
    table_class = ' class="sortable"' if sortable else ""
    return (
        f'<div class="scroll"><table{table_class}><thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(body)
        + "\n</tbody></table></div>"
    )


def _inline_markdown(text: str) -> str:
    """Escape ``text`` and turn its `code` spans into <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def to_html(
    board: Leaderboard,
    title: str,
    plots: dict[str, Path] | None = None,
    intro: list[str] | None = None,
    source: str = LEADERBOARD_SOURCE,
) -> str:
    """One self-contained page: sortable tables, and every plot inlined as base64 PNG."""
    parts = []
    shared = shared_settings(board)
    if shared:
        parts.append(f'<p class="shared">{_inline_markdown(shared)}</p>')
    if intro:
        items = "".join(f"<li>{_inline_markdown(p)}</li>" for p in intro)
        parts.append(f'<ul class="intro">{items}</ul>')
    all_sections = sections(board)
    several = len(all_sections) > 1
    for setting, budget_sections in all_sections:
        if several:
            parts.append(f"<h2>{_inline_markdown(_setting_text(setting, markdown=True))}</h2>")
        for section in budget_sections:
            tag = "h3" if several else "h2"
            parts.append(f"<{tag}>{html.escape(section.heading)}</{tag}>")
            if separation_text(section):
                parts.append(f"<p>{html.escape(separation_text(section))}</p>")
            header = columns(board)
            rows = [
                (cells(board, row, "seeds" in header), "reference" if row["reference"] else "")
                for _, row in section.rows.iterrows()
            ]
            parts.append(_html_table(header, rows, sortable=True))
            separated_pairs = _separated_pairs(board, section)
            if separated_pairs:
                items = "".join(f"<li>{html.escape(p)}</li>" for p in separated_pairs)
                parts.append(
                    f"<details><summary>Pairs that differ beyond their paired 95% CI "
                    f"({len(separated_pairs)})</summary><ul>{items}</ul></details>"
                )
    parts.append(f'<p class="note">{_inline_markdown(footnote(source, board.baseline))}</p>')
    exports = export_lines(board)
    if exports:
        items = "".join(f"<li>{_inline_markdown(line[2:])}</li>" for line in exports)
        parts.append(
            f"<details><summary>Export a row's subset ({len(exports)} rows)</summary>"
            f"<p>{_inline_markdown(EXPORT_NOTE)}</p><ul>{items}</ul></details>"
        )
    if board.comparison is not None:
        sentence, header, rows = comparison_lines(board)
        parts.append(
            f"<h2>Ranking stability vs {_inline_markdown(board.comparison.name)}</h2>"
            f"<p>{_inline_markdown(sentence)}</p>"
        )
        parts.append(
            _html_table(header, [([Cell(v) for v in row], "") for row in rows], sortable=False)
        )
    for caption, path in (plots or {}).items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    body = "\n".join(parts)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
<script>{SORT_SCRIPT}</script>
</body></html>
"""


def _separated_pairs(board: Leaderboard, section: Section) -> list[str]:
    """``clip_score ahead of random in R@1 by 0.021 ± 0.010`` for every separated pair."""
    pairs = board.pairs
    if pairs.empty:
        return []
    mine = pairs[
        (pairs[list(SETTING_KEYS)] == section.setting).all(axis=1)
        & (pairs["budget"] == section.budget)
        & (pairs["separated"] != 0)
    ]
    out = []
    for _, p in mine.iterrows():
        ahead, behind = (p["method_a"], p["method_b"])[:: int(p["separated"])]
        out.append(
            f"{ahead} ahead of {behind} in {metric_name(p['metric'])} by "
            f"{abs(p['difference_mean']):.3f} ± {p['difference_ci95']:.3f} "
            f"({p['pairs']} seeds)"
        )
    return out


def write(
    board: Leaderboard,
    out_dir: Path,
    name: str,
    plots: dict[str, Path] | None = None,
    intro: list[str] | None = None,
    source: str = LEADERBOARD_SOURCE,
) -> tuple[Path, ...]:
    """Write ``<name>.md``, ``<name>.csv`` (one row per method and budget),
    ``<name>.html`` and ``<name>_pairs.csv`` (every method pair's paired comparison)
    under ``out_dir``; ``intro`` paragraphs (markdown, e.g. :func:`provenance`) go above
    the tables, and the footnote names ``source``, the command that wrote the page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"selbench leaderboard: {name}"
    md_path, csv_path = out_dir / f"{name}.md", out_dir / f"{name}.csv"
    html_path, pairs_path = out_dir / f"{name}.html", out_dir / f"{name}_pairs.csv"
    atomic_write_text(md_path, to_markdown(board, title, plots, intro, source))
    commands = export_commands(board)
    table = board.table.copy()
    if not table.empty:
        table["export"] = [
            "; ".join(cmd for _, cmd in commands.get(_row_key(row), []))
            for _, row in table.iterrows()
        ]
    atomic_write_text(csv_path, table.to_csv(index=False))
    atomic_write_text(html_path, to_html(board, title, plots, intro, source))
    atomic_write_text(pairs_path, board.pairs.to_csv(index=False))
    return md_path, csv_path, html_path, pairs_path
