"""A leaderboard from the store to files: load the runs, summarise them, draw the plots,
print the terminal view, write markdown, CSV and HTML, and keep the files in MLflow."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from selbench import tracking
from selbench.errors import SelbenchError
from selbench.fileutil import atomic_write_text
from selbench.leaderboard.keys import DEFAULT_BASELINE
from selbench.leaderboard.load import comparison_runs, default_metrics, load_runs
from selbench.leaderboard.page import (
    LEADERBOARD_SOURCE,
    Page,
    build_page,
    export_commands,
    provenance,
    row_key,
)
from selbench.leaderboard.render import render_html, render_markdown, render_terminal
from selbench.leaderboard.stats import Leaderboard, compare, summarise


def rich_tables(board: Leaderboard, title: str = "selbench leaderboard") -> list:
    """The terminal view of ``board`` (:func:`~selbench.leaderboard.render.render_terminal`)."""
    return render_terminal(build_page(board, title))


def to_markdown(
    board: Leaderboard,
    title: str,
    plots: dict[str, Path] | None = None,
    intro: list[str] | None = None,
    source: str = LEADERBOARD_SOURCE,
) -> str:
    return render_markdown(build_page(board, title, plots, intro, source))


def to_html(
    board: Leaderboard,
    title: str,
    plots: dict[str, Path] | None = None,
    intro: list[str] | None = None,
    source: str = LEADERBOARD_SOURCE,
) -> str:
    """One self-contained page: sortable tables, and every plot inlined as base64 PNG."""
    return render_html(build_page(board, title, plots, intro, source))


def page_title(name: str) -> str:
    return f"selbench leaderboard: {name}"


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
    page = build_page(board, page_title(name), plots, intro, source)
    return write_page(page, board, out_dir, name)


def write_page(page: Page, board: Leaderboard, out_dir: Path, name: str) -> tuple[Path, ...]:
    """:func:`write` for a page already built from ``board``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / f"{name}.md", out_dir / f"{name}.csv"
    html_path, pairs_path = out_dir / f"{name}.html", out_dir / f"{name}_pairs.csv"
    atomic_write_text(md_path, render_markdown(page))
    commands = export_commands(board)
    table = board.table.copy()
    if not table.empty:
        table["export"] = [
            "; ".join(cmd for _, cmd in commands.get(row_key(row), []))
            for _, row in table.iterrows()
        ]
    atomic_write_text(csv_path, table.to_csv(index=False))
    atomic_write_text(html_path, render_html(page))
    atomic_write_text(pairs_path, board.pairs.to_csv(index=False))
    return md_path, csv_path, html_path, pairs_path


def board_of(
    experiment: str,
    metrics: tuple[str, ...] = (),
    filters: dict[str, str] | None = None,
    run_ids: set[str] | None = None,
    compare_with: str | None = None,
    baseline: str = DEFAULT_BASELINE,
) -> tuple[Leaderboard, pd.DataFrame]:
    """The board of ``experiment``'s finished runs (those of ``run_ids`` only, when given:
    exactly one sweep's cells) and the runs it was computed from; ranked against
    ``compare_with`` when given (:func:`~selbench.leaderboard.load.comparison_runs`).
    SelbenchError when there are no runs, or none of ``baseline``."""
    filters = filters or {}
    runs = load_runs(experiment, filters)
    if run_ids is not None:
        runs = runs[runs["run_id"].isin(run_ids)]
    other = None
    if compare_with:
        runs, other, other_name = comparison_runs(compare_with, experiment, filters, runs)
    board = summarise(runs, metrics or default_metrics(runs), baseline)
    if board.table.empty:
        raise SelbenchError(
            f"no finished runs in MLflow experiment {experiment!r}"
            + (f" matching {filters}" if filters else "")
            + "; start one with `selbench run --method random --budget 0.25`"
        )
    if baseline != "random" and baseline not in set(board.table["method"]):
        raise SelbenchError(
            f"--baseline {baseline!r} has no finished runs in experiment {experiment!r}; "
            f"methods with runs: {', '.join(sorted(set(board.table['method'])))}"
        )
    if other is not None:
        compare(board, other, other_name)
    return board, runs


def generate(
    experiment: str,
    out: Path,
    stem: str,
    metrics: tuple[str, ...] = (),
    filters: dict[str, str] | None = None,
    plots: bool = True,
    intro: list[str] | None = None,
    run_ids: set[str] | None = None,
    source: str | None = None,
    compare_with: str | None = None,
    baseline: str = DEFAULT_BASELINE,
    console=None,
) -> list[Path]:
    """``selbench leaderboard`` (and ``sweep --leaderboard``): the board of
    :func:`board_of`, its plots, the terminal view on ``console``, the files of
    :func:`write` under ``out`` named ``stem`` (``intro`` and the runs' :func:`provenance`
    above the tables, ``source`` in the footnote), all logged to MLflow in a run tagged
    ``selbench.leaderboard``. Returns the files written."""
    if console is None:
        from rich.console import Console

        console = Console()
    board, runs = board_of(experiment, metrics, filters, run_ids, compare_with, baseline)
    figures = {}
    if plots:
        from selbench.leaderboard.plots import all_plots

        figures = all_plots(board, runs, out, stem)
    intro = [*(intro or []), *provenance(runs)]
    page = build_page(board, page_title(stem), figures, intro, source or LEADERBOARD_SOURCE)
    for part in render_terminal(page):
        console.print(part)
    files = [*write_page(page, board, out, stem), *figures.values()]
    log_files(experiment, stem, files)
    console.print(f"Wrote {', '.join(str(p) for p in files)}")
    return files


def log_files(experiment: str, stem: str, files: list[Path]) -> None:
    """Keep the leaderboard's files in MLflow too, in a run tagged as a leaderboard."""
    recorder = tracking.Recorder(experiment)
    recorder.start(f"leaderboard-{stem}", tags={"selbench.leaderboard": "true"})
    try:
        for path in files:
            recorder.artifact(path)
    except BaseException as exc:
        recorder.fail(exc)
        raise
    recorder.finish()
