"""TL;DR (Wang et al., ICCV 2023): quotas, within-cluster rules, the captioner's codes and
decoding, caption refinement, the release preset's matching filter, determinism."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from selbench_plugins.tldr import Tldr, TldrRelease, TldrReleaseParams
from selbench_plugins.tldr.captioner import (
    EOT,
    PAD,
    SOT,
    CaptionerConfig,
    CaptionVocab,
    build_captioner,
    extract_codes,
    init_codebook,
    train_captioner,
)
from selbench_plugins.tldr.selection import (
    centre_distances,
    cluster_prototype_distances,
    kmeans_all_points,
    largest_remainder_quotas,
    pick_within_cluster,
    refine_caption,
    sample_then_filter,
    top_keywords,
    truncate_to_context,
    whiten,
)

from selbench.errors import ConfigError
from selbench.paths import selbench_home
from selbench.strategy import SelectionContext, validate_selection
from selbench.testing import RecordingServices, make_memory_pool, parametrize_with_checks
from selbench.train import build_model

# -- quotas ----------------------------------------------------------------------------


def test_quotas_worked_by_hand():
    # ideal shares of 5 over sizes 5/3/2 are 2.5, 1.5, 1.0: floors 2+1+1 = 4, and the one
    # left over goes to the largest remainder, a tie (0.5 vs 0.5) won by cluster 0.
    assert largest_remainder_quotas([5, 3, 2], 5).tolist() == [3, 1, 1]
    # 7 of 10+10+10: 2.33 each -> 2+2+2, one left -> cluster 0
    assert largest_remainder_quotas([10, 10, 10], 7).tolist() == [3, 2, 2]
    # a cluster of one can never get two
    assert largest_remainder_quotas([1, 1, 1, 1], 4).tolist() == [1, 1, 1, 1]
    assert largest_remainder_quotas([0, 4], 2).tolist() == [0, 2]
    assert largest_remainder_quotas([3, 9], 0).tolist() == [0, 0]


@pytest.mark.parametrize("seed", range(60))
def test_quotas_hit_the_budget_exactly_and_stay_proportional(seed):
    rng = np.random.default_rng(seed)
    clusters = int(rng.integers(1, 400))
    sizes = rng.zipf(1.6, size=clusters).clip(max=5000)
    if seed % 5 == 0:
        sizes[rng.integers(0, clusters, size=max(1, clusters // 3))] = 0  # empty clusters
    if sizes.sum() == 0:
        sizes[0] = 1
    total = int(rng.integers(0, sizes.sum() + 1))
    quotas = largest_remainder_quotas(sizes, total)
    assert quotas.sum() == total
    assert (quotas <= sizes).all() and (quotas >= 0).all()
    ideal = total * sizes / sizes.sum()
    assert np.all(np.abs(quotas - ideal) < 1.0 + 1e-9)


def test_quotas_refuse_more_than_the_clusters_hold():
    with pytest.raises(ValueError, match="cannot take 6"):
        largest_remainder_quotas([2, 3], 6)


# -- within-cluster rules --------------------------------------------------------------


def test_within_cluster_rules_worked_by_hand():
    members = np.arange(10, 20)
    rng = np.random.default_rng(0)
    # stride: step 10/5 = 2 -> positions 0, 2, 4, 6, 8
    assert pick_within_cluster(members, 5, "stride", rng).tolist() == [10, 12, 14, 16, 18]
    hardness = np.zeros(20)
    hardness[[13, 17, 11]] = [3.0, 2.0, 2.0]  # 13 hardest; 11 and 17 tie -> 11 first
    assert pick_within_cluster(members, 2, "hard", rng, hardness=hardness).tolist() == [11, 13]
    loss = np.zeros(20)
    loss[[19, 10]] = [5.0, 4.0]
    picked = pick_within_cluster(members, 2, "caption_loss", rng, caption_loss=loss)
    assert picked.tolist() == [10, 19]
    with pytest.raises(ValueError, match="needs per-sample values"):
        pick_within_cluster(members, 2, "caption_loss", rng, hardness=hardness)
    distance = np.arange(20, dtype=float)
    assert pick_within_cluster(members, 3, "far", rng, distance=distance).tolist() == [17, 18, 19]
    uniform = pick_within_cluster(members, 4, "uniform", np.random.default_rng(5))
    again = pick_within_cluster(members, 4, "uniform", np.random.default_rng(5))
    assert uniform.tolist() == again.tolist() and len(set(uniform.tolist())) == 4
    assert set(uniform.tolist()) <= set(members.tolist())
    assert pick_within_cluster(members, 12, "uniform", rng).tolist() == members.tolist()


def test_whitening_gives_unit_rows_of_the_requested_dimension():
    x = np.random.default_rng(0).integers(0, 50, size=(200, 17)).astype(np.float32)
    out, dim = whiten(x, 256)  # capped at the input dimension, as the release's PCA must be
    assert out.shape == (200, 17) and dim == 17
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert whiten(x, 8)[0].shape == (200, 8) and whiten(x, 8)[1] == 8


def test_hard_is_the_distance_to_the_cluster_prototype():
    # Sorscher et al.'s metric: cosine distance to the mean of the cluster's unit rows.
    # Cluster 0 holds (1, 0), (1, 0), (0, 1): prototype (2, 1)/sqrt(5), so the odd one
    # out is the farthest; cluster 1 holds two opposite-free rows at 0 and 90 degrees.
    emb = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assignment = np.array([0, 0, 0, 1, 1])
    d = cluster_prototype_distances(emb, assignment, 2)
    np.testing.assert_allclose(d[:3], [1 - 2 / 5**0.5, 1 - 2 / 5**0.5, 1 - 1 / 5**0.5], atol=1e-6)
    np.testing.assert_allclose(d[3:], [1 - 0.5**0.5] * 2, atol=1e-6)
    picked = pick_within_cluster(np.arange(3), 1, "hard", np.random.default_rng(0), hardness=d)
    assert picked.tolist() == [2]


# -- the release's order: sample the whole pool's clusters, then filter -----------------


def test_filter_is_applied_after_stride_sampling_worked_by_hand():
    # Cluster A = 0..9, every member passes the filter; cluster B = 10..19, only the odd
    # members pass. Budget 6 of 15 eligible: 6 * 20 / 15 = 8 sampled before the filter,
    # 4 per cluster, evenly spaced (step 2.5): A -> 0, 2, 5, 7; B -> 10, 12, 15, 17, of
    # which 15 and 17 pass. Six pass: the budget, nothing to trim.
    members = [np.arange(10), np.arange(10, 20)]
    eligible = np.ones(20, dtype=bool)
    eligible[10:20:2] = False
    rng = np.random.default_rng(0)

    def stride(group, quota):
        return pick_within_cluster(group, quota, "stride", rng)

    selected, sampled = sample_then_filter(members, eligible, 6, stride)
    assert selected.tolist() == [0, 2, 5, 7, 15, 17] and sampled == 8
    # Filtering first and sampling the survivors (quotas 4 and 2 of the 10 and 5 that
    # pass) would have taken 11 and 15 from cluster B instead.
    assert stride(np.arange(11, 20, 2), 2).tolist() == [11, 15]
    # A budget below what passes is trimmed by the same rule inside each cluster; one
    # that needs more sampled before the filter gets it; one above the eligible count
    # is refused.
    selected, _ = sample_then_filter(members, eligible, 3, stride)
    assert len(selected) == 3 and eligible[selected].all()
    selected, sampled = sample_then_filter(members, eligible, 15, stride)
    assert selected.tolist() == np.flatnonzero(eligible).tolist() and sampled == 20
    with pytest.raises(ValueError, match="cannot take 16"):
        sample_then_filter(members, eligible, 16, stride)


@pytest.mark.parametrize("seed", range(25))
def test_sampling_then_filtering_hits_the_budget_with_eligible_samples_only(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    assignment = rng.integers(0, int(rng.integers(1, 12)), size=n)
    members = [np.flatnonzero(assignment == c) for c in np.unique(assignment)]
    eligible = rng.random(n) < rng.uniform(0.2, 1.0)
    eligible[int(rng.integers(0, n))] = True
    budget = int(rng.integers(0, eligible.sum() + 1))
    rule = ["stride", "uniform"][seed % 2]

    def pick(group, quota):
        return pick_within_cluster(group, quota, rule, rng)

    selected, sampled = sample_then_filter(members, eligible, budget, pick)
    assert len(selected) == budget == len(set(selected.tolist()))
    assert eligible[selected].all() and budget <= sampled <= n


def test_centre_distances_in_blocks_equal_the_whole_array_form(monkeypatch):
    import selbench_plugins.tldr.selection as selection

    rng = np.random.default_rng(0)
    features = rng.normal(size=(1000, 16)).astype(np.float16)  # a cache entry's dtype
    centroids = rng.normal(size=(9, 16)).astype(np.float32)
    assignment = rng.integers(0, 9, size=1000)
    whole = np.linalg.norm(features.astype(np.float32) - centroids[assignment], axis=1)
    monkeypatch.setattr(selection, "ROWS_AT_ONCE", 64)  # 16 blocks, the last one short
    assert np.array_equal(centre_distances(features, centroids, assignment), whole)


# -- k-means on every point ------------------------------------------------------------


def test_kmeans_trains_on_every_point_unless_told_to_subsample():
    # One cluster: its centroid is the mean of the training set, so it is the mean of the
    # whole pool only when every point was used.
    x = np.random.default_rng(0).normal(size=(1000, 4)).astype(np.float32)
    x[:500] += 5.0
    every = TldrReleaseParams().kmeans_max_points_per_centroid
    centroids, assignment, trained = kmeans_all_points(x, 1, 0, max_points_per_centroid=every)
    assert trained == 1000 and (assignment == 0).all()
    np.testing.assert_allclose(centroids[0], x.mean(0), atol=1e-4)
    few, _, trained = kmeans_all_points(x, 1, seed=0, max_points_per_centroid=40)
    assert trained == 40  # faiss's seeded subsample of 40 points
    assert np.abs(few[0] - x.mean(0)).max() > 0.05
    assert kmeans_all_points(x, 1, seed=0)[2] == 256  # faiss's own default subsamples
    assert TldrReleaseParams().kmeans_max_points_per_centroid >= 10_000_000
    assert Tldr.Params().kmeans_max_points_per_centroid >= 10_000_000


# -- keywords and refinement -----------------------------------------------------------


def test_top_keywords_counts_words_and_two_word_phrases_without_stop_words():
    captions = ["a red circle", "the red circle", "a blue star", "red"]
    # red: 3, circle: 2, red circle: 2, blue / star / blue star: 1 (ties alphabetical)
    assert top_keywords(captions, 6) == ["red", "circle", "red circle", "blue", "blue star", "star"]
    assert top_keywords(["the a of"], 5) == []


def test_refinement_appends_the_generated_caption_with_the_separator():
    assert refine_caption("a red circle", "red circle icon") == "a red circle; red circle icon"
    assert refine_caption("a red circle", "  ") == "a red circle"
    assert refine_caption("a", "b", separator=" | ") == "a | b"


def test_truncation_keeps_the_longest_prefix_that_fits_the_context():
    _, _, tokenizer = build_model("selbench-tiny", 0)
    text = refine_caption("one two three four five six", "seven eight nine ten")
    assert truncate_to_context(text, tokenizer, 77) == text
    # context 8 leaves 6 tokens: "one two three four five six;" is already 7 tokens
    cut = truncate_to_context(text, tokenizer, 8)
    assert cut == "one two three four five"
    assert len(tokenizer.encode(cut)) <= 6
    assert text.startswith(cut)


# -- captioner ---------------------------------------------------------------------------


def small_config(**overrides) -> CaptionerConfig:
    values = dict(
        model="selbench-tiny",
        codebook_size=32,
        codebook_init="uniform",
        quantize_cls=False,
        decoder_layers=1,
        epochs=1.0,
        lr=1e-3,
        weight_decay=0.05,
        batch_size=16,
        warmup_fraction=0.0,
        commitment_weight=1.0,
        codebook_weight=0.25,
        visual_init="random",
        seed=0,
    )
    values.update(overrides)
    return CaptionerConfig(**values)


@pytest.mark.parametrize("quantize_cls, tokens", [(False, 16), (True, 17)])
def test_code_index_vectors_have_one_code_per_token(quantize_cls, tokens):
    # selbench-tiny: 32 px images, 8 px patches -> 4 x 4 = 16 patch tokens (+1 class token)
    model, _ = build_captioner(small_config(quantize_cls=quantize_cls), 40, 128)
    init_codebook(model, None, seed=0)
    codebook = model.codebook
    assert codebook.shape == (32, 128)
    assert model.token_space == "projected"
    assert float(codebook.detach().abs().max()) <= 1 / 32  # the release's U[-1/K, 1/K]
    images = torch.randn(5, 3, 32, 32)
    codes, losses = extract_codes(model, images)
    assert codes.shape == (5, tokens) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 32
    assert losses is None
    # each code is the nearest codebook entry of its token (L2)
    with torch.no_grad():
        z = torch.nn.functional.normalize(model.to_code(model.image_tokens(images)), dim=-1)
        nearest = torch.cdist(z, codebook.unsqueeze(0).expand(5, -1, -1)).argmin(-1)
    assert (nearest.numpy() == codes).all()


def test_raw_tokens_are_quantised_unprojected_and_unnormalised():
    # The release quantises the ViT's LayerNormed output tokens as they are: the codebook
    # lives in the encoder's width (selbench-tiny: 128... its vision width), no projection,
    # no unit norm, and the decoder reads the quantised tokens directly.
    model, _ = build_captioner(small_config(token_space="raw", quantize_cls=True), 40, 64)
    init_codebook(model, None, seed=0)
    width = model.visual.transformer.width
    assert model.codebook.shape == (32, width)
    assert isinstance(model.to_code, torch.nn.Identity)
    assert isinstance(model.from_code, torch.nn.Identity)
    images = torch.randn(4, 3, 32, 32)
    codes, _ = extract_codes(model, images)
    with torch.no_grad():
        raw = model.image_tokens(images)
        z, _, _ = model.quantize(images)
        nearest = torch.cdist(raw, model.codebook.unsqueeze(0).expand(4, -1, -1)).argmin(-1)
    assert torch.equal(z, raw)  # what enters the codebook is the raw token
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(4, 17), atol=1e-2)
    assert (nearest.numpy() == codes).all()
    # the captioner still trains end to end on raw tokens
    tokens = torch.randint(3, 40, (4, 24), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = SOT
    record = train_captioner(model, images, tokens, small_config(token_space="raw"))
    assert record["steps"] >= 1


@pytest.mark.parametrize("threshold, expect_revived", [(0.0, False), (1.0, True)])
def test_dead_code_replacement_reseeds_unused_codes_only_when_enabled(threshold, expect_revived):
    # Every token starts nearest code 0 (the origin; the others sit 10 units away): a
    # collapsed codebook. With the threshold on, one training step re-seeds the unused
    # codes with tokens of the batch, so the tokens spread over several codes.
    config = small_config(dead_code_threshold=threshold, batch_size=16)
    model, context = build_captioner(config, 40, 128)
    far = torch.zeros(32, 128)
    far[1:, 0] = 10.0
    init_codebook(model, far, seed=0)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before, _ = extract_codes(model, images)
    assert set(np.unique(before)) == {0}
    tokens = torch.randint(3, 40, (16, context), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 1
    train_captioner(model, images, tokens, config)
    after, _ = extract_codes(model, images)
    assert (len(np.unique(after)) > 1) == expect_revived


def test_vocab_round_trip_and_greedy_decoding_equals_argmax():
    _, _, tokenizer = build_model("selbench-tiny", 0)
    captions = ["a red circle", "a blue star on a green background"]
    vocab = CaptionVocab.from_captions(captions, tokenizer)
    tokens = vocab.encode(captions, 24)
    assert tokens[0, 0] == SOT and EOT in tokens[0].tolist()
    assert vocab.decode(tokens[1, 1:].tolist()) == captions[1]
    model, context = build_captioner(small_config(), len(vocab), 128)
    init_codebook(model, None, seed=0)
    images = torch.randn(3, 3, 32, 32)
    greedy = model.generate(images, beams=1, max_length=8)
    # the same thing by hand: argmax of the next-token distribution, special ids masked,
    # at most 8 tokens in the sequence counting the start token
    with torch.no_grad():
        _, memory, _ = model.quantize(images)
        for row in range(3):
            seq = torch.tensor([[SOT]])
            out = []
            while seq.shape[1] < 8:
                logits = model.decode_logits(memory[row : row + 1], seq)[0, -1].clone()
                logits[[0, SOT]] = -float("inf")
                token = int(logits.argmax())
                if token == EOT:
                    break
                out.append(token)
                seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
            assert greedy[row] == out
    beam = model.generate(images, beams=3, max_length=8, min_length=3)
    assert all(2 <= len(ids) <= 7 for ids in beam)
    assert all(SOT not in ids and EOT not in ids and 0 not in ids for ids in beam)


def test_prompt_is_in_the_vocab_masked_from_the_loss_and_starts_generation():
    _, _, tokenizer = build_model("selbench-tiny", 0)
    vocab = CaptionVocab.from_captions(["red circle"], tokenizer, prompt="a picture of ")
    assert len(vocab.prompt_ids) == 3
    assert vocab.decode(vocab.prompt_ids) == "a picture of"
    tokens = vocab.encode(["red circle"], 10)
    assert tokens[0, :6].tolist() == [SOT, *vocab.prompt_ids, *tokens[0, 4:6].tolist()]
    assert vocab.decode(tokens[0, 4:].tolist()) == "red circle"
    model, _ = build_captioner(small_config(), len(vocab), 64)
    init_codebook(model, None, seed=0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, memory, _ = model.quantize(images)
        batch = tokens.repeat(2, 1)
        masked = model.caption_loss(memory, batch, "none", prompt_length=3)
        # by hand: the loss over the caption's tokens and the end token only
        logits = model.decode_logits(memory, batch[:, :-1])
        labels = batch[:, 1:].clone()
        labels[:, :3] = PAD
        ce = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=PAD, reduction="none"
        )
        np.testing.assert_allclose(masked, ce.sum(1) / 3, rtol=1e-5)


def force_end_token(model, bias: float) -> None:
    """Make the end token overwhelmingly likely (bias > 0) or unlikely (bias < 0)."""
    decode = model.decode_logits

    def biased(memory, tokens):
        logits = decode(memory, tokens).clone()
        logits[..., EOT] += bias
        return logits

    model.decode_logits = biased


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_respects_the_minimum_and_maximum_lengths(beams):
    # The release's BLIP settings: lengths count the start token and the prompt. With
    # the prompt 3 tokens long, min_length 5 and max_length 20 allow 1 to 16 caption
    # tokens. A decoder that wants to stop at once still writes 1 token; one that never
    # wants to stop writes exactly 16.
    model, _ = build_captioner(small_config(), 40, 64)
    init_codebook(model, None, seed=0)
    images = torch.randn(3, 3, 32, 32)
    prompt = [5, 6, 7]
    force_end_token(model, 100.0)
    eager = model.generate(images, beams=beams, max_length=20, min_length=5, prompt=prompt)
    assert [len(ids) for ids in eager] == [1, 1, 1]
    assert model.generate(images, beams=beams, max_length=20, prompt=prompt) == [[], [], []]
    model.decode_logits = type(model).decode_logits.__get__(model)
    force_end_token(model, -100.0)
    endless = model.generate(images, beams=beams, max_length=20, min_length=5, prompt=prompt)
    assert [len(ids) for ids in endless] == [16, 16, 16]
    assert all(EOT not in ids and PAD not in ids for ids in endless)
    # the preset carries the release's settings
    release = TldrReleaseParams()
    assert (release.beams, release.max_length, release.min_length) == (3, 20, 5)
    assert release.prompt == "a picture of "


# -- the strategy ------------------------------------------------------------------------

FAST = {"captioner_epochs": 1.0, "decoder_layers": 1, "captioner_batch_size": 64}


def context(pool, count, seed, work):
    return SelectionContext(
        pool=pool,
        budget_count=count,
        budget_fraction=count / len(pool),
        seed=seed,
        device="cpu",
        work_dir=Path(work),
        services=RecordingServices(pool),
    )


def test_tldr_is_deterministic_and_refines_every_selected_caption(tmp_path):
    pool = make_memory_pool(120, seed=3)
    runs = []
    for _ in range(2):
        with tempfile.TemporaryDirectory() as work:
            selection = Tldr(FAST).select(context(pool, 30, 7, work))
            checked = validate_selection(selection, set(pool.uids), 30, "tldr")
            names = sorted(Path(a).name for a in selection.artifacts)
        runs.append(checked)
    assert runs[0].uids == runs[1].uids
    assert runs[0].captions == runs[1].captions
    assert set(runs[0].captions) == set(runs[0].uids)
    originals = dict(zip(pool.uids, pool.captions, strict=True))
    for uid, text in runs[0].captions.items():
        assert text.startswith(originals[uid])
    assert names == ["tldr_caption_examples.md", "tldr_cluster_sizes.png"]
    metrics = runs[0].metrics
    assert metrics["clusters_used"] == 120 // 39 and metrics["clusters_requested"] == 3000
    assert metrics["captioner_cache_hit"] == 0.0
    assert runs[1].metrics["captioner_cache_hit"] == 1.0  # the second run reused it
    for stage in ("captioner_training", "code_extraction", "clustering", "generation"):
        assert metrics[f"seconds_{stage}"] >= 0


def test_without_refinement_captions_are_untouched(tmp_path):
    pool = make_memory_pool(80, seed=4)
    selection = Tldr({**FAST, "refine": False}).select(context(pool, 20, 0, tmp_path))
    assert selection.captions is None


def test_release_filter_only_keeps_the_better_matching_half(tmp_path):
    pool = make_memory_pool(100, seed=5)
    ctx = context(pool, 25, 0, tmp_path)
    asked: list[str] = []
    fake_embeddings = ctx.services.embeddings
    ctx.services.embeddings = lambda spec="proxy": asked.append(spec) or fake_embeddings(spec)
    selection = TldrRelease(FAST).select(ctx)
    # The matching score comes from the reference CLIP, the stand-in for the release's
    # pretrained BLIP ITM head.
    assert asked == ["reference"]
    emb = fake_embeddings("reference")
    score = (emb.image.astype(np.float32) * emb.text.astype(np.float32)).sum(1)
    top_half = {pool.uids[i] for i in np.argsort(-score, kind="stable")[:50]}
    assert set(selection.uids) <= top_half
    metrics = selection.metrics
    assert metrics["match_filter_kept"] == 50
    # The whole pool was whitened and clustered (the filter came after sampling), with
    # every point in k-means' training set: 100 // 39 = 2 clusters, not 50 // 39 = 1.
    assert metrics["kmeans_training_points"] == 100
    assert metrics["clusters_used"] == 2
    assert metrics["sampled_before_filter"] >= 50
    # selbench-tiny index vectors are 17 long (16 patches + the class token): the
    # release's 256 whitening dimensions become 17, and the run says so.
    assert metrics["whiten_dim_effective"] == 17
    # the preset's captioner quantised raw tokens
    metas = list((selbench_home() / "captioners").glob("*/meta.json"))
    assert [json.loads(m.read_text())["config"]["token_space"] for m in metas] == ["raw"]
    with pytest.raises(ConfigError, match="match_keep"):
        TldrRelease(FAST).select(context(pool, 60, 0, tmp_path))


def test_release_preset_defaults_differ_from_the_paper_where_the_code_does():
    paper, release = Tldr.Params(), TldrReleaseParams()
    assert (paper.codebook_size, release.codebook_size) == (3000, 1024)
    assert (paper.clusters, release.clusters) == (3000, 1000)
    assert (paper.codebook_init, release.codebook_init) == ("keywords", "uniform")
    assert not paper.whiten and release.whiten
    assert not paper.match_filter and release.match_filter
    assert (paper.token_space, release.token_space) == ("projected", "raw")
    assert (paper.prompt, paper.min_length, paper.max_length) == ("", 0, 0)
    assert paper.match_filter_stage == release.match_filter_stage == "after_sampling"


def test_filter_before_clustering_remains_available(tmp_path):
    pool = make_memory_pool(100, seed=5)
    params = {**FAST, "match_filter_stage": "before_clustering"}
    selection = TldrRelease(params).select(context(pool, 25, 0, tmp_path))
    assert selection.metrics["kmeans_training_points"] == 50
    assert "sampled_before_filter" not in selection.metrics


def test_hard_rule_measures_prototypes_in_the_embedder_and_raw_tokens_refuse_keywords(tmp_path):
    pool = make_memory_pool(80, seed=4)
    ctx = context(pool, 20, 0, tmp_path)
    asked: list[str] = []
    fake_embeddings = ctx.services.embeddings
    ctx.services.embeddings = lambda spec="proxy": asked.append(spec) or fake_embeddings(spec)
    params = {**FAST, "within_cluster": "hard", "refine": False, "prototype_embedder": "clip"}
    selection = Tldr(params).select(ctx)
    assert asked == ["clip"] and len(set(selection.uids)) == 20
    with pytest.raises(ConfigError, match="token_space"):
        Tldr({**FAST, "token_space": "raw"}).select(context(pool, 20, 0, tmp_path))


@parametrize_with_checks(
    [Tldr(FAST), TldrRelease(FAST), TldrRelease({**FAST, "within_cluster": "uniform"})],
    pool_sizes=(40, 97),
    budgets=(0.1, 0.5),
)
def test_tldr_presets_pass_the_conformance_kit(strategy, check):
    # A one-epoch captioner: the default three epochs, 24 times over, would dominate the
    # suite. Both presets and both within-cluster rules pass every check, check_seed
    # included (the stride rule varies with the seed through k-means on the 40-sample pool).
    check(strategy)
