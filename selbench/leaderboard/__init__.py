"""Leaderboards built from MLflow runs.

Per (pool, scale, protocol) and method x budget: each metric's mean over seeds with a
95% confidence interval (Student's t over seeds), the paired difference from the baseline
method (``baseline``, default ``random``) at the same budget and seed (mean and 95% CI of
the per-seed differences), the selection cost (seconds, and as a share of training
time) and, where runs logged it, their total FLOPs (``flops/total``). The full pool
(the baseline at budget 1.0) is the reference row of every budget's table.

Per budget, every two methods are compared the same paired way (:func:`pairwise`); the
page counts the pairs whose 95% CI excludes zero, i.e. how far the leaderboard separates
methods at all. Given a second configuration (another pool or experiment), the page
also reports how stable the ranking is: Kendall's tau between the two rankings of the
methods at each budget (:func:`rank_agreement`).

Output: rich tables, markdown, CSV, and a self-contained HTML page (sortable tables, the
plots of :mod:`selbench.leaderboard.plots` inlined, among them the first metric against
total FLOPs across training lengths).

The modules, in the order data flows through them: :mod:`~selbench.leaderboard.load`
(runs from :class:`selbench.tracking.Store`, labels by :mod:`~selbench.leaderboard.labels`),
:mod:`~selbench.leaderboard.stats` (the numbers), :mod:`~selbench.leaderboard.page` (the
page model, built once), :mod:`~selbench.leaderboard.render` (terminal, markdown and HTML,
each reading the page model), :mod:`~selbench.leaderboard.publish` (files, and the
``selbench leaderboard`` command's one call, :func:`generate`).
"""

from __future__ import annotations

from selbench.errors import SelbenchError
from selbench.leaderboard.keys import (
    COST_METRICS,
    DEFAULT_BASELINE,
    DEFAULT_METRICS,
    GROUP_KEYS,
    METRIC_NAMES,
    SETTING_KEYS,
    metric_name,
)
from selbench.leaderboard.labels import (
    SYNTHESIZED_MARK,
    UNSET,
    mark_synthesized,
    readable_label,
    split_mixed_parameters,
)
from selbench.leaderboard.load import (
    comparison_runs,
    default_metrics,
    experiment_exists,
    filter_runs,
    load_runs,
    parse_compare_target,
)
from selbench.leaderboard.page import (
    LEADERBOARD_SOURCE,
    Cell,
    Page,
    build_page,
    cells,
    columns,
    export_commands,
    export_lines,
    footnote,
    provenance,
    shared_settings,
)
from selbench.leaderboard.publish import (
    board_of,
    generate,
    rich_tables,
    to_html,
    to_markdown,
    write,
)
from selbench.leaderboard.stats import (
    Comparison,
    Leaderboard,
    ci95,
    compare,
    paired,
    pairwise,
    per_run_frame,
    rank_agreement,
    separated,
    separation_counts,
    summarise,
)

__all__ = [
    "COST_METRICS",
    "DEFAULT_BASELINE",
    "DEFAULT_METRICS",
    "GROUP_KEYS",
    "LEADERBOARD_SOURCE",
    "METRIC_NAMES",
    "SETTING_KEYS",
    "SYNTHESIZED_MARK",
    "UNSET",
    "Cell",
    "Comparison",
    "Leaderboard",
    "Page",
    "SelbenchError",
    "board_of",
    "build_page",
    "cells",
    "ci95",
    "columns",
    "compare",
    "comparison_runs",
    "default_metrics",
    "experiment_exists",
    "export_commands",
    "export_lines",
    "filter_runs",
    "footnote",
    "generate",
    "load_runs",
    "mark_synthesized",
    "metric_name",
    "paired",
    "pairwise",
    "parse_compare_target",
    "per_run_frame",
    "provenance",
    "rank_agreement",
    "readable_label",
    "rich_tables",
    "separated",
    "separation_counts",
    "shared_settings",
    "split_mixed_parameters",
    "summarise",
    "to_html",
    "to_markdown",
    "write",
]
