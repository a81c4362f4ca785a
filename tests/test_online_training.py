"""Online selection wired into runs (issue 31): the registry's hook, the method grammar's
online step, the in-memory engine's super-batches, the open_clip engine's refusal, the
compute it records and the training lengths a sweep runs at."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import BaseModel

from selbench import hookimpl
from selbench.configs import ScaleConfig
from selbench.errors import ConfigError, PluginError, UnknownMethodError
from selbench.online import OnlineParams, OnlineStrategy, SuperBatch, make_online
from selbench.online.harness import OnlineSelector, check_reference
from selbench.registry import Registry, get_registry, make_plugin_manager
from selbench.run.spec import (
    RunRequest,
    cell_key,
    online_label,
    parse_train_samples,
    split_online,
    split_train_label,
    train_label,
)
from selbench.train import TrainingData, build_model, train_clip

SCALE = ScaleConfig(
    name="t",
    model="selbench-tiny",
    batch_size=8,
    epochs=1,
    lr=1e-3,
    weight_decay=0.1,
    warmup_fraction=0.1,
    random_resized_crop_scale=(0.9, 1.0),
)


def _data(n: int = 32, seed: int = 0) -> TrainingData:
    generator = torch.Generator().manual_seed(seed)
    _, _, tokenizer = build_model("selbench-tiny", seed=0)
    captions = [f"a {i % 7} shape number {i}" for i in range(n)]
    return TrainingData(torch.randn(n, 3, 32, 32, generator=generator), tokenizer(captions))


def _uids(n: int) -> list[str]:
    return [f"{i:06d}" for i in range(n)]


# -- the grammar and the labels -------------------------------------------------------------
def test_an_online_step_ends_a_chain_and_splits_off():
    assert split_online("clip_score >> online:jest(ratio=2)") == ("clip_score", "jest(ratio=2)")
    assert split_online("basic >> clip_score(keep=0.5) >> online:uniform") == (
        "basic >> clip_score(keep=0.5)",
        "uniform",
    )
    assert split_online("clip_score") == ("clip_score", None)


@pytest.mark.parametrize(
    "text", ["online:jest", "online:jest >> clip_score", "fuse(clip_score, online:jest)"]
)
def test_an_online_step_anywhere_but_last_is_refused_with_the_fix(text):
    with pytest.raises(ConfigError, match="last step of a chain") as error:
        split_online(text)
    assert "random >> online:jest" in str(error.value)


def test_training_lengths_parse_and_round_trip_through_the_label():
    assert parse_train_samples("0.5x") == 0.5 and parse_train_samples("2") == 2.0
    for bad in ("0x", "-1x", "twice", "infx"):
        with pytest.raises(ConfigError, match="positive multiple"):
            parse_train_samples(bad)
    label = train_label(online_label("clip_score", "jest(ratio=2)"), 2.0)
    assert label == "clip_score >> online:jest(ratio=2) [train 2x]"
    assert split_train_label(label) == ("clip_score >> online:jest(ratio=2)", 2.0)
    assert train_label("random", 1.0) == "random" and split_train_label("random") == ("random", 1)


def test_cell_keys_change_with_the_online_step_and_length_and_old_keys_stay():
    from selbench.run.plan import resolve_online

    base = RunRequest(method="random", budget=1.0)
    params = get_registry().get("random").cls.Params()
    old = cell_key(base, params)
    jest = resolve_online("jest(ratio=2)")
    online = RunRequest(method="random", budget=1.0, online=jest.label)
    longer = RunRequest(method="random", budget=1.0, train_samples=2.0)
    keys = {old, cell_key(online, params, jest.params), cell_key(longer, params)}
    assert len(keys) == 3
    assert cell_key(RunRequest(method="random", budget=1.0, train_samples=1.0), params) == old


# -- the registry ---------------------------------------------------------------------------
def test_the_built_in_online_strategies_arrive_through_the_entry_point():
    registry = get_registry()
    assert registry.online_names() == [
        "easy-reference",
        "hard-learner",
        "jest",
        "learnability",
        "uniform",
    ]
    assert registry.get_online("jest").package == "selbench"
    with pytest.raises(UnknownMethodError, match="'clip_score' is an offline strategy"):
        registry.get_online("clip_score")


class Newest(OnlineStrategy):
    """A third-party online strategy: the last ``keep`` of the super-batch."""

    name = "newest"
    stochastic = False

    def choose(self, batch: SuperBatch) -> torch.Tensor:
        return torch.arange(len(batch) - batch.keep, len(batch))


class NoRatioParams(BaseModel):
    pass


class NoRatio(OnlineStrategy):
    name = "no-ratio"
    Params = NoRatioParams


class Plugin:
    def __init__(self, *classes: type) -> None:
        self.classes = classes

    @hookimpl
    def register_online_strategies(self, register):
        for cls in self.classes:
            register(cls)


def test_a_third_party_online_strategy_registers_through_the_hook():
    registry = Registry(make_plugin_manager(load_entry_points=False))
    registry.add_plugin(Plugin(Newest), package="my-plugin", version="1.0")
    assert registry.get_online("newest").package == "my-plugin"
    with pytest.raises(PluginError, match="no `ratio` field"):
        registry.add_plugin(Plugin(NoRatio))
    with pytest.raises(PluginError, match="registered twice"):
        registry.add_plugin(Plugin(Newest))
    with pytest.raises(PluginError, match="not a selbench.online.OnlineStrategy"):
        registry.add_plugin(Plugin(dict))


# -- the in-memory engine ---------------------------------------------------------------------
def test_uniform_at_ratio_1_trains_bit_identically_to_plain_training():
    data = _data()
    plain, _, _ = build_model("selbench-tiny", 3)
    train_clip(plain, data, SCALE, 48, seed=3)
    online, _, _ = build_model("selbench-tiny", 3)
    selector = OnlineSelector(
        make_online("uniform", {"ratio": 1}), data.images, data.tokens, _uids(32), online, 8, 3
    )
    train_clip(online, data, SCALE, 48, seed=3, online=selector)
    assert selector.step == 6 and selector.draw_size == 8
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), online.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


class Duplicates(OnlineStrategy):
    name = "duplicates"
    Params = OnlineParams

    def choose(self, batch: SuperBatch) -> torch.Tensor:
        return torch.zeros(batch.keep, dtype=torch.long)


class TooMany(OnlineStrategy):
    name = "too-many"
    Params = OnlineParams

    def choose(self, batch: SuperBatch) -> torch.Tensor:
        return torch.arange(batch.keep + 1)


@pytest.mark.parametrize(
    "strategy, problem",
    [(Duplicates, "more than once"), (TooMany, "expected exactly 8")],
)
def test_the_harness_enforces_the_count_during_training(strategy, problem):
    data = _data()
    model, _, _ = build_model("selbench-tiny", 0)
    selector = OnlineSelector(
        strategy({"ratio": 2}), data.images, data.tokens, _uids(32), model, 8, 0
    )
    with pytest.raises(PluginError, match=problem):
        train_clip(model, data, SCALE, 16, seed=0, online=selector)


def test_jest_trains_on_what_it_chose_and_counts_every_scoring_pass():
    data = _data()
    learner, _, _ = build_model("selbench-tiny", 0)
    reference, _, _ = build_model("selbench-tiny", 1)
    chosen: list[torch.Tensor] = []
    selector = OnlineSelector(
        make_online("jest", {"ratio": 2, "n_chunks": 2}),
        data.images,
        data.tokens,
        _uids(32),
        learner,
        8,
        0,
        reference=reference,
    )
    original = selector.choose
    before = {k: v.clone() for k, v in reference.state_dict().items()}

    def spy(drawn):
        picked = original(drawn)
        assert set(picked.tolist()) <= set(drawn.tolist()) and len(picked) == 8
        chosen.append(picked)
        return picked

    selector.choose = spy  # type: ignore[method-assign]
    trained = train_clip(learner, data, SCALE, 32, seed=0, online=selector)
    assert trained.steps == 4 and len(chosen) == 4 and selector.draw_size == 16
    assert selector.forward_passes == {"learner": 64, "reference": 64}
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    from selbench.flops import clip_forward_flops

    per_example = sum(clip_forward_flops(learner, None, None).values())
    dim = learner.text_projection.shape[-1]
    logits = 4 * 2 * 16 * 16 * dim  # one N x N logit matrix per scored super-batch
    assert selector.compute()["flops/online/learner"] == per_example * 64 + logits
    metrics = selector.metrics()
    assert metrics["online/ratio"] == 2 and metrics["online/examples_scored/reference"] == 64
    assert {"learner_loss_chosen", "reference_loss_superbatch"} <= set(selector.series)


def test_a_small_subset_draws_the_whole_of_it_and_says_the_ratio_it_got():
    data = _data(12)
    model, _, _ = build_model("selbench-tiny", 0)
    selector = OnlineSelector(
        make_online("hard-learner"), data.images, data.tokens, _uids(12), model, 8, 0
    )
    assert selector.draw_size == 12 and math.isclose(selector.effective_ratio, 1.5)


def test_a_reference_of_other_input_shapes_is_refused():
    learner, _, _ = build_model("selbench-tiny", 0)
    other, _, _ = build_model("selbench-tiny", 0)
    other.visual.image_size = (64, 64)
    with pytest.raises(ConfigError, match="must match"):
        check_reference(learner, other, "selbench-tiny", "open_clip:X:/w.pt")
    check_reference(learner, build_model("selbench-tiny", 1)[0], "a", "b")


def test_a_strategy_needing_a_reference_gets_one():
    data = _data()
    model, _, _ = build_model("selbench-tiny", 0)
    with pytest.raises(ConfigError, match="scores with a reference model"):
        OnlineSelector(make_online("jest"), data.images, data.tokens, _uids(32), model, 8, 0)


# -- runs -----------------------------------------------------------------------------------
def _request(tiny, **changes) -> RunRequest:
    pool, scale = tiny
    settings = dict(method="random", budget=1.0, pool=str(pool), scale=str(scale))
    return RunRequest(**{**settings, **changes})


def test_preparing_an_online_run_resolves_its_label_and_refuses_the_open_clip_engine(tiny):
    from selbench.progress import NullProgress
    from selbench.run.stages import prepare

    run = prepare(_request(tiny, method="random >> online:jest( ratio=2 )"), NullProgress())
    assert run.label == "random >> online:jest(ratio=2)"
    assert run.request.method == "random" and run.request.online == "jest(ratio=2)"
    longer = prepare(_request(tiny, online="uniform", train_samples="2x"), NullProgress())
    assert longer.label == "random >> online:uniform [train 2x]"
    with pytest.raises(ConfigError, match="needs the in-memory engine"):
        prepare(_request(tiny, online="jest", engine="open_clip"), NullProgress())
    with pytest.raises(ConfigError, match="give the online strategy once"):
        prepare(_request(tiny, method="random >> online:jest", online="uniform"), NullProgress())
    with pytest.raises(UnknownMethodError, match="unknown online method 'jets'"):
        prepare(_request(tiny, online="jets"), NullProgress())
    with pytest.raises(ConfigError, match="ratio"):
        prepare(_request(tiny, online="jest(ratio=0)"), NullProgress())


@pytest.mark.slow
def test_an_online_run_trains_logs_its_compute_and_a_sweep_finds_it(tiny):
    from click.testing import CliRunner
    from e2e_helpers import logged_runs

    from selbench.cli import main
    from selbench.sweep import plan

    pool, scale = tiny
    args = ["run", "--method", "random", "--budget", "1", "--pool", str(pool)]
    args += ["--scale", str(scale), "--online", "jest(ratio=2)", "--train-samples", "0.5x"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (run,) = logged_runs("selbench")
    metrics, params = run.data.metrics, run.data.params
    assert params["method_label"] == "random >> online:jest(ratio=2) [train 0.5x]"
    assert params["online"] == "jest(ratio=2)" and params["online.param.ratio"] == "2"
    assert metrics["samples_seen"] == 192  # half of 320, in whole batches of 64
    steps = metrics["training_steps"]
    assert metrics["online/examples_scored/learner"] == steps * 128
    assert metrics["flops/online/reference"] > 0 and metrics["flops/online/learner"] > 0
    parts = [v for k, v in metrics.items() if k.startswith("flops/") and k != "flops/total"]
    assert metrics["flops/total"] == pytest.approx(sum(parts))
    (cell,) = plan(
        ["random >> online:jest(ratio=2)"], [1.0], [0], pool=str(pool), scale=str(scale),
        full_pool=False, train_samples=["0.5x"],
    )  # fmt: skip
    assert cell.key == run.data.tags["selbench.cell_key"]
