"""The run package's pure parts: selection.parquet round trips, and stages that return
their results without a tracking store (selbench.run.selection_io, selbench.run.stages)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from selbench.errors import SelbenchError
from selbench.paths import run_home
from selbench.progress import NullProgress
from selbench.run.lifecycle import stages_to_run
from selbench.run.selection_io import (
    SELECTION_COLUMNS,
    read_selection,
    selection_from_file,
    selection_path,
    synthesized_path,
    write_selection,
)
from selbench.run.spec import RunRequest, selection_hash
from selbench.run.stages import StageContext, materialize_stage, prepare, select_stage
from selbench.rundir import RunDir
from selbench.strategy import Selection, Synthesized


def _pool(n: int = 6) -> SimpleNamespace:
    uids = [f"u{i}" for i in range(n)]
    return SimpleNamespace(pool=SimpleNamespace(uids=uids, captions=[f"c{i}" for i in uids]))


def test_a_pool_selection_round_trips_with_its_rewrites_and_scores(tmp_path):
    rundir = RunDir(tmp_path / "run")
    rundir.root.mkdir()
    chosen = Selection(uids=["u3", "u1", "u4"], captions={"u1": "new"}, scores={"u3": 0.5})
    written = write_selection(rundir, _pool(), chosen)
    assert written == [selection_path(rundir)]
    frame = read_selection(rundir)
    assert list(frame.columns) == list(SELECTION_COLUMNS)
    assert frame["uid"].tolist() == ["u3", "u1", "u4"]
    assert frame["train_caption"].tolist() == ["cu3", "new", "cu4"]
    assert pd.isna(frame["score"].iloc[1])
    back = selection_from_file(rundir)
    assert back.uids == chosen.uids and back.captions == {"u1": "new"}
    assert back.scores == {"u3": 0.5}


def test_a_synthesized_selection_keeps_its_pixels_beside_the_parquet(tmp_path):
    rundir = RunDir(tmp_path / "run")
    pixels = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    chosen = Selection(
        uids=["synth:a:000001", "synth:a:000002"],
        synthesized=Synthesized(pixels, ["one", "two"], ["u1", None]),
        pixels=pixels,
    )
    written = write_selection(rundir, _pool(), chosen)
    assert written == [selection_path(rundir), synthesized_path(rundir)]
    back = selection_from_file(rundir)
    assert back.uids == chosen.uids and back.synthesized is not None
    assert list(back.synthesized.captions) == ["one", "two"]
    assert np.array_equal(back.pixels, pixels)


def test_a_missing_selection_is_an_error_naming_the_file(tmp_path):
    rundir = RunDir(tmp_path / "run")
    with pytest.raises(SelbenchError, match="selection.parquet is missing"):
        read_selection(rundir)


def test_the_stages_a_run_runs_follow_the_resume_rules(tmp_path):
    rundir = RunDir(tmp_path / "run")
    rundir.root.mkdir()
    assert stages_to_run(rundir, None, "r") == ["select", "materialize", "train", "evaluate"]
    rundir.mark_done("select", {"metrics": {}})
    assert stages_to_run(rundir, None, "r") == ["materialize", "train", "evaluate"]
    with pytest.raises(SelbenchError, match="already done"):
        stages_to_run(rundir, ["select"], "r")
    with pytest.raises(SelbenchError, match="needs stage 'materialize' first"):
        stages_to_run(rundir, ["train"], "r")


@pytest.mark.slow  # generates the tiny pool
def test_select_and_materialize_return_their_results_and_touch_no_store(
    tiny, tmp_path, empty_mlflow_store
):
    pool, scale = tiny
    request = RunRequest(method="random", budget=0.25, pool=str(pool), scale=str(scale))
    plan = prepare(request, NullProgress())
    rundir = RunDir(tmp_path / "run")
    steps: list[tuple[int, dict]] = []
    stage = StageContext(plan, rundir, "no-run", NullProgress(), lambda s, v: steps.append((s, v)))
    selected = select_stage(stage)
    assert selected.metrics["subset_size"] == plan.count
    digest = selection_hash(selected.selection.uids)
    assert selected.params["selection_sha256"] == digest
    assert selected.stage_record() == {"metrics": selected.metrics, "selection_sha256": digest}
    assert [path for path, _ in selected.artifacts] == [selection_path(rundir)]
    shards = materialize_stage(stage)
    assert shards.record["samples"] == plan.count and shards.metrics["materialize_shards"] >= 1
    # no tracking call was made: the home's store is still the empty one it started with
    store = run_home() / "mlflow.db"
    assert store.read_bytes() == empty_mlflow_store.read_bytes()


def test_training_is_counted_as_three_forwards_per_sample_plus_the_loss():
    from selbench.flops import clip_forward_flops, clip_loss_flops
    from selbench.run.compute import training_compute
    from selbench.train import TrainResult, build_model

    trained = TrainResult(
        steps=5, samples_seen=320, batch_size=64, seconds=1.0, final_loss=0.0, loss_curve=[]
    )
    model, _, _ = build_model("selbench-tiny", 0)
    per_example = sum(clip_forward_flops(model, None, None).values())
    loss = clip_loss_flops(64, model.text_projection.shape[1])
    got = training_compute("selbench-tiny", trained)
    assert got == {"flops/training": float(3 * per_example * 320 + 3 * loss * 5)}


def test_an_embedding_pass_the_cache_served_is_not_counted_again():
    from selbench.run.compute import selection_compute

    class Services:
        def __init__(self, hit: bool):
            from selbench.train import build_model

            self.model = build_model("selbench-tiny", 0)[0]
            self.usage = {"proxy": {"hit": hit, "embedder_id": "proxy:selbench-tiny:w0:p0"}}

        def embedder(self, spec):
            return SimpleNamespace(model=self.model)

    computed = selection_compute(Services(hit=False), 100)
    cached = selection_compute(Services(hit=True), 100)
    assert computed["flops/selection/embedding/proxy"] > 0
    assert cached == {"flops/selection/embedding/proxy": 0.0}
