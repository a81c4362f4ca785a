"""The online conformance kit (selbench/online/kit.py): every built-in online strategy
passes every check, one pytest item per check; deliberately broken strategies each fail
the check that names their fault; names, classes and declared failures are handled as in
the offline kit (tests/test_conformance_kit.py)."""

from __future__ import annotations

import types

import pytest
import torch
from pydantic import BaseModel, Field

import selbench
from selbench import testing
from selbench.online import (
    BUILTIN_ONLINE,
    HardLearner,
    Jest,
    Learnability,
    OnlineParams,
    OnlineStrategy,
    Uniform,
)
from selbench.online import kit as online_kit
from selbench.online.builtins import top_k
from selbench.online.kit import (
    ONLINE_CHECKS,
    TinyClip,
    check_online_params,
    check_online_strategy,
    make_super_batch,
    parametrize_online_with_checks,
)

# -- deliberately broken strategies ------------------------------------------------------


class TooMany(HardLearner):
    """Returns one index more than the batch trains on."""

    name = "too-many"

    def choose(self, batch):
        return torch.arange(batch.keep + 1)


class TrainsLearner(HardLearner):
    """Chooses like hard-learner, then takes an SGD step on the learner."""

    name = "trains-learner"

    def choose(self, batch):
        chosen = super().choose(batch)
        image, text, scale = batch.learner(batch.images, batch.texts)
        loss = -(scale * image @ text.T).diagonal().mean()
        loss.backward()
        with torch.no_grad():  # a plain SGD step (torch.optim's import alone takes seconds)
            for param in batch.learner.parameters():
                param -= 0.1 * param.grad
        return chosen


class LeavesEval(HardLearner):
    """Puts the learner in eval mode to score it, and leaves it there."""

    name = "leaves-eval"

    def choose(self, batch):
        batch.learner.eval()
        return super().choose(batch)


class IgnoresSeed(HardLearner):
    """Claims to be stochastic; never draws from the generator."""

    name = "ignores-seed"
    stochastic = True


class HiddenRandomness(Uniform):
    """Claims to be deterministic; draws from torch's global generator."""

    name = "hidden-randomness"
    stochastic = False

    def is_stochastic(self):
        return False

    def choose(self, batch):
        return torch.randperm(len(batch))[: batch.keep]


class UndocumentedParams(OnlineParams):
    window: int = 3


class Undocumented(HardLearner):
    """A parameter without a description."""

    name = "undocumented"
    Params = UndocumentedParams


class LaxRatioParams(OnlineParams):
    ratio: int = Field(default=4, description="super-batch size / batch size, unbounded")


class LaxRatio(HardLearner):
    """A ratio of 0 is accepted."""

    name = "lax-ratio"
    Params = LaxRatioParams


class FloatRatioParams(BaseModel):
    ratio: float = Field(default=4.0, ge=1, description="super-batch size / batch size")


class FloatRatio(HardLearner):
    name = "float-ratio"
    Params = FloatRatioParams


class CommaParams(OnlineParams):
    note: str = Field(default="a,b=c", description="a default the method grammar splits")


class CommaDefault(HardLearner):
    """A default that does not survive being written as ``name(note=a,b=c)``."""

    name = "comma-default"
    Params = CommaParams


class Unreferenced(HardLearner):
    name = "unreferenced"
    reference = ""


class UndeclaredReference(Learnability):
    """Scores with the reference model without declaring needs_reference."""

    name = "undeclared-reference"
    needs_reference = False


class PeeksAtReference(HardLearner):
    """Runs a reference model when there is one, without declaring it."""

    name = "peeks-at-reference"

    def choose(self, batch):
        if batch.reference is not None:
            batch.reference_losses()
        return super().choose(batch)


class DeclaredIgnoresSeed(IgnoresSeed):
    name = "declared-ignores-seed"
    expected_check_failures = {"check_online_seed": "the seed is ignored, for this test"}


# -- every built-in passes ---------------------------------------------------------------


@parametrize_online_with_checks(
    list(BUILTIN_ONLINE.values())
    + [
        Jest({"ratio": 2}),
        Jest({"temperature": 0}),
        Jest({"loss": "sigmoid", "n_chunks": 2}),
        Uniform({"ratio": 1}),
        DeclaredIgnoresSeed(),  # a strict expected failure: check_online_seed must fail
    ]
)
def test_every_builtin_online_strategy_passes_the_kit(strategy, check):
    check(strategy)


def test_one_item_per_check_with_the_methods_label_as_id():
    params = parametrize_online_with_checks([Jest({"ratio": 2}), Uniform]).args[1]
    names = [check.__name__ for check in ONLINE_CHECKS]
    assert [p.id for p in params] == [f"jest(ratio=2)-{n}" for n in names] + [
        f"uniform-{n}" for n in names
    ]
    assert all(not p.marks for p in params)
    declared = parametrize_online_with_checks([DeclaredIgnoresSeed]).args[1]
    marked = {p.id: p.marks for p in declared if p.marks}
    assert list(marked) == ["declared-ignores-seed-check_online_seed"]
    (mark,) = marked["declared-ignores-seed-check_online_seed"]
    assert mark.name == "xfail" and mark.kwargs["strict"] is True


def test_the_kit_is_exported_by_selbench_testing():
    for name in online_kit.__all__:
        assert getattr(testing, name) is getattr(online_kit, name)


# -- broken strategies fail the check that names their fault -----------------------------


def failing_checks(strategy) -> dict[str, str]:
    found = {}
    for check in ONLINE_CHECKS:
        try:
            check(strategy)
        except AssertionError as exc:
            found[check.__name__] = str(exc)
    return found


BROKEN = [
    (TooMany(), {"check_online_count"}, "expected exactly 1"),
    (TrainsLearner(), {"check_online_models_untouched"}, "changed: logit_scale, visual.weight"),
    (TrainsLearner(), {"check_online_models_untouched"}, ".grad set on: logit_scale, visual"),
    (LeavesEval(), {"check_online_models_untouched"}, "mode: <root> (was training)"),
    (IgnoresSeed(), {"check_online_seed"}, "declared stochastic"),
    (
        HiddenRandomness(),
        {"check_online_deterministic", "check_online_seed"},
        "the same seed gave different choices",
    ),
    (Undocumented(), {"check_online_params"}, "'window' has no description"),
    (LaxRatio(), {"check_online_params"}, "accepts ratio=0"),
    (FloatRatio(), {"check_online_params"}, "not int"),
    (CommaDefault(), {"check_online_params"}, "do not parse"),
    (Unreferenced(), {"check_online_params"}, "`reference` is empty"),
    (UndeclaredReference(), {"check_online_reference"}, "reference=None"),
    (PeeksAtReference(), {"check_online_reference"}, "ran the reference model"),
]


@pytest.mark.parametrize(
    "strategy, expected, message", BROKEN, ids=[case[0].name for case in BROKEN]
)
def test_a_broken_strategy_fails_the_check_that_names_its_fault(strategy, expected, message):
    found = failing_checks(strategy)
    assert set(found) == expected, found
    assert all(strategy.name in text for text in found.values()), found
    assert any(message in text for text in found.values()), found


def test_a_strategy_whose_params_lack_ratio_cannot_be_checked():
    class NoRatioParams(BaseModel):
        window: int = Field(default=3, description="a parameter, and no ratio")

    class NoRatio(HardLearner):
        name = "no-ratio"
        Params = NoRatioParams

    with pytest.raises(AssertionError, match="no-ratio: Params has no `ratio`"):
        check_online_params(NoRatio)
    with pytest.raises(AssertionError, match="no-ratio: cannot be built"):
        check_online_strategy(NoRatio)


def test_check_online_strategy_runs_every_check_and_enforces_declared_failures():
    check_online_strategy(Jest, params={"ratio": 2, "n_chunks": 4})
    check_online_strategy(DeclaredIgnoresSeed)  # fails check_online_seed, as declared
    with pytest.raises(AssertionError, match="check_online_seed was expected to fail"):
        check_online_strategy(HardLearner, expected_failures={"check_online_seed": "stale"})
    with pytest.raises(AssertionError, match="unknown checks \\['check_nothing'\\]"):
        check_online_strategy(HardLearner, expected_failures={"check_nothing": "typo"})
    with pytest.raises(AssertionError, match="is not a selbench.online.OnlineStrategy"):
        check_online_strategy(selbench.Strategy)


class Tempered(OnlineStrategy):
    """A third-party online strategy: softmax-sampled by learner loss."""

    name = "tempered"
    summary = "Sample the keep by softmax(learner loss / temperature)"
    reference = "a test fixture"
    stochastic = True

    class Params(OnlineParams):
        temperature: float = Field(default=1.0, gt=0, description="softmax temperature")

    def choose(self, batch):
        scores = batch.learner_losses() / self.params.temperature
        noise = torch.rand(len(batch), generator=batch.generator)
        return top_k(scores - torch.log(-torch.log(noise.clamp_min(1e-12))), batch.keep)


def test_registered_names_with_parameters_are_accepted(monkeypatch):
    from selbench.registry import Registry, make_plugin_manager

    plugin = types.ModuleType("tempered_plugin")

    @selbench.hookimpl
    def register_online_strategies(register):
        register(Tempered)

    plugin.register_online_strategies = register_online_strategies
    registry = Registry(make_plugin_manager(load_entry_points=False))
    registry.add_plugin(plugin, package="tempered-plugin")
    monkeypatch.setattr("selbench.run.plan.get_registry", lambda: registry)
    check_online_strategy("tempered(ratio=2,temperature=0.5)")
    params = parametrize_online_with_checks(["tempered(temperature=0.5)"]).args[1]
    assert params[0].id == "tempered(temperature=0.5)-check_online_params"
    assert params[0].values[0].params.temperature == 0.5


# -- the fake model and super-batch ------------------------------------------------------


def test_the_fake_clip_and_super_batch_are_seeded_and_give_varied_losses():
    state = torch.random.get_rng_state()
    batch, again = make_super_batch(32, 8, seed=3), make_super_batch(32, 8, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG untouched
    assert torch.equal(batch.images, again.images) and torch.equal(batch.texts, again.texts)
    assert torch.equal(batch.learner_logits(), again.learner_logits())
    losses = batch.learner_losses()
    assert losses.std() > 1 and len(set(losses.tolist())) == 32
    assert not torch.allclose(batch.learner_logits(), batch.reference_logits())
    assert batch.learner.training and not batch.learner.token_embedding.training
    assert not batch.reference.training
    assert all(not p.requires_grad for p in batch.reference.parameters())
    assert make_super_batch(4, 1, reference=False).reference is None
    image, text, scale = TinyClip(0)(batch.images, batch.texts)
    assert image.shape == text.shape == (32, 32)
    assert torch.allclose(image.norm(dim=1), torch.ones(32))
    assert scale.item() == pytest.approx(1 / 0.07)
