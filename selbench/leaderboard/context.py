"""Where a finished run stands: ``random`` at its budget and the full pool, beside it.

``selbench run`` ends with its metrics; on their own, R@1 0.026 says little. Under them it
shows the rows a leaderboard would put next to the run: the baseline (``random``) at the
run's budget and the full pool (``random`` at budget 1.0, every leaderboard's reference
row), on the same pool (name and fingerprint), scale, protocol, training length and
evaluation suite. Each row comes

1. from the user's own finished runs in the run's MLflow experiment (this run left out),
   read through :func:`selbench.leaderboard.load.load_runs` with the setting as the store's
   query, so a large store is not scanned; or else
2. from a committed leaderboard (``leaderboards/*.csv``, ``synthweb.csv`` first), only
   when its row states the same pool fingerprint, scale, protocol, label (training length
   included) and budget, and the run used the pool's own evaluation sets (the committed
   runs did). A wheel built without ``leaderboards/`` has no such fallback.

and says which. Nothing matches: nothing is shown rather than a misleading comparison.
The lookup never fails a run: :func:`context_table` logs an error as a warning and returns
None.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Group
from rich.table import Table
from rich.text import Text

from selbench import tracking
from selbench.leaderboard.keys import DEFAULT_BASELINE, DEFAULT_METRICS, metric_name
from selbench.leaderboard.load import load_runs
from selbench.leaderboard.stats import ci95
from selbench.paths import committed_leaderboard_dir
from selbench.run.spec import train_label

log = logging.getLogger(__name__)

FULL_POOL = 1.0
YOUR_RUNS = "your runs"
FIRST_BOARD = "synthweb.csv"  # the README's committed leaderboard, consulted first
#: The committed leaderboards' runs evaluated on the pool's own sets (``--eval`` unset).
COMMITTED_EVAL_SUITE = "pool"


@dataclass(frozen=True)
class RunSetting:
    """What a run is compared within: the leaderboard's setting plus training length and
    evaluation suite, read off the run's params."""

    run_id: str
    experiment: str
    pool: str
    pool_fingerprint: str
    scale: str
    protocol: str
    budget: float
    train_samples: float = 1.0
    eval_suite: str = COMMITTED_EVAL_SUITE

    @classmethod
    def from_params(cls, run_id: str, experiment: str, params: dict[str, str]) -> RunSetting:
        return cls(
            run_id=run_id,
            experiment=experiment,
            pool=params["pool"],
            pool_fingerprint=params["pool_fingerprint"],
            scale=params["scale"],
            protocol=params["protocol"],
            budget=float(params["budget"]),
            train_samples=float(params.get("train_samples", 1.0)),
            eval_suite=params.get("eval_suite", COMMITTED_EVAL_SUITE),
        )

    @property
    def baseline_label(self) -> str:
        """``random``, or ``random [train 2x]`` at another training length."""
        return train_label(DEFAULT_BASELINE, self.train_samples)

    def budgets(self) -> list[float]:
        """The run's budget and the full pool's (one of them at budget 1.0)."""
        return [self.budget] if self.budget == FULL_POOL else [self.budget, FULL_POOL]


@dataclass
class ContextRow:
    """``random`` at one budget: per metric its mean and 95% CI over seeds, and where the
    numbers come from (:data:`YOUR_RUNS` or a committed leaderboard's path)."""

    budget: float
    seeds: int
    values: dict[str, tuple[float, float]]  # metric -> (mean, ci95)
    source: str

    @property
    def name(self) -> str:
        if self.budget == FULL_POOL:
            return "full pool"
        return f"{DEFAULT_BASELINE} @ {self.budget:g}"


@dataclass
class RunContext:
    setting: RunSetting
    rows: list[ContextRow]
    notes: dict[str, str] = field(default_factory=dict)  # source -> what it is


# -- the user's own runs -----------------------------------------------------------------
def your_rows(setting: RunSetting) -> dict[float, ContextRow]:
    """``random``'s rows from the finished runs of the run's experiment on its setting."""
    query = {
        "pool": setting.pool,
        "pool_fingerprint": setting.pool_fingerprint,
        "scale": setting.scale,
        "protocol": setting.protocol,
        "eval_suite": setting.eval_suite,
        "method_label": setting.baseline_label,
    }
    runs = load_runs(setting.experiment, params=query)
    if runs.empty or "params.budget" not in runs.columns:
        return {}
    runs = runs[runs["run_id"] != setting.run_id]
    budgets = pd.to_numeric(runs["params.budget"], errors="coerce")
    rows = {}
    for budget in setting.budgets():
        group = runs[np.isclose(budgets, budget)]
        if group.empty:
            continue
        values = {}
        for metric in DEFAULT_METRICS:
            column = group.get(f"metrics.{metric}", pd.Series(dtype=float)).dropna()
            if len(column):
                values[metric] = (float(column.mean()), ci95(column.to_numpy(dtype=float)))
        seeds = group.get("params.seed", pd.Series(range(len(group)))).nunique()
        rows[budget] = ContextRow(budget, int(seeds), values, YOUR_RUNS)
    return rows


# -- the committed leaderboards ----------------------------------------------------------
def committed_boards() -> list[Path]:
    """The committed leaderboards' CSVs, :data:`FIRST_BOARD` first ([] when none ships)."""
    folder = committed_leaderboard_dir()
    if folder is None:
        return []
    boards = [p for p in folder.glob("*.csv") if not p.name.endswith("_pairs.csv")]
    return sorted(boards, key=lambda p: (p.name != FIRST_BOARD, p.name))


def board_rows(path: Path, setting: RunSetting, budgets: list[float]) -> dict[float, ContextRow]:
    """The rows of one committed leaderboard CSV that match ``setting`` exactly."""
    board = pd.read_csv(path, dtype={"pool": str, "pool_fingerprint": str, "method": str})
    needed = {"pool", "pool_fingerprint", "scale", "protocol", "method", "budget", "seeds"}
    if not needed <= set(board.columns):
        return {}
    same = board[
        (board["pool"] == setting.pool)
        & (board["pool_fingerprint"] == setting.pool_fingerprint)
        & (board["scale"].astype(str) == setting.scale)
        & (board["protocol"].astype(str) == setting.protocol)
        & (board["method"] == setting.baseline_label)
    ]
    rows = {}
    for budget in budgets:
        found = same[np.isclose(same["budget"].astype(float), budget)]
        if found.empty:
            continue
        row = found.iloc[0]
        values = {
            metric: (float(row[f"{metric}_mean"]), float(row.get(f"{metric}_ci95", math.nan)))
            for metric in DEFAULT_METRICS
            if f"{metric}_mean" in row and not pd.isna(row[f"{metric}_mean"])
        }
        rows[budget] = ContextRow(budget, int(row["seeds"]), values, board_name(path))
    return rows


def board_name(path: Path) -> str:
    """``synthweb.csv``: how a table row names the committed leaderboard it came from."""
    return path.name


def board_note(path: Path) -> str:
    """What a committed leaderboard is, with the git commits its page says its runs had:
    ``committed leaderboard leaderboards/synthweb.csv, runs at commit 6eace43486``."""
    note = f"committed leaderboard leaderboards/{path.name}"
    page = path.with_suffix(".md")
    text = page.read_text() if page.is_file() else ""
    found = re.search(r"git commit ([0-9a-f]{7,40}(?:, [0-9a-f]{7,40})*)", text)
    if found:
        commits = found.group(1).split(", ")
        more = f" and {len(commits) - 3} more" if len(commits) > 3 else ""
        note += f", runs at commit {', '.join(commits[:3])}{more}"
    return note


def committed_rows(
    setting: RunSetting, budgets: list[float]
) -> dict[float, tuple[Path, ContextRow]]:
    """Per budget, the first committed leaderboard's row that matches ``setting``; none
    for a run evaluated on other sets than the pool's own (the committed runs' suite)."""
    if setting.eval_suite != COMMITTED_EVAL_SUITE or not budgets:
        return {}
    found: dict[float, tuple[Path, ContextRow]] = {}
    for path in committed_boards():
        rows = board_rows(path, setting, [b for b in budgets if b not in found])
        found.update({budget: (path, row) for budget, row in rows.items()})
        if len(found) == len(budgets):
            break
    return found


# -- the lookup and its table ------------------------------------------------------------
def setting_of(run_id: str) -> RunSetting | None:
    """The setting of run ``run_id`` from its params; None for a run without them."""
    store = tracking.Store()
    run = store.run(run_id)
    params = dict(run.data.params)
    needed = ("pool", "pool_fingerprint", "scale", "protocol", "budget")
    if any(key not in params for key in needed):
        return None
    return RunSetting.from_params(run_id, store.experiment_name(run.info.experiment_id), params)


def lookup(run_id: str) -> RunContext | None:
    """``random``'s rows at the run's budget and at the full pool: the user's runs where
    there are some, else a committed leaderboard's; None when neither has any."""
    setting = setting_of(run_id)
    if setting is None:
        return None
    rows = your_rows(setting)
    notes = {}
    if rows:
        notes[YOUR_RUNS] = (
            f"finished runs in MLflow experiment '{setting.experiment}', this one left out"
        )
    committed = committed_rows(setting, [b for b in setting.budgets() if b not in rows])
    for budget, (path, row) in committed.items():
        rows[budget] = row
        notes[row.source] = board_note(path)
    if not rows:
        return None
    ordered = [rows[b] for b in setting.budgets() if b in rows]
    return RunContext(setting, ordered, notes)


def _cell(value: tuple[float, float] | float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, tuple):
        mean, half = value
        return f"{mean:.3f}" + ("" if math.isnan(half) else f" ± {half:.3f}")
    return "—" if math.isnan(value) else f"{value:.3f}"


def render(context: RunContext, metrics: dict[str, float]) -> Group:
    """The run beside ``random`` and the full pool, one row each, saying where each came
    from; under the table, a line per source saying what it is."""
    setting = context.setting
    table = Table(
        title=f"Compared with {DEFAULT_BASELINE} on pool {setting.pool} "
        f"({setting.pool_fingerprint[:12]}), scale {setting.scale}, {setting.protocol}"
    )
    table.add_column("")
    for metric in DEFAULT_METRICS:
        table.add_column(metric_name(metric), justify="right")
    table.add_column("seeds", justify="right")
    table.add_column("from")
    this = [_cell(metrics.get(m)) for m in DEFAULT_METRICS]
    table.add_row(f"this run @ {setting.budget:g}", *this, "", "")
    for row in context.rows:
        cells = [_cell(row.values.get(m)) for m in DEFAULT_METRICS]
        table.add_row(row.name, *cells, str(row.seeds), row.source)
    notes = (Text(f"{source}: {note}.") for source, note in context.notes.items())
    return Group(table, *notes)


def context_table(run_id: str, metrics: dict[str, float]) -> Group | None:
    """:func:`render` of :func:`lookup` for a finished run, or None: nothing to compare
    with, or the lookup failed (logged as a warning; the run's summary goes on)."""
    try:
        context = lookup(run_id)
        return None if context is None else render(context, metrics)
    except Exception as exc:
        log.warning(
            "could not look up random and full-pool rows to compare run %s with: %s", run_id, exc
        )
        return None
