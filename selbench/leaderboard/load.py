"""Runs from the store: a page's runs, its default metrics, and the runs of the
configuration ``--compare-with`` names."""

from __future__ import annotations

import pandas as pd

from selbench import tracking
from selbench.errors import SelbenchError
from selbench.leaderboard.keys import DEFAULT_METRICS
from selbench.leaderboard.labels import mark_synthesized, split_mixed_parameters


def filter_runs(runs: pd.DataFrame, where: dict[str, str]) -> pd.DataFrame:
    """The runs whose param, ``selbench.*`` tag or tag of each ``where`` key equals its value."""
    for key, value in where.items():
        candidates = [f"params.{key}", f"tags.selbench.{key}", f"tags.{key}"]
        column = next((c for c in candidates if c in runs.columns), None)
        if column is None:
            return runs.iloc[0:0]
        runs = runs[runs[column].astype(str) == str(value)]
    return runs


def load_runs(
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    where: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Finished selbench runs of ``experiment`` as MLflow's ``search_runs`` frame,
    optionally filtered by lineage: ``where={"git_commit": "abc123"}`` keeps runs whose
    param or ``selbench.*`` tag of that name equals the value. ``params`` filters in the
    store's own query (only runs whose param of each name has that value are read), for
    callers that want a few runs of a large store."""
    runs = tracking.Store().finished_runs(experiment, params)
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


def unique(runs: pd.DataFrame, column: str) -> list[str]:
    """The distinct non-empty values of ``column`` as text, sorted ([] without the column)."""
    if column not in runs.columns:
        return []
    return sorted({str(v) for v in runs[column].dropna() if str(v) != ""})


# --- the configuration --compare-with names --------------------------------------------


def experiment_exists(name: str) -> bool:
    """Whether the MLflow store has an experiment called ``name`` (creates nothing)."""
    return tracking.Store().has_experiment(name)


def parse_compare_target(target: str) -> tuple[str, str]:
    """``--compare-with TARGET`` as ``(kind, name)``: ``experiment:NAME`` ->
    ``("experiment", NAME)``, ``pool:NAME`` -> ``("pool", NAME)``, anything else ->
    ``("", TARGET)``, a bare name (an experiment if one exists, otherwise a pool)."""
    prefix, sep, rest = target.partition(":")
    if sep and prefix in ("experiment", "pool"):
        return prefix, rest
    return "", target


def comparison_runs(
    target: str, experiment: str, where: dict[str, str], runs: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Resolve ``--compare-with TARGET`` (:func:`parse_compare_target`): ``experiment:NAME``
    (the finished runs of that MLflow experiment), ``pool:NAME`` (this experiment's runs on
    that pool; the page keeps its other pools), or a bare NAME, which is an experiment if
    one exists and otherwise a pool. The ``where`` filters apply to the comparison too,
    except ``pool``. Returns this page's runs, the comparison's runs and how the page
    names it."""
    kind, name = parse_compare_target(target)
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
        pools = unique(everything, "params.pool")
        raise SelbenchError(
            f"--compare-with {target!r}: no MLflow experiment of that name, and no finished "
            f"runs on a pool of that name in experiment {experiment!r} (its pools: "
            f"{', '.join(pools) or 'none'})"
        )
    mine = runs[runs.get("params.pool", pd.Series(dtype=object)) != name]
    return mine, other, f"pool `{name}`"
