"""Pool-eval decontamination (issue 33, point 5): SynthWeb's planted evaluation copies, the
detector's recall and false positives on them, and what a run does with what it finds.
docs/decontamination.md describes the design and the thresholds."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from e2e_helpers import TINY_POOL, logged_runs, write_shard
from PIL import Image

from selbench import decontaminate as dc
from selbench.progress import NullProgress
from selbench.run.spec import RunRequest, cell_key

#: The acceptance pool: 3,000 pairs with 150 planted copies (5%), against 1,000 evaluation
#: images (retrieval 400, shape and colour 300 each; no reasoning set).
PLANTED_POOL = dict(
    seed=3,
    n_samples=3000,
    shard_size=1000,
    n_retrieval=400,
    n_classification=300,
    n_target=20,
    n_reasoning_train=0,
    n_reasoning_test=0,
    planted_eval_copies=150,
)
#: A tiny SynthWeb with copies, for whole runs.
TINY_PLANTED = {**TINY_POOL, "planted_eval_copies": 30}


def _generate(root: Path, settings: dict) -> Path:
    from selbench.synthweb import SynthWebConfig, generate_synthweb

    return generate_synthweb(root, SynthWebConfig(**settings))


@pytest.fixture(scope="module")
def planted_pool(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("planted") / "synthweb", PLANTED_POOL)


@pytest.fixture(scope="module")
def tiny_planted(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("tiny-planted") / "synthweb", TINY_PLANTED)


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


# -- SynthWeb's planted copies -----------------------------------------------------------
def test_planted_copies_replace_clean_samples_and_leave_everything_else(tiny_pool, tiny_planted):
    from selbench.pools import resolve_pool
    from selbench.synthweb.planted import planted_uids

    before, after = _files(tiny_pool), _files(tiny_planted)
    changed = sorted(name for name in before if before[name] != after[name])
    assert changed and all(name.startswith("pool/") and name.endswith(".tar") for name in changed)
    assert set(after) == set(before)  # the evaluation sets and the target split are the same
    truth = resolve_pool(str(tiny_planted)).pool.ground_truth()
    planted = planted_uids(truth)
    assert len(planted) == 30
    for uid, record in planted.items():
        assert truth[uid]["pathology"] == "clean"
        assert record["set"] in ("retrieval", "shape", "colour")
        assert 85 <= record["jpeg_quality"] <= 95 and 28 <= record["side"] <= 64
    old = resolve_pool(str(tiny_pool)).pool.ground_truth()
    assert {u for u in old if old[u] != truth[u]} == set(planted)  # no other sample changed
    with tarfile.open(tiny_planted / "pool" / "00000.tar") as tar:
        names = tar.getnames()
    assert any(name.endswith(".jpg") for name in names)  # copies are re-encoded as JPEG


def test_too_many_planted_copies_is_a_config_error_naming_the_setting():
    from selbench.errors import ConfigError
    from selbench.pools import synthweb_dir

    with pytest.raises(ConfigError, match="planted_eval_copies=5000 needs"):
        synthweb_dir({**TINY_POOL, "planted_eval_copies": 5000})


def test_which_pools_decontaminate_by_default(tiny_pool, tiny_planted, tmp_path):
    from selbench.pools import decontaminates_by_default

    assert not decontaminates_by_default("synthweb")  # every plain SynthWeb config: off
    assert not decontaminates_by_default("synthweb-8k")
    assert not decontaminates_by_default(str(tiny_pool))
    assert decontaminates_by_default("synthweb-planted")
    assert decontaminates_by_default(str(tiny_planted))
    assert decontaminates_by_default("cc3m")  # a real pool: on
    pool_yaml = tmp_path / "mine.yaml"
    pool_yaml.write_text(f"name: mine\nkind: shards\npath: {tmp_path}\n")
    assert decontaminates_by_default(str(pool_yaml))


def test_an_unplanted_config_keeps_its_dataset_folder():
    """The folder of a SynthWeb dataset is keyed by its settings; planted_eval_copies: 0
    leaves the key as it was, so existing datasets (and their runs) are found again."""
    from selbench.pools import synthweb_dir

    assert synthweb_dir({})[0].name == "synthweb-1813193ea26a"
    assert synthweb_dir(TINY_POOL)[0].name == "synthweb-49637b7bb10c"
    assert synthweb_dir({"planted_eval_copies": 0})[0] == synthweb_dir({})[0]
    assert synthweb_dir({"planted_eval_copies": 5})[0] != synthweb_dir({})[0]


# -- the detector ------------------------------------------------------------------------
@pytest.mark.slow  # generates a 3,000-pair pool and embeds it
def test_decontamination_finds_planted_copies_with_few_false_positives(planted_pool):
    """Acceptance: at least 95% of the planted copies found, under 1% of the other pool
    samples flagged (PLANTED_POOL: 3,000 pairs, 150 copies, 1,000 evaluation images; the
    suite's tiny reference model embeds)."""
    from selbench.embedders import EmbeddingService
    from selbench.pools import resolve_pool
    from selbench.registry import get_registry
    from selbench.synthweb.planted import planted_uids

    resolved = resolve_pool(str(planted_pool))
    pool = resolved.pool
    services = EmbeddingService(
        pool.strategy_view(), "cpu", get_registry().make_embedder, NullProgress()
    )
    found = dc.measure(pool, resolved.eval_sets, services)
    planted = set(planted_uids(pool.ground_truth()))
    removed = set(found.removed)
    recall = len(removed & planted) / len(planted)
    false_positive = len(removed - planted) / (len(pool) - len(planted))
    assert recall >= 0.95, (recall, false_positive)
    assert false_positive < 0.01, (recall, false_positive)
    # The captioning set reads the retrieval set's images: the same count, found once.
    assert found.per_set["captioning"] == found.per_set["retrieval"]
    per_set = {name: c.flagged for name, c in found.per_set.items() if name != "captioning"}
    assert sum(per_set.values()) >= len(removed)
    # A second look (another method's run, a resumed run) reads the cached result.
    again = dc.measure(pool, resolved.eval_sets, services)
    assert again.removed == found.removed and np.array_equal(again.kept_rows, found.kept_rows)


def test_hamming_neighbours_are_exact():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(50, 32), dtype=np.uint8)
    queries = base[[3, 7]].copy()
    queries[1, 0] ^= 0b101  # two bits off row 7
    distance, index = dc.hamming_knn(queries, base, 2)
    assert index[:, 0].tolist() == [3, 7] and distance[:, 0].tolist() == [0, 2]
    assert dc.hamming_knn(queries, base[:1], 8)[0].shape == (2, 1)  # k clipped to the base


# -- runs ----------------------------------------------------------------------------------
def _request(pool: Path | str, scale: Path, **kwargs) -> RunRequest:
    return RunRequest(
        method="random", budget=0.5, pool=str(pool), scale=str(scale), experiment="dc", **kwargs
    )


def _selected(outcome) -> set[str]:
    return set(outcome.selection.uids)


@pytest.mark.slow  # whole runs' select stages
def test_a_run_on_a_planted_pool_removes_the_copies_before_selection(tiny_planted, tiny_scale):
    from selbench.run.lifecycle import execute

    outcome = execute(_request(tiny_planted, tiny_scale), stages=["select"])
    run = logged_runs("dc")[0]
    params, metrics = run.data.params, run.data.metrics
    removed = int(params["decontaminate.removed"])
    assert params["decontaminate"] == "True" and removed >= 28  # of the 30 planted
    # The budget counts the decontaminated pool, and the strategy never saw what was removed.
    assert int(params["pool_size"]) == 320 - removed
    assert int(params["budget_count"]) == round(0.5 * (320 - removed))
    assert len(outcome.selection.uids) == int(params["budget_count"])
    assert params["pool_fingerprint"] != params["pool_source_fingerprint"]
    assert len(params["decontaminate.removed_sha256"]) == 64
    for name in ("retrieval", "shape", "colour", "captioning", "reasoning-probe"):
        assert f"decontaminate/{name}/flagged" in metrics
        assert f"decontaminate/{name}/by_hash" in metrics
    flagged = sum(metrics[f"decontaminate/{n}/flagged"] for n in ("retrieval", "shape", "colour"))
    assert flagged >= removed - metrics["decontaminate/reasoning-probe/flagged"]
    assert metrics["decontaminate/removed"] == removed
    from selbench.run.stages import prepare
    from selbench.synthweb.planted import planted_uids

    plan = prepare(_request(tiny_planted, tiny_scale), NullProgress())  # the cached result
    planted = set(planted_uids(plan.resolved.pool.ground_truth()))
    assert len(planted & set(plan.decontamination.removed)) >= 28
    assert not _selected(outcome) & set(plan.decontamination.removed)
    assert (
        dc.Decontamination.removed_sha256.fget(plan.decontamination)
        == (params["decontaminate.removed_sha256"])
    )
    # Resuming finds the same decontaminated pool (its result is cached) and goes on.
    from selbench.run.lifecycle import resume

    resumed = resume(outcome.run_id, ["materialize"], experiment="dc")
    assert resumed.stages_run == ["materialize"]
    assert set(resumed.selection.uids) == _selected(outcome)

    from selbench.pools import resolve_pool

    pool = resolve_pool(str(tiny_planted)).pool
    from click.testing import CliRunner

    from selbench.cli import main

    argv = ["run", "--method", "random", "--budget", "0.5", "--pool", str(tiny_planted)]
    argv += ["--scale", str(tiny_scale), "--experiment", "dc", "--stage", "select"]
    result = CliRunner().invoke(main, [*argv, "--no-decontaminate"])
    assert result.exit_code == 0, result.output
    runs = {r.data.params["decontaminate"]: r for r in logged_runs("dc")}
    off = runs["False"].data
    assert int(off.params["pool_size"]) == 320 and "decontaminate.removed" not in off.params
    assert off.params["budget_count"] == "160"  # --no-decontaminate: the whole pool counts
    assert off.params["pool_fingerprint"] == pool.fingerprint
    assert off.tags["selbench.cell_key"] != run.data.tags["selbench.cell_key"]
    assert not any(key.startswith("decontaminate/") for key in off.metrics)


@pytest.mark.slow  # a whole run's select stage
def test_default_synthweb_runs_do_not_decontaminate_and_select_as_before(tiny, tmp_path):
    from selbench.run.lifecycle import execute
    from selbench.run.stages import prepare

    pool, scale = tiny
    plan = prepare(_request(pool, scale), NullProgress())
    assert plan.request.decontaminate is False and plan.decontamination is None
    assert plan.pool_view.fingerprint == plan.resolved.pool.fingerprint
    assert plan.count == 160
    # The cell key is the one runs had before the option existed.
    legacy = cell_key(_request(pool, scale), plan.params)
    assert cell_key(plan.request, plan.params) == legacy
    # The strategy sees the pool itself, as before (not a view of it).
    assert type(plan.pool_view) is type(plan.resolved.pool.strategy_view())
    default = execute(_request(pool, scale), stages=["select"])
    explicit = execute(_request(pool, scale, decontaminate=False), stages=["select"])
    assert default.selection.uids == explicit.selection.uids
    params = [run.data.params for run in logged_runs("dc")]
    assert all(p["decontaminate"] == "False" and "decontaminate.removed" not in p for p in params)
    assert {p["pool_fingerprint"] for p in params} == {plan.resolved.pool.fingerprint}


# -- a real (shard) pool -------------------------------------------------------------------
def _noise_png(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_copy(png: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _write_eval_set(root: Path, images: list[bytes]) -> Path:
    """A classification set in CLIP_benchmark's wds layout: test/0.tar of key.png+key.cls."""
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, data in enumerate(images):
            for name, member in ((f"{i:04d}.png", data), (f"{i:04d}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(member)
                tar.addfile(info, io.BytesIO(member))
    (root / "classnames.txt").write_text("noise\n")
    (root / "dataset_type.txt").write_text("classification\n")
    return root


@pytest.mark.slow  # a whole run's select stage
def test_a_real_pool_decontaminates_by_default(tmp_path, tiny_scale):
    """A shard pool holding JPEG copies of 4 of its evaluation set's 6 images: a run
    removes them without being asked, logs the count, and budgets on the 8 left."""
    import torch

    from selbench.run.lifecycle import execute
    from selbench.train import build_model

    evals = [_noise_png(100 + i) for i in range(6)]
    samples = [(f"{i:09d}", _noise_png(i), f"noise picture {i}", {}) for i in range(8)]
    samples += [
        (f"{100 + i:09d}", _jpeg_copy(evals[i]), f"copied picture {i}", {}) for i in range(4)
    ]
    # write_shard names every image .png; a JPEG copy reads the same (decoded by content).
    write_shard(tmp_path / "pool" / "00000.tar", samples)
    model, _, _ = build_model("selbench-tiny", seed=0)
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    noise = _write_eval_set(tmp_path / "evals" / "noise", evals)
    pool_yaml = tmp_path / "noisepool.yaml"
    pool_yaml.write_text(
        f"name: noisepool\nkind: shards\npath: {tmp_path / 'pool'}\n"
        f"reference: open_clip:selbench-tiny:{weights}\n"
        f"eval:\n  - {{name: noise, task: classification, path: {noise}}}\n"
    )
    outcome = execute(_request(pool_yaml, tiny_scale), stages=["select"])
    params = logged_runs("dc")[0].data.params
    assert params["decontaminate"] == "True"
    assert params["decontaminate.removed"] == "4"
    assert params["pool_size"] == "8" and params["budget_count"] == "4"
    assert not _selected(outcome) & {f"{100 + i:09d}" for i in range(4)}
    metrics = logged_runs("dc")[0].data.metrics
    assert metrics["decontaminate/noise/flagged"] == 4
    assert metrics["decontaminate/noise/copied_images"] == 4
    assert metrics["decontaminate/noise/images"] == 6
