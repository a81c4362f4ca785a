import math

import pandas as pd
import pytest

from selbench import leaderboard as lb
from selbench import plots

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


def test_rows_sorted_by_budget_then_best_first():
    board = lb.summarise(fake_runs())
    assert board.table[["method", "budget"]].values.tolist() == [
        ["clip(k=3)", 0.25],
        ["tldr", 0.25],
        ["random", 0.25],
        ["random", 1.0],
    ]


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
    md, csv, html = lb.write(board, tmp_path, "synthweb", figures)
    text = md.read_text()
    assert "| clip(k=3) | 0.25 | 1 | 0.400 | +0.300 |" in text  # one seed: values alone
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert f"| random | 0.25 | 3 | 0.200 ± {half:.3f} | — |" in text
    assert "full pool (random 1.0)" in text
    assert "![mean_R1 vs. budget](synthweb_budget.png)" in text
    assert len(pd.read_csv(csv)) == 4
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
    md, _, html = lb.write(lb.summarise(runs), tmp_path, "x", intro=["Produced by `cmd`.", *lines])
    assert md.read_text().index("Produced by `cmd`.") < md.read_text().index("| pool |")
    assert "Runs: 9 finished MLflow runs" in html.read_text()


def test_terminal_table_moves_shared_settings_into_the_title():
    from rich.console import Console

    table = lb.rich_table(lb.summarise(fake_runs()), "board")
    assert table.title == "board (pool synthweb, scale tiny, protocol fixed-compute)"
    names = [c.header for c in table.columns]
    assert names[:3] == ["method", "budget", "seeds"]
    console = Console(width=200, record=True)
    console.print(table)
    assert "0.200 ± " in console.export_text()  # random at 0.25 keeps its CI


def test_runs_of_one_label_with_different_parameters_get_separate_rows():
    # A default changed between runs: both carry the label "tldr-release", but their
    # logged parameters differ, so averaging them as one method would be wrong.
    runs = fake_runs()
    extra = []
    for seed, (embedder, value) in enumerate([("proxy", 0.06), ("proxy:scorer", 0.12)] * 2):
        extra.append(
            {
                **runs.iloc[0].to_dict(),
                "run_id": f"rel-{seed}",
                "params.method_label": "tldr-release",
                "params.seed": str(seed // 2),
                "params.param.match_embedder": embedder,
                "params.param.clusters": "1000",
                "metrics.mean_R1": value,
            }
        )
    runs = lb.split_mixed_parameters(pd.concat([runs, pd.DataFrame(extra)], ignore_index=True))
    table = lb.summarise(runs).table.set_index(["method", "budget"])
    old = table.loc[("tldr-release[match_embedder=proxy]", 0.25)]
    new = table.loc[("tldr-release[match_embedder=proxy:scorer]", 0.25)]
    assert (old["mean_R1_mean"], new["mean_R1_mean"]) == (pytest.approx(0.06), pytest.approx(0.12))
    assert old["seeds"] == new["seeds"] == 2
    # labels whose runs agree (or that have no parameters) are left alone
    assert {"random", "tldr", "clip(k=3)"} <= {m for m, _ in table.index}
