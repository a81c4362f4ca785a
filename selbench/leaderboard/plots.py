"""Leaderboard plots (PNG, matplotlib's Agg backend): metric vs. budget with 95% CI
bands, quality vs. total compute, quality vs. total FLOPs across training lengths,
pathologies kept (SynthWeb), and the overlap between methods' selections (mean Jaccard
index over shared seeds)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from selbench.leaderboard.keys import SETTING_KEYS, TOTAL_FLOPS, metric_name  # noqa: E402
from selbench.leaderboard.labels import base_label  # noqa: E402
from selbench.leaderboard.stats import Leaderboard  # noqa: E402
from selbench.run.selection_io import stored_selection  # noqa: E402
from selbench.run.spec import ONLINE_PREFIX  # noqa: E402

# tab20's 20 colours, one per method.
_TAB20 = [plt.cm.tab20(i) for i in range(20)]

log = logging.getLogger(__name__)

PATHOLOGIES = (
    "clean",
    "misaligned",
    "partially_wrong",
    "near_duplicate",
    "boilerplate",
    "low_information",
)
OPTIONAL_PATHOLOGIES = ("text_in_image",)  # off in the default SynthWeb; a column when on


def _save(fig, path: Path) -> Path:
    # bbox_inches="tight" grows the saved image to hold everything drawn outside the
    # axes (long method labels, titles, colour bars, legends) instead of cutting it off,
    # and keeps the plotting area the size the figure asked for.
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return path


def _ink(value: float, light_from: float) -> str:
    """Text colour that stays readable on a colour map cell: black on light cells."""
    return "black" if value >= light_from else "white"


def metric_vs_budget(board: Leaderboard, metric: str, path: Path) -> Path | None:
    table = board.table
    if table.empty or f"{metric}_mean" not in table:
        return None
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    ax.set_prop_cycle(color=_TAB20)
    for method, rows in table[~table["reference"]].groupby("method"):
        rows = rows.sort_values("budget")
        mean, half = rows[f"{metric}_mean"], rows[f"{metric}_ci95"].fillna(0.0)
        (line,) = ax.plot(rows["budget"], mean, marker="o", label=method)
        ax.fill_between(
            rows["budget"], mean - half, mean + half, alpha=0.18, color=line.get_color()
        )
    for _, ref in table[table["reference"]].iterrows():
        ax.axhline(ref[f"{metric}_mean"], color="black", linestyle="--", linewidth=1)
        ax.annotate("full pool", (table["budget"].min(), ref[f"{metric}_mean"]), fontsize=8)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("budget (fraction of the pool)")
    ax.set_ylabel(metric_name(metric))
    ax.set_title(f"{metric_name(metric)} vs. budget (mean, 95% CI over seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def quality_vs_compute(board: Leaderboard, metric: str, path: Path) -> Path | None:
    table = board.table
    if table.empty or "training_seconds_mean" not in table:
        return None
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    ax.set_prop_cycle(color=_TAB20)
    for method, rows in table.groupby("method"):
        total = rows["selection_seconds_mean"].fillna(0) + rows["training_seconds_mean"]
        ax.scatter(total, rows[f"{metric}_mean"], label=method, s=22)
        for (_, row), x in zip(rows.iterrows(), total, strict=True):
            ax.annotate(f"{row['budget']:g}", (x, row[f"{metric}_mean"]), fontsize=6)
    ax.set_xlabel("selection + training seconds (mean per run)")
    ax.set_ylabel(metric_name(metric))
    ax.set_title(f"{metric_name(metric)} vs. total compute (labels: budget)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


@dataclass
class FlopsCurve:
    """One line of :func:`metric_vs_flops`: a method (its label at 1x) at one budget,
    through its training lengths in order of total FLOPs."""

    method: str  # the label at 1x, e.g. "clip_score >> online:jest(ratio=2)"
    budget: float
    setting: str  # "pool/scale/protocol" on a page with several settings, else ""
    train: list[float]  # training lengths, x the protocol's samples seen
    flops: list[float]  # mean total FLOPs per run, ascending
    mean: list[float]  # the metric's mean over seeds
    ci95: list[float]  # half-width of its 95% CI (NaN: one seed)

    @property
    def online(self) -> bool:
        return f" >> {ONLINE_PREFIX}" in self.method

    @property
    def linestyle(self) -> str:
        return "--" if self.online else "-"

    @property
    def marker(self) -> str:
        return "^" if self.online else "o"

    @property
    def name(self) -> str:
        """The legend entry: ``clip_score @ budget 0.25``."""
        return f"{self.method} @ budget {self.budget:g}" + (
            f" ({self.setting})" if self.setting else ""
        )


@dataclass
class FlopsPlot:
    """What :func:`metric_vs_flops` drew, and where."""

    path: Path
    metric: str
    curves: list[FlopsCurve]


def flops_curves(board: Leaderboard, metric: str) -> list[FlopsCurve]:
    """The rows of ``board`` with a mean total FLOPs, as one curve per setting, method
    label at 1x (:func:`~selbench.leaderboard.labels.base_label`) and budget."""
    table, flops = board.table, f"{TOTAL_FLOPS}_mean"
    if table.empty or flops not in table or f"{metric}_mean" not in table:
        return []
    several = len(table[list(SETTING_KEYS)].drop_duplicates()) > 1
    rows = table.dropna(subset=[flops, f"{metric}_mean"])
    parts = [base_label(str(method)) for method in rows["method"]]
    rows = rows.assign(base=[p[0] for p in parts], train=[p[1] for p in parts])
    curves = []
    for key, group in rows.groupby([*SETTING_KEYS, "base", "budget"], sort=True):
        setting = dict(zip([*SETTING_KEYS, "base", "budget"], key, strict=True))
        group = group.sort_values([flops, "train"])
        curves.append(
            FlopsCurve(
                method=str(setting["base"]),
                budget=float(setting["budget"]),
                setting=f"{setting['pool']}/{setting['scale']}/{setting['protocol']}"
                if several
                else "",
                train=group["train"].astype(float).tolist(),
                flops=group[flops].astype(float).tolist(),
                mean=group[f"{metric}_mean"].astype(float).tolist(),
                ci95=group[f"{metric}_ci95"].astype(float).tolist(),
            )
        )
    return curves


def metric_vs_flops(board: Leaderboard, metric: str, path: Path) -> FlopsPlot | None:
    """``metric`` against total FLOPs (log scale), every method and budget of the page on
    one chart: a line per :func:`flops_curves` curve through its training lengths, 95% CI
    error bars, each point labelled with its length; offline methods solid with circles,
    online ones dashed with triangles. None when no run logged its total FLOPs."""
    curves = flops_curves(board, metric)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(8.4, 4.6))
    for i, curve in enumerate(curves):
        colour = _TAB20[i % len(_TAB20)]
        ax.errorbar(
            curve.flops,
            curve.mean,
            yerr=np.nan_to_num(np.asarray(curve.ci95, dtype=float)),
            color=colour,
            linestyle=curve.linestyle,
            marker=curve.marker,
            markersize=5,
            capsize=3,
            label=curve.name,
        )
        for x, y, times in zip(curve.flops, curve.mean, curve.train, strict=True):
            ax.annotate(
                f"{times:g}x", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=6
            )
    ax.set_xscale("log")
    ax.set_xlabel("total FLOPs: selection + training + online scoring (mean per run)")
    ax.set_ylabel(metric_name(metric))
    ax.set_title(
        f"{metric_name(metric)} vs. total FLOPs (mean, 95% CI over seeds; labels: training length)"
    )
    ax.legend(
        fontsize=7,
        title="method @ budget (solid: offline, dashed: online)",
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
    )
    return FlopsPlot(_save(fig, path), metric, curves)


def pathologies_kept(runs: pd.DataFrame, path: Path) -> Path | None:
    shown = PATHOLOGIES + tuple(
        p for p in OPTIONAL_PATHOLOGIES if f"metrics.diag/kept/{p}" in runs.columns
    )
    columns = [f"metrics.diag/kept/{p}" for p in shown]
    if runs.empty or not all(c in runs.columns for c in columns):
        return None
    base = [f"metrics.diag/kept/{p}" for p in PATHOLOGIES]  # optional ones may be missing
    runs = runs.dropna(subset=base + ["params.method_label", "params.budget"])
    if runs.empty:
        return None
    runs = runs.assign(budget=runs["params.budget"].astype(float))
    grid = runs.groupby(["budget", "params.method_label"])[columns].mean()
    names = [
        "full pool" if (budget == 1.0 and method == "random") else f"{method} @ {budget:g}"
        for budget, method in grid.index
    ]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(grid) + 1.6))
    image = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(grid)), names, fontsize=7)
    for (i, j), value in np.ndenumerate(grid.to_numpy()):
        if np.isnan(value):  # a pool without that pathology
            continue
        ink = _ink(value, 0.6)  # viridis turns light (green-yellow) above about 0.6
        ax.text(j, i, f"{100 * value:.0f}%", ha="center", va="center", fontsize=6, color=ink)
    fig.colorbar(image, ax=ax, label="share of the pool's samples kept")
    ax.set_title(
        "Pathologies kept (SynthWeb ground truth)\n"
        "a selection blind to them keeps about the budget's share of each",
        fontsize=10,
    )
    return _save(fig, path)


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def selection_overlap(
    frame: pd.DataFrame, load_uids: Callable[[str], set[str]], budget: float, path: Path
) -> Path | None:
    """Mean Jaccard index between every two methods' selections at ``budget``, over the
    seeds both have. A run whose selection cannot be read (its artifact store lost the
    file) is left out with a warning, and the title counts it."""
    rows = frame[frame["budget"] == budget]
    methods = sorted(rows["method_label"].unique())
    if len(methods) < 2:
        return None
    uids, unreadable = {}, []
    for r in rows.itertuples():
        try:
            uids[(r.method_label, r.seed)] = load_uids(r.run_id)
        except FileNotFoundError as exc:
            unreadable.append(r.run_id)
            log.warning(
                "selection overlap at budget %g leaves out run %s: %s", budget, r.run_id, exc
            )
    matrix = np.full((len(methods), len(methods)), np.nan)
    for i, a in enumerate(methods):
        for j, b in enumerate(methods):
            seeds = {s for m, s in uids if m == a} & {s for m, s in uids if m == b}
            if seeds:
                matrix[i, j] = np.mean([jaccard(uids[(a, s)], uids[(b, s)]) for s in seeds])
    fig, ax = plt.subplots(figsize=(0.55 * len(methods) + 3, 0.5 * len(methods) + 2))
    image = ax.imshow(matrix, cmap="magma", vmin=0, vmax=1)
    ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(len(methods)), methods, fontsize=7)
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            ink = _ink(value, 0.5)  # magma turns light (orange-cream) above about 0.5
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color=ink)
    fig.colorbar(image, ax=ax, label="Jaccard index")
    title = f"Selection overlap at budget {budget:g} (mean over shared seeds)"
    if unreadable:
        title += f"\n{len(unreadable)} run(s) left out: selection not readable"
    ax.set_title(title)
    return _save(fig, path)


def stored_uids(run_id: str) -> set[str]:
    """The selected uids of a run, from its ``selection.parquet`` artifact in the store;
    FileNotFoundError when the store has lost it."""
    return set(stored_selection(run_id, columns=["uid"])["uid"])


def _path(plot: FlopsPlot | None) -> Path | None:
    return None if plot is None else plot.path


def all_plots(
    board: Leaderboard,
    runs: pd.DataFrame,
    out_dir: Path,
    name: str,
    load_uids: Callable[[str], set[str]] = stored_uids,
) -> dict[str, Path]:
    """Every plot the data allows, as ``{caption: path}`` (files ``<name>_*.png``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = board.metrics[0] if board.metrics else "mean_R1"
    made: dict[str, Path | None] = {
        f"{metric_name(metric)} vs. budget": metric_vs_budget(
            board, metric, out_dir / f"{name}_budget.png"
        ),
        f"{metric_name(metric)} vs. compute": quality_vs_compute(
            board, metric, out_dir / f"{name}_compute.png"
        ),
        f"{metric_name(metric)} vs. total FLOPs": _path(
            metric_vs_flops(board, metric, out_dir / f"{name}_flops.png")
        ),
        "pathologies kept": pathologies_kept(runs, out_dir / f"{name}_pathologies.png"),
    }
    frame = board.runs
    if not frame.empty:
        for budget in sorted(b for b in frame["budget"].unique() if b < 1.0):
            made[f"selection overlap at {budget:g}"] = selection_overlap(
                frame, load_uids, budget, out_dir / f"{name}_overlap_{budget:g}.png"
            )
    return {caption: path for caption, path in made.items() if path is not None}
