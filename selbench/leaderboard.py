"""Leaderboards built from MLflow runs.

Per (pool, scale, protocol) and method x budget: each metric's mean over seeds with a
95% confidence interval (Student's t over seeds), the paired difference from ``random``
at the same budget and seed (mean and 95% CI of the per-seed differences), and the
selection cost (seconds, and as a share of training time). The full pool (``random`` at
budget 1.0) is marked as the reference row. Output: a rich table, markdown, CSV, and a
self-contained HTML page with the plots of :mod:`selbench.plots`.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table
from scipy import stats

from selbench import tracking

GROUP_KEYS = ("pool", "pool_fingerprint", "scale", "protocol", "method_label", "budget")
SETTING_KEYS = ("pool", "pool_fingerprint", "scale", "protocol")
DEFAULT_METRICS = ("mean_R1", "zeroshot_acc1")
COST_METRICS = ("selection_seconds", "training_seconds")
BASELINE = "random"


@dataclass
class Leaderboard:
    """One row per (pool, scale, protocol, method, budget); see the module docstring."""

    table: pd.DataFrame
    metrics: tuple[str, ...]
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # the per-run frame used


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
    return split_mixed_parameters(filter_runs(runs, where or {}))


def split_mixed_parameters(runs: pd.DataFrame) -> pd.DataFrame:
    """Give runs that share a method label but not their parameters separate labels.

    A run's label names only the parameters that differ from the defaults *of its own
    version*, so when a default changes (``tldr-release``'s ``match_embedder`` did),
    runs from before and after carry the same label and would be averaged as one method.
    Every run logs all its parameters (``param.*``); where they differ within a label,
    the differing ones are appended, ``tldr-release[match_embedder=proxy]``. A parameter
    a run did not log (added later) shows as ``unset``.
    """
    label_column = "params.method_label"
    columns = [c for c in runs.columns if c.startswith("params.param.")]
    if runs.empty or label_column not in runs.columns or not columns:
        return runs
    runs = runs.copy()
    for label, group in runs.groupby(label_column):
        values = group[columns].astype(object).where(group[columns].notna(), "unset")
        values = values.loc[:, values.nunique() > 1].sort_index(axis=1)
        if values.empty:
            continue
        for index, row in values.iterrows():
            tag = ",".join(f"{c.removeprefix('params.param.')}={row[c]}" for c in values)
            runs.loc[index, label_column] = f"{label}[{tag}]"
    return runs


def filter_runs(runs: pd.DataFrame, where: dict[str, str]) -> pd.DataFrame:
    for key, value in where.items():
        candidates = [f"params.{key}", f"tags.selbench.{key}", f"tags.{key}"]
        column = next((c for c in candidates if c in runs.columns), None)
        if column is None:
            return runs.iloc[0:0]
        runs = runs[runs[column].astype(str) == str(value)]
    return runs


def ci95(values: np.ndarray) -> float:
    """Half-width of the 95% Student-t confidence interval of the mean (NaN for n < 2)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


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


def summarise(runs: pd.DataFrame, metrics: tuple[str, ...] = DEFAULT_METRICS) -> Leaderboard:
    """Aggregate runs per :data:`GROUP_KEYS` (module docstring)."""
    wanted = tuple(dict.fromkeys(metrics + COST_METRICS))
    frame = per_run_frame(runs, wanted)
    if frame.empty:
        return Leaderboard(pd.DataFrame(), metrics)
    metrics = tuple(m for m in metrics if m in frame.columns)
    baseline = frame[frame["method_label"] == BASELINE]
    rows = []
    for key, group in frame.groupby(list(GROUP_KEYS), sort=True):
        row = dict(zip(GROUP_KEYS, key, strict=True))
        row["seeds"] = int(group["seed"].nunique())
        row["runs"] = len(group)
        row["reference"] = row["method_label"] == BASELINE and row["budget"] == 1.0
        same = baseline
        for k in SETTING_KEYS + ("budget",):
            same = same[same[k] == row[k]]
        for metric in metrics:
            values = group[metric].astype(float).to_numpy()
            row[f"{metric}_mean"] = values.mean()
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else float("nan")
            row[f"{metric}_ci95"] = ci95(values)
            # paired with random at the same budget and seed (one run per seed each side)
            mine = group.groupby("seed")[metric].mean()
            theirs = same.groupby("seed")[metric].mean()
            common = mine.index.intersection(theirs.index)
            if row["method_label"] != BASELINE and len(common):
                diff = (mine[common] - theirs[common]).to_numpy(dtype=float)
                row[f"{metric}_vs_random_mean"] = diff.mean()
                row[f"{metric}_vs_random_ci95"] = ci95(diff)
                row[f"{metric}_vs_random_pairs"] = len(common)
            else:
                row[f"{metric}_vs_random_mean"] = float("nan")
                row[f"{metric}_vs_random_ci95"] = float("nan")
                row[f"{metric}_vs_random_pairs"] = 0
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
    return Leaderboard(table, metrics, frame)


COLUMNS = ("pool", "scale", "protocol", "method", "budget", "seeds")


def _fmt(mean: float, half: float) -> str:
    if pd.isna(mean):
        return "—"
    return f"{mean:.3f}" if pd.isna(half) else f"{mean:.3f} ± {half:.3f}"


def _cells(row: pd.Series, metrics: tuple[str, ...]) -> list[str]:
    """One row as display strings: grouping columns, then per metric mean ± 95% CI and
    the paired difference from random, then the selection cost."""
    cells = [str(row[c]) for c in COLUMNS]
    if row.get("reference", False):
        cells[COLUMNS.index("method")] = "full pool (random 1.0)"
    cells[COLUMNS.index("budget")] = f"{row['budget']:g}"
    for m in metrics:
        cells.append(_fmt(row[f"{m}_mean"], row[f"{m}_ci95"]))
        delta = row.get(f"{m}_vs_random_mean", float("nan"))
        half = row.get(f"{m}_vs_random_ci95", float("nan"))
        cells.append(
            "—" if pd.isna(delta) else f"{delta:+.3f}" + ("" if pd.isna(half) else f" ± {half:.3f}")
        )
    seconds, share = row.get("selection_seconds_mean"), row.get("selection_share")
    cells.append("—" if pd.isna(seconds) else f"{seconds:.1f}")
    cells.append("—" if pd.isna(share) else f"{100 * share:.0f}%")
    return cells


def headers(metrics: tuple[str, ...]) -> list[str]:
    out = list(COLUMNS)
    for m in metrics:
        out += [f"{m} (mean ± 95% CI)", f"{m} vs random (paired)"]
    return out + ["selection s", "selection / training"]


def rich_table(board: Leaderboard, title: str = "selbench leaderboard") -> Table:
    """The terminal table. Setting columns (pool, scale, protocol) with one value in every
    row move into the title, so the numbers fit a narrow terminal."""
    header = headers(board.metrics)
    constant = [
        c for c in ("pool", "scale", "protocol") if board.table[c].astype(str).nunique() == 1
    ]
    if constant:
        title += " (" + ", ".join(f"{c} {board.table[c].iloc[0]}" for c in constant) + ")"
    keep = [i for i, column in enumerate(header) if column not in constant]
    table = Table(title=title)
    for i in keep:
        column = header[i]
        table.add_column(column, justify="left" if column in COLUMNS[:4] else "right")
    for _, row in board.table.iterrows():
        cells = _cells(row, board.metrics)
        table.add_row(*(cells[i] for i in keep))
    return table


FOOTNOTE = (
    "Mean over seeds ± half-width of the 95% Student-t confidence interval (one seed: "
    "its value alone). 'vs random (paired)': mean difference from `random` at the same "
    "budget and seed, ± its 95% CI. Selection cost: mean seconds spent choosing the "
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


LEADERBOARD_SOURCE = "`selbench leaderboard`"  # the command named in a page's footnote


def footnote(source: str = LEADERBOARD_SOURCE) -> str:
    """The note under a table, naming the command that wrote it."""
    return FOOTNOTE.format(source=source)


def to_markdown(
    board: Leaderboard,
    title: str,
    plots: dict[str, Path] | None = None,
    intro: list[str] | None = None,
    source: str = LEADERBOARD_SOURCE,
) -> str:
    header = headers(board.metrics)
    lines = [f"# {title}", ""]
    for paragraph in intro or []:
        lines += [paragraph, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in board.table.iterrows():
        lines.append("| " + " | ".join(_cells(row, board.metrics)) + " |")
    lines += ["", footnote(source)]
    for caption, path in (plots or {}).items():
        lines += ["", f"![{caption}]({path.name})"]
    return "\n".join(lines) + "\n"


def to_html(
    board: Leaderboard,
    title: str,
    plots: dict[str, Path] | None = None,
    intro: list[str] | None = None,
    source: str = LEADERBOARD_SOURCE,
) -> str:
    """One self-contained page: the table and every plot inlined as base64 PNG."""
    header = headers(board.metrics)
    preamble = "\n".join(f"<p>{html.escape(p).replace('`', '')}</p>" for p in intro or [])
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r, board.metrics)) + "</tr>"
        for _, r in board.table.iterrows()
    )
    figures = "\n".join(
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(caption)}'
        "</figcaption></figure>"
        for caption, path in (plots or {}).items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
img{{max-width:900px}}figure{{margin:1.5em 0}}</style></head>
<body><h1>{html.escape(title)}</h1>
{preamble}
<table><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in header)}</tr>
{rows}</table>
<p>{html.escape(footnote(source))}</p>
{figures}
</body></html>
"""


def write(
    board: Leaderboard,
    out_dir: Path,
    name: str,
    plots: dict[str, Path] | None = None,
    intro: list[str] | None = None,
    source: str = LEADERBOARD_SOURCE,
) -> tuple[Path, Path, Path]:
    """Write ``<name>.md``, ``<name>.csv`` and ``<name>.html`` under ``out_dir``;
    ``intro`` paragraphs (markdown, e.g. :func:`provenance`) go above the table, and the
    footnote names ``source``, the command that wrote the page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"selbench leaderboard: {name}"
    md_path, csv_path = out_dir / f"{name}.md", out_dir / f"{name}.csv"
    html_path = out_dir / f"{name}.html"
    md_path.write_text(to_markdown(board, title, plots, intro, source))
    board.table.to_csv(csv_path, index=False)
    html_path.write_text(to_html(board, title, plots, intro, source))
    return md_path, csv_path, html_path
