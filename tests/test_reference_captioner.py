"""SynthWeb's reference captioner (selbench.reference_captioner): a CoCa built once on the
reference corpus and cached, nucleus sampling for SIEVE, refused on a real pool unless a
local checkpoint is named, and TL;DR's refine_captioner=reference."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from e2e_helpers import png_bytes, write_shard
from selbench_plugins.tldr import Tldr
from selbench_plugins.tldr.refine import reference_settings, refine_with_reference
from selbench_plugins.tldr.selection import refine_caption

from selbench import reference_captioner as rc
from selbench.captioning import (
    DecodeSettings,
    _nucleus_candidates,
    generate_captions,
)
from selbench.cli import main
from selbench.configs import find_config
from selbench.errors import ConfigError
from selbench.pools import ShardPool, resolve_pool
from selbench.strategy import SelectionContext, validate_selection
from selbench.testing import RecordingServices, make_memory_pool
from selbench.train import build_model

SAMPLING = DecodeSettings(method="nucleus", top_p=0.9, top_k=50, repetition_penalty=1.1, seq_len=12)


def test_builds_once_on_the_reference_corpus_then_loads_without_training(tmp_path, monkeypatch):
    monkeypatch.setenv("SELBENCH_HOME", str(tmp_path / "home"))
    assert rc.cached_reference_captioner() is None
    first = rc.build_reference_captioner()
    assert first.built and first.checkpoint.is_file()
    assert first.checkpoint.is_relative_to(tmp_path / "home" / "reference")
    assert first.meta["corpus_size"] == 512 and first.meta["samples_seen"] == 1024
    assert first.meta["recipe"]["model"] == "selbench-tiny-coca"
    import selbench.train

    def no_training(*args, **kwargs):
        raise AssertionError("a cached captioner was trained again")

    monkeypatch.setattr(selbench.train, "train_coca", no_training)
    second = rc.build_reference_captioner()
    assert not second.built
    assert (second.checkpoint, second.sha256) == (first.checkpoint, first.sha256)
    assert rc.cached_reference_captioner() == first.checkpoint
    # the CLIP's folder and key are its own: the captioner is a sibling entry
    assert first.checkpoint.parent.name.startswith("reference-tiny-captioner-")


def test_the_recipe_is_a_coca_on_the_reference_corpus_and_bad_ones_are_refused(tmp_path):
    recipe, reference, corpus = rc.captioner_recipe()
    assert recipe.model == "selbench-tiny-coca" and reference.name == "reference-tiny"
    assert corpus.n_samples == 512
    default, default_reference, _ = rc.captioner_recipe("reference")
    assert (default.name, default.model) == ("reference-captioner", "selbench-tiny-coca")
    assert (default.epochs, default.batch_size) == (default_reference.epochs, 256)
    clip_only = tmp_path / "clip-only.yaml"
    clip_only.write_text("name: x\nmodel: selbench-tiny\nbatch_size: 8\nepochs: 1\nlr: 0.001\n"
                         "weight_decay: 0.1\nwarmup_fraction: 0.1\n")  # fmt: skip
    recipe_text = find_config("scales", rc.recipe_spec()).read_text()
    bad = tmp_path / "bad-reference.yaml"
    bad.write_text(recipe_text.replace("reference-tiny-captioner.yaml", "clip-only.yaml"))
    with pytest.raises(ConfigError, match="is not a CoCa"):
        rc.captioner_recipe(str(bad))


def _real_pool(tmp_path: Path):
    write_shard(
        tmp_path / "shards" / "00000.tar",
        [(f"{i:09d}", png_bytes((40 * i, 0, 0)), f"photo {i}", {}) for i in range(3)],
    )
    return ShardPool(tmp_path / "shards", name="cc3m-mini").strategy_view()


def test_refused_on_a_real_pool_unless_a_local_checkpoint_is_named(tmp_path):
    view = _real_pool(tmp_path)
    with pytest.raises(ConfigError, match="is not SynthWeb.*captioner=open_clip:"):
        rc.reference_captioner(view)
    with pytest.raises(ConfigError, match="local weights file"):
        rc.reference_captioner(view, spec=f"open_clip:selbench-tiny-coca:{tmp_path}/none.pt")
    model, _, _ = build_model("selbench-tiny-coca", 3)
    weights = tmp_path / "coca.pt"
    torch.save(model.state_dict(), weights)
    captioner = rc.reference_captioner(view, spec=f"open_clip:selbench-tiny-coca:{weights}")
    images = [image for _, image in view.iter_images()]
    captions = captioner(images, DecodeSettings(method="greedy", seq_len=8), n=2)
    assert len(captions) == 3 and all(len(c) == 2 and c[0] == c[1] for c in captions)
    clip, _, _ = build_model("selbench-tiny", 3)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    with pytest.raises(ConfigError, match="not an open_clip CoCa"):
        rc.reference_captioner(view, spec=f"open_clip:selbench-tiny:{tmp_path / 'clip.pt'}")


def _nucleus_filter(logits, prefix, settings):
    """The processors over the whole vocabulary, as transformers applies them: the
    reference the sampler's candidates are checked against."""
    if settings.repetition_penalty != 1.0:
        seen = torch.gather(logits, 1, prefix)
        penalty = settings.repetition_penalty
        logits = logits.scatter(1, prefix, torch.where(seen < 0, seen * penalty, seen / penalty))
    if settings.top_k:
        kth = torch.topk(logits, min(settings.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if settings.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        probs = ordered.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= settings.top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -math.inf)
    return logits


def _vocabulary_probs(logits, prefix, settings):
    ids, probs = _nucleus_candidates(logits, prefix, settings)
    return torch.zeros_like(logits).scatter_add(1, ids, probs)


def test_nucleus_sampling_keeps_the_smallest_set_holding_top_p():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    prefix = torch.tensor([[0]])
    keep = lambda **kw: _vocabulary_probs(logits, prefix, DecodeSettings(**kw)) > 0  # noqa: E731
    assert keep(top_p=0.7).tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.8
    assert keep(top_p=0.8).tolist() == [[True, True, False, False]]
    assert keep(top_p=0.81).tolist() == [[True, True, True, False]]
    assert keep(top_p=1e-6).tolist() == [[True, False, False, False]]
    assert keep(top_p=1.0, top_k=3).tolist() == [[True, True, True, False]]
    penalised = _vocabulary_probs(
        torch.tensor([[2.0, -2.0]]), torch.tensor([[0, 1]]),
        DecodeSettings(top_p=1.0, repetition_penalty=2.0),
    )  # fmt: skip
    # CTRL: positive / 2, negative x 2: the logits become 1 and -4
    torch.testing.assert_close(penalised, torch.tensor([[1.0, -4.0]]).softmax(dim=-1))


@pytest.mark.parametrize(
    "settings",
    [
        DecodeSettings(top_p=0.9, top_k=50, repetition_penalty=1.1),
        DecodeSettings(top_p=0.5, top_k=0),
        DecodeSettings(top_p=1.0, top_k=7),
        DecodeSettings(top_p=0.95, top_k=3),
    ],
)
def test_the_sampled_candidates_carry_the_filters_distribution(settings):
    # The draw covers only the candidates; their probabilities are the whole-vocabulary
    # filter's, and every token the filter keeps is a candidate (ties at the k-th too).
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=generator) * 3
    logits[0, :20] = 4.0  # twenty tokens tied at the top: more than k=3 or k=7 survive
    prefix = torch.randint(0, 500, (6, 4), generator=generator)
    want = _nucleus_filter(logits, prefix, settings).softmax(dim=-1)
    ids, probs = _nucleus_candidates(logits, prefix, settings)
    got = torch.zeros_like(want).scatter_add(1, ids, probs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert ids.shape[1] < 500 if settings.top_k else ids.shape[1] == 500


def test_sampling_is_seeded_and_a_vanishing_nucleus_is_greedy():
    model, _, _ = build_model("selbench-tiny-coca", 1)
    images = torch.randn(3, 3, 32, 32)
    once = generate_captions(model, images, SAMPLING, seed=5)
    assert generate_captions(model, images, SAMPLING, seed=5) == once
    assert generate_captions(model, images, SAMPLING, seed=6) != once
    argmax = DecodeSettings(method="nucleus", top_p=1e-6, seq_len=12)
    greedy = DecodeSettings(method="greedy", seq_len=12)
    assert generate_captions(model, images, argmax) == generate_captions(model, images, greedy)


def test_the_captioner_gives_n_seeded_captions_per_image_in_order():
    pool = make_memory_pool(5)
    captioner = rc.reference_captioner(pool)  # the shared tiny reference captioner
    assert captioner.details["resolved_to"].startswith("synthweb reference captioner")
    captioner.batch_size = 6  # two images (of 3 captions) per batch: batching is seeded too
    out = captioner(pool.images, SAMPLING, n=3, seed=1)
    assert [len(c) for c in out] == [3] * 5
    assert captioner(pool.images, SAMPLING, n=3, seed=1) == out
    single = captioner(pool.images[:1], DecodeSettings(method="greedy", seq_len=12))
    batched = captioner(pool.images, DecodeSettings(method="greedy", seq_len=12))
    assert single[0] == batched[0]


def test_status_and_build_commands_name_the_captioner():
    status = CliRunner().invoke(main, ["reference", "status"])
    assert status.exit_code == 0, status.output
    assert "reference captioner (reference-tiny-captioner)" in status.output
    built = CliRunner().invoke(main, ["reference", "build"])
    assert built.exit_code == 0, built.output
    assert "reference model" in built.output
    assert "reference captioner (reference-tiny-captioner)" in built.output
    after = CliRunner().invoke(main, ["reference", "status"])
    assert after.output.count(": built, ") == 2, after.output


# -- TL;DR's refine_captioner --------------------------------------------------------------

FAST = {"captioner_epochs": 1.0, "decoder_layers": 1, "captioner_batch_size": 64}


def _select(pool, params):
    with tempfile.TemporaryDirectory() as work:
        ctx = SelectionContext(
            pool=pool,
            budget_count=40,
            budget_fraction=40 / len(pool),
            seed=3,
            device="cpu",
            work_dir=Path(work),
            services=RecordingServices(pool),
        )
        selection = Tldr(params).select(ctx)
        return validate_selection(selection, set(pool.uids), 40, "tldr")


def test_tldr_default_refines_with_its_codebook_and_reference_uses_the_reference(tiny_pool):
    pool = resolve_pool(str(tiny_pool)).pool.strategy_view()
    default = _select(pool, FAST)
    codebook = _select(pool, {**FAST, "refine_captioner": "codebook"})
    assert (default.uids, default.captions) == (codebook.uids, codebook.captions)
    # the default is left out of the parameters' dump, so earlier runs keep their cell key
    params = Tldr(FAST).params
    assert "refine_captioner" not in params.model_dump()
    assert (
        Tldr({**FAST, "refine_captioner": "reference"}).params.model_dump()["refine_captioner"]
        == "reference"
    )

    reference = _select(pool, {**FAST, "refine_captioner": "reference"})
    assert reference.uids == default.uids  # refinement never changes what is selected
    assert reference.metrics["refine_reference_captioner"] == 1.0
    captioner = rc.reference_captioner(pool)
    settings = reference_settings(Tldr(FAST).params)
    images = dict(pool.iter_images(set(reference.uids)))
    originals = dict(zip(pool.uids, pool.captions, strict=True))
    expected = captioner([images[u] for u in reference.uids], settings)
    longer = 0
    for uid, (generated,) in zip(reference.uids, expected, strict=True):
        # "original; generated", cut to the model's context where it is too long
        text, original = reference.captions[uid], originals[uid]
        assert refine_caption(original, generated, "; ").startswith(text)
        longer += len(text) > len(original)
    assert longer > 0 and reference.metrics["refined_with_generated_text"] == longer / 40
    assert reference.captions != default.captions
    with pytest.raises(ConfigError, match="refine_captioner"):
        Tldr({"refine_captioner": "blip"})


def test_tldr_reference_refinement_is_refused_on_a_real_pool(tmp_path):
    ctx = SelectionContext(_real_pool(tmp_path), 1, 1 / 3, 0, "cpu", tmp_path)
    params = Tldr({"refine_captioner": "reference"}).params
    with pytest.raises(ConfigError, match="is not SynthWeb"):
        refine_with_reference(ctx, params, None, np.arange(1), 24)


def test_meta_records_the_corpus_it_shares_with_the_reference_clip():
    from selbench.reference import build_reference

    clip = build_reference()
    captioner = rc.build_reference_captioner()
    assert captioner.meta["corpus_fingerprint"] == clip.meta["corpus_fingerprint"]
    assert json.loads((captioner.checkpoint.parent / "meta.json").read_text())["seed"] == 0
