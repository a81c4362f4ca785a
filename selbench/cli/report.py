"""``selbench leaderboard``: what the runs say (``selbench methods``, what is installed,
is :mod:`selbench.cli.methods`)."""

from __future__ import annotations

from pathlib import Path

import click

from selbench.cli.common import (
    console,
    friendly_errors,
    main,
    parse_assignments,
)
from selbench.cli.common import (
    quiet_libraries as _quiet_libraries,
)


@main.command()
@click.option("--experiment", default="selbench", show_default=True, help="MLflow experiment.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("leaderboards"),
    show_default=True,
    help="Directory for the markdown, CSV, HTML and PNG files.",
)
@click.option("--name", default=None, help="File name stem (default: the experiment name).")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="Metric column(s) to aggregate, repeatable; the first one is plotted. Default: "
    "mean_R1 and zeroshot_acc1, then the summary columns of every evaluation suite the runs "
    "used (`summary:` in configs/evals/NAME.yaml, e.g. DataComp's average).",
)
@click.option(
    "--where",
    "where",
    multiple=True,
    metavar="KEY=VALUE",
    help="Only runs whose param or selbench tag KEY equals VALUE, repeatable: e.g. "
    "--where git_commit=abc123, --where plugin_package=selbench==0.1.0, --where pool=synthweb.",
)
@click.option("--plots/--no-plots", default=True, show_default=True, help="Draw the PNG plots.")
@click.option(
    "--compare-with",
    "compare_with",
    default=None,
    metavar="EXPERIMENT_OR_POOL",
    help="Rank the methods on a second configuration too and report, per budget, Kendall's "
    "tau between the two rankings (how stable the ranking is). An MLflow experiment name, "
    "or a pool of this experiment's runs (the page then keeps the other pools); write "
    "experiment:NAME or pool:NAME when a name is both. --where filters apply to both "
    "sides except pool=; each side must come down to one pool, scale and protocol. "
    "published:NAME compares with the numbers papers report instead (NAME: datacomp-small, "
    "datacomp-medium, cc3m, cc12m, or a CSV file of the same columns; "
    "leaderboards/published/README.md).",
)
@click.option(
    "--published-metric",
    "published_metrics",
    multiple=True,
    metavar="METRIC=COLUMN",
    help="With --compare-with published:NAME: rank page metric METRIC against the published "
    "table's COLUMN, repeatable. Default: zeroshot_acc1 and datacomp/imagenet with imagenet, "
    "datacomp/average with average_38, mean_R1 with the mean of the two published R@1 "
    "(mean_r1) or DataComp's retrieval, the other datacomp/* columns with their namesakes.",
)
@click.option(
    "--baseline",
    default="random",
    show_default=True,
    metavar="METHOD",
    help="The method every row is paired with (its method label, as in the tables, e.g. "
    "clip_score or clip_score(mode=threshold)); its budget-1.0 runs are the full-pool row.",
)
@friendly_errors
def leaderboard(
    experiment, out, name, metrics, where, plots, compare_with, published_metrics, baseline
) -> None:
    """Aggregate finished runs: one table per budget with each method's mean and 95% CI
    over seeds, its paired difference from the baseline (--baseline, default random),
    and its selection cost; counts the
    method pairs that differ beyond their paired 95% CI; writes markdown, CSV, HTML and
    plots.

    \b
    Example, the same sweep on a second SynthWeb in experiment synthweb-b:
      selbench leaderboard --experiment synthweb --compare-with synthweb-b

    \b
    Example, against the numbers DataComp reports at small scale:
      selbench leaderboard --experiment datacomp-small --compare-with published:datacomp-small
    """
    _quiet_libraries()
    from selbench.leaderboard import generate

    filters = parse_assignments(where, "--where")
    kind, _, table_name = (compare_with or "").partition(":")
    if kind == "published":
        from selbench.leaderboard.published import generate_vs_published

        generate_vs_published(
            experiment, out, name or experiment, table_name, tuple(metrics), filters, plots,
            published_metrics, baseline, console=console,
        )  # fmt: skip
        return
    if published_metrics:
        raise click.UsageError("--published-metric needs --compare-with published:NAME")
    generate(
        experiment, out, name or experiment, tuple(metrics), filters, plots,
        compare_with=compare_with, baseline=baseline, console=console,
    )  # fmt: skip
