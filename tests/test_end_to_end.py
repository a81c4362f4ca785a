"""End to end on a tiny SynthWeb pool: select, train, evaluate, log, leaderboard."""

from __future__ import annotations

import math

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner

from selbench import leaderboard as lb
from selbench import tracking
from selbench.cli import main
from selbench.run.lifecycle import execute
from selbench.run.spec import RunRequest

pytestmark = pytest.mark.slow


def is_timing(key: str) -> bool:
    """Wall-clock figures (seconds, rates): the only metrics that may differ between runs."""
    return "seconds" in key or key.endswith("per_second")


def _request(tiny, **kw):
    pool, scale = tiny
    return RunRequest(
        pool=str(pool), scale=str(scale), **{"method": "random", "budget": 0.25, **kw}
    )


def test_same_seed_same_uids_and_metrics_and_leaderboard_rows(tiny):
    first = execute(_request(tiny, seed=3))
    second = execute(_request(tiny, seed=3))
    assert first.selection.uids == second.selection.uids
    runs = mlflow.search_runs(experiment_names=["selbench"]).set_index("run_id")
    assert (
        runs.loc[first.run_id, "params.selection_sha256"]
        == runs.loc[second.run_id, "params.selection_sha256"]
    )
    assert len(first.selection.uids) == 80  # round(0.25 * 320)
    for key, value in first.metrics.items():
        if not is_timing(key):
            assert value == second.metrics[key] or (
                math.isnan(value) and math.isnan(second.metrics[key])
            ), key
    other_seed = execute(_request(tiny, seed=4))
    assert other_seed.selection.uids != first.selection.uids
    full = execute(_request(tiny, budget=1.0))
    assert len(full.selection.uids) == 320

    runs = lb.load_runs()
    board = lb.summarise(runs)
    assert sorted(board.table["budget"]) == [0.25, 1.0]
    quarter = board.table[board.table["budget"] == 0.25].iloc[0]
    assert quarter["seeds"] == 2 and quarter["runs"] == 3
    # The leaderboard equals a recomputation from the raw metrics of the runs.
    values = pd.Series(
        [first.metrics["mean_R1"], second.metrics["mean_R1"], other_seed.metrics["mean_R1"]]
    )
    assert quarter["mean_R1_mean"] == pytest.approx(values.mean())
    assert quarter["mean_R1_std"] == pytest.approx(values.std(ddof=1))


def test_run_is_visible_in_mlflow_with_params_metrics_and_artifacts(tiny, tmp_path):
    outcome = execute(_request(tiny, seed=0))
    tracking.setup()
    runs = mlflow.search_runs(experiment_names=["selbench"])
    row = runs.set_index("run_id").loc[outcome.run_id]
    assert row["status"] == "FINISHED"
    for param in (
        "method",
        "budget",
        "protocol",
        "scale",
        "seed",
        "pool_fingerprint",
        "version.torch",
        "version.open_clip_torch",
        "method_params",
        "budget_count",
    ):
        assert isinstance(row[f"params.{param}"], str) and row[f"params.{param}"], param
    assert row["params.method"] == "random" and row["params.budget_count"] == "80"
    for metric in (
        "mean_R1",
        "zeroshot_acc1",
        "retrieval/i2t_R1",
        "retrieval/t2i_R10",
        "shape/acc1",
        "colour/acc1",
        "reasoning-probe/acc",
        "reasoning-probe/text_only_acc",
        "subset_size",
        "selection_seconds",
        "training_seconds",
        "diag/pool_frac/misaligned",
        "diag/selected_frac/clean",
    ):
        assert not math.isnan(row[f"metrics.{metric}"]), metric
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(outcome.run_id)}
    assert {"selection.parquet", "config.yaml"} <= artifacts
    local = mlflow.artifacts.download_artifacts(
        run_id=outcome.run_id, artifact_path="selection.parquet", dst_path=str(tmp_path)
    )
    frame = pd.read_parquet(local)
    assert frame["uid"].tolist() == outcome.selection.uids
    assert set(frame.columns) >= {"uid", "caption", "train_caption", "score"}


def test_cli_run_prints_metrics_and_where_it_logged(tiny):
    pool, scale = tiny
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--method",
            "random",
            "--budget",
            "0.5",
            "--pool",
            str(pool),
            "--scale",
            str(scale),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "R@1" in result.output and "zero-shot top-1" in result.output
    assert "mlflow ui --backend-store-uri sqlite:///" in result.output
    board = CliRunner().invoke(main, ["leaderboard", "--out", str(pool.parent / "boards")])
    assert board.exit_code == 0, board.output
    assert (pool.parent / "boards" / "selbench.md").read_text().count("| random |") == 1


def test_embedding_strategies_share_one_cache_entry(tiny):
    first = execute(_request(tiny, method="clip_score"))
    second = execute(_request(tiny, method="clip_score", budget=0.5))
    spec = "reference"  # clip_score's default embedder: SynthWeb's reference CLIP
    assert first.embeddings[spec]["hit"] is False
    assert second.embeddings[spec]["hit"] is True
    assert first.embeddings[spec]["entry_id"] == second.embeddings[spec]["entry_id"]
    runs = mlflow.search_runs(experiment_names=["selbench"]).set_index("run_id")
    assert runs.loc[first.run_id, "params.embeddings.reference.spec"] == spec
    assert runs.loc[first.run_id, "params.embeddings.reference.hit"] == "False"
    assert runs.loc[second.run_id, "params.embeddings.reference.hit"] == "True"
    # (What a hit saves is measured by benchmarks, not asserted here: on this 320-sample
    # pool the first pass takes a fraction of a second, and timings are noise.)
    # clip_score keeps the best-aligned pairs: its scores are logged with the selection
    assert set(first.selection.uids) <= set(second.selection.uids)


def test_oracle_gets_the_ground_truth_from_the_harness_and_keeps_only_clean_pairs(tiny):
    outcome = execute(_request(tiny, method="oracle"))
    assert outcome.metrics["diag/kept/clean"] > 0
    noisy = [k for k in outcome.metrics if k.startswith("diag/kept/") and k != "diag/kept/clean"]
    assert noisy and all(outcome.metrics[k] == 0 for k in noisy)
    assert outcome.metrics["strategy/filled"] == 0
