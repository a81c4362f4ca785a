"""selbench.toolbox: the helpers plugin authors build on, against cases worked by hand."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
import torch

import selbench
import selbench.toolbox as toolbox
from selbench.toolbox import (
    cached_directory,
    centroid_distances,
    clip_scores,
    image_batches,
    memoised_sha256,
    rank,
    top_k,
    training_loop,
)


def test_every_public_name_is_exported_and_documented():
    for name in toolbox.__all__:
        assert hasattr(toolbox, name), name
    assert selbench.Embeddings is toolbox.Embeddings
    assert selbench.TargetSet is toolbox.TargetSet


def test_rank_best_first_ties_by_pool_position():
    scores = np.array([0.2, 0.9, 0.5, 0.9, 0.1])
    assert rank(scores).tolist() == [1, 3, 2, 0, 4]
    assert rank(scores, largest=False).tolist() == [4, 0, 2, 1, 3]
    assert rank(scores, among=np.array([0, 2, 3])).tolist() == [3, 2, 0]


def test_top_k_without_sorting_the_pool_picks_what_rank_picks():
    """top_k's partition path equals rank's first k, ties and both directions included."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 400))
        levels = int(rng.integers(1, 12)) if trial % 2 else n  # many ties, or few
        scores = rng.integers(0, levels, n).astype(np.float32) / 7
        if trial % 5 == 0:
            scores = scores.astype(np.float64) - 0.5
        for k in {1, n - 1, int(rng.integers(1, n))}:
            for largest in (True, False):
                expected = np.sort(rank(scores, largest=largest)[:k])
                got = top_k(scores, k, largest=largest)
                assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert top_k(np.array([1.0, np.nan, 2.0]), 1).tolist() == [2]  # rank's order with NaN


def test_top_k_keeps_the_highest_and_breaks_ties_by_pool_position():
    scores = np.array([0.2, 0.9, 0.5, 0.9, 0.1])
    assert top_k(scores, 2).tolist() == [1, 3]
    assert top_k(scores, 3).tolist() == [1, 2, 3]
    assert top_k(np.array([0.5, 0.5, 0.5]), 2).tolist() == [0, 1]
    # the smallest, as prototypes' "easy" rule: 0.1 (4), 0.2 (0), then 0.5 (2)
    assert top_k(scores, 3, largest=False).tolist() == [0, 2, 4]
    assert top_k(scores, 1, among=np.array([0, 2, 4])).tolist() == [2]


def test_clip_score_is_the_per_pair_cosine():
    s = np.sqrt(0.5)
    image = np.array([[1.0, 0.0], [0.0, 1.0], [s, s]])
    text = np.array([[1.0, 0.0], [1.0, 0.0], [s, -s]])
    # pair 0 identical -> 1; pair 1 orthogonal -> 0; pair 2 at 90 degrees too -> 0
    assert clip_scores(image, text) == pytest.approx([1.0, 0.0, 0.0])


def test_cosine_distance_to_assigned_centroid_worked_by_hand():
    # 2-D vectors; centroids need not be unit length (the metric is a cosine).
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0], [3.0, 4.0]])
    centroids = np.array([[1.0, 0.0], [0.0, 2.0]])
    assignment = np.array([0, 1, 1, 0, 0])
    # x0 on c0: 0; x1 on c1: 0; x2.(0,1) = 0.8 -> 0.2; x3 opposite c0 -> 2;
    # x4 = 5 * (0.6, 0.8) on c0: 1 - 0.6 = 0.4 (its length does not count)
    expected = [0.0, 0.0, 0.2, 2.0, 0.4]
    np.testing.assert_allclose(centroid_distances(x, centroids, assignment), expected, atol=1e-6)


def test_distances_in_blocks_equal_the_whole_pool_at_once(monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1000, 12)).astype(np.float16)
    centroids = rng.standard_normal((7, 12)).astype(np.float32)
    assignment = rng.integers(0, 7, 1000)
    whole = centroid_distances(x, centroids, assignment)
    monkeypatch.setattr(toolbox, "ROWS_AT_ONCE", 64)
    assert np.array_equal(centroid_distances(x, centroids, assignment), whole)


def test_image_batches_cover_every_image_in_order():
    from PIL import Image

    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(5)]

    def preprocess(image):  # a model's transform: HWC uint8 -> CHW float
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)

    batches = list(image_batches(images, preprocess, batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert torch.cat(batches)[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_cached_directory_builds_once_then_hits(tmp_path):
    folder = tmp_path / "cache" / "entry"
    builds = []

    def build(tmp):
        builds.append(tmp)
        assert not folder.exists()  # the entry appears only when complete
        (tmp / "model.pt").write_text("weights")

    path, hit = cached_directory(folder, toolbox.checkpoint_in, build)
    assert (path, hit) == (folder / "model.pt", False)
    path, hit = cached_directory(folder, toolbox.checkpoint_in, build)
    assert hit and len(builds) == 1
    assert sorted(p.name for p in folder.parent.iterdir()) == ["entry", "entry.lock"]


def test_cached_directory_rebuilds_a_damaged_entry_and_keeps_nothing_of_a_failed_build(tmp_path):
    folder = tmp_path / "entry"
    folder.mkdir()
    (folder / "partial").write_text("left by a crash, no model.pt")

    def failing(tmp):
        (tmp / "model.pt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_directory(folder, toolbox.checkpoint_in, failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "entry.lock"]
    path, hit = cached_directory(folder, toolbox.checkpoint_in, lambda t: (t / "model.pt").touch())
    assert not hit and sorted(p.name for p in folder.iterdir()) == ["model.pt"]


def test_cached_directory_removes_what_a_killed_build_left(tmp_path):
    """A build killed with SIGKILL runs no cleanup; the next caller removes its temporary
    directory, and leaves alone the temporaries of other entries and files it did not make."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    folder = tmp_path / "entry"
    started = tmp_path / "started"
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from selbench.fileutil import cached_directory
        def build(tmp):
            (tmp / "model.pt").write_text("half")
            Path({str(started)!r}).touch()
            time.sleep(600)
        cached_directory(Path({str(folder)!r}), lambda f: None, build)
    """)
    builder = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert builder.poll() is None and time.monotonic() < deadline, "build never started"
            time.sleep(0.05)
    finally:
        builder.send_signal(signal.SIGKILL)
        builder.wait()
    left = [p.name for p in tmp_path.glob(".entry.*.tmp")]
    assert len(left) == 1  # what SIGKILL leaves
    other = tmp_path / ".entry.v2.123-0badc0de.tmp"  # entry.v2's temporary, maybe in use
    other.mkdir()
    notes = tmp_path / ".entry.notes.tmp"
    notes.write_text("not ours")

    path, hit = cached_directory(folder, toolbox.checkpoint_in, lambda t: (t / "model.pt").touch())
    assert not hit and path == folder / "model.pt"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [
        ".entry.notes.tmp",
        ".entry.v2.123-0badc0de.tmp",
    ]


def test_memoised_sha256_reuses_the_digest_until_the_file_changes(tmp_path, monkeypatch):
    import hashlib

    import selbench.fileutil as fileutil

    data = tmp_path / "data.bin"
    data.write_bytes(b"abc")
    old = time.time() - 60
    os.utime(data, (old, old))
    memo = tmp_path / "memo.json"
    assert memoised_sha256(data, memo) == hashlib.sha256(b"abc").hexdigest()
    assert list(json.loads(memo.read_text()).values()) == [hashlib.sha256(b"abc").hexdigest()]
    monkeypatch.setattr(fileutil, "file_sha256", lambda path: pytest.fail("hashed again"))
    assert memoised_sha256(data, memo) == hashlib.sha256(b"abc").hexdigest()
    monkeypatch.undo()
    data.write_bytes(b"abcd")  # new size and mtime: a new key, the stale one dropped
    os.utime(data, (old + 1, old + 1))
    assert memoised_sha256(data, memo) == hashlib.sha256(b"abcd").hexdigest()
    assert len(json.loads(memo.read_text())) == 1


def test_training_loop_runs_the_schedule_and_records_every_loss_term():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(32, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def batch_loss(index):
        loss = torch.nn.functional.mse_loss(model(x[index]), y[index])
        return loss, {"mse": float(loss.detach()), "half": float(loss.detach()) / 2}

    result = training_loop(
        model,
        batch_loss,
        32,
        8,
        60,
        seed=0,
        lr=0.05,
        warmup_steps=5,
        weight_decay=0.0,
        curve_key="mse",
    )
    assert result.steps == 60 and set(result.running) == {"mse", "half"}
    assert [step for step, _ in result.curve] == [0, 10, 20, 30, 40, 50, 59]
    assert result.curve[-1][1] < result.curve[0][1] / 3  # it learns
    assert not model.training  # left in eval mode


def test_training_loop_same_seed_same_weights_and_non_finite_loss_stops():
    def train(seed):
        torch.manual_seed(123)
        model = torch.nn.Linear(3, 1)
        x = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))

        def batch_loss(index):
            loss = model(x[index]).pow(2).mean()
            return loss, {"loss": float(loss.detach())}

        training_loop(
            model, batch_loss, 20, 4, 10, seed=seed, lr=0.1, warmup_steps=0, weight_decay=0.1
        )
        return model.weight.detach().clone()

    assert torch.equal(train(0), train(0))
    assert not torch.equal(train(0), train(1))  # the seed orders the batches

    model = torch.nn.Linear(2, 1)

    def nan_loss(index):
        loss = model(torch.ones(len(index), 2)).sum() * math.nan
        return loss, {"loss": float(loss.detach())}

    with pytest.raises(FloatingPointError, match="Training: loss became non-finite at step 0"):
        training_loop(model, nan_loss, 4, 2, 3, seed=0, lr=0.1, warmup_steps=0, weight_decay=0.0)


def test_weight_decay_rules_are_a_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    default = toolbox.weight_decay_groups(model, 0.2)
    assert [len(g["params"]) for g in default] == [3, 1]  # biases and the norm exempt
    everything = toolbox.weight_decay_groups(model, 0.2, no_decay=lambda name, p: False)
    assert [len(g["params"]) for g in everything] == [0, 4]
