"""Captioning: BLEU@4 and CIDEr wiring, CoCa's loss and decoding, the captioning eval set."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.loss import CoCaLoss
from PIL import Image

from selbench.captioning import (
    DecodeSettings,
    caption_scores,
    coca_losses,
    decoder_states,
    generate_captions,
    vocab_logits,
)
from selbench.configs import EvalSetConfig, ScaleConfig, load_scale
from selbench.errors import PoolError, SelbenchError
from selbench.evaluate import check_eval_set, evaluate
from selbench.train import build_model, build_training_data, model_config, train_coca

# -- metric wiring against numbers computed by hand ----------------------------------


def test_bleu4_matches_a_hand_computation():
    # "the cat sat on the mat" against "the cat sat on a mat": clipped n-gram precisions
    # 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty.
    scores = caption_scores(["The cat sat on the mat."], [["the cat sat on a mat"]])
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert scores["bleu4"] == pytest.approx(expected, rel=1e-6)
    assert scores["bleu1"] == pytest.approx(5 / 6, rel=1e-6)


def test_bleu4_brevity_penalty_and_corpus_counts():
    # Every n-gram of "the cat sat on" is right, but it is 4 tokens against 6:
    # BP = exp(1 - 6/4).
    short = caption_scores(["the cat sat on"], [["the cat sat on the mat"]])
    assert short["bleu4"] == pytest.approx(math.exp(1 - 6 / 4), rel=1e-6)
    # Corpus BLEU pools the counts of both images (not a mean of per-image BLEU):
    # 1-grams 4/4 + 3/4, 2-grams 3/3 + 2/3, 3-grams 2/2 + 1/2, 4-grams 1/1 + 0/1.
    both = caption_scores(
        ["a red circle left", "a blue square up"],
        [["a red circle left"], ["a blue square right"]],
    )
    expected = (7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25
    assert both["bleu4"] == pytest.approx(expected, rel=1e-6)


def test_cider_matches_a_hand_computation():
    # CIDEr-D: tf-idf n-gram vectors, idf from the references (2 images, each n-gram in
    # one of them, so every weight is log 2). A candidate equal to its only reference has
    # cosine 1 for the 1-, 2- and 3-grams of a 3-word caption and no 4-grams: 10 x 3/4.
    # A candidate sharing nothing with its reference scores 0.
    scores = caption_scores(
        ["red circle left", "green star top"],
        [["red circle left"], ["blue square right"]],
    )
    assert scores["cider"] == pytest.approx((10 * 3 / 4 + 0) / 2, rel=1e-9)


def test_metrics_refuse_mismatched_inputs_and_name_missing_java(monkeypatch):
    with pytest.raises(ValueError, match="2 candidates for 1 reference"):
        caption_scores(["a", "b"], [["a"]])
    monkeypatch.setenv("PATH", "")
    with pytest.raises(SelbenchError, match="Java"):
        caption_scores(["a red circle"], [["a red circle"]])


# -- a small CoCa that learns two captions ---------------------------------------------
CAPTIONS = ("a big red circle here", "one small blue square there")


def colour_images(n: int) -> list[Image.Image]:
    """``n`` reddish images then ``n`` bluish ones, with seeded noise."""
    g = torch.Generator().manual_seed(0)
    images = []
    for colour in ((200, 40, 40), (40, 40, 200)):
        for _ in range(n):
            noise = torch.randint(-30, 30, (32, 32, 3), generator=g)
            pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
            images.append(Image.fromarray(pixels))
    return images


@pytest.fixture(scope="module")
def small_coca(tmp_path_factory):
    """The tiny-coca architecture shrunk (width 32, one layer each, context 8), trained on
    16 images with two captions through train_coca, tiny-coca's recipe."""
    config = model_config("selbench-tiny-coca")
    config["embed_dim"] = 32
    config["vision_cfg"].update(
        width=32, layers=1, head_width=16, attn_pooler_queries=4, attn_pooler_heads=2
    )
    config["text_cfg"].update(width=32, heads=2, layers=1, context_length=8)
    config["multimodal_cfg"].update(
        width=32, heads=2, layers=1, context_length=8, attn_pooler_heads=2
    )
    folder = tmp_path_factory.mktemp("models")
    (folder / "test-small-coca.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    model, preprocess, tokenizer = build_model("test-small-coca", seed=0)
    images = colour_images(8)
    uids = [str(i) for i in range(len(images))]
    captions = {uid: CAPTIONS[i // 8] for i, uid in enumerate(uids)}
    data = build_training_data(zip(uids, images, strict=True), captions, preprocess, tokenizer)
    scale = load_scale("tiny-coca").model_copy(
        update=dict(model="test-small-coca", batch_size=16, lr=5e-3, weight_decay=0.0)
    )
    result = train_coca(model, data, scale, samples_seen=16 * 150, seed=0)
    return model, preprocess, tokenizer, data, result


def test_coca_loss_is_open_clips_coca_loss(small_coca):
    """The pad-skipping caption loss equals open_clip's CoCa.forward + CoCaLoss. (Compared in
    float64: in float32, torch's cross-entropy over the vocabulary as dimension 1 of a
    3-D tensor, CoCaLoss's layout, rounds visibly worse once the loss is small.)"""
    model, _, _, data, _ = small_coca
    loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)
    model.eval()
    with torch.no_grad():
        out = model(data.images, data.tokens)
        want = loss_fn(
            out["image_features"], out["text_features"], out["logits"].double(), out["labels"],
            out["logit_scale"],
        )  # fmt: skip
        got = coca_losses(model, data.images, data.tokens, loss_fn)
        _, image_embs = model._encode_image(data.images)
        _, token_embs = model._encode_text(data.tokens)
        logits = vocab_logits(model, decoder_states(model, image_embs, token_embs[:, :-1]))
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-5)
    assert float(got[1]) == pytest.approx(float(want[1]), abs=5e-4)  # float32 rounding
    torch.testing.assert_close(logits, out["logits"])


def test_training_reports_both_terms_and_is_deterministic(small_coca):
    model, preprocess, tokenizer, data, result = small_coca
    assert result.steps == 150 and result.samples_seen == 16 * 150
    assert math.isfinite(result.final_loss) and result.loss_curve[-1][1] < result.loss_curve[0][1]
    again, _, _ = build_model("test-small-coca", seed=0)
    scale = load_scale("tiny-coca").model_copy(
        update=dict(model="test-small-coca", batch_size=16, lr=5e-3, weight_decay=0.0)
    )
    first = train_coca(again, data, scale, samples_seen=16 * 3, seed=1)
    again2, _, _ = build_model("test-small-coca", seed=0)
    second = train_coca(again2, data, scale, samples_seen=16 * 3, seed=1)
    assert first.loss_curve == second.loss_curve


@pytest.mark.parametrize("method", ["beam", "greedy"])
def test_the_trained_coca_captions_each_image(small_coca, method):
    model, preprocess, _, _, _ = small_coca
    images = torch.stack([preprocess(image) for image in colour_images(2)])
    captions = generate_captions(model, images, DecodeSettings(method=method))
    assert captions == [CAPTIONS[0]] * 2 + [CAPTIONS[1]] * 2


def test_decode_settings_are_checked():
    with pytest.raises(ValueError, match="beam"):
        DecodeSettings(method="sample")
    with pytest.raises(ValueError, match="multiple"):
        DecodeSettings(num_beams=5, num_beam_groups=3)


# -- the captioning eval set -------------------------------------------------------------
def write_caption_set(root: Path, images: list[Image.Image], refs: list[list[str]]) -> Path:
    """A set in CLIP_benchmark's wds layout (retrieval type: image + one caption a line)."""
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, (image, captions) in enumerate(zip(images, refs, strict=True)):
            png = io.BytesIO()
            image.save(png, format="PNG")
            for suffix, payload in (("png", png.getvalue()), ("txt", "\n".join(captions).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (root / "test" / "nshards.txt").write_text("1")
    (root / "dataset_type.txt").write_text("retrieval")
    return root


class Notes:
    """A progress stand-in that keeps the run log's notes."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def track(self, items, description, total=None):
        return items

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_captioning_eval_scores_the_models_captions(small_coca, tmp_path):
    model, preprocess, tokenizer, _, _ = small_coca
    refs = [[CAPTIONS[0], "a red circle"]] * 2 + [[CAPTIONS[1], "a blue square"]] * 2
    root = write_caption_set(tmp_path / "caps", colour_images(2), refs)
    eval_set = EvalSetConfig(name="caps", task="captioning", path=str(root), main_metric="cider")
    metrics = evaluate(model, [eval_set], preprocess, tokenizer, batch_size=3)
    assert metrics["caps/bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["caps/cider"] > 0 and metrics["caps/main"] == metrics["caps/cider"]
    assert metrics["caps/n_images"] == 4


def test_a_clip_model_skips_captioning_and_says_so(tmp_path):
    model, preprocess, tokenizer = build_model("selbench-tiny", seed=0)
    root = write_caption_set(tmp_path / "caps", colour_images(1), [["a"], ["b"]])
    notes = Notes()
    sets = [EvalSetConfig(name="caps", task="captioning", path=str(root))]
    assert evaluate(model, sets, preprocess, tokenizer, progress=notes) == {}
    assert notes.notes and "'caps' skipped" in notes.notes[0] and "CLIP" in notes.notes[0]


def test_a_captioning_set_in_the_wrong_layout_is_named(tmp_path):
    root = write_caption_set(tmp_path / "caps", colour_images(1), [["a"], ["b"]])
    (root / "dataset_type.txt").write_text("classification")
    with pytest.raises(PoolError, match="eval set 'caps'.*retrieval"):
        check_eval_set(EvalSetConfig(name="caps", task="captioning", path=str(root)))


def test_tiny_coca_scale_keeps_tinys_recipe():
    tiny, coca = load_scale("tiny"), load_scale("tiny-coca")
    differs = {k for k, v in tiny.model_dump().items() if coca.model_dump()[k] != v}
    assert differs == {"name", "model"}
    config = model_config(coca.model)
    assert (
        config["text_cfg"]["context_length"]
        == model_config(tiny.model)["text_cfg"]["context_length"]
    )
    assert isinstance(ScaleConfig(**coca.model_dump()), ScaleConfig)


def test_the_open_clip_engine_refuses_a_coca_scale(tmp_path):
    from selbench.errors import ConfigError
    from selbench.train_open_clip import model_argument

    with pytest.raises(ConfigError, match="selbench-tiny-coca.*--engine in-memory"):
        model_argument("selbench-tiny-coca", tmp_path)


def test_leaderboards_show_captioning_where_runs_logged_it():
    import pandas as pd

    from selbench import leaderboard as lb

    runs = pd.DataFrame(
        {
            "metrics.mean_R1": [0.1, 0.2],
            "metrics.zeroshot_acc1": [0.3, 0.4],
            "metrics.captioning/bleu4": [0.05, float("nan")],
            "metrics.captioning/cider": [0.4, float("nan")],
            "metrics.other/bleu4": [float("nan"), float("nan")],
        }
    )
    metrics = lb.default_metrics(runs)
    assert metrics == (*lb.DEFAULT_METRICS, "captioning/bleu4", "captioning/cider")
    assert lb.metric_name("captioning/bleu4") == "BLEU@4"


@pytest.mark.slow
def test_acceptance_command_prints_bleu4_and_cider_and_a_clip_run_skips_them(tiny_pool):
    """``selbench run --method random --budget 0.25 --scale tiny-coca`` on a small SynthWeb
    pool: BLEU@4 and CIDEr printed and in MLflow; the same run at ``tiny`` skips
    captioning, says so, and logs no captioning metric."""
    import mlflow
    import pandas as pd
    from click.testing import CliRunner

    from selbench import tracking
    from selbench.cli import main

    pool = tiny_pool
    outputs = {}
    for scale in ("tiny-coca", "tiny"):
        args = ["run", "--method", "random", "--budget", "0.25", "--scale", scale]
        result = CliRunner().invoke(main, [*args, "--pool", str(pool)])
        assert result.exit_code == 0, result.output
        outputs[scale] = result.output
    assert "BLEU@4" in outputs["tiny-coca"] and "CIDEr" in outputs["tiny-coca"]
    assert "captioning/bleu4" in outputs["tiny-coca"]
    assert "Captioning set 'captioning' skipped" in outputs["tiny"]
    assert "BLEU@4" not in outputs["tiny"]
    tracking.setup(tracking.DEFAULT_EXPERIMENT)
    runs = mlflow.search_runs(experiment_names=[tracking.DEFAULT_EXPERIMENT])
    coca = runs[runs["params.scale"] == "tiny-coca"].iloc[0]
    clip = runs[runs["params.scale"] == "tiny"].iloc[0]
    assert 0 <= coca["metrics.captioning/bleu4"] <= 1 and coca["metrics.captioning/cider"] >= 0
    assert coca["metrics.captioning/n_images"] == 60
    assert pd.isna(clip.get("metrics.captioning/bleu4"))
