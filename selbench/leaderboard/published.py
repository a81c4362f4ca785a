"""Published rankings as a reference: the numbers papers report for the methods selbench
implements, and Kendall's tau between a leaderboard's ranking and theirs.

One CSV file per setting (``datacomp-small``, ``datacomp-medium``, ``cc3m``, ``cc12m``) ships
with the package in ``selbench/leaderboard/published_tables/``, so an editable install
and a wheel find them alike; ``leaderboards/published/README.md`` describes their
columns and sources. A row is one number set a paper reports: the selbench strategy it
stands for (``method``; the whole pool is ``full_pool``), where it was read (``paper``,
``arxiv``, ``table``, ``source``), its ``scale`` and, where a paper reports several
variants of one method, whether it is the one compared (``default``). Every other column
is a metric; a cell left empty is a number the source does not report.

``selbench leaderboard --compare-with published:NAME`` ranks the page's methods per
budget and metric, and compares that ranking with the published one over the methods
both have (:func:`published_agreement`): the page's full-pool row as ``full_pool``, and
every row whose method label is a bare strategy name (a label with parameters is another
configuration than the published default, so it is left out and listed). Which page
metric meets which published column is :data:`METRIC_COLUMNS`, or ``--published-metric``.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats

from selbench.errors import SelbenchError
from selbench.fileutil import atomic_write_text
from selbench.leaderboard.keys import SETTING_KEYS, metric_name, setting_text
from selbench.leaderboard.stats import Comparison, Leaderboard

TABLE_DIR = Path(__file__).resolve().parent / "published_tables"
FULL_POOL = "full_pool"  # how a published table names the whole pool
#: The columns that describe a row; every other column of a table is a metric.
META_COLUMNS = (
    "method", "published_name", "variant", "default", "dataset_size",
    "paper", "arxiv", "table", "scale", "source", "notes",
)  # fmt: skip
#: The columns every row fills in.
REQUIRED_COLUMNS = (
    "method", "published_name", "default", "paper", "arxiv", "table", "scale", "source",
)  # fmt: skip
#: Columns computed on load, from the columns a source reports: selbench's ``mean_R1`` is
#: the mean of the image-to-text and text-to-image R@1, so the published one is too.
DERIVED_COLUMNS = {"mean_r1": ("retrieval_i2t_r1", "retrieval_t2i_r1")}
#: A page metric and the published columns it is ranked against: the first of them that
#: the table has. ``--published-metric METRIC=COLUMN`` replaces a pair or adds one.
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "zeroshot_acc1": ("imagenet",),
    "datacomp/imagenet": ("imagenet",),
    "datacomp/imagenet_dist_shifts": ("imagenet_dist_shifts",),
    "datacomp/vtab": ("vtab",),
    "datacomp/retrieval": ("retrieval",),
    "datacomp/average": ("average_38",),
    "mean_R1": ("mean_r1", "retrieval"),
}
_METHOD = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_ARXIV = re.compile(r"^\d{4}\.\d{4,5}$")
_BOOLEAN = {"true": True, "false": False}


@dataclass
class PublishedTable:
    """One published table, validated (:func:`read_table`)."""

    name: str  # the file stem, e.g. ``datacomp-small``
    path: Path
    rows: pd.DataFrame  # one row per CSV row; metric columns as floats (NaN: not reported)
    metrics: tuple[str, ...]  # the metric columns, derived ones last

    def values(self, column: str) -> pd.Series:
        """The ``default`` rows' values in ``column``, indexed by method (NaN dropped)."""
        rows = self.rows[self.rows["default"] & self.rows[column].notna()]
        return rows.set_index("method")[column].astype(float)

    def cited(self, method: str, column: str) -> str:
        """Where ``method``'s default value in ``column`` comes from: name and table."""
        rows = self.rows[self.rows["default"] & (self.rows["method"] == method)]
        rows = rows[rows[column].notna()]
        if rows.empty:
            return ""
        row = rows.iloc[0]
        return f"{row['published_name']} ({row['table']})"

    def papers(self) -> str:
        """``DataComp (...) arXiv 2304.14108, Tables 3, 25``: every source of the table."""
        parts = []
        for (paper, arxiv), rows in self.rows.groupby(["paper", "arxiv"], sort=False):
            tables = ", ".join(dict.fromkeys(rows["table"]))
            parts.append(f"{paper}, arXiv {arxiv}: {tables}")
        return "; ".join(parts)


# --- the tables ------------------------------------------------------------------------


def available_tables() -> list[str]:
    """The names ``--compare-with published:NAME`` takes: the shipped CSV files' stems."""
    return sorted(path.stem for path in TABLE_DIR.glob("*.csv"))


def table_path(name: str) -> Path:
    """The CSV file of published table ``name``; a name ending in ``.csv`` is a path."""
    if name.endswith(".csv"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise SelbenchError(f"published table {name!r}: no such file")
        return path
    path = TABLE_DIR / f"{name}.csv"
    if not name or not path.is_file():
        raise SelbenchError(
            f"no published table {name!r}; available: {', '.join(available_tables()) or 'none'} "
            f"(files in {TABLE_DIR}; or give a path to a CSV file of the same columns)"
        )
    return path


def load_table(name: str) -> PublishedTable:
    """Published table ``name`` (:func:`available_tables`, or a path), validated."""
    return read_table(table_path(name))


def read_table(path: Path) -> PublishedTable:
    """Read and validate one published CSV file. SelbenchError naming the file, and the
    line and column at fault, when a required column is missing or empty, ``default`` is
    not true/false, ``method`` or ``arxiv`` is malformed, a metric is not a number, a row
    has no metric at all, or two default rows give one method's value in one column."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        records = list(reader)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise SelbenchError(f"{path}: missing column(s) {', '.join(missing)}")
    metrics = [c for c in header if c not in META_COLUMNS]
    if not metrics:
        raise SelbenchError(f"{path}: no metric column (every column is one of {META_COLUMNS})")
    problems = []
    rows = []
    for line, record in enumerate(records, start=2):  # line 1 is the header
        if None in record:  # more cells than the header has columns
            problems.append(f"line {line}: more cells than the header's {len(header)} columns")
            continue
        row, row_problems = _parse_row(record, metrics)
        problems += [f"line {line} ({record.get('method') or '?'}): {p}" for p in row_problems]
        rows.append(row)
    if not records:
        problems.append("no rows")
    frame = pd.DataFrame(rows, columns=header)
    problems += _duplicate_defaults(frame, metrics) if not problems else []
    if problems:
        raise SelbenchError(f"{path}: " + "; ".join(problems))
    frame, derived = _derive(frame, metrics)
    return PublishedTable(path.stem, path, frame, tuple(metrics + derived))


def _parse_row(record: dict[str, str], metrics: list[str]) -> tuple[dict, list[str]]:
    """One CSV record as typed values, and what is wrong with it."""
    row: dict = {key: (value or "").strip() for key, value in record.items()}
    problems = [f"{c} is empty" for c in REQUIRED_COLUMNS if not row[c]]
    if row["method"] and not _METHOD.match(row["method"]):
        problems.append(f"method {row['method']!r} is not a strategy name (e.g. clip_score)")
    if row["arxiv"] and not _ARXIV.match(row["arxiv"]):
        problems.append(f"arxiv {row['arxiv']!r} is not an arXiv id such as 2304.14108")
    default = _BOOLEAN.get(row["default"].lower())
    if row["default"] and default is None:
        problems.append(f"default {row['default']!r} is not true or false")
    row["default"] = bool(default)
    unreadable = False
    for column in metrics:
        text = row[column]
        try:
            value = float(text) if text else math.nan
        except ValueError:
            value = math.inf  # reported as not a number below
        if text and not math.isfinite(value):
            problems.append(f"{column} {text!r} is not a number")
            value, unreadable = math.nan, True
        row[column] = value
    if not unreadable and all(math.isnan(row[c]) for c in metrics):
        problems.append("no metric value")
    return row, problems


def _duplicate_defaults(frame: pd.DataFrame, metrics: list[str]) -> list[str]:
    """Methods with two default rows that both give a value in one metric column."""
    problems = []
    defaults = frame[frame["default"]]
    for column in metrics:
        counts = defaults[defaults[column].notna()]["method"].value_counts()
        for method in counts[counts > 1].index:
            problems.append(
                f"method {method} has {counts[method]} default rows with a {column} value; "
                "mark one default=true"
            )
    return problems


def _derive(frame: pd.DataFrame, metrics: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Add :data:`DERIVED_COLUMNS` whose inputs the table has."""
    derived = []
    for column, parts in DERIVED_COLUMNS.items():
        if column not in metrics and all(p in metrics for p in parts):
            frame = frame.assign(**{column: frame[list(parts)].mean(axis=1, skipna=False)})
            derived.append(column)
    return frame, derived


# --- which page metric meets which published column -------------------------------------


def parse_metric_pairs(items: Sequence[str]) -> dict[str, str]:
    """``--published-metric METRIC=COLUMN`` values as ``{metric: column}``."""
    pairs = {}
    for item in items:
        metric, sep, column = item.partition("=")
        if not sep or not metric.strip() or not column.strip():
            raise SelbenchError(
                f"--published-metric {item!r}: write METRIC=COLUMN, e.g. zeroshot_acc1=imagenet"
            )
        pairs[metric.strip()] = column.strip()
    return pairs


def metric_mapping(
    metrics: Sequence[str], table: PublishedTable, pairs: dict[str, str] | None = None
) -> dict[str, str]:
    """Each page metric and the published column it is ranked against: ``pairs`` first,
    then :data:`METRIC_COLUMNS` (the first column of its list the table has). A metric
    with no counterpart is left out."""
    pairs = pairs or {}
    for metric, column in pairs.items():
        if metric not in metrics:
            raise SelbenchError(
                f"--published-metric {metric}={column}: the page has no metric {metric!r} "
                f"(its metrics: {', '.join(metrics)}; add it with --metric)"
            )
        if column not in table.metrics:
            raise SelbenchError(
                f"--published-metric {metric}={column}: published table {table.name!r} has no "
                f"column {column!r} (its metric columns: {', '.join(table.metrics)})"
            )
    mapping = {}
    for metric in metrics:
        candidates = (pairs[metric],) if metric in pairs else METRIC_COLUMNS.get(metric, ())
        found = next((c for c in candidates if c in table.metrics), None)
        if found is not None:
            mapping[metric] = found
    return mapping


# --- the comparison ----------------------------------------------------------------------


def kendall_tau(mine: Sequence[float], theirs: Sequence[float]) -> tuple[float, float]:
    """Kendall's tau-b between two paired value lists and its p-value for tau = 0
    (``scipy.stats.kendalltau``), as :func:`~selbench.leaderboard.stats.rank_agreement`
    computes it: NaN for fewer than three pairs."""
    if len(mine) != len(theirs):
        raise ValueError(f"{len(mine)} values against {len(theirs)}")
    if len(mine) < 3:
        return math.nan, math.nan
    result = stats.kendalltau(list(mine), list(theirs))
    return float(result.statistic), float(result.pvalue)


def board_rankings(board: Leaderboard) -> dict[float, pd.DataFrame]:
    """Per budget, the page's methods (index: method label; columns ``<metric>_mean``),
    the full pool's row among them as :data:`FULL_POOL`. SelbenchError when the page
    mixes settings, so that a method has several rankings."""
    table = board.table
    if table.empty:
        raise SelbenchError("the page has no finished runs to rank")
    settings = table[list(SETTING_KEYS)].drop_duplicates()
    if len(settings) > 1:
        listed = "; ".join(setting_text(row) for _, row in settings.iterrows())
        raise SelbenchError(
            f"the page mixes {len(settings)} settings ({listed}), so a method has several "
            "rankings; keep one with --where (e.g. --where pool=NAME)"
        )
    reference = table[table["reference"]].assign(method=FULL_POOL)
    methods = table[~table["reference"]]
    rankings = {}
    for budget in sorted(methods["budget"].unique()):
        rows = pd.concat([methods[methods["budget"] == budget], reference])
        rankings[float(budget)] = rows.drop_duplicates("method").set_index("method")
    return rankings


def published_agreement(
    board: Leaderboard, table: PublishedTable, mapping: dict[str, str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Kendall's tau between the page's ranking and the published one, per budget and
    mapped metric, over the methods both have (:func:`board_rankings`;
    :meth:`PublishedTable.values`). Returns ``(agreement, side_by_side)``: ``agreement``
    has :func:`~selbench.leaderboard.stats.rank_agreement`'s columns (``budget``,
    ``metric``, ``methods``, ``tau``, ``p_value``, ``only_here``, ``only_there``) plus
    ``column``; ``side_by_side`` has a row per method and ranking: both values and their
    ranks among the methods in both (1 = best), ``status`` ``both``, ``only here`` or
    ``only published``."""
    agreement, side = [], []
    for budget, ranking in board_rankings(board).items():
        for metric, column in mapping.items():
            mine = ranking[f"{metric}_mean"].dropna() if f"{metric}_mean" in ranking else None
            if mine is None:
                continue
            theirs = table.values(column)
            common = sorted(set(mine.index) & set(theirs.index))
            tau, p_value = kendall_tau(mine[common].tolist(), theirs[common].tolist())
            only_here = sorted(set(mine.index) - set(theirs.index))
            only_there = sorted(set(theirs.index) - set(mine.index))
            agreement.append(
                {
                    "budget": budget, "metric": metric, "column": column,
                    "methods": len(common), "tau": tau, "p_value": p_value,
                    "only_here": ", ".join(only_here), "only_there": ", ".join(only_there),
                }
            )  # fmt: skip
            side += _side_rows(budget, metric, column, mine, theirs, common, table)
    return pd.DataFrame(agreement), pd.DataFrame(side)


def _side_rows(
    budget: float,
    metric: str,
    column: str,
    mine: pd.Series,
    theirs: pd.Series,
    common: list[str],
    table: PublishedTable,
) -> list[dict]:
    """The side-by-side rows of one ranking: the methods in both (best first by the
    page), then those only on the page, then those only published."""
    my_rank = mine[common].rank(ascending=False, method="min")
    their_rank = theirs[common].rank(ascending=False, method="min")
    base = {"budget": budget, "metric": metric, "column": column}
    rows = [
        {
            **base, "method": method, "selbench": float(mine[method]),
            "selbench_rank": int(my_rank[method]), "published": float(theirs[method]),
            "published_rank": int(their_rank[method]),
            "published_as": table.cited(method, column), "status": "both",
        }
        for method in sorted(common, key=lambda m: (my_rank[m], m))
    ]  # fmt: skip
    rows += [
        {**base, "method": method, "selbench": float(mine[method]), "status": "only here"}
        for method in sorted(set(mine.index) - set(common))
    ]
    rows += [
        {
            **base, "method": method, "published": float(theirs[method]),
            "published_as": table.cited(method, column), "status": "only published",
        }
        for method in sorted(set(theirs.index) - set(common))
    ]  # fmt: skip
    return rows


def compare_published(
    board: Leaderboard, table: PublishedTable, mapping: dict[str, str]
) -> pd.DataFrame:
    """Attach :func:`published_agreement` to ``board`` as its comparison (the page then
    shows it as it shows another pool's ranking); returns the side-by-side rows."""
    if not mapping:
        raise SelbenchError(
            f"none of the page's metrics ({', '.join(board.metrics)}) has a column in published "
            f"table {table.name!r} (its columns: {', '.join(table.metrics)}); pair one with "
            "--published-metric METRIC=COLUMN"
        )
    agreement, side = published_agreement(board, table, mapping)
    board.comparison = Comparison(f"the published numbers `{table.name}`", agreement)
    return side


def published_intro(table: PublishedTable, mapping: dict[str, str], stem: str) -> str:
    """The page's paragraph saying what its ranking was compared with, and how."""
    pairs = ", ".join(f"{metric_name(m)} (`{m}`) with `{c}`" for m, c in mapping.items())
    return (
        f"Published reference: `{table.name}` ({table.papers()}). Ranked against the "
        f"published numbers: {pairs}. The full pool is `{FULL_POOL}`; only rows whose "
        "method label is a bare strategy name are matched with the paper's default row; "
        f"the values side by side are in `{stem}_vs_{table.name}.csv` beside this page."
    )


def side_by_side_tables(side: pd.DataFrame, table_name: str) -> list:
    """Rich tables of the side-by-side rows, one per budget and metric."""
    from rich.table import Table

    tables: list[Table] = []
    if side.empty:
        return tables
    for (budget, metric, column), rows in side.groupby(["budget", "metric", "column"], sort=True):
        table = Table(title=f"budget {budget:g}: {metric_name(metric)} vs {table_name} {column}")
        for heading in ("method", "selbench", "rank", "published", "rank", "published as"):
            table.add_column(heading, overflow="fold")
        for _, row in rows.iterrows():
            table.add_row(
                row["method"] + ("" if row["status"] == "both" else f" ({row['status']})"),
                _number(row.get("selbench")),
                _number(row.get("selbench_rank"), rank=True),
                _number(row.get("published")),
                _number(row.get("published_rank"), rank=True),
                row["published_as"] if isinstance(row.get("published_as"), str) else "",
            )
        tables.append(table)
    return tables


def _number(value: Any, rank: bool = False) -> str:
    """A value of the side-by-side table as text: a rank as an integer, "—" for none."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "—"
    if math.isnan(number):
        return "—"
    return f"{int(number)}" if rank else f"{number:.3f}"


def generate_vs_published(
    experiment: str,
    out: Path,
    stem: str,
    table_name: str,
    metrics: tuple[str, ...] = (),
    filters: dict[str, str] | None = None,
    plots: bool = True,
    metric_pairs: Sequence[str] = (),
    baseline: str = "random",
    console=None,
    intro: list[str] | None = None,
    run_ids: set[str] | None = None,
    source: str | None = None,
) -> list[Path]:
    """``selbench leaderboard --compare-with published:NAME`` (and ``sweep --leaderboard
    NAME --compare-with published:TABLE``, with the sweep's ``intro``, its cells'
    ``run_ids`` and ``source``): the page of
    :func:`~selbench.leaderboard.publish.generate`, compared with published table
    ``table_name`` (:func:`compare_published`) instead of a second configuration, plus
    ``<stem>_vs_<table>.csv`` (the side-by-side rows) among its files. The table and the
    metric pairs are checked before any run is read."""
    from selbench.leaderboard.page import LEADERBOARD_SOURCE, build_page, provenance
    from selbench.leaderboard.publish import board_of, log_files, page_title, write_page
    from selbench.leaderboard.render import render_terminal

    if console is None:
        from rich.console import Console

        console = Console()
    table = load_table(table_name)
    pairs = parse_metric_pairs(metric_pairs)
    board, runs = board_of(experiment, metrics, filters, run_ids, baseline=baseline)
    mapping = metric_mapping(board.metrics, table, pairs)
    side = compare_published(board, table, mapping)
    figures = {}
    if plots:
        from selbench.leaderboard.plots import all_plots

        figures = all_plots(board, runs, out, stem)
    intro = [*(intro or []), *provenance(runs), published_intro(table, mapping, stem)]
    page = build_page(board, page_title(stem), figures, intro, source or LEADERBOARD_SOURCE)
    for part in [*render_terminal(page), *side_by_side_tables(side, table.name)]:
        console.print(part)
    files = [*write_page(page, board, out, stem), *figures.values()]
    side_path = out / f"{stem}_vs_{table.name}.csv"
    atomic_write_text(side_path, side.to_csv(index=False))
    files.append(side_path)
    log_files(experiment, stem, files)
    console.print(f"Wrote {', '.join(str(p) for p in files)}")
    return files
