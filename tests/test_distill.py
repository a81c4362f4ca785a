"""Vision-language dataset distillation (plugins/selbench_plugins/distill.py) and the
contract for synthesized pairs (selbench.strategy.Synthesized): validation, storage,
training on them, resume, diagnostics, leaderboard marking, the conformance kit."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from e2e_helpers import logged_runs
from selbench_plugins.distill import Distill, trajectory_loss

import selbench
from selbench.cli import main
from selbench.errors import PluginError
from selbench.leaderboard import SYNTHESIZED_MARK, mark_synthesized
from selbench.materialize import load_subset
from selbench.registry import Registry, make_plugin_manager
from selbench.run.selection_io import selection_path, synthesized_path
from selbench.rundir import RunDir
from selbench.strategy import (
    SelectionContext,
    Synthesized,
    is_synthetic_uid,
    validate_selection,
)
from selbench.testing import make_memory_pool, parametrize_with_checks

EXPERIMENT = "distill-tests"
# Seconds, not minutes: one short expert, two matching iterations of two student steps.
TINY = dict(
    iterations=2,
    syn_steps=2,
    num_experts=1,
    expert_train_epochs=2,
    max_start_epoch=1,
    mini_batch_size=16,
)


def _pixels(n: int, size: int = 8, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype == np.uint8:
        return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return rng.random((n, size, size, 3)).astype(dtype)


def _made(images, captions=None, **kwargs) -> selbench.Selection:
    n = len(images)
    return selbench.Selection(
        uids=[],
        synthesized=Synthesized(images, captions or [f"pair {i}" for i in range(n)]),
        **kwargs,
    )


# -- validation --------------------------------------------------------------------------
def test_valid_synthesized_pairs_get_content_derived_uids_and_uint8_pixels():
    images = _pixels(3)
    got = validate_selection(_made(images), ["u1"], 3, "maker", image_size=8)
    assert got.pixels.dtype == np.uint8 and got.pixels.shape == (3, 8, 8, 3)
    assert np.array_equal(got.pixels, np.round(images * 255).astype(np.uint8))
    assert all(is_synthetic_uid(u) for u in got.uids)
    assert got.uids[0].endswith(":000001") and got.uids[2].endswith(":000003")
    again = validate_selection(_made(images.copy()), ["u1"], 3, "maker", image_size=8)
    assert again.uids == got.uids  # same content, same uids
    other = validate_selection(_made(_pixels(3)[::-1].copy()), ["u1"], 3, "maker", image_size=8)
    assert other.uids != got.uids


def _nan_images():
    images = _pixels(2)
    images[1, 0, 0, 0] = np.nan
    return images


@pytest.mark.parametrize(
    "selection, message",
    [
        (_made(_pixels(3)), "synthesized 3 images and 3 captions, the budget is exactly 2"),
        (_made(_pixels(2, size=16)), r"shape \(2, 16, 16, 3\), expected \(2, 8, 8, 3\)"),
        (_made(_nan_images()), "non-finite pixels"),
        (_made(_pixels(2) * 2), r"outside \[0, 1\]"),
        (_made(_pixels(2), ["a cat", ""]), "empty or non-string captions"),
        (_made(_pixels(2), ["a cat", None]), "empty or non-string captions"),
        (_made(_pixels(2).astype(np.int32)), "dtype int32"),
        (_made(_pixels(2), scores={"u1": 1.0}), "together with pool uids"),
    ],
)
def test_bad_synthesized_pairs_are_refused_naming_the_strategy(selection, message):
    with pytest.raises(PluginError, match=message) as info:
        validate_selection(selection, ["u1"], 2, "bad_maker", image_size=8)
    assert "strategy 'bad_maker'" in str(info.value)


def test_synthesized_pixels_of_uint8_are_stored_as_given():
    images = _pixels(2, dtype=np.uint8)
    got = validate_selection(_made(images), [], 2, "maker", image_size=8)
    assert np.array_equal(got.pixels, images)


# -- the harness: a bad return fails the run, naming the strategy -------------------------
class BadMaker(selbench.Strategy):
    """Returns synthesized pairs broken in the way its class attribute says."""

    name = "bad_maker"
    fault = "count"

    def select(self, ctx):
        n, side = ctx.budget_count, ctx.image_size
        images = np.full((n, side, side, 3), 0.5, dtype=np.float32)
        captions = [f"made {i}" for i in range(n)]
        if self.fault == "count":
            images, captions = images[:-1], captions[:-1]
        elif self.fault == "size":
            images = np.full((n, side + 4, side + 4, 3), 0.5, dtype=np.float32)
        elif self.fault == "nan":
            images[0, 1, 1, 1] = np.nan
        elif self.fault == "caption":
            captions[-1] = ""
        return selbench.Selection(uids=[], synthesized=Synthesized(images, captions))


class GoodMaker(selbench.Strategy):
    """Synthesizes a mid-grey image with the caption of a pool sample for each pair."""

    name = "good_maker"

    def select(self, ctx):
        n, side = ctx.budget_count, ctx.image_size
        images = np.full((n, side, side, 3), 128, dtype=np.uint8)
        images[:, : side // 2] = np.arange(n, dtype=np.uint8)[:, None, None, None]
        return selbench.Selection(
            uids=[], synthesized=Synthesized(images, list(ctx.pool.captions[:n]))
        )


@pytest.fixture
def makers(monkeypatch):
    module = types.ModuleType("maker_plugin")
    classes = [GoodMaker] + [
        type(f"BadMaker_{fault}", (BadMaker,), {"name": f"bad_{fault}", "fault": fault})
        for fault in ("count", "size", "nan", "caption")
    ]

    @selbench.hookimpl
    def register_strategies(register):
        for strategy in classes:
            register(strategy)

    module.register_strategies = register_strategies
    registry = Registry(make_plugin_manager())
    registry.add_plugin(module, package="maker-plugin", version="0.0.1")
    monkeypatch.setattr("selbench.run.stages.get_registry", lambda: registry)
    monkeypatch.setattr("selbench.run.plan.get_registry", lambda: registry)


def _run(method, tiny, *extra):
    pool, scale = tiny
    return CliRunner().invoke(
        main,
        ["run", "-m", method, "-b", "0.1", "--pool", str(pool), "--scale", str(scale)]
        + ["--experiment", EXPERIMENT, *extra],
    )


def _runs(method):
    return [r for r in logged_runs(EXPERIMENT) if r.data.params.get("method") == method]


@pytest.mark.parametrize(
    "fault, message",
    [
        ("count", "synthesized 31 images and 31 captions, the budget is exactly 32"),
        ("size", r"shape \(32, 36, 36, 3\), expected \(32, 32, 32, 3\)"),
        ("nan", "non-finite pixels"),
        ("caption", "empty or non-string captions"),
    ],
)
def test_a_bad_synthesized_return_fails_the_run_naming_the_strategy(tiny, makers, fault, message):
    result = _run(f"bad_{fault}", tiny)
    assert result.exit_code == 1, result.output
    assert f"strategy 'bad_{fault}'" in result.output
    assert re.search(message, " ".join(result.output.split()))
    (found,) = _runs(f"bad_{fault}")
    assert found.info.status == "FAILED"  # never left RUNNING
    rundir = RunDir(Path(found.data.tags["selbench.run_dir"]))
    assert not selection_path(rundir).exists() and not synthesized_path(rundir).exists()
    assert not rundir.subset_dir.exists()


@pytest.mark.slow  # trains and evaluates a model
def test_synthesized_pairs_are_stored_trained_on_and_marked(tiny, makers):
    result = _run("good_maker", tiny)
    assert result.exit_code == 0, result.output
    (found,) = _runs("good_maker")
    assert found.info.status == "FINISHED"
    assert found.data.params["synthesized"] == "True"
    metrics = found.data.metrics
    assert metrics["synthesized_samples"] == 32 and metrics["samples_seen"] > 0
    assert not any(k.startswith("diag/") for k in metrics)  # pool ground truth: n/a
    rundir = RunDir(Path(found.data.tags["selbench.run_dir"]))
    frame = pd.read_parquet(selection_path(rundir))
    assert frame["synthesized"].all() and frame["uid"].map(is_synthetic_uid).all()
    subset = load_subset(rundir.subset_dir)
    samples = list(subset.iter_samples())
    assert [s[0] for s in samples] == frame["uid"].tolist()
    assert {s[2] for s in samples} == {"png"}
    from selbench.decoding import decode_image_bytes

    first = np.asarray(decode_image_bytes(samples[3][1]))
    assert first.shape == (32, 32, 3) and first[0, 0, 0] == 3 and first[-1, 0, 0] == 128


def test_leaderboards_mark_synthesized_runs():
    runs = pd.DataFrame(
        {
            "params.method_label": ["distill", "random", "old"],
            "params.synthesized": ["True", "False", None],
        }
    )
    labels = mark_synthesized(runs)["params.method_label"].tolist()
    assert labels == [f"distill{SYNTHESIZED_MARK}", "random", "old"]
    assert SYNTHESIZED_MARK == " [synthesized]"


# -- the distill strategy -----------------------------------------------------------------
def test_trajectory_loss_is_the_normalised_distance():
    start = {"a": torch.zeros(2), "b": torch.zeros(1)}
    target = {"a": torch.tensor([3.0, 4.0]), "b": torch.ones(1)}
    student = {"a": torch.tensor([3.0, 0.0]), "b": torch.ones(1)}
    assert float(trajectory_loss(student, start, target, ["a"])) == pytest.approx(16 / 25)
    assert float(trajectory_loss(target, start, target, ["a", "b"])) == 0.0


def _distill(pool, seed, tmp_path, **params):
    ctx = SelectionContext(
        pool=pool,
        budget_count=12,
        budget_fraction=12 / len(pool),
        seed=seed,
        device="cpu",
        work_dir=tmp_path,
        image_size=32,
    )
    selection = Distill({**TINY, **params}).select(ctx)
    return validate_selection(selection, pool.uids, 12, "distill", 32)


def test_distill_is_deterministic_under_a_seed_and_changes_the_images(tmp_path):
    pool = make_memory_pool(60, seed=3)
    first = _distill(pool, 0, tmp_path)
    again = _distill(pool, 0, tmp_path)
    other = _distill(pool, 1, tmp_path)
    assert np.array_equal(first.pixels, again.pixels) and first.uids == again.uids
    assert other.uids != first.uids
    assert first.metrics["experts_cached"] == 0.0 and again.metrics["experts_cached"] == 1.0
    # the pairs start from real pairs and the matching moves their pixels
    sources = first.synthesized.sources
    assert all(s in pool.uids for s in sources)
    captions = dict(zip(pool.uids, pool.captions, strict=True))
    assert list(first.synthesized.captions) == [captions[s] for s in sources]
    start = np.stack(
        [np.asarray(im) for u, im in zip(pool.uids, pool.images, strict=True) if u in set(sources)]
    )
    assert np.abs(first.pixels.astype(int) - start.astype(int)).max() > 0
    assert len(first.series["matching_loss"]) == TINY["iterations"]


def test_distill_refuses_segments_longer_than_the_experts(tmp_path):
    from selbench.errors import ConfigError

    with pytest.raises(ConfigError, match="expert_train_epochs=2 is shorter"):
        _distill(make_memory_pool(30), 0, tmp_path, max_start_epoch=2, expert_epochs=2)


@pytest.mark.slow  # trains and evaluates a model
def test_a_distill_run_trains_on_its_synthesized_pairs_and_resumes(tiny, makers):
    params = [x for k, v in TINY.items() for x in ("-p", f"{k}={v}")]
    result = _run("distill", tiny, *params, "--stage", "select")
    assert result.exit_code == 0, result.output
    (found,) = _runs("distill")
    rundir = RunDir(Path(found.data.tags["selbench.run_dir"]))
    assert synthesized_path(rundir).is_file() and "train" not in rundir.stages()
    resumed = CliRunner().invoke(
        main, ["run", "--resume", found.info.run_id, "--experiment", EXPERIMENT]
    )
    assert resumed.exit_code == 0, resumed.output
    (found,) = _runs("distill")
    assert found.info.status == "FINISHED"
    assert found.data.metrics["synthesized_samples"] == 32
    assert found.data.metrics["training_steps"] >= 1
    record = json.loads((rundir.root / "stages.json").read_text())
    assert record["materialize"]["samples"] == 32
    subset = load_subset(rundir.subset_dir)
    assert all(is_synthetic_uid(uid) for uid, *_ in subset.iter_samples())


@parametrize_with_checks([Distill(TINY)], pool_sizes=(40,), budgets=(0.25, 1.0))
def test_distill_conforms(strategy, check):
    check(strategy)
