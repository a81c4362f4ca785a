import pandas as pd
import pytest

from selbench import leaderboard as lb


def fake_runs():
    rows = []
    values = {
        ("random", "0.25"): [0.10, 0.20, 0.30],
        ("random", "1.0"): [0.5, 0.7],
        ("clip(k=3)", "0.25"): [0.4],
    }
    for (method, budget), metric in values.items():
        for seed, value in enumerate(metric):
            rows.append(
                {
                    "params.pool": "synthweb",
                    "params.pool_fingerprint": "abc",
                    "params.scale": "tiny",
                    "params.protocol": "fixed-compute",
                    "params.method_label": method,
                    "params.budget": budget,
                    "params.seed": str(seed),
                    "metrics.mean_R1": value,
                    "metrics.zeroshot_acc1": 2 * value,
                }
            )
    return pd.DataFrame(rows)


def test_summary_matches_a_recomputation_from_raw_metrics():
    board = lb.summarise(fake_runs())
    table = board.table.set_index(["method", "budget"])
    assert table.loc[("random", 0.25), "mean_R1_mean"] == pytest.approx(0.2)
    assert table.loc[("random", 0.25), "mean_R1_std"] == pytest.approx(0.1)
    assert table.loc[("random", 1.0), "zeroshot_acc1_mean"] == pytest.approx(1.2)
    assert pd.isna(table.loc[("clip(k=3)", 0.25), "mean_R1_std"])  # one seed: no spread
    assert table.loc[("random", 0.25), "seeds"] == 3


def test_rows_sorted_by_budget_then_best_first():
    board = lb.summarise(fake_runs())
    assert board.table[["method", "budget"]].values.tolist() == [
        ["clip(k=3)", 0.25],
        ["random", 0.25],
        ["random", 1.0],
    ]


def test_markdown_and_csv_are_written(tmp_path):
    board = lb.summarise(fake_runs())
    md, csv = lb.write(board, tmp_path, "synthweb")
    text = md.read_text()
    assert "| clip(k=3) | 0.25 | 1 | 0.400 | 0.800 |" in text  # one seed: value alone
    assert (
        "| synthweb | tiny | fixed-compute | random | 0.25 | 3 | 0.200 ± 0.100 | 0.400 ± 0.200 |"
        in text
    )
    assert len(pd.read_csv(csv)) == 3


def test_no_runs_gives_an_empty_board():
    assert lb.summarise(pd.DataFrame()).table.empty
