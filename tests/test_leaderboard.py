import math

import pandas as pd
import pytest
from e2e_helpers import log_frame_runs

from selbench import leaderboard as lb
from selbench.leaderboard import plots
from selbench.run.spec import MethodSpec

T_975_DF2 = 4.302652729749464  # Student's t, 97.5th percentile, 2 degrees of freedom
T_975_DF1 = 12.706204736174707


def fake_runs():
    rows = []
    values = {
        ("random", "0.25"): [0.10, 0.20, 0.30],
        ("random", "1.0"): [0.5, 0.7],
        ("clip(k=3)", "0.25"): [0.4],
        ("tldr", "0.25"): [0.15, 0.35, 0.30],
    }
    for (method, budget), metric in values.items():
        for seed, value in enumerate(metric):
            rows.append(
                {
                    "run_id": f"{method}-{budget}-{seed}",
                    "params.pool": "synthweb",
                    "params.pool_fingerprint": "abc",
                    "params.scale": "tiny",
                    "params.protocol": "fixed-compute",
                    "params.method_label": method,
                    "params.budget": budget,
                    "params.seed": str(seed),
                    "params.git_commit": "c1" if method != "tldr" else "c2",
                    "metrics.mean_R1": value,
                    "metrics.zeroshot_acc1": 2 * value,
                    "metrics.selection_seconds": 10.0 * (seed + 1),
                    "metrics.training_seconds": 100.0,
                    **{f"metrics.diag/kept/{p}": 0.25 for p in plots.PATHOLOGIES},
                }
            )
    rows.append({"run_id": "sweep-parent"})  # a sweep's parent run has no params
    return pd.DataFrame(rows)


def test_summary_matches_a_recomputation_from_raw_metrics():
    board = lb.summarise(fake_runs())
    table = board.table.set_index(["method", "budget"])
    random = table.loc[("random", 0.25)]
    assert random["mean_R1_mean"] == pytest.approx(0.2)
    assert random["mean_R1_std"] == pytest.approx(0.1)
    assert random["mean_R1_ci95"] == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3))
    assert table.loc[("random", 1.0), "zeroshot_acc1_mean"] == pytest.approx(1.2)
    assert table.loc[("random", 1.0), "mean_R1_ci95"] == pytest.approx(
        T_975_DF1 * pd.Series([0.5, 0.7]).std() / math.sqrt(2)
    )
    assert pd.isna(table.loc[("clip(k=3)", 0.25), "mean_R1_ci95"])  # one seed: no interval
    assert random["seeds"] == 3
    # paired with random at the same budget and seed: differences 0.05, 0.15, 0.0
    tldr = table.loc[("tldr", 0.25)]
    diffs = pd.Series([0.05, 0.15, 0.0])
    assert tldr["mean_R1_vs_random_mean"] == pytest.approx(diffs.mean())
    assert tldr["mean_R1_vs_random_ci95"] == pytest.approx(T_975_DF2 * diffs.std() / math.sqrt(3))
    assert tldr["mean_R1_vs_random_pairs"] == 3
    assert table.loc[("clip(k=3)", 0.25), "mean_R1_vs_random_mean"] == pytest.approx(0.3)
    assert pd.isna(random["mean_R1_vs_random_mean"])
    # cost: selection seconds 10, 20, 30 -> 20; training 100 -> share 0.2
    assert tldr["selection_seconds_mean"] == pytest.approx(20.0)
    assert tldr["selection_share"] == pytest.approx(0.2)
    assert table.loc[("random", 1.0), "reference"] and not tldr["reference"]


def test_the_baseline_is_a_setting_not_random_written_into_the_core():
    board = lb.summarise(fake_runs(), baseline="tldr")
    table = board.table.set_index(["method", "budget"])
    # random minus tldr at the same seeds: -0.05, -0.15, 0.0
    diffs = pd.Series([-0.05, -0.15, 0.0])
    random = table.loc[("random", 0.25)]
    assert random["mean_R1_vs_tldr_mean"] == pytest.approx(diffs.mean())
    assert random["mean_R1_vs_tldr_pairs"] == 3
    assert pd.isna(table.loc[("tldr", 0.25), "mean_R1_vs_tldr_mean"])
    assert "mean_R1_vs_random_mean" not in board.table.columns
    assert not table["reference"].any()  # tldr has no budget-1.0 runs
    assert "R@1 vs tldr (paired)" in lb.columns(board)
    assert "mean difference from `tldr` at the same budget" in lb.to_markdown(board, "board")


def test_rows_sorted_by_budget_then_best_first():
    board = lb.summarise(fake_runs())
    assert board.table[["method", "budget"]].values.tolist() == [
        ["clip(k=3)", 0.25],
        ["tldr", 0.25],
        ["random", 0.25],
        ["random", 1.0],
    ]


def test_a_run_whose_selection_is_lost_is_left_out_of_the_overlap_plot(tmp_path, caplog):
    runs = fake_runs()
    lost = runs["run_id"].iloc[0]

    def load(run_id):
        if run_id == lost:
            raise FileNotFoundError(f"no selection.parquet under /gone/{run_id}")
        return {"u1", "u2"}

    with caplog.at_level("WARNING"):
        figures = plots.all_plots(lb.summarise(runs), runs, tmp_path, "s", load_uids=load)
    assert (tmp_path / "s_overlap_0.25.png").is_file() and len(figures) == 4
    assert f"leaves out run {lost}: no selection.parquet under /gone" in caplog.text


def test_lineage_filter_keeps_matching_runs_only():
    runs = lb.filter_runs(fake_runs(), {"git_commit": "c2"})
    assert set(runs["params.method_label"]) == {"tldr"}
    assert lb.filter_runs(fake_runs(), {"no_such_key": "x"}).empty


def test_markdown_csv_html_and_plots_are_written(tmp_path):
    runs = fake_runs()
    board = lb.summarise(runs)
    selected = {rid: {f"u{i}" for i in range(4)} for rid in runs["run_id"]}
    figures = plots.all_plots(board, runs, tmp_path, "synthweb", load_uids=selected.__getitem__)
    assert {p.name for p in figures.values()} == {
        "synthweb_budget.png",
        "synthweb_compute.png",
        "synthweb_pathologies.png",
        "synthweb_overlap_0.25.png",
    }
    md, csv, html, pairs = lb.write(board, tmp_path, "synthweb", figures)
    text = md.read_text()
    # one table per budget; seeds differ between rows, so the column stays
    assert "## Budget 0.25 (25% of the pool)" in text and "## Budget 1" not in text
    assert "| clip(k=3) | 1 | 0.400 | +0.300 |" in text  # one seed: values alone
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert f"| random | 3 | 0.200 ± {half:.3f} | — |" in text
    assert "| *full pool (random, budget 1)* |" in text  # the reference row closes the table
    assert "![R@1 vs. budget](synthweb_budget.png)" in text
    assert len(pd.read_csv(csv)) == 4
    assert len(pd.read_csv(pairs)) == 3 * 2  # 3 methods at 0.25 -> 3 pairs, 2 metrics
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 4 and "full pool" in page


def test_jaccard_by_hand():
    assert plots.jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert plots.jaccard(set(), set()) == 1.0


def test_no_runs_gives_an_empty_board():
    assert lb.summarise(pd.DataFrame()).table.empty


def test_page_states_what_it_was_computed_from(tmp_path):
    runs = fake_runs()
    runs["params.pool_size"] = "8000"
    runs["params.version.selbench"] = "0.1.0"
    runs["tags.selbench.git_commit"] = "0123456789abcdef"
    runs["params.device"] = "cpu"
    runs["metrics.samples_seen"] = 40192.0
    runs["metrics.eval_seconds"] = 2.0
    lines = lb.provenance(runs)
    text = "\n".join(lines)
    assert "Runs: 9 finished MLflow runs; seeds 0, 1, 2." in text
    assert "Pool: `synthweb`, 8000 image-text pairs (fingerprint `abc`)." in text
    assert "samples seen per training run: 40192" in text
    assert "git commit 0123456789" in text
    # 9 runs x (training 100 s + eval 2 s), selection 60 + 30 + 10 + 60 s
    assert f"Compute: {(9 * 102 + 160) / 60:.1f} min" in text
    md, _, html, _ = lb.write(
        lb.summarise(runs), tmp_path, "x", intro=["Produced by `cmd`.", *lines]
    )
    assert md.read_text().index("Produced by `cmd`.") < md.read_text().index("| method |")
    assert "Runs: 9 finished MLflow runs" in html.read_text()


def test_terminal_shows_shared_settings_once_and_a_table_per_budget():
    from rich.console import Console

    parts = lb.rich_tables(lb.summarise(fake_runs()), "board")
    console = Console(width=200, record=True)
    for part in parts:
        console.print(part)
    text = console.export_text()
    assert "Every row: pool synthweb (fingerprint abc), scale tiny, protocol fixed-compute." in text
    tables = [p for p in parts if hasattr(p, "columns")]
    assert [t.title for t in tables] == ["Budget 0.25 (25% of the pool)"]
    assert [c.header for c in tables[0].columns][:2] == ["method", "seeds"]
    assert "0.200 ± " in text  # random at 0.25 keeps its CI
    assert "pool synthweb" not in [c.header for c in tables[0].columns]


def test_runs_of_one_label_with_different_parameters_get_separate_rows():
    # A default changed between runs: both carry the label "tldr-release", but their
    # logged parameters differ, so averaging them as one method would be wrong.
    runs = fake_runs()
    extra = []
    for seed, (embedder, threshold, value) in enumerate(
        [("proxy", None, 0.06), ("proxy:scorer", "0.0", 0.12)] * 2
    ):
        extra.append(
            {
                **runs.iloc[0].to_dict(),
                "run_id": f"rel-{seed}",
                "params.method_label": "tldr-release",
                "params.seed": str(seed // 2),
                "params.param.match_embedder": embedder,
                "params.param.dead_code_threshold": threshold,  # not logged by the old runs
                "params.param.clusters": "1000",
                "metrics.mean_R1": value,
            }
        )
    runs = lb.split_mixed_parameters(pd.concat([runs, pd.DataFrame(extra)], ignore_index=True))
    table = lb.summarise(runs).table.set_index(["method", "budget"])
    # the fewest parameters that tell the runs apart, preferring ones every run logged
    old = table.loc[("tldr-release (match_embedder=proxy)", 0.25)]
    new = table.loc[("tldr-release (match_embedder=proxy:scorer)", 0.25)]
    assert (old["mean_R1_mean"], new["mean_R1_mean"]) == (pytest.approx(0.06), pytest.approx(0.12))
    assert old["seeds"] == new["seeds"] == 2
    # labels whose runs agree (or that have no parameters) only read as a person writes them
    assert {"random", "tldr", "clip (k=3)"} <= {m for m, _ in table.index}


def test_labels_read_as_written_and_stay_unambiguous():
    spec = MethodSpec.parse("tldr(captioner_epochs=10.0,refine=False)")
    assert (spec.name, dict(spec.params)) == (
        "tldr",
        {"captioner_epochs": "10.0", "refine": "False"},
    )
    spec = MethodSpec.parse("random")
    assert (spec.name, dict(spec.params)) == ("random", {})
    assert lb.readable_label("tldr", {"refine": "False", "captioner_epochs": "10.0"}) == (
        "tldr (captioner_epochs=10, refine=False)"
    )
    # where only a parameter some runs never logged tells them apart, the label says so
    runs = pd.DataFrame(
        {
            "params.method_label": ["nds", "nds", "nds(k=5)"],
            "params.param.k": ["10", "10", "5"],
            "params.param.tau": [None, "0.5", None],
        }
    )
    labels = lb.split_mixed_parameters(runs)["params.method_label"].tolist()
    assert labels == ["nds (tau not logged)", "nds (tau=0.5)", "nds (k=5)"]


def hand_runs(values: dict[tuple[str, float], list[float]], pool: str = "synthweb"):
    """MLflow-like runs: per (method label, budget) one R@1 value per seed 0, 1, ..."""
    rows = []
    for (method, budget), per_seed in values.items():
        for seed, value in enumerate(per_seed):
            rows.append(
                {
                    "run_id": f"{pool}-{method}-{budget}-{seed}",
                    "params.pool": pool,
                    "params.pool_fingerprint": f"fp-{pool}",
                    "params.scale": "tiny",
                    "params.protocol": "fixed-compute",
                    "params.method_label": method,
                    "params.budget": str(budget),
                    "params.seed": str(seed),
                    "metrics.mean_R1": value,
                    "metrics.zeroshot_acc1": 2 * value,
                    "metrics.selection_seconds": 1.0,
                    "metrics.training_seconds": 10.0,
                }
            )
    return pd.DataFrame(rows)


RANDOM = [0.10, 0.20, 0.30]
SEPARATION = {
    ("random", 0.25): RANDOM,
    ("ahead", 0.25): [r + d for r, d in zip(RANDOM, [0.10, 0.11, 0.12], strict=True)],
    ("level", 0.25): [r + d for r, d in zip(RANDOM, [0.0, 0.01, -0.01], strict=True)],
    ("behind", 0.25): [r - d for r, d in zip(RANDOM, [0.05, 0.06, 0.04], strict=True)],
    ("random", 1.0): [0.5, 0.7, 0.6],
}


def test_pairs_of_methods_are_compared_over_seeds_and_counted():
    board = lb.summarise(hand_runs(SEPARATION))
    pairs = board.pairs[board.pairs["metric"] == "mean_R1"].set_index(["method_a", "method_b"])
    # ahead - behind per seed: 0.15, 0.17, 0.16
    diffs = pd.Series([0.15, 0.17, 0.16])
    ahead_behind = pairs.loc[("ahead", "behind")]
    assert ahead_behind["difference_mean"] == pytest.approx(diffs.mean())
    assert ahead_behind["difference_ci95"] == pytest.approx(T_975_DF2 * diffs.std() / math.sqrt(3))
    assert ahead_behind["separated"] == 1 and ahead_behind["pairs"] == 3
    assert pairs.loc[("level", "random"), "separated"] == 0  # +0.0 ± 0.025
    assert pairs.loc[("behind", "level"), "separated"] == -1  # level ahead: 0.05, 0.07, 0.03
    # 4 methods -> 6 pairs; all but level-random differ beyond their interval
    counts = lb.separation_counts(board.pairs).set_index("metric")
    assert counts.loc["mean_R1", ["method_pairs", "testable", "separated"]].tolist() == [6, 6, 5]
    table = board.table.set_index("method")
    assert table.loc["ahead", "mean_R1_vs_random_separated"] == 1
    assert table.loc["behind", "mean_R1_vs_random_separated"] == -1
    assert table.loc["level", "mean_R1_vs_random_separated"] == 0


def test_page_marks_separated_differences_and_reports_the_counts(tmp_path):
    md, _, html, _ = lb.write(lb.summarise(hand_runs(SEPARATION)), tmp_path, "sep")
    text = md.read_text()
    assert "**Every row: pool `synthweb` (fingerprint `fp-synthweb`), scale `tiny`" in text
    assert "3 seeds per row (0, 1, 2)" in text and "| seeds |" not in text
    assert (
        "Method pairs that differ beyond their paired 95% CI: R@1 5 of 6; zero-shot top-1 5 of 6."
        in text
    )
    rows = {line.split(" | ")[0].strip("| *"): line for line in text.splitlines() if "|" in line}
    assert "▲ +0.110 ± " in rows["ahead"] and "▼ -0.050 ± " in rows["behind"]
    assert "▲" not in rows["level"] and "▼" not in rows["level"]
    page = html.read_text()
    assert '<table class="sortable">' in page and "<script>" in page
    assert 'class="up"' in page and 'class="down"' in page
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched
    assert "level ahead of behind in R@1 by 0.050 ± " in page  # the separated pairs, listed
    assert 'data-v="0.11' in page  # cells sort by their number, not their text


def test_kendall_tau_between_two_configurations_on_hand_built_tables():
    from scipy import stats

    def board(means: dict[str, float], pool: str):
        return lb.summarise(hand_runs({(m, 0.25): [v, v + 0.01] for m, v in means.items()}, pool))

    here = board({"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1, "e": 0.05}, "one")
    same = lb.rank_agreement(here, board({"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6}, "two"))
    r1 = same[same["metric"] == "mean_R1"].iloc[0]
    assert (r1["methods"], r1["tau"]) == (4, pytest.approx(1.0))  # "e" ran only here
    assert r1["only_here"] == "e" and r1["only_there"] == ""
    swapped = lb.rank_agreement(here, board({"a": 0.9, "b": 0.8, "c": 0.6, "d": 0.7}, "two"))
    # one discordant pair of six: (5 - 1) / 6
    assert swapped.iloc[0]["tau"] == pytest.approx(4 / 6)
    assert swapped.iloc[0]["tau"] == pytest.approx(
        stats.kendalltau([0.4, 0.3, 0.2, 0.1], [0.9, 0.8, 0.6, 0.7]).statistic
    )
    reversed_ = lb.rank_agreement(here, board({"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}, "two"))
    assert reversed_.iloc[0]["tau"] == pytest.approx(-1.0)
    too_few = lb.rank_agreement(here, board({"a": 0.1, "b": 0.2}, "two"))
    assert pd.isna(too_few.iloc[0]["tau"])  # two methods rank nothing worth a number
    mixed = lb.summarise(pd.concat([hand_runs(SEPARATION, "one"), hand_runs(SEPARATION, "two")]))
    with pytest.raises(lb.SelbenchError, match="mixes 2 settings"):
        lb.rank_agreement(mixed, here)


def test_leaderboard_command_compares_with_another_pool_or_experiment(tmp_path):
    from click.testing import CliRunner

    from selbench.cli import main

    means = {"a": 0.4, "b": 0.3, "c": 0.2, "random": 0.1}
    other = {"a": 0.4, "b": 0.2, "c": 0.3, "random": 0.1}  # b and c swap: tau 4/6
    log_frame_runs("first", hand_runs({(m, 0.25): [v, v + 0.02] for m, v in means.items()}, "p1"))
    log_frame_runs("first", hand_runs({(m, 0.25): [v, v + 0.02] for m, v in other.items()}, "p2"))
    log_frame_runs("second", hand_runs({(m, 0.25): [v, v + 0.02] for m, v in other.items()}, "p3"))
    out = tmp_path / "boards"
    base = ["leaderboard", "--experiment", "first", "--out", str(out), "--no-plots"]
    result = CliRunner().invoke(main, [*base, "--compare-with", "p2"])
    assert result.exit_code == 0, result.output
    text = (out / "first.md").read_text()
    assert "## Ranking stability vs pool `p2`" in text
    assert "| 0.25 | 4 | +0.67 (p " in text
    assert "pool `p1`" in text and "p2" not in text.split("## Ranking stability")[0]
    result = CliRunner().invoke(main, [*base, "--where", "pool=p1", "--compare-with", "second"])
    assert result.exit_code == 0, result.output
    assert "## Ranking stability vs experiment `second`" in (out / "first.md").read_text()
    result = CliRunner().invoke(main, [*base, "--compare-with", "nowhere"])
    assert result.exit_code == 1
    assert "no finished runs on a pool of that name" in result.output
    assert "its pools: p1, p2" in result.output
    assert (
        "--compare-with EXPERIMENT_OR_POOL"
        in CliRunner().invoke(main, ["leaderboard", "-h"]).output
    )


def test_suite_summary_columns_join_the_default_metrics():
    runs = fake_runs()
    runs["params.eval_suite"] = "pool"
    assert lb.default_metrics(runs) == lb.DEFAULT_METRICS
    runs.loc[runs["params.method_label"] == "tldr", "params.eval_suite"] = "datacomp-38"
    runs.loc[runs["params.method_label"] == "random", "params.eval_suite"] = "seed"
    metrics = lb.default_metrics(runs)
    assert metrics[:2] == lb.DEFAULT_METRICS
    assert {"datacomp/average", "datacomp/vtab", "mscoco/mean_R1", "imagenet1k/acc1"} <= set(
        metrics
    )
    # a suite whose config is not on this machine adds nothing and does not fail
    runs["params.eval_suite"] = "a-suite-from-another-lab"
    assert lb.default_metrics(runs) == lb.DEFAULT_METRICS
    # the summary columns reach the page under DataComp's names
    runs["params.eval_suite"] = "datacomp-38"
    runs["metrics.datacomp/average"] = runs["metrics.mean_R1"] / 2
    board = lb.summarise(runs, lb.default_metrics(runs))
    assert "datacomp/average" in board.metrics
    assert "average (38) (mean ± 95% CI)" in lb.columns(board)


def test_every_row_names_the_commands_that_export_its_subsets(tmp_path):
    board = lb.summarise(fake_runs())
    md, csv, html, _ = lb.write(board, tmp_path, "synthweb")
    text = md.read_text()
    assert "## Export a row's subset" in text
    line = next(x for x in text.splitlines() if x.startswith("- tldr at budget 0.25"))
    for seed in range(3):
        assert f"`selbench export tldr-0.25-{seed} --format parquet` (seed {seed})" in line
    table = pd.read_csv(csv)
    exported = table.set_index("method")["export"].to_dict()
    assert exported["clip(k=3)"] == "selbench export clip(k=3)-0.25-0 --format parquet"
    assert exported["tldr"].count("selbench export") == 3
    assert "selbench export random-1.0-1 --format parquet" in html.read_text()


# --- total FLOPs: a cost column, and the metric against them ----------------------------

# (label at 1x, budget) -> the training lengths it ran at; one online method among them
FLOPS_CELLS = {
    ("random", 0.25): (0.5, 1.0, 2.0),
    ("clip_score(k=3)", 0.25): (0.5, 1.0, 2.0),
    ("random >> online:jest(ratio=2)", 0.25): (1.0, 2.0),
    ("random", 1.0): (1.0, 2.0),
}


def flops_r1(label: str, budget: float, train: float) -> list[float]:
    """R@1 per seed: longer training does better, the filter and the online step too."""
    base = 0.1 * train + (0.05 if "clip" in label else 0.0) + (0.03 if "online" in label else 0.0)
    return [base + budget / 10, base + budget / 10 + 0.02]


def flops_runs() -> pd.DataFrame:
    """Runs that logged ``flops/total`` (selection + training + online scoring) at several
    training lengths; seed 1 costs 1.24 x seed 0, so a row's mean is 1.12 x seed 0's."""
    from selbench.run.spec import train_label

    frames = []
    for (label, budget), lengths in FLOPS_CELLS.items():
        for train in lengths:
            runs = hand_runs({(train_label(label, train), budget): flops_r1(label, budget, train)})
            per_seed = 6e12 * train * (1.5 if "online" in label else 1.0) * (budget / 0.25)
            runs["metrics.flops/total"] = [per_seed, 1.24 * per_seed]
            runs["params.train_samples"] = str(train)
            runs["params.online"] = "jest(ratio=2)" if "online" in label else ""
            frames.append(runs)
    return pd.concat(frames, ignore_index=True)


def test_total_flops_is_a_cost_column_when_some_run_logged_it(tmp_path):
    from rich.console import Console

    old = hand_runs({("tldr", 0.25): [0.2, 0.3]})  # logged before runs counted FLOPs
    runs = lb.split_mixed_parameters(pd.concat([flops_runs(), old], ignore_index=True))
    board = lb.summarise(runs)
    table = board.table.set_index(["method", "budget"])
    assert table.loc[("random", 0.25), "flops/total_mean"] == pytest.approx(6.72e12)
    assert table.loc[("clip_score (k=3) [train 2x]", 0.25), "flops/total_mean"] == (
        pytest.approx(2 * 6.72e12)
    )
    assert pd.isna(table.loc[("tldr", 0.25), "flops/total_mean"])
    assert lb.columns(board)[-1] == "total FLOPs"  # a cost column: no CI, no paired column
    assert "total FLOPs (mean ± 95% CI)" not in lb.columns(board)
    md, csv, html, _ = lb.write(board, tmp_path, "flops")
    text = md.read_text()
    rows = {line.split(" | ")[0].strip("| *"): line for line in text.splitlines() if "|" in line}
    assert rows["random"].endswith(" | 6.72e12 |")
    assert rows["random >> online:jest(ratio=2) [train 2x]"].endswith(" | 2.02e13 |")
    assert rows["tldr"].endswith(" | — |")  # an older run: no FLOPs, the row stays
    assert "Total FLOPs: mean over seeds" in text
    written = pd.read_csv(csv).set_index(["method", "budget"])
    assert written.loc[("random", 0.25), "flops/total_mean"] == pytest.approx(6.72e12)
    page = html.read_text()
    assert "<th>total FLOPs</th>" in page and 'data-v="6.72e+12"' in page
    console = Console(width=400, record=True)
    for part in lb.rich_tables(board):
        console.print(part)
    shown = console.export_text()
    assert "total FLOPs" in shown and "6.72e12" in shown
    # no run logged it (also when the store has the metric from runs not on this page)
    for without in (fake_runs(), fake_runs().assign(**{"metrics.flops/total": float("nan")})):
        plain = lb.summarise(without)
        assert "flops/total_mean" not in plain.table.columns
        assert "total FLOPs" not in lb.columns(plain)
        assert "FLOPs" not in lb.to_markdown(plain, "board")


def test_metric_vs_total_flops_draws_a_line_per_method_and_budget(tmp_path):
    board = lb.summarise(lb.split_mixed_parameters(flops_runs()))
    drawn = plots.metric_vs_flops(board, "mean_R1", tmp_path / "f_flops.png")
    assert drawn is not None and drawn.path.is_file() and drawn.metric == "mean_R1"
    curves = {(c.method, c.budget): c for c in drawn.curves}
    # one line per label at 1x and budget, through its training lengths by FLOPs
    assert set(curves) == {
        ("random", 0.25),
        ("clip_score (k=3)", 0.25),
        ("random >> online:jest(ratio=2)", 0.25),
        ("random", 1.0),
    }
    clip = curves[("clip_score (k=3)", 0.25)]
    assert clip.train == [0.5, 1.0, 2.0]
    assert clip.flops == pytest.approx([3.36e12, 6.72e12, 13.44e12])
    assert clip.mean == pytest.approx([sum(flops_r1("clip", 0.25, t)) / 2 for t in clip.train])
    assert clip.ci95 == pytest.approx([T_975_DF1 * pd.Series([0, 0.02]).std() / math.sqrt(2)] * 3)
    online = curves[("random >> online:jest(ratio=2)", 0.25)]
    assert (online.linestyle, online.marker, online.train) == ("--", "^", [1.0, 2.0])
    assert (clip.linestyle, clip.marker) == ("-", "o")
    assert clip.name == "clip_score (k=3) @ budget 0.25"
    # runs that never logged their FLOPs draw nothing
    nothing = plots.metric_vs_flops(lb.summarise(fake_runs()), "mean_R1", tmp_path / "no.png")
    assert nothing is None and not (tmp_path / "no.png").exists()


def test_the_flops_plot_is_written_beside_the_others_and_the_page_shows_it(tmp_path):
    old = hand_runs({("tldr", 0.25): [0.2, 0.3]})
    log_frame_runs("flops", pd.concat([flops_runs(), old], ignore_index=True))
    runs = lb.load_runs("flops")  # back from MLflow: labels read as the page shows them
    board = lb.summarise(runs)
    figures = plots.all_plots(board, runs, tmp_path, "board", load_uids=lambda _: {"u1"})
    assert figures["R@1 vs. total FLOPs"] == tmp_path / "board_flops.png"
    assert (tmp_path / "board_flops.png").is_file()
    curves = plots.flops_curves(board, "mean_R1")
    assert {c.method for c in curves} == {
        "random",
        "clip_score (k=3)",
        "random >> online:jest(ratio=2)",
    }  # tldr logged no FLOPs: not on the chart
    md, _, html, _ = lb.write(board, tmp_path, "board", figures)
    assert "![R@1 vs. total FLOPs](board_flops.png)" in md.read_text()
    assert 'alt="R@1 vs. total FLOPs"' in html.read_text()
    old_runs = fake_runs()
    without = plots.all_plots(
        lb.summarise(old_runs), old_runs, tmp_path / "old", "old", load_uids=lambda _: {"u1"}
    )
    assert not any("FLOPs" in caption for caption in without)
