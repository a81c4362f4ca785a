"""Target data, the leakage check, and the kNN-target strategy."""

from __future__ import annotations

import tarfile

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from selbench_plugins.knn_target import max_similarity, round_robin

from selbench.cli import main
from selbench.errors import ConfigError
from selbench.pools import resolve_pool
from selbench.run.lifecycle import execute
from selbench.run.spec import RunRequest
from selbench.target import load_target


def test_round_robin_takes_each_targets_nearest_in_turn():
    neighbours = np.array([[5, 1, 2], [5, 3, 4]])  # both targets' nearest is sample 5
    assert round_robin(neighbours, 3).tolist() == [5, 1, 3]
    assert round_robin(neighbours, 5).tolist() == [5, 1, 3, 2, 4]
    assert round_robin(neighbours, 6) is None  # lists exhausted: caller asks for more


def test_max_similarity_is_the_best_cosine_to_any_target():
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [np.sqrt(0.5), np.sqrt(0.5)]], dtype=np.float32)
    target = np.array([[1.0, 0.0]], dtype=np.float32)
    assert max_similarity(pool, target) == pytest.approx([1.0, 0.0, np.sqrt(0.5)], abs=1e-6)


def test_synthweb_target_split_passes_the_leakage_check(tiny):
    pool, _ = tiny
    resolved = resolve_pool(str(pool))
    target = load_target(resolved.target, resolved.eval_sets)
    assert len(target.images) == 20
    assert sorted(target.checked_against) == [
        "captioning",
        "colour",
        "reasoning-probe",
        "retrieval",
        "shape",
    ]


def _eval_image_bytes(pool_dir):
    with tarfile.open(pool_dir / "eval" / "shape" / "test" / "0.tar") as tar:
        member = next(m for m in tar if m.name.endswith(".png"))
        return tar.extractfile(member).read()


def test_a_target_holding_an_eval_image_is_refused(tiny, tmp_path):
    pool, _ = tiny
    folder = tmp_path / "leaky"
    folder.mkdir()
    (folder / "copied.png").write_bytes(_eval_image_bytes(pool))
    resolved = resolve_pool(str(pool))
    with pytest.raises(ConfigError, match="overlaps eval set 'shape'.*copied.png"):
        load_target(folder, resolved.eval_sets)


def test_missing_or_empty_target_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_target(tmp_path / "nope", [])
    with pytest.raises(ConfigError, match="holds no images"):
        load_target(tmp_path, [])


@pytest.mark.slow
def test_knn_target_runs_on_the_pools_target_split_and_logs_the_check(tiny):
    pool, scale = tiny
    outcome = execute(
        RunRequest(method="knn_target", budget=0.25, pool=str(pool), scale=str(scale))
    )
    assert len(outcome.selection.uids) == 80
    row = mlflow.search_runs(experiment_names=["selbench"]).set_index("run_id").loc[outcome.run_id]
    assert row["params.target.size"] == "20"
    assert row["params.target.overlap"] == "0"
    assert sorted(row["params.target.overlap_checked_against"].split(",")) == [
        "captioning",
        "colour",
        "reasoning-probe",
        "retrieval",
        "shape",
    ]


@pytest.mark.slow
def test_cli_refuses_a_leaky_target_and_marks_the_run_failed(tiny, tmp_path):
    pool, scale = tiny
    folder = tmp_path / "leaky"
    folder.mkdir()
    (folder / "copied.png").write_bytes(_eval_image_bytes(pool))
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--method",
            "knn_target",
            "--budget",
            "0.25",
            "--pool",
            str(pool),
            "--scale",
            str(scale),
            "--target",
            str(folder),
        ],
    )
    assert result.exit_code != 0
    assert "overlaps eval set" in result.output
    runs = mlflow.search_runs(experiment_names=["selbench"])
    assert runs["status"].tolist() == ["FAILED"]


def test_a_target_holding_a_reasoning_test_image_is_refused(tiny, tmp_path):
    pool, _ = tiny
    image = next((pool / "eval" / "reasoning" / "images" / "test1").rglob("*.png"))
    folder = tmp_path / "leaky"
    folder.mkdir()
    (folder / "pair.png").write_bytes(image.read_bytes())
    resolved = resolve_pool(str(pool))
    with pytest.raises(ConfigError, match="overlaps eval set 'reasoning-probe'.*pair.png"):
        load_target(folder, resolved.eval_sets)
