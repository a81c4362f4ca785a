"""nds: Neural Data Server (Yan, Acuna, Fidler, CVPR 2020) as the released code runs it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from selbench_plugins.nds import (
    Nds,
    RotationNet,
    draw_without_replacement,
    expert_distribution,
    images_to_tensor,
    normalised_accuracy,
    rotation_accuracy,
    rotation_batch,
    sample_probabilities,
    torch_threads,
    train_expert,
)

from selbench.embedders import Embeddings
from selbench.strategy import SelectionContext, validate_selection
from selbench.target import TargetSet
from selbench.testing import MemoryPool, RecordingServices, check_strategy, make_memory_pool

# ------------------------------------------------------------------ weighting, by hand


def test_accuracies_are_min_max_normalised():
    np.testing.assert_allclose(normalised_accuracy([50.0, 70.0, 60.0]), [0.0, 1.0, 0.5])
    # all equal (or a single expert): no spread, every expert 0
    np.testing.assert_array_equal(normalised_accuracy([0.3, 0.3]), [0.0, 0.0])
    np.testing.assert_array_equal(normalised_accuracy([0.9]), [0.0])


def test_per_sample_probabilities_worked_by_hand():
    # Three experts, accuracies 0.5, 0.7, 0.6 -> normalised 0, 1, 0.5.
    # T = 1 / ln 4, so exp(norm / T) = 4 ** norm = 1, 4, 2 and z = (1/7, 4/7, 2/7).
    # Subsets: samples 0,1 in expert 0 (|S|=2), sample 2 in expert 1 (|S|=1),
    # samples 3,4,5 in expert 2 (|S|=3). p_i = z_k / |S_k|:
    #   expert 0: (1/7) / 2 = 1/14;  expert 1: 4/7;  expert 2: (2/7) / 3 = 2/21.
    # Check: 2/14 + 4/7 + 3 * 2/21 = 1/7 + 4/7 + 2/7 = 1.
    temperature = 1.0 / math.log(4.0)
    np.testing.assert_allclose(
        expert_distribution([0.5, 0.7, 0.6], temperature), [1 / 7, 4 / 7, 2 / 7]
    )
    assignment = np.array([0, 0, 1, 2, 2, 2])
    p = sample_probabilities(assignment, np.array([0.5, 0.7, 0.6]), temperature)
    np.testing.assert_allclose(p, [1 / 14, 1 / 14, 4 / 7, 2 / 21, 2 / 21, 2 / 21])
    assert p.sum() == pytest.approx(1.0)


def test_the_release_temperature_makes_the_best_subset_dominate():
    # T = 0.01 (the server's "x 100"): logits 0, 100, 50 -> z ~ (e^-100, 1, e^-50).
    z = expert_distribution([0.5, 0.7, 0.6], 0.01)
    np.testing.assert_allclose(z, [math.exp(-100), 1.0, math.exp(-50)], rtol=1e-9)


def test_equal_accuracies_give_every_subset_the_same_share():
    # z = (1/2, 1/2); subsets of 1 and 3 samples: 1/2 and 1/6 per sample.
    p = sample_probabilities(np.array([0, 1, 1, 1]), np.array([0.4, 0.4]), 0.01)
    np.testing.assert_allclose(p, [1 / 2, 1 / 6, 1 / 6, 1 / 6])


def test_a_subset_without_members_takes_no_part_in_the_softmax():
    # Expert 1 has no samples: normalisation runs over experts 0 and 2 only (0.5 -> 0,
    # 0.7 -> 1); with T = 1 / ln 2 the weights are 2**0 = 1 and 2**1 = 2 -> z = (1/3, 2/3).
    p = sample_probabilities(np.array([0, 2, 2]), np.array([0.5, 0.99, 0.7]), 1 / math.log(2))
    np.testing.assert_allclose(p, [1 / 3, 1 / 3, 1 / 3])
    p = sample_probabilities(np.array([0, 0, 2]), np.array([0.5, 0.99, 0.7]), 1 / math.log(2))
    np.testing.assert_allclose(p, [1 / 6, 1 / 6, 2 / 3])


def test_draw_is_exact_unique_sorted_and_reproducible():
    p = np.random.default_rng(0).random(50)
    first = draw_without_replacement(p, 20, np.random.default_rng(3))
    again = draw_without_replacement(p, 20, np.random.default_rng(3))
    assert len(first) == 20 and len(set(first.tolist())) == 20
    assert first.tolist() == sorted(first.tolist())
    np.testing.assert_array_equal(first, again)
    assert len(draw_without_replacement(p, 50, np.random.default_rng(0))) == 50


def test_draw_with_too_few_nonzero_weights_keeps_them_and_fills_uniformly():
    p = np.array([0.0, 0.6, 0.0, 0.4, 0.0, 0.0])
    chosen = draw_without_replacement(p, 4, np.random.default_rng(1))
    assert {1, 3} <= set(chosen.tolist()) and len(set(chosen.tolist())) == 4
    np.testing.assert_array_equal(chosen, draw_without_replacement(p, 4, np.random.default_rng(1)))


# ------------------------------------------------------------------ the rotation task


def test_rotation_batch_layout_and_pixels_worked_by_hand():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = a + 10
    images = torch.stack([a, b]).unsqueeze(1)  # (2, 1, 2, 2)
    x, y = rotation_batch(images)
    assert x.shape == (8, 1, 2, 2)
    assert y.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # quarter turns counter-clockwise (np.rot90; the release's rotate_img(img, 90) is
    # flipud(transpose(img)), the same array):
    #   0: [[1,2],[3,4]]  90: [[2,4],[1,3]]  180: [[4,3],[2,1]]  270: [[3,1],[4,2]]
    by_hand = [[[1, 2], [3, 4]], [[2, 4], [1, 3]], [[4, 3], [2, 1]], [[3, 1], [4, 2]]]
    for r in range(4):
        assert x[r, 0].tolist() == by_hand[r]
        assert x[4 + r, 0].tolist() == (torch.tensor(by_hand[r]) + 10).tolist()
        assert torch.equal(x[r], torch.rot90(images[0], r, dims=(1, 2)))
    np.testing.assert_array_equal(x[1, 0].numpy(), np.flipud(a.numpy().T))


def test_rotation_batch_rejects_non_square_images():
    with pytest.raises(ValueError, match="square"):
        rotation_batch(torch.zeros(2, 3, 4, 5))


@pytest.mark.parametrize("size", [16, 32, 48])
def test_expert_gives_four_logits_per_rotated_image(size):
    x, _ = rotation_batch(torch.zeros(3, 3, size, size))
    assert RotationNet(4)(x).shape == (12, 4)


def test_images_are_converted_once_to_square_uint8():
    images = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("L", (64, 40), 7)]
    t = images_to_tensor(images, 32)
    assert t.shape == (2, 3, 32, 32) and t.dtype == torch.uint8
    assert t[0, :, 0, 0].tolist() == [255, 0, 0] and t[1, :, 5, 5].tolist() == [7, 7, 7]


def oriented_images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """Images with an unambiguous "up": a bright top band on a random dark background."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (n, 3, size, size)).astype(np.uint8)
    x[:, :, : size // 4, :] = 250
    return torch.from_numpy(x)


def test_an_expert_learns_orientation_and_training_is_deterministic():
    images = oriented_images(64, seed=0)
    with torch_threads(1):  # as Nds.select trains (cpu_threads=1)
        model = train_expert(images, seed=5, epochs=4, batch_size=16, lr=0.01, width=4)
        assert rotation_accuracy(model, oriented_images(32, seed=1)) > 0.9
        again = train_expert(images, seed=5, epochs=4, batch_size=16, lr=0.01, width=4)
    for (k, v), w in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_thread_setting_is_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_an_expert_that_always_says_upright_scores_one_quarter():
    class Upright(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(len(x), 4)

    assert rotation_accuracy(Upright(), torch.zeros(10, 3, 8, 8, dtype=torch.uint8)) == 0.25


# ------------------------------------------------------------------ the strategy


def noise_context(size: int, count: int, tmp_path: Path, seed: int = 0) -> SelectionContext:
    pool = make_memory_pool(size, seed=size)
    return SelectionContext(
        pool=pool,
        budget_count=count,
        budget_fraction=count / size,
        seed=seed,
        device="cpu",
        work_dir=tmp_path,
        services=RecordingServices(pool),
    )


@pytest.mark.parametrize("count", [1, 30, 119, 120])
def test_exact_budget_and_a_probability_for_every_sample(tmp_path, count):
    ctx = noise_context(120, count, tmp_path)
    selection = Nds({"experts": 3}).select(ctx)
    checked = validate_selection(selection, set(ctx.pool.uids), count, "nds")
    assert set(checked.scores) == set(ctx.pool.uids)
    assert sum(checked.scores.values()) == pytest.approx(1.0)


def test_same_seed_same_selection_other_seed_other_draw(tmp_path):
    first = Nds({"experts": 3}).select(noise_context(120, 40, tmp_path, seed=7))
    again = Nds({"experts": 3}).select(noise_context(120, 40, tmp_path, seed=7))
    other = Nds({"experts": 3}).select(noise_context(120, 40, tmp_path, seed=8))
    assert first.uids == again.uids and first.scores == again.scores
    assert first.uids != other.uids


def test_a_pool_too_small_for_k_scales_k_down(tmp_path):
    strategy = Nds()  # K = 50 by default
    strategy.select(noise_context(100, 25, tmp_path))
    assert strategy.experts_used == 2  # 100 // 39
    assert strategy.subset_sizes.sum() == 100
    strategy = Nds({"min_points_per_expert": 10})
    strategy.select(noise_context(100, 25, tmp_path))
    assert strategy.experts_used == 10
    strategy = Nds()
    strategy.select(noise_context(30, 10, tmp_path))
    assert strategy.experts_used == 1  # never below one


@dataclass
class TwoKinds:
    """Services for a pool of oriented images (embedded near e0) and flat, orientation-free
    images (near e1), with oriented target images."""

    pool: MemoryPool
    image: np.ndarray
    target_images: list

    def embeddings(self, spec: str = "proxy") -> Embeddings:
        return Embeddings(self.image, self.image, self.pool.uids, "fixed", "fixed")

    def target(self) -> TargetSet:
        keys = [str(i) for i in range(len(self.target_images))]
        return TargetSet(Path("memory-target"), self.target_images, keys, [])


def test_the_subset_whose_expert_transfers_to_the_target_is_drawn(tmp_path):
    as_pil = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in oriented_images(60, seed=2)]
    rng = np.random.default_rng(3)
    flat = [
        Image.new("RGB", (16, 16), tuple(int(c) for c in rng.integers(0, 255, 3)))
        for _ in range(60)
    ]
    target = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in oriented_images(12, seed=4)]
    order = rng.permutation(120)  # interleave the two kinds in pool order
    images = as_pil + flat
    images = [images[i] for i in order]
    embedding = np.zeros((120, 4), dtype=np.float16)
    embedding[order < 60, 0] = 1.0
    embedding[order >= 60, 1] = 1.0
    uids = [f"u{i:03d}" for i in range(120)]
    pool = MemoryPool(uids, ["x"] * 120, images)
    ctx = SelectionContext(
        pool=pool,
        budget_count=30,
        budget_fraction=0.25,
        seed=0,
        device="cpu",
        work_dir=tmp_path,
        services=TwoKinds(pool, embedding, target),
    )
    strategy = Nds({"experts": 2, "lr": 0.01, "image_size": 16})
    selection = strategy.select(ctx)
    oriented = {uids[i] for i in range(120) if order[i] < 60}
    assert set(selection.uids) <= oriented
    assert strategy.expert_accuracy.max() > 0.9
    assert sorted(strategy.expert_probability)[-1] == pytest.approx(1.0)


def test_unknown_parameters_are_rejected():
    from selbench.errors import ConfigError

    with pytest.raises(ConfigError, match="experts"):
        Nds({"experts": 0})
    with pytest.raises(ConfigError, match="known parameters"):
        Nds({"clusters": 5})


def test_nds_passes_the_conformance_kit():
    check_strategy(Nds)
