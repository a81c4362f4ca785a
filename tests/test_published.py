"""Published rankings as a reference (selbench/leaderboard/published.py): the shipped
tables validate, a broken table is reported by file and line, Kendall's tau matches a hand
count, and ``selbench leaderboard --compare-with published:NAME`` compares a page with
them."""

import math
import re

import pandas as pd
import pytest
from click.testing import CliRunner
from e2e_helpers import log_frame_runs

from selbench import leaderboard as lb
from selbench.cli import main
from selbench.errors import SelbenchError
from selbench.leaderboard import published

SHIPPED = {"datacomp-small", "datacomp-medium", "cc3m", "cc12m"}
HEADER = "method,published_name,variant,default,imagenet,paper,arxiv,table,scale,source,notes"


def runs_of(values: dict[tuple[str, float], list[float]]) -> pd.DataFrame:
    """MLflow-like runs of one setting: per (method label, budget) one zero-shot top-1
    value per seed 0, 1, ... (R@1 is a tenth of it)."""
    rows = []
    for (method, budget), per_seed in values.items():
        for seed, value in enumerate(per_seed):
            rows.append(
                {
                    "run_id": f"{method}-{budget}-{seed}",
                    "params.pool": "datacomp-small",
                    "params.pool_fingerprint": "fp",
                    "params.scale": "small",
                    "params.protocol": "fixed-compute",
                    "params.method_label": method,
                    "params.budget": str(budget),
                    "params.seed": str(seed),
                    "metrics.zeroshot_acc1": value,
                    "metrics.mean_R1": value / 10,
                    "metrics.selection_seconds": 1.0,
                    "metrics.training_seconds": 10.0,
                }
            )
    return pd.DataFrame(rows)


def write_table(tmp_path, lines: list[str], name: str = "mine.csv"):
    path = tmp_path / name
    path.write_text("\n".join([HEADER, *lines]) + "\n")
    return path


def row(method: str, imagenet: str, default: str = "true", source: str = "Table 1 of x") -> str:
    cited = f"A paper,2304.14108,Table 1,small,{source},"
    return f"{method},{method} as published,,{default},{imagenet},{cited}"


# --- the shipped tables -------------------------------------------------------------------


def test_every_shipped_table_loads_and_cites_a_source_for_every_row():
    from selbench.registry import get_registry

    known = {info.name for info in get_registry().infos()} | {published.FULL_POOL}
    assert SHIPPED <= set(published.available_tables())
    for name in published.available_tables():
        table = published.load_table(name)
        rows = table.rows
        assert not rows.empty, name
        assert set(rows["method"]) <= known, (name, set(rows["method"]) - known)
        for column in ("paper", "arxiv", "table", "scale", "source"):
            assert (rows[column].str.len() > 0).all(), (name, column)
        values = rows[list(table.metrics)]
        assert all(pd.api.types.is_float_dtype(values[c]) for c in values), name
        assert values.notna().any(axis=1).all(), name  # every row reports something
        # the full pool is every table's reference, and each table ranks three methods
        for column in table.metrics:
            assert published.FULL_POOL in table.values(column).index, (name, column)
            assert len(table.values(column)) >= 3, (name, column)


def test_datacomp_tables_hold_the_defaults_a_comparison_uses():
    small = published.load_table("datacomp-small")
    imagenet = small.values("imagenet")
    # the paper's Table 3 row is the one compared, not the appendix variants
    assert imagenet["clip_score"] == pytest.approx(0.051)
    assert "CLIP score (L/14 30%)" in small.cited("clip_score", "imagenet")
    assert set(imagenet.index) == {"full_pool", "random", "basic", "image_based", "clip_score"}
    cc3m = published.load_table("cc3m")  # mean_r1: the mean of the two published R@1
    assert cc3m.values("mean_r1")["tldr"] == pytest.approx((72.8 + 54.8) / 2)


# --- a table that is wrong ------------------------------------------------------------------


def test_a_malformed_table_is_reported_by_file_line_and_column(tmp_path):
    path = write_table(tmp_path, [row("random", "0.1"), row("clip_score", "zero point two")])
    with pytest.raises(SelbenchError) as error:
        published.read_table(path)
    message = str(error.value)
    assert str(path) in message
    assert "line 3 (clip_score): imagenet 'zero point two' is not a number" in message

    path = write_table(tmp_path, [row("random", "0.1", source="")], "no-source.csv")
    with pytest.raises(SelbenchError, match=r"no-source.csv: line 2 \(random\): source is empty"):
        published.read_table(path)
    path = write_table(tmp_path, [row("random", "0.1", default="maybe")], "default.csv")
    with pytest.raises(SelbenchError, match="line 2 .*default 'maybe' is not true or false"):
        published.read_table(path)
    path = write_table(tmp_path, [row("random", "")], "empty.csv")
    with pytest.raises(SelbenchError, match="line 2 .*no metric value"):
        published.read_table(path)
    path = write_table(tmp_path, [row("random", "0.1"), row("random", "0.2")], "twice.csv")
    with pytest.raises(SelbenchError, match="method random has 2 default rows"):
        published.read_table(path)
    path = tmp_path / "columns.csv"
    path.write_text("method,imagenet\nrandom,0.1\n")
    with pytest.raises(SelbenchError, match=r"columns.csv: missing column\(s\) published_name"):
        published.read_table(path)


def test_an_unknown_table_name_lists_the_available_ones():
    with pytest.raises(SelbenchError) as error:
        published.load_table("unknown")
    assert "no published table 'unknown'" in str(error.value)
    assert "datacomp-small" in str(error.value) and "cc3m" in str(error.value)


# --- Kendall's tau ------------------------------------------------------------------------


def test_kendall_tau_matches_a_hand_count():
    assert published.kendall_tau([4, 3, 2, 1], [0.9, 0.8, 0.7, 0.6])[0] == pytest.approx(1.0)
    assert published.kendall_tau([4, 3, 2, 1], [0.6, 0.7, 0.8, 0.9])[0] == pytest.approx(-1.0)
    # one discordant pair of six: (5 - 1) / 6
    assert published.kendall_tau([4, 3, 2, 1], [0.9, 0.8, 0.6, 0.7])[0] == pytest.approx(4 / 6)
    assert all(math.isnan(v) for v in published.kendall_tau([1, 2], [2, 1]))


def test_a_page_is_ranked_against_the_published_defaults(tmp_path):
    table = published.read_table(
        write_table(
            tmp_path,
            [
                row("full_pool", "0.10"), row("random", "0.05"), row("clip_score", "0.30"),
                row("tmars", "0.20"), row("dfn", "0.40"),
                row("clip_score", "0.99", default="false"),  # a variant: not compared
            ],
        )
    )  # fmt: skip
    board = lb.summarise(
        runs_of(
            {
                ("random", 0.25): [0.2, 0.2], ("clip_score", 0.25): [0.5, 0.5],
                ("tmars", 0.25): [0.6, 0.6], ("normsim (norm=2)", 0.25): [0.9, 0.9],
                ("random", 1.0): [0.3, 0.3],
            }
        ),
        ("zeroshot_acc1", "mean_R1"),
    )  # fmt: skip
    mapping = published.metric_mapping(board.metrics, table)
    assert mapping == {"zeroshot_acc1": "imagenet"}  # the table has no retrieval column
    agreement, side = published.published_agreement(board, table, mapping)
    result = agreement.iloc[0]
    # page: tmars > clip_score > full_pool > random; published: clip_score > tmars >
    # full_pool > random: one discordant pair of six
    assert (result["budget"], result["methods"]) == (0.25, 4)
    assert result["tau"] == pytest.approx(4 / 6)
    assert result["only_here"] == "normsim (norm=2)" and result["only_there"] == "dfn"
    both = side[side["status"] == "both"].set_index("method")
    assert both.loc["tmars", ["selbench_rank", "published_rank"]].tolist() == [1, 2]
    assert both.loc["full_pool", "published"] == pytest.approx(0.10)
    with pytest.raises(SelbenchError, match="has no column 'vtab'"):
        published.metric_mapping(board.metrics, table, {"zeroshot_acc1": "vtab"})


# --- the command --------------------------------------------------------------------------


def test_an_unknown_published_table_fails_before_reading_any_run(tmp_path):
    out = tmp_path / "boards"
    result = CliRunner().invoke(
        main, ["leaderboard", "--out", str(out), "--compare-with", "published:unknown"]
    )
    assert result.exit_code == 1
    assert "no published table 'unknown'" in result.output
    assert "datacomp-medium, datacomp-small" in result.output
    assert not out.exists()
    result = CliRunner().invoke(main, ["leaderboard", "--published-metric", "mean_R1=retrieval"])
    assert result.exit_code == 2 and "needs --compare-with published:NAME" in result.output


def test_leaderboard_command_compares_a_page_with_datacomp_small(tmp_path):
    # DataComp small, ImageNet: clip_score .051 > image_based .043 > basic .038 >
    # full_pool .025 > random .022; here random is ahead of the full pool: tau 8/10
    means = {"clip_score": 0.5, "image_based": 0.4, "basic": 0.3, "random": 0.2}
    values = {(m, 0.25): [v, v + 0.01] for m, v in means.items()}
    log_frame_runs("dc", runs_of({**values, ("random", 1.0): [0.1, 0.11]}))
    out = tmp_path / "boards"
    args = ["leaderboard", "--experiment", "dc", "--out", str(out), "--no-plots"]
    result = CliRunner().invoke(main, [*args, "--compare-with", "published:datacomp-small"])
    assert result.exit_code == 0, result.output
    text = (out / "dc.md").read_text()
    assert "## Ranking stability vs the published numbers `datacomp-small`" in text
    # R@1 against DataComp's retrieval (two swaps: 6/10), zero-shot top-1 against imagenet
    assert re.search(r"\| 0\.25 \| 5 \| \+0\.60 \(p [0-9.]+\) \| \+0\.80 \(p ", text), text
    assert "zero-shot top-1 (`zeroshot_acc1`) with `imagenet`" in text
    side = pd.read_csv(out / "dc_vs_datacomp-small.csv")
    both = side[(side["metric"] == "zeroshot_acc1") & (side["status"] == "both")]
    assert both["method"].tolist() == ["clip_score", "image_based", "basic", "random", "full_pool"]
    assert both["published_rank"].tolist() == [1, 2, 3, 5, 4]
    assert "budget 0.25: zero-shot top-1 vs datacomp-small imagenet" in result.output
    result = CliRunner().invoke(
        main, [*args, "--compare-with", "published:datacomp-small", "--published-metric",
               "mean_R1=vtab"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "R@1 (`mean_R1`) with `vtab`" in (out / "dc.md").read_text()


def test_a_sweep_page_compares_only_its_cells_with_a_published_table(tmp_path):
    # What `sweep --leaderboard NAME --compare-with published:TABLE` writes: the sweep's
    # cells only (a run of the experiment outside them stays off the page), its intro and
    # source, and tau against the paper's table.
    from selbench.leaderboard.load import load_runs

    means = {"clip_score": 0.5, "image_based": 0.4, "random": 0.2}
    values = {(m, 0.25): [v, v + 0.01] for m, v in means.items()}
    log_frame_runs("dcs", runs_of({**values, ("random", 1.0): [0.1, 0.11]}))
    log_frame_runs("dcs", runs_of({("basic", 0.25): [0.3, 0.31]}))  # not the sweep's
    runs = load_runs("dcs")
    cells = set(runs.loc[runs["params.method_label"] != "basic", "run_id"])
    out = tmp_path / "boards"
    published.generate_vs_published(
        "dcs", out, "grid", "datacomp-small", plots=False, intro=["Produced by a sweep."],
        run_ids=cells, source="`selbench sweep --leaderboard`",
    )  # fmt: skip
    text = (out / "grid.md").read_text()
    assert "Produced by a sweep." in text and "`selbench sweep --leaderboard`" in text
    assert "## Ranking stability vs the published numbers `datacomp-small`" in text
    side = pd.read_csv(out / "grid_vs_datacomp-small.csv")
    assert "basic" not in set(side.loc[side["status"] == "both", "method"])


def test_a_sweep_refuses_an_unknown_published_table_before_any_cell_runs():
    args = ["sweep", "--methods", "random", "--budgets", "0.25", "--seeds", "0"]
    result = CliRunner().invoke(
        main, [*args, "--leaderboard", "x", "--compare-with", "published:unknown"]
    )
    assert result.exit_code == 1 and "no published table 'unknown'" in result.output
