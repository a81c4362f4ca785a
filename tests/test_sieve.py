"""SIEVE (Mahmoud et al., CVPR 2024): medium-phrase masking, the max-over-captions
sentence similarity on hand-made pairs, the fusion with the CLIP score, exact budgets,
determinism, caption caching, and the conformance kit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import selbench_plugins.sieve as sieve_module
from selbench_plugins.sieve import (
    LONG_PHRASES,
    RELEASE_PHRASES,
    Sieve,
    mask_phrases,
    minmax,
    sieve_scores,
)

from selbench.strategy import SelectionContext, validate_selection
from selbench.testing import (
    MemoryPool,
    RecordingServices,
    make_memory_pool,
    parametrize_with_checks,
)
from selbench.toolbox import clip_scores

VOCAB = ("red", "blue", "green", "circle", "star", "square", "heart", "yellow", "image", "photo")


def bag_of_words(texts: list[str]) -> np.ndarray:
    """A stub sentence encoder: word counts over VOCAB, plus a constant so that a text
    with none of the words still has a direction."""
    rows = [[text.lower().split().count(w) for w in VOCAB] + [0.1] for text in texts]
    return np.asarray(rows, dtype=np.float32)


def test_medium_phrases_are_masked_case_insensitively_as_whole_words():
    texts = [
        "An image of a red circle",
        "stock photo of a blue star",
        "a photo of a Photo booth",
        "a photograph of imagery",
        "IMAGE",
    ]
    assert mask_phrases(texts, RELEASE_PHRASES) == [
        "a red circle",  # "an image of" first, then nothing else matches
        "of a blue star",  # "stock photo"
        "booth",  # "a photo of", then "a photo"
        "a photograph of imagery",  # whole words only: not "graph of ry"
        "",
    ]
    assert mask_phrases(["a star icon, vector illustration"], LONG_PHRASES) == ["a star ,"]
    assert mask_phrases(texts[:1], ()) == texts[:1]


def test_the_matching_alt_text_scores_above_the_mismatched_one():
    captions = [
        ["a photo of a red circle", "a green square"],
        ["a yellow heart", "an image of a blue star"],
    ]
    matching = sieve_scores(["red circle", "blue star"], captions, bag_of_words)
    swapped = sieve_scores(["blue star", "red circle"], captions, bag_of_words)
    assert np.all(matching > swapped)
    # the max over the captions: the second caption of image 2 is the one that matches
    assert matching[1] == pytest.approx(
        sieve_scores(["blue star"], [captions[1][1:]], bag_of_words)[0]
    )
    # masking matters: "photo" alone would otherwise make an unrelated alt-text match
    unrelated = ["photo", "photo"]
    masked = sieve_scores(unrelated, captions, bag_of_words)
    unmasked = sieve_scores(unrelated, captions, bag_of_words, ())
    assert np.all(masked < matching) and masked[0] < 0.1 < 0.5 < unmasked[0]


def test_minmax_matches_the_release_normalisation():
    assert minmax(np.array([2.0, 4.0, 3.0])).tolist() == [0.0, 1.0, 0.5]
    assert minmax(np.array([1.0, 1.0])).tolist() == [0.0, 0.0]


# -- the strategy with a stubbed captioner and sentence encoder ---------------------------

SCENES = ["red circle", "blue star", "green square", "yellow heart", "red star", "blue circle"]


def _pool() -> MemoryPool:
    """Six images whose stub captions describe SCENES; alt-texts 0, 2 and 4 agree with
    their image, 1, 3 and 5 describe another image's scene."""
    base = make_memory_pool(6, seed=11)
    alt = [
        "a photo of a red circle",
        "green square",
        "image of a green square",
        "red circle",
        "red star stock photo",
        "yellow heart",
    ]
    return MemoryPool(base.uids, alt, base.images)


class StubCaptioner:
    """Captions each image of ``pool`` with its SCENES entry, K times; counts calls."""

    def __init__(self, pool: MemoryPool) -> None:
        self.by_pixels = {image.tobytes(): SCENES[i] for i, image in enumerate(pool.images)}
        self.calls = 0
        self.weights_digest = "stub"
        self.batch_size = 256

    def __call__(self, images, settings=None, n=1, seed=0, **kwargs):
        self.calls += 1
        return [[f"a {self.by_pixels[image.tobytes()]}"] * n for image in images]


@pytest.fixture
def stubbed(monkeypatch):
    pool = _pool()
    stub = StubCaptioner(pool)
    monkeypatch.setattr(sieve_module, "reference_captioner", lambda *args, **kwargs: stub)
    monkeypatch.setattr(Sieve, "embed_texts", lambda self, ctx, texts: bag_of_words(texts))
    return pool, stub


def _context(pool, count: int, tmp_path: Path, seed: int = 0) -> SelectionContext:
    return SelectionContext(
        pool=pool,
        budget_count=count,
        budget_fraction=count / len(pool),
        seed=seed,
        device="cpu",
        work_dir=tmp_path,
        services=RecordingServices(pool),
    )


def test_sieve_alone_keeps_exactly_the_aligned_pairs(stubbed, tmp_path):
    pool, stub = stubbed
    selection = Sieve({"clip_weight": 0.0}).select(_context(pool, 3, tmp_path))
    checked = validate_selection(selection, set(pool.uids), 3, "sieve")
    assert checked.uids == [pool.uids[0], pool.uids[2], pool.uids[4]]
    assert stub.calls == 1
    again = Sieve({"clip_weight": 0.0}).select(_context(pool, 3, tmp_path, seed=5))
    assert again.uids == checked.uids and again.scores == selection.scores
    assert stub.calls == 1  # the captions were cached, not sampled again


def test_the_fused_score_is_the_weighted_sum_of_min_max_normalised_signals(stubbed, tmp_path):
    pool, _ = stubbed
    ctx = _context(pool, 2, tmp_path)
    alone = Sieve({"clip_weight": 0.0}).score(ctx)
    fused = Sieve().score(ctx)  # the default: clip_weight 0.5
    found = ctx.services.embeddings("reference")
    clip = clip_scores(np.asarray(found.image), np.asarray(found.text))
    np.testing.assert_allclose(fused, 0.5 * minmax(alone) + 0.5 * minmax(clip), rtol=1e-6)
    for count in (1, 4, 6):
        selection = Sieve().select(_context(pool, count, tmp_path))
        assert len(set(selection.uids)) == count


def test_defaults_follow_the_release():
    p = Sieve.Params()
    assert (p.captions_per_image, p.top_p, p.top_k, p.repetition_penalty) == (8, 0.9, 50, 1.1)
    assert (p.max_length, p.min_length, p.clip_weight) == (20, 5, 0.5)
    assert (p.mask_phrases, p.captioner, p.sentence_encoder) == (
        "release",
        "reference",
        "reference",
    )
    settings = Sieve().decode_settings()
    assert (settings.method, settings.seq_len, settings.min_seq_len) == ("nucleus", 20, 5)


@parametrize_with_checks(
    [Sieve({"captions_per_image": 2, "max_length": 8})], pool_sizes=(40,), budgets=(0.1, 0.5)
)
def test_sieve_passes_the_conformance_kit(strategy, check):
    # the tiny test reference captioner, two short captions per image: the kit's point is
    # the contract (budget, determinism, seed, scores), not the captions
    check(strategy)
