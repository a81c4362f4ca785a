"""The online selection package (selbench/online/, issue 31): the contract, the losses and
JEST's incremental conditional gains, and each built-in on super-batches whose losses the
test chooses (fake models that return a given logit matrix), plus one tiny open_clip CLIP.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from selbench.errors import ConfigError, PluginError
from selbench.online import (
    BUILTIN_ONLINE,
    Jest,
    OnlineStrategy,
    SuperBatch,
    choose_checked,
    conditional_gain,
    jest_select,
    make_online,
    softmax_losses,
    subbatch_learnability,
    subset_loss,
    validate_choice,
)
from selbench.online.builtins import block_sizes


class LogitModel(nn.Module):
    """A fake open_clip CLIP whose logits over examples ``ids`` are ``Z[ids][:, ids]``:
    image ``i``'s features are row ``Z[i]``, text ``j``'s the one-hot ``e_j``; the example
    id travels as the first text token. A parameter multiplies the features, so anything
    scored with gradients enabled would record them; ``tower`` has a mode of its own."""

    def __init__(self, logits: torch.Tensor, output: str = "dict", bias: float | None = None):
        super().__init__()
        self.register_buffer("z", torch.as_tensor(logits, dtype=torch.float64))
        self.weight = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.bias = None if bias is None else nn.Parameter(torch.tensor(bias, dtype=torch.float64))
        self.tower = nn.Linear(1, 1)
        self.output, self.calls, self.modes_seen = output, 0, []

    def forward(self, images: torch.Tensor, texts: torch.Tensor):
        self.calls += 1
        self.modes_seen.append((self.training, self.tower.training))
        ids = texts[:, 0].long()
        img = self.z[ids] * self.weight
        txt = torch.eye(len(self.z), dtype=torch.float64)[ids] * self.weight
        scale = torch.ones((), dtype=torch.float64)
        if self.output == "tuple":
            return (img, txt, scale) if self.bias is None else (img, txt, scale, self.bias)
        out = {"image_features": img, "text_features": txt, "logit_scale": scale}
        if self.bias is not None:
            out["logit_bias"] = self.bias
        return out


def make_batch(learner, reference=None, keep=2, seed=0, **kw) -> SuperBatch:
    learner = learner if isinstance(learner, nn.Module) else LogitModel(learner)
    if reference is not None and not isinstance(reference, nn.Module):
        reference = LogitModel(reference)
    n = len(learner.z)
    return SuperBatch(
        images=torch.zeros(n, 3, 4, 4),
        texts=torch.arange(n)[:, None].repeat(1, 3),
        uids=[f"u{i}" for i in range(n)],
        keep=keep,
        learner=learner,
        reference=reference,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


def diagonal(values) -> torch.Tensor:
    """Logits with ``values`` on the diagonal and 0 elsewhere: example i's loss falls as
    its value rises."""
    return torch.diag(torch.tensor(values, dtype=torch.float64))


# Hardest for the learner: 3, then 5, 2; easiest for the reference: 7, then 0, 5, 2.
# Learnable (hard for one, easy for the other): 5, then 2. Distinct values: float losses
# of tied logits may differ in the last bit, so no test relies on a tie.
LEARNER = diagonal([4, 3.5, -2, -3, 3, -2.5, 2.5, 2])
REFERENCE = diagonal([5, -2, 4, -2.5, -2, 4.5, -1, 6])


def chosen(name: str, batch: SuperBatch, **params) -> list[int]:
    return choose_checked(make_online(name, params), batch).tolist()


# --- losses -------------------------------------------------------------------------


def test_per_example_softmax_loss_is_clips_symmetric_loss_by_hand():
    z = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.3], [1.5, -0.5, 0.2]]
    expected = []
    for i in range(3):
        row = math.log(sum(math.exp(z[i][j]) for j in range(3))) - z[i][i]
        col = math.log(sum(math.exp(z[j][i]) for j in range(3))) - z[i][i]
        expected.append((row + col) / 2)
    found = softmax_losses(torch.tensor(z, dtype=torch.float64))
    assert found.tolist() == pytest.approx(expected, rel=1e-12)
    # their mean is the batch's CLIP loss (open_clip's ClipLoss, with unit scale)
    zt = torch.tensor(z, dtype=torch.float64)
    labels = torch.arange(3)
    clip = (nn.functional.cross_entropy(zt, labels) + nn.functional.cross_entropy(zt.T, labels)) / 2
    assert float(found.mean()) == pytest.approx(float(clip), rel=1e-12)


def test_sigmoid_subset_loss_is_siglips_pair_sum_by_hand():
    z = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3], [1.5, -0.5, 0.2]], dtype=torch.float64)
    expected = sum(
        math.log1p(math.exp(-(1 if i == j else -1) * float(z[i, j])))
        for i in (0, 2)
        for j in (0, 2)
    )
    assert float(subset_loss(z, [0, 2], "sigmoid")) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_incremental_conditional_gain_equals_brute_force_loss_difference(loss, seed):
    g = torch.Generator().manual_seed(seed)
    n = 14
    z = torch.randn(n, n, generator=g, dtype=torch.float64) * 3 + 2 * torch.eye(n)
    tracker = conditional_gain(z, loss)
    order = torch.randperm(n, generator=g).tolist()
    chosen_set: list[int] = []
    for block in (order[:1], order[1:3], order[3:7], order[7:8]):
        base = float(subset_loss(z, chosen_set, loss)) if chosen_set else 0.0
        gains = tracker.gains()
        for i in set(range(n)) - set(chosen_set):
            brute = float(subset_loss(z, chosen_set + [i], loss)) - base
            assert float(gains[i]) == pytest.approx(brute, abs=1e-9)
        tracker.add(block)
        chosen_set += block


def test_block_sizes_put_the_remainder_last_and_never_leave_a_block_empty():
    assert block_sizes(16, 16) == [1] * 16
    assert block_sizes(10, 3) == [3, 3, 4]
    assert block_sizes(4, 16) == [1, 1, 1, 1]
    assert sum(block_sizes(37, 16)) == 37


# --- the contract -------------------------------------------------------------------


def test_validate_choice_enforces_count_uniqueness_range_and_dtype():
    batch = make_batch(LEARNER, keep=3)
    assert validate_choice(np.array([0, 5, 7]), batch, "mine").tolist() == [0, 5, 7]
    cases = {
        "chose 2 examples": [0, 1],
        "more than once": [1, 1, 2],
        "outside the super-batch": [0, 1, 8],
        "dtype": [0.0, 1.0, 2.0],
    }
    for problem, indices in cases.items():
        with pytest.raises(PluginError, match=f"'mine'.*{problem}"):
            validate_choice(indices, batch, "mine")
    with pytest.raises(PluginError, match="expected exactly 3.*harness enforces the count"):
        validate_choice(torch.arange(4), batch, "mine")


def test_choose_checked_names_a_strategy_that_returns_the_wrong_count():
    class Greedy(OnlineStrategy):
        name = "greedy"

        def choose(self, batch):
            return torch.arange(batch.keep + 1)

    with pytest.raises(PluginError, match="'greedy' chose 3 examples.*expected exactly 2"):
        choose_checked(Greedy(), make_batch(LEARNER, keep=2))


def test_a_strategy_that_needs_a_reference_refuses_a_batch_without_one():
    with pytest.raises(ConfigError, match="'jest'.*reference"):
        choose_checked(Jest(), make_batch(LEARNER))


def test_params_are_validated_and_errors_name_the_strategy_and_key():
    with pytest.raises(ConfigError, match="'jest'.*n_chunk"):
        make_online("jest", {"n_chunk": 4})
    with pytest.raises(ConfigError, match="'uniform'.*ratio"):
        make_online("uniform", {"ratio": 0})
    with pytest.raises(ConfigError, match="unknown online method 'nope'"):
        make_online("nope")
    assert make_online("jest", {"n_chunks": 2}).params.n_chunks == 2


def test_every_builtin_declares_its_contract():
    assert set(BUILTIN_ONLINE) == {
        "uniform",
        "hard-learner",
        "easy-reference",
        "learnability",
        "jest",
    }
    for name, cls in BUILTIN_ONLINE.items():
        assert cls.name == name and cls.summary and cls.reference
        assert cls.needs_reference == (name in {"jest", "learnability", "easy-reference"})
        fields = cls.Params.model_fields
        assert fields["ratio"].default >= 1
        assert all(f.description and f.default is not None for f in fields.values())
    assert make_online("uniform", {"ratio": 1}).is_stochastic() is False
    assert make_online("jest", {"temperature": 0}).is_stochastic() is False
    assert make_online("jest").super_batch_size(32) == 128


def test_super_batch_checks_its_shape_and_keep():
    with pytest.raises(ConfigError, match="keep=9"):
        make_batch(LEARNER, keep=9)


# --- scoring: caching, modes, gradients, output forms ----------------------------------


def test_scoring_runs_once_in_eval_mode_without_gradients_and_restores_modes():
    model = LogitModel(LEARNER)
    model.train()
    model.tower.eval()  # a submodule in a mode of its own
    batch = make_batch(model, keep=3)
    logits = batch.learner_logits()
    losses = batch.learner_losses()
    batch.learner_logits()
    assert model.calls == 1 and batch.forward_passes == {"learner": 8}
    assert model.modes_seen == [(False, False)]
    assert model.training is True and model.tower.training is False
    assert not logits.requires_grad and not losses.requires_grad
    assert model.weight.grad is None
    assert torch.equal(logits, LEARNER)


def test_chunked_scoring_tuple_outputs_and_logit_bias():
    model = LogitModel(LEARNER, output="tuple", bias=-1.5)
    batch = make_batch(model, keep=2, score_batch_size=3)
    assert torch.allclose(batch.learner_logits(), LEARNER - 1.5)
    assert model.calls == 3 and batch.forward_passes == {"learner": 8}


# --- each built-in picks what its definition picks -------------------------------------


def test_hard_learner_picks_the_top_learner_losses():
    batch = make_batch(diagonal([5, 0, 4, -1, 3, 2, 1, 6]), keep=3)
    assert chosen("hard-learner", batch) == [1, 3, 6]  # the three lowest logits
    assert chosen("hard-learner", make_batch(LEARNER, REFERENCE)) == [3, 5]


def test_easy_reference_picks_the_lowest_reference_losses():
    batch = make_batch(LEARNER, diagonal([5, 0, 4, -1, 3, 2, 1, 6]), keep=3)
    assert chosen("easy-reference", batch) == [0, 2, 7]
    assert chosen("easy-reference", make_batch(LEARNER, REFERENCE)) == [0, 7]


def test_learnability_picks_the_top_loss_differences():
    assert chosen("learnability", make_batch(LEARNER, REFERENCE)) == [2, 5]
    g = torch.Generator().manual_seed(3)
    zl, zr = torch.randn(12, 12, generator=g), torch.randn(12, 12, generator=g)
    batch = make_batch(zl, zr, keep=4)
    expected = torch.topk(softmax_losses(zl) - softmax_losses(zr), 4).indices
    assert chosen("learnability", batch) == sorted(expected.tolist())


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_jest_in_one_greedy_block_picks_the_most_learnable_sub_batch(loss):
    batch = make_batch(LEARNER, REFERENCE, keep=2)
    best = max(
        itertools.combinations(range(8), 2),
        key=lambda s: subbatch_learnability(LEARNER, REFERENCE, list(s), loss),
    )
    assert list(best) == [2, 5]
    assert chosen("jest", batch, n_chunks=1, temperature=0, loss=loss) == [2, 5]
    assert chosen("jest", batch, n_chunks=1, temperature=1e-6, loss=loss) == [2, 5]


def planted(seed: int, noise: float = 0.5, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with Gaussian noise (std ``noise``) where the first 8 examples are hard for
    the learner and easy for the reference, and the rest the other way round."""
    learnable = 8
    g = torch.Generator().manual_seed(seed)
    mark = torch.arange(n) < learnable
    learner = torch.randn(n, n, generator=g, dtype=torch.float64) * noise
    reference = torch.randn(n, n, generator=g, dtype=torch.float64) * noise
    learner += torch.diag(torch.where(mark, -3.0, 3.0).double())
    reference += torch.diag(torch.where(mark, 6.0, 0.0).double())
    return learner, reference


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_jest_greedy_in_blocks_finds_the_planted_learnable_set(loss):
    learner, reference = planted(0, noise=0.1)
    gen = torch.Generator().manual_seed(0)
    found = jest_select(learner, reference, 8, gen, n_chunks=4, temperature=0, loss=loss)
    assert found.tolist() == list(range(8))


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_jest_sub_batches_are_more_learnable_than_uniform_ones(loss):
    learner, reference = planted(1)
    jest, uniform = [], []
    for seed in range(20):
        batch = make_batch(learner, reference, keep=8, seed=seed)
        jest_choice = chosen("jest", batch, n_chunks=4, loss=loss)
        uniform_choice = chosen("uniform", batch)
        jest.append(subbatch_learnability(learner, reference, jest_choice, loss))
        uniform.append(subbatch_learnability(learner, reference, uniform_choice, loss))
    assert np.mean(jest) > np.mean(uniform)
    assert min(jest) >= np.mean(uniform)


# --- randomness --------------------------------------------------------------------


def test_uniform_at_ratio_one_returns_the_batch_in_order_and_draws_nothing():
    batch = make_batch(LEARNER, keep=8)
    state = batch.generator.get_state()
    assert torch.equal(choose_checked(make_online("uniform", {"ratio": 1}), batch), torch.arange(8))
    assert torch.equal(batch.generator.get_state(), state)
    assert batch.forward_passes == {}


@pytest.mark.parametrize("name", sorted(BUILTIN_ONLINE))
def test_same_seed_same_choice_and_stochastic_ones_change_with_the_seed(name):
    learner, reference = planted(2)

    def pick(seed):
        return chosen(name, make_batch(learner, reference, keep=8, seed=seed))

    assert pick(0) == pick(0)
    others = {tuple(pick(seed)) for seed in range(1, 6)}
    if make_online(name).is_stochastic():
        assert len(others | {tuple(pick(0))}) > 1
    else:
        assert others == {tuple(pick(0))}


# --- a real tiny open_clip CLIP ------------------------------------------------------


def test_every_builtin_chooses_valid_indices_with_a_tiny_open_clip_model():
    from selbench.train import build_model

    learner, _, tokenizer = build_model("selbench-tiny", 0)
    reference, _, _ = build_model("selbench-tiny", 1)
    learner.train()
    size = learner.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    batch = SuperBatch(
        images=torch.rand(16, 3, size, size, generator=torch.Generator().manual_seed(0)),
        texts=tokenizer([f"a photo of object number {i}" for i in range(16)]),
        uids=[f"u{i}" for i in range(16)],
        keep=4,
        learner=learner,
        reference=reference,
        generator=torch.Generator().manual_seed(0),
    )
    for name in sorted(BUILTIN_ONLINE):
        found = choose_checked(make_online(name), batch)
        assert found.dtype == torch.long and len(set(found.tolist())) == 4
        assert all(0 <= i < 16 for i in found.tolist())
    assert batch.forward_passes == {"learner": 16, "reference": 16}
    assert learner.training and not any(p.grad is not None for p in learner.parameters())
    assert batch.learner_logits().shape == (16, 16)
    assert torch.isfinite(batch.learner_losses()).all()


def test_jest_in_one_greedy_softmax_block_is_the_learnability_strategy():
    g = torch.Generator().manual_seed(5)
    zl, zr = torch.randn(20, 20, generator=g), torch.randn(20, 20, generator=g)
    batch = make_batch(zl, zr, keep=6)
    assert chosen("jest", batch, n_chunks=1, temperature=0) == chosen("learnability", batch)
