"""negCLIPLoss and NormSim (arXiv 2405.19547) against cases worked out by hand."""

import types

import numpy as np
import pytest
import torch
from selbench_plugins.negcliploss_normsim import (
    NegClipLoss,
    NormSim,
    batch_normaliser,
    negcliploss,
    normsim,
)

from selbench.errors import ConfigError
from selbench.strategy import SelectionContext
from selbench.testing import MemoryPool, check_strategy

E = np.eye(4, dtype=np.float32)


def test_normaliser_of_two_orthogonal_pairs():
    # s = identity; tau = 1: each row and column sums e^1 + e^0, so R_i = log(1 + e).
    r = batch_normaliser(E[:2], E[:2], temperature=1.0)
    assert r == pytest.approx([np.log(1 + np.e)] * 2, rel=1e-6)
    assert negcliploss(E[:2], E[:2], temperature=1.0) == pytest.approx(
        [1 - np.log(1 + np.e)] * 2, rel=1e-6
    )


def test_normaliser_is_minus_tau_times_the_clip_loss():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((6, 5)).astype(np.float32)
    text = rng.standard_normal((6, 5)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    tau = 0.07
    logits = image @ text.T / tau
    log_softmax_rows = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    log_softmax_cols = logits - np.log(np.exp(logits).sum(axis=0, keepdims=True))
    clip_loss = -0.5 * (np.diag(log_softmax_rows) + np.diag(log_softmax_cols))
    assert negcliploss(image, text, temperature=tau) == pytest.approx(-tau * clip_loss, rel=1e-4)


def test_a_pair_whose_caption_fits_other_images_ranks_below_an_equally_aligned_unique_pair():
    # Pairs 0 and 1 both have CLIP score 1; pair 1's image and caption equal pair 2's, so its
    # normaliser is larger and negCLIPLoss puts it below pair 0 (CLIP score ties them).
    image = np.stack([E[0], E[1], E[1], E[2]])
    scores = negcliploss(image, image, temperature=0.1)
    assert scores[0] > scores[1]
    assert scores[0] == pytest.approx(scores[3])


def test_random_batches_average_the_normaliser_over_k_partitions():
    rng = np.random.default_rng(3)
    image = rng.standard_normal((5, 4)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text = np.roll(image, 1, axis=1)
    got = negcliploss(image, text, temperature=0.5, batch_size=2, repeats=3, seed=7)
    order_rng = np.random.default_rng(7)
    normaliser = np.zeros(5)
    for _ in range(3):
        order = order_rng.permutation(5)
        for start in range(0, 5, 2):
            m = order[start : start + 2]
            normaliser[m] += batch_normaliser(image[m], text[m], 0.5)
    expected = np.einsum("ij,ij->i", image, text) - normaliser / 3
    assert got == pytest.approx(expected, rel=1e-5)
    # one batch holding the pool: the seed cannot matter
    assert negcliploss(image, text, 0.5, 8, 3, 1) == pytest.approx(negcliploss(image, text, 0.5, 8))


def test_normsim_p2_and_pinf_by_hand():
    target = E[:2]
    s = np.sqrt(0.5)
    pool = np.array([E[0], [s, s, 0, 0], E[2], -E[0]], dtype=np.float32)
    # similarities: (1, 0), (.707, .707), (0, 0), (-1, 0)
    assert normsim(pool, target, 2.0) == pytest.approx([1.0, 1.0, 0.0, 1.0], rel=1e-6)
    assert normsim(pool, target, np.inf) == pytest.approx([1.0, s, 0.0, 1.0], rel=1e-6)


class TargetServices:
    """Pool embeddings and target embeddings chosen by the test."""

    def __init__(self, pool, image, text, target):
        self.pool, self.image, self.text, self.target_rows = pool, image, text, target

    def embeddings(self, spec):
        from selbench.embedders import Embeddings

        return Embeddings(self.image, self.text, self.pool.uids, spec, "fixed")

    def target(self):
        from pathlib import Path

        from selbench.target import TargetSet

        return TargetSet(Path("t"), [None] * len(self.target_rows), [], [])

    def embed_images(self, spec, images):
        return self.target_rows

    def embedder(self, spec):
        # an embedder whose learned temperature is 0.05 (logit scale 20)
        model = types.SimpleNamespace(logit_scale=torch.tensor(np.log(20.0)))
        return types.SimpleNamespace(model=model)


def _ctx(tmp_path, image, text, target, budget):
    uids = [f"u{i}" for i in range(len(image))]
    pool = MemoryPool(uids, ["c"] * len(uids))
    return SelectionContext(
        pool=pool,
        budget_count=budget,
        budget_fraction=budget / len(uids),
        seed=0,
        device="cpu",
        work_dir=tmp_path,
        services=TargetServices(pool, image, text, target),
    )


def test_normsim_selects_near_the_target_among_well_aligned_pairs(tmp_path):
    s = np.sqrt(0.5)
    # u0: on the target, misaligned caption; u1: on the target, aligned; u2: half on it,
    # aligned; u3: off the target, aligned.
    image = np.array([E[0], E[0], [s, 0, s, 0], E[3]], dtype=np.float32)
    text = np.array([E[1], E[0], [s, 0, s, 0], E[3]], dtype=np.float32)
    target = E[:1]
    ctx = _ctx(tmp_path, image, text, target, 2)
    # NormSim alone takes the two images nearest the target, the misaligned one included
    assert NormSim({"prefilter": "none"}).select(ctx).uids == ["u0", "u1"]
    # after the quality filter (3 = 1.5 x budget, rounded) u0 is gone
    picked = NormSim({"prefilter": "clip_score"}).select(ctx)
    assert picked.uids == ["u1", "u2"]
    assert picked.metrics["prefilter_kept"] == 3
    assert NormSim({"temperature": 0.1}).select(ctx).uids == ["u1", "u2"]


def test_negcliploss_strategy_keeps_the_top_scores(tmp_path):
    image = np.stack([E[0], E[1], E[1], E[2]])
    text = np.stack([E[0], E[1], E[1], E[3]])
    ctx = _ctx(tmp_path, image, text, E[:1], 1)
    assert NegClipLoss({"temperature": 0.1}).select(ctx).uids == ["u0"]


def test_temperature_0_is_the_embedders_learned_temperature(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.standard_normal((8, 4)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text = np.roll(image, 1, axis=0)
    ctx = _ctx(tmp_path, image, text, E[:1], 3)
    learned = NegClipLoss().select(ctx).scores
    assert list(learned.values()) == pytest.approx(negcliploss(image, text, 0.05).tolist())
    assert NormSim().select(ctx).metrics["temperature"] == pytest.approx(0.05)


def test_bad_parameters_are_named(tmp_path):
    ctx = _ctx(tmp_path, E, E, E[:1], 2)
    with pytest.raises(ConfigError, match="prefilter_ratio must be >= 1"):
        NormSim({"prefilter_ratio": 0.5}).select(ctx)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        NegClipLoss({"temperature": -1}).select(ctx)


@pytest.mark.parametrize(
    "cls, params",
    [
        (NegClipLoss, {}),
        (NegClipLoss, {"batch_size": 16}),
        (NormSim, {}),
        (NormSim, {"norm": "2", "prefilter": "clip_score"}),
    ],
)
def test_conformance_kit(cls, params):
    check_strategy(cls, params)
