"""selbench.flops: FLOP counts from torch's FlopCounterMode against hand computations,
the tiny CLIP's towers against its config, the training rule and the ComputeLedger."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from selbench import flops
from selbench.train import build_model

TINY_CONFIG = json.loads(
    (Path(__file__).resolve().parents[1] / "configs/models/selbench-tiny.json").read_text()
)


@pytest.fixture(scope="module")
def tiny_clip() -> nn.Module:
    model, _, _ = build_model("selbench-tiny", seed=0)
    return model


def _direct(encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> int:
    with torch.no_grad():
        return flops.forward_flops(lambda: encode(inputs))


# -- hand computations -----------------------------------------------------------------


def test_linear_counts_two_flops_per_multiply_add_and_not_the_bias() -> None:
    # 5 x 64 @ 64 x 32: 5*64*32 multiply-adds, 2 FLOPs each. torch runs a biased Linear as
    # aten.addmm and counts only its matmul: the bias add (5*32) is 0, like every
    # elementwise op, so with and without a bias the count is the same.
    x = torch.zeros(5, 64)
    for bias in (True, False):
        assert _direct(nn.Linear(64, 32, bias=bias), x) == 2 * 5 * 64 * 32


def test_two_layer_mlp_is_the_sum_of_its_matmuls_and_relu_counts_zero() -> None:
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.LayerNorm(128), nn.Linear(128, 10))
    x = torch.zeros(3, 64)
    assert flops.forward_flops(lambda: mlp(x)) == 2 * 3 * (64 * 128 + 128 * 10)
    assert flops.flops_by_op(lambda: mlp(x)) == {"aten.addmm": 2 * 3 * (64 * 128 + 128 * 10)}


def test_conv_matches_the_hand_formula() -> None:
    # 2 FLOPs x N x C_out x H_out x W_out x C_in x k_h x k_w (bias excluded).
    conv = nn.Conv2d(3, 16, kernel_size=3, stride=2, padding=1)
    x = torch.zeros(2, 3, 8, 8)  # H_out = W_out = 4
    assert flops.forward_flops(lambda: conv(x)) == 2 * 2 * 16 * 4 * 4 * 3 * 3 * 3


def test_cpu_attention_is_counted_as_torch_counts_gpu_attention() -> None:
    # torch has no formula for the CPU kernel; flops gives it the GPU kernels' one:
    # scores (s x d @ d x s) and values (s x s @ s x d) per head, 2 FLOPs per multiply-add.
    b, h, s, d = 2, 4, 10, 8
    q = torch.zeros(b, h, s, d)
    counted = flops.forward_flops(lambda: nn.functional.scaled_dot_product_attention(q, q, q))
    assert counted == 2 * (2 * b * h * s * s * d)


def test_multihead_attention_fast_path_is_counted_in_full() -> None:
    # In eval mode without autograd nn.MultiheadAttention takes a fused fast path that
    # torch's counter counts as 0; flops turns it off while counting and back on after.
    b, s, w, heads = 2, 6, 16, 4
    mha = nn.MultiheadAttention(w, heads, batch_first=True).eval()
    x = torch.zeros(b, s, w)
    expected = 2 * b * s * w * 3 * w + 2 * b * s * w * w + 2 * (2 * b * s * s * w)
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        assert flops.forward_flops(lambda: mha(x, x, x, need_weights=False)) == expected
    assert torch.backends.mha.get_fastpath_enabled()


# -- the tiny CLIP ---------------------------------------------------------------------


def _transformer_hand_count(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
    """Every matmul of a pre-norm transformer, 2 FLOPs per multiply-add: QKV projection
    (w -> 3w), output projection (w -> w), MLP (w -> r w -> w), attention scores and
    values (tokens x tokens x w over all heads, whatever the head count)."""
    hidden = int(width * mlp_ratio)
    projections = 2 * tokens * (width * 3 * width + width * width + 2 * width * hidden)
    attention = 2 * (2 * tokens * tokens * width)
    return layers * (projections + attention)


def test_text_tower_matches_a_hand_count_of_its_transformer(tiny_clip: nn.Module) -> None:
    # Tolerance 0: FlopCounterMode counts only matmul/conv/attention ops, whose FLOPs are
    # fixed by the shapes, and the hand count below lists every one of them: the
    # transformer's (dominant, 99.75 %) and the projection of the pooled token to
    # embed_dim. Token embedding (a lookup), positional add, LayerNorm, GELU and softmax
    # count 0 on both sides. The causal mask does not halve the count: the kernel's
    # formula counts the full tokens x tokens attention.
    text = TINY_CONFIG["text_cfg"]
    width, tokens = text["width"], text["context_length"]
    dominant = _transformer_hand_count(tokens, width, text["layers"], text["mlp_ratio"])
    projection = 2 * width * TINY_CONFIG["embed_dim"]
    counted = flops.clip_forward_flops(tiny_clip, 32, tokens, towers=("text",))
    assert counted == {"text": dominant + projection}
    assert dominant / counted["text"] > 0.99


def test_image_tower_matches_a_hand_count_of_its_vit(tiny_clip: nn.Module) -> None:
    vision = TINY_CONFIG["vision_cfg"]
    size, patch, width = vision["image_size"], vision["patch_size"], vision["width"]
    patches = (size // patch) ** 2
    patchify = 2 * patches * width * 3 * patch * patch  # the stride-`patch` conv
    blocks = _transformer_hand_count(patches + 1, width, vision["layers"], vision["mlp_ratio"])
    projection = 2 * width * TINY_CONFIG["embed_dim"]  # the class token's
    counted = flops.clip_forward_flops(tiny_clip, size, 24, towers=("image",))
    assert counted == {"image": patchify + blocks + projection}


def test_tiny_clip_counts_are_positive_and_linear_in_the_batch(tiny_clip: nn.Module) -> None:
    one = flops.clip_forward_flops(tiny_clip, 32, 24, batch=1)
    four = flops.clip_forward_flops(tiny_clip, 32, 24, batch=4)
    assert set(one) == {"image", "text"} and all(n > 0 for n in one.values())
    assert four == {tower: 4 * n for tower, n in one.items()}
    # Measured directly, not extrapolated: the same per-example count at batch 1 and 4.
    for batch in (1, 4):
        assert _direct(tiny_clip.encode_text, torch.zeros(batch, 24, dtype=torch.long)) == (
            batch * one["text"]
        )
        assert _direct(tiny_clip.encode_image, torch.zeros(batch, 3, 32, 32)) == (
            batch * one["image"]
        )
    # Sizes default to the model's own.
    assert flops.clip_forward_flops(tiny_clip, None, None) == one
    assert flops.embedding_pass_flops(tiny_clip, 32, 24, 1000) == 1000 * sum(one.values())


def test_counts_are_cached_and_leave_the_model_as_it_was(
    tiny_clip: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_clip.train()
    first = flops.clip_forward_flops(tiny_clip, 32, 24, batch=7)
    assert tiny_clip.training and all(m.training for m in tiny_clip.modules())

    def no_model_run(*args: object) -> int:
        raise AssertionError("a cached count ran the model")

    monkeypatch.setattr(flops, "_measure_tower", no_model_run)
    assert flops.clip_forward_flops(tiny_clip, 32, 24, batch=7) == first
    with pytest.raises(AssertionError, match="ran the model"):  # another shape is measured
        flops.clip_forward_flops(tiny_clip, 32, 16, towers=("text",))


def test_cache_key_is_shared_by_instances_of_an_architecture(tiny_clip: nn.Module) -> None:
    key = ("selbench-tiny", "test")
    counted = flops.clip_forward_flops(tiny_clip, 32, 24, cache_key=key)
    other = nn.Linear(1, 1)  # never run: the key's counts are reused
    assert flops.clip_forward_flops(other, 32, 24, cache_key=key) == counted
    with pytest.raises(ValueError, match="unknown tower"):
        flops.clip_forward_flops(tiny_clip, 32, 24, towers=("audio",))


def test_backward_is_about_twice_the_forward_as_the_training_rule_says(
    tiny_clip: nn.Module,
) -> None:
    # Measured on the image tower: the backward is a bit under 2x because the input
    # image needs no gradient, so the patchify conv has no input-gradient matmul.
    images = torch.zeros(2, 3, 32, 32)
    forward = flops.clip_forward_flops(tiny_clip, 32, 24, batch=2, towers=("image",))["image"]
    both = flops.forward_flops(lambda: tiny_clip.encode_image(images).sum().backward())
    tiny_clip.zero_grad(set_to_none=True)
    assert 1.9 < (both - forward) / forward <= 2.0
    assert both <= flops.training_flops(forward // 2, 2)


# -- training rule, loss -----------------------------------------------------------------


def test_training_flops_is_three_times_the_forward_by_default() -> None:
    assert flops.training_flops(1000, 7) == 3 * 7000
    assert flops.training_flops(1000, 7, backward_factor=1.0) == 2 * 7000
    assert flops.training_flops(10**18 + 1, 3) == 3 * 3 * (10**18 + 1)  # exact, no float
    assert flops.training_flops(5, 0) == 0
    with pytest.raises(ValueError):
        flops.training_flops(-1, 3)


def test_clip_loss_flops_matches_open_clip_clip_loss() -> None:
    from open_clip.loss import ClipLoss

    batch, dim = 6, 16
    features = torch.zeros(batch, dim)
    counted = flops.forward_flops(lambda: ClipLoss()(features, features, torch.tensor(1.0)))
    assert counted == flops.clip_loss_flops(batch, dim) == 2 * (2 * batch * batch * dim)


# -- the ledger ------------------------------------------------------------------------


def test_ledger_charges_a_cached_entry_nothing_and_marks_it() -> None:
    ledger = flops.ComputeLedger()
    ledger.add("selection/embedding:reference", 5_000, cached=True)
    ledger.add("selection/proxy_training", 300)
    ledger.add("training", 1_000)
    ledger.add("training", 500)
    ledger.add("online/learner_forward", 20)
    ledger.add("online/reference_forward", 10)

    assert ledger.total() == 300 + 1_500 + 20 + 10
    cached = ledger.entries[0]
    assert cached.cached and cached.flops == 0 and cached.reused_flops == 5_000
    assert cached.note == flops.CACHED_NOTE == "computed by another run"
    assert ledger.cached_names() == ["selection/embedding:reference"]
    assert ledger.as_metrics(total=True) == {
        "flops/selection/embedding:reference": 0.0,
        "flops/selection/proxy_training": 300.0,
        "flops/training": 1500.0,
        "flops/online/learner_forward": 20.0,
        "flops/online/reference_forward": 10.0,
        "flops/total": 1830.0,
    }
    assert set(ledger.as_metrics(prefix="compute/", total=True)) == {
        "compute/" + k.removeprefix("flops/") for k in ledger.as_metrics(total=True)
    }
    # by default no subtotal: a run's flops/total sums every flops/ metric it logged
    assert ledger.as_metrics("flops/selection/") == {
        f"flops/selection/{name}": float(n) for name, n in ledger.by_name().items()
    }


def test_ledger_round_trips_through_json_and_names_its_method() -> None:
    ledger = flops.ComputeLedger()
    ledger.add("selection/embedding:proxy", 40, note="pool 1a2b")
    ledger.add("selection/embedding:reference", 70, cached=True)
    data = json.loads(json.dumps(ledger.to_dict()))
    assert data["method"].startswith("torch.utils.flop_counter.FlopCounterMode")
    assert "Kaplan" in data["training_rule"]
    assert data["total"] == 40 and data["by_name"]["selection/embedding:reference"] == 0
    assert data["entries"][1] == {
        "name": "selection/embedding:reference",
        "flops": 0,
        "cached": True,
        "reused_flops": 70,
        "note": "computed by another run",
    }
    assert flops.ComputeLedger.from_dict(data) == ledger


@pytest.mark.parametrize("name", ["", "total", "a//b", "/a", "a/", "a=b", "../x", "x\n"])
def test_ledger_refuses_names_that_are_not_mlflow_metric_names(name: str) -> None:
    with pytest.raises(ValueError):
        flops.ComputeLedger().add(name, 1)


def test_ledger_refuses_negative_and_non_integer_flops() -> None:
    ledger = flops.ComputeLedger()
    with pytest.raises(ValueError):
        ledger.add("training", -1)
    with pytest.raises(TypeError):
        ledger.add("training", 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ledger.add("training", True)


# -- the open ledger: charges of selection -----------------------------------------------


def test_charge_outside_a_ledger_does_nothing_not_even_count(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("counted with no ledger open")

    monkeypatch.setattr(flops, "model_training_flops", fail)
    assert not flops.charging()
    flops.charge("training/proxy", 10)
    flops.charge("not a metric name = fine here", -1)  # not even checked
    flops.charge_training(nn.Linear(2, 2), "Proxy: training", 8, 2, 4)
    with flops.counted("scoring/x"):
        nn.Linear(4, 4)(torch.zeros(1, 4))
    with flops.recording() as ledger:
        pass
    assert ledger.entries == []


def test_recording_collects_charges_by_name_for_the_select_stages_metrics() -> None:
    with flops.recording() as ledger:
        assert flops.charging()
        flops.charge("training/proxy", 300)
        flops.charge("training/proxy", 200)
        flops.charge("scoring/dfn", 50)
        flops.charge("training/reference", 1_000, cached=True)
    assert not flops.charging()
    flops.charge("training/proxy", 7)  # closed: not added
    assert ledger.by_name() == {"training/proxy": 500, "scoring/dfn": 50, "training/reference": 0}
    assert ledger.cached_names() == ["training/reference"]
    assert ledger.as_metrics("flops/selection/") == {
        "flops/selection/training/proxy": 500.0,
        "flops/selection/scoring/dfn": 50.0,
        "flops/selection/training/reference": 0.0,
    }
    assert ledger.total() == 550
    with flops.recording() as ledger, pytest.raises(ValueError):
        flops.charge("total", 1)  # names are checked once a ledger is open


def test_nested_recordings_charge_the_innermost_open_ledger() -> None:
    with flops.recording() as outer:
        flops.charge("a", 1)
        with flops.recording() as inner:
            flops.charge("b", 2)
        flops.charge("c", 3)
    assert outer.by_name() == {"a": 1, "c": 3}
    assert inner.by_name() == {"b": 2}


def test_counted_charges_what_the_block_ran_once_even_when_nested() -> None:
    layer = nn.Linear(64, 32)
    x = torch.zeros(5, 64)
    with flops.recording() as ledger:
        with flops.counted("scoring/outer"):
            layer(x)
            with flops.counted("scoring/inner"):
                layer(x)
                flops.charge("scoring/typed", 99)  # the outer counter already saw it
                flops.charge_training(nn.Linear(2, 2), "Proxy: training", 8, 2, 4)
        with pytest.raises(RuntimeError), flops.counted("scoring/failed"):
            layer(x)
            raise RuntimeError
    assert ledger.by_name() == {"scoring/outer": 2 * (2 * 5 * 64 * 32)}


@pytest.mark.parametrize(
    ("description", "name"),
    [
        ("Proxy: training", "training/proxy"),
        ("Proxy scorer: training", "training/proxy_scorer"),
        ("TL;DR: training captioner", "training/tldr"),
        ("Distill: expert 2", "training/distill"),
        ("EL2N: training proxy 1/2", "training/el2n"),
        ("Training", "training/training"),
        (":::", "training/model"),
    ],
)
def test_training_names_are_short_metric_names(description: str, name: str) -> None:
    assert flops.training_name(description) == name
    flops.ComputeLedger().add(name, 1)  # passes the ledger's check


def test_charge_training_of_a_clip_is_the_training_stages_rule(tiny_clip: nn.Module) -> None:
    samples, steps, batch = 1_000, 4, 256
    towers = flops.clip_forward_flops(tiny_clip, None, None)
    expected = flops.training_flops(sum(towers.values()), samples) + flops.training_flops(
        flops.clip_loss_flops(batch, TINY_CONFIG["embed_dim"]), steps
    )
    assert flops.model_training_flops(tiny_clip, samples, steps, batch) == expected
    with flops.recording() as ledger:
        flops.charge_training(tiny_clip, "Proxy: training", samples, steps, batch)
    assert ledger.by_name() == {"training/proxy": expected}
    assert expected == 3 * 27_837_952 * samples + 3 * 2 * 2 * batch * batch * 128 * steps


def test_a_coca_counts_its_decoder_as_well_as_its_towers() -> None:
    coca, _, _ = build_model("selbench-tiny-coca", seed=0)
    samples, steps, batch = 100, 2, 50
    towers = sum(flops.clip_forward_flops(coca, None, None).values())
    loss = flops.training_flops(flops.clip_loss_flops(batch, 64), steps)
    counted = flops.model_training_flops(coca.train(), samples, steps, batch)
    assert coca.training  # counted in eval mode, mode restored
    images, tokens = torch.zeros(1, 3, 32, 32), torch.zeros(1, 24, dtype=torch.long)
    with torch.no_grad():
        whole = flops.forward_flops(lambda: coca.eval()(images, tokens))
    assert counted == flops.training_flops(whole, samples) + loss
    assert counted > flops.training_flops(towers, samples) + loss


def test_other_models_are_counted_on_the_forward_they_are_given() -> None:
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).train()
    with pytest.raises(TypeError, match="example="):
        flops.model_training_flops(mlp, 10, 2, 5)
    counted = flops.model_training_flops(mlp, 10, 2, 5, example=lambda b: mlp(torch.zeros(b, 8)))
    assert counted == 3 * 10 * 2 * (8 * 16 + 16 * 4)
    assert mlp.training  # counted in eval mode, mode restored


def test_train_clip_inside_a_recording_charges_its_training(tiny_clip: nn.Module) -> None:
    from selbench.configs import ScaleConfig
    from selbench.train import TrainingData, train_clip

    scale = ScaleConfig(
        name="t", model="selbench-tiny", batch_size=4, epochs=1, lr=1e-3,
        weight_decay=0.1, warmup_fraction=0.0,
    )  # fmt: skip
    model, _, tokenizer = build_model("selbench-tiny", seed=3)
    data = TrainingData(torch.randn(6, 3, 32, 32), tokenizer([f"shape {i}" for i in range(6)]))
    train_clip(model, data, scale, 8, seed=0)  # no ledger: nothing to charge
    with flops.recording() as ledger:
        result = train_clip(model, data, scale, 8, seed=0, description="EL2N: training proxy")
    assert (result.steps, result.samples_seen, result.batch_size) == (2, 8, 4)
    expected = flops.model_training_flops(model, 8, 2, 4)
    assert expected == flops.model_training_flops(tiny_clip, 8, 2, 4)  # same architecture
    assert ledger.by_name() == {"training/el2n": expected}


def test_a_cached_proxy_is_charged_only_by_the_run_that_trained_it(tiny_pool, tmp_path) -> None:
    from selbench.embedders import EmbeddingService
    from selbench.pools import resolve_pool
    from selbench.registry import get_registry

    recipe = tmp_path / "flops-proxy.yaml"  # one step of 64 pairs: the cheapest proxy
    recipe.write_text(
        "name: flops-proxy\nmodel: selbench-tiny\nbatch_size: 64\nepochs: 0.2\nlr: 1.0e-3\n"
        "weight_decay: 0.1\nwarmup_fraction: 0.0\n"
    )
    charged = []
    for _ in range(2):
        pool = resolve_pool(str(tiny_pool)).pool.strategy_view()
        service = EmbeddingService(pool, "cpu", get_registry().make_embedder)
        with flops.recording() as ledger:
            embedder = service.embedder(f"proxy:{recipe}")
        charged.append(ledger.by_name())
    first, second = charged
    per_step = flops.model_training_flops(embedder.model, 64, 1, 64)
    assert first == {"training/proxy_flops_proxy": per_step}
    assert second == {}  # the cache served it: the run that trained it was charged
