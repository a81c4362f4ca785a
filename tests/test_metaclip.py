"""metaclip: MetaCLIP's metadata curation (Xu et al., ICLR 2024; Meta CLIP 2, 2025)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from e2e_helpers import write_shard
from PIL import Image
from selbench_plugins.metaclip import (
    PAPER_TAIL_PROPORTION,
    MetaCLIP,
    algorithm1_sample,
    exact_size_sample,
    keep_probabilities,
    match_captions,
    tail_proportion,
    threshold_for_budget,
    threshold_for_tail_proportion,
)

from selbench.errors import ConfigError
from selbench.pools import resolve_pool
from selbench.strategy import SelectionContext, validate_selection
from selbench.synthweb.vocabulary import concept_entries
from selbench.testing import MemoryPool, parametrize_with_checks

ENTRIES = ["red", "red circle", "circle", "square", "Star", "five-pointed star", "blue"]
CAPTIONS = [
    "a red circle.",  # red, red circle, circle (punctuation is spaced off)
    "Red circle",  # circle only: matching is case-sensitive
    "blue circle, red square",  # red, circle, square, blue
    "squares and circles",  # nothing: whole words only
    "a Star",  # Star
    "a five-pointed star",  # five-pointed star (not "Star")
    "redcircle",  # nothing
    "a red\tcircle",  # red, red circle, circle (a tab is a space)
]
# Hand count of the texts matching each entry of ENTRIES.
HAND_COUNTS = [3, 2, 4, 1, 1, 1, 1]


def write_entries(path: Path, entries: list[str]) -> Path:
    path.write_text("\n".join(entries) + "\n")
    return path


def context(pool, count: int, tmp_path: Path, seed: int = 0) -> SelectionContext:
    return SelectionContext(
        pool=pool,
        budget_count=count,
        budget_fraction=count / len(pool),
        seed=seed,
        device="cpu",
        work_dir=tmp_path,
    )


def head_and_tail_pool(head: int = 1000, tail: int = 100, unmatched: int = 50) -> MemoryPool:
    """``head`` captions of one entry ("dog"), ``tail`` captions of an entry each, then
    ``unmatched`` captions that match nothing."""
    captions = ["a photo of a dog"] * head
    captions += [f"a photo of a rare{i}" for i in range(tail)]
    captions += ["no description available"] * unmatched
    return MemoryPool([f"s{i:05d}" for i in range(len(captions))], captions)


HEAD_TAIL_ENTRIES = ["dog"] + [f"rare{i}" for i in range(100)]


def test_match_counts_equal_a_hand_count():
    matches = match_captions(CAPTIONS, ENTRIES)
    assert matches.counts().tolist() == HAND_COUNTS
    assert matches.entries_of(0) == [0, 1, 2]
    assert matches.entries_of(1) == [2]
    assert matches.entries_of(3) == []
    assert matches.matched().tolist() == [True, True, True, False, True, True, False, True]


def test_lowercase_matches_case_insensitively():
    matches = match_captions(CAPTIONS, ENTRIES, lowercase=True)
    assert matches.entries_of(1) == [0, 1, 2]  # "Red circle"
    assert matches.entries_of(5) == [4, 5]  # "star" now matches "Star" too


def test_keep_probability_is_one_minus_the_product_of_misses():
    matches = match_captions(["red circle", "red", "circle"], ["red", "circle"])
    # c_red = 2, c_circle = 2; at t = 1 each entry is sampled with probability 1/2.
    assert keep_probabilities(matches, 1.0).tolist() == pytest.approx([0.75, 0.5, 0.5])
    assert keep_probabilities(matches, 2.0).tolist() == [1.0, 1.0, 1.0]


def test_head_entries_are_capped_and_tail_texts_always_kept():
    pool = head_and_tail_pool()
    matches = match_captions(pool.captions, HEAD_TAIL_ENTRIES)
    kept_head = []
    for seed in range(5):
        kept = algorithm1_sample(matches, 50.0, np.random.default_rng(seed))
        assert set(range(1000, 1100)) <= set(kept.tolist())  # every tail text
        assert not set(kept.tolist()) & set(range(1100, 1150))  # nothing unmatched
        kept_head.append(int(np.count_nonzero(kept < 1000)))
    # Binomial(1000, 50/1000): mean 50, sd 6.9.
    assert all(25 <= k <= 75 for k in kept_head)
    assert 40 <= np.mean(kept_head) <= 60


def test_budget_threshold_meets_the_expected_count_and_keeps_the_tail(tmp_path):
    pool = head_and_tail_pool()
    entries = write_entries(tmp_path / "entries.txt", HEAD_TAIL_ENTRIES)
    matches = match_captions(pool.captions, HEAD_TAIL_ENTRIES)
    # K(t) = 100 + 1000 * t / 1000 for 1 <= t <= 1000: K = 300 at t = 200.
    assert threshold_for_budget(matches, 300) == pytest.approx(200.0, rel=1e-9)
    selection = MetaCLIP({"metadata": str(entries)}).select(context(pool, 300, tmp_path))
    chosen = {int(uid[1:]) for uid in selection.uids}
    assert len(chosen) == 300
    assert set(range(1000, 1100)) <= chosen  # tail: probability 1
    assert selection.metrics["t_used"] == pytest.approx(200.0, rel=1e-3)
    assert selection.metrics["head_entries"] == 1.0
    assert selection.metrics["filled_unmatched"] == 0.0


def test_exact_size_sample_has_the_given_inclusion_probabilities():
    probabilities = np.array([1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25])  # sums to 4
    rng = np.random.default_rng(0)
    hits = np.zeros(len(probabilities))
    for _ in range(4000):
        chosen = exact_size_sample(probabilities, 4, rng)
        assert len(chosen) == 4 and len(set(chosen.tolist())) == 4
        hits[chosen] += 1
    assert hits[:2].tolist() == [4000, 4000]
    assert hits / 4000 == pytest.approx(probabilities, abs=0.03)


@pytest.mark.parametrize("threshold", ["budget", "paper"])
@pytest.mark.parametrize("count", [1, 37, 500, 1100, 1140])
def test_exact_budget_without_duplicates(tmp_path, threshold, count):
    pool = head_and_tail_pool()
    entries = write_entries(tmp_path / "entries.txt", HEAD_TAIL_ENTRIES)
    strategy = MetaCLIP({"metadata": str(entries), "threshold": threshold})
    ctx = context(pool, count, tmp_path)
    selection = strategy.select(ctx)
    checked = validate_selection(selection, set(pool.uids), count, "metaclip")
    assert len(set(checked.uids)) == count
    matched = {int(uid[1:]) < 1100 for uid in checked.uids}
    if count <= 1100:  # matched texts suffice: no unmatched one is chosen
        assert matched == {True}
    else:  # all 1100 matched texts, then unmatched ones at random
        assert sum(int(uid[1:]) < 1100 for uid in checked.uids) == 1100
        assert selection.metrics["filled_unmatched"] == count - 1100


def test_same_seed_same_selection_other_seed_another(tmp_path):
    pool = head_and_tail_pool()
    entries = str(write_entries(tmp_path / "entries.txt", HEAD_TAIL_ENTRIES))
    for threshold in ("budget", "paper"):
        strategy = MetaCLIP({"metadata": entries, "threshold": threshold})
        first = strategy.select(context(pool, 300, tmp_path, seed=0)).uids
        again = strategy.select(context(pool, 300, tmp_path, seed=0)).uids
        other = strategy.select(context(pool, 300, tmp_path, seed=1)).uids
        assert first == again
        assert first != other


def test_unmatched_error_refuses_a_budget_above_the_matched_texts(tmp_path):
    pool = head_and_tail_pool()
    entries = str(write_entries(tmp_path / "entries.txt", HEAD_TAIL_ENTRIES))
    strategy = MetaCLIP({"metadata": entries, "unmatched": "error"})
    assert len(strategy.select(context(pool, 1100, tmp_path)).uids) == 1100
    with pytest.raises(ConfigError, match="only 1100 of pool 'memory'"):
        strategy.select(context(pool, 1101, tmp_path))


def test_tail_proportion_rule_carries_t_across_pools():
    counts = np.array([1, 1, 2, 10, 100, 0])  # 114 matches
    assert tail_proportion(counts, 2) == pytest.approx(2 / 114)
    assert tail_proportion(counts, 10) == pytest.approx(4 / 114)
    # Candidate shares: t=1: 0, t=2: 2/114, t=10: 4/114, t=100: 14/114, t=101: 1.
    assert threshold_for_tail_proportion(counts, 0.05) == 10.0
    assert threshold_for_tail_proportion(counts, 0.1) == 100.0
    assert PAPER_TAIL_PROPORTION == pytest.approx(0.0564, abs=1e-4)
    # The same shape of counts at 10x the pool: the rule gives 10x the t.
    assert threshold_for_tail_proportion(counts * 10, 0.05) == 100.0


def test_paper_threshold_uses_the_tail_rule_or_a_fixed_t(tmp_path):
    pool = head_and_tail_pool()
    entries = str(write_entries(tmp_path / "entries.txt", HEAD_TAIL_ENTRIES))
    # 1100 matches. Tail proportions: t = 1: 0; t = 1000: 100 / 1100 = 9.1% (the rare
    # entries); t = 1001: 1. Nearest to 5.64%: t = 1000, which keeps every matched text.
    ruled = MetaCLIP({"metadata": entries, "threshold": "paper"})
    selection = ruled.select(context(pool, 200, tmp_path))
    assert selection.metrics["t_used"] == 1000.0
    assert selection.metrics["algorithm1_kept"] == 1100.0  # then cut to the budget
    fixed = MetaCLIP({"metadata": entries, "threshold": "paper", "t": 50})
    selection = fixed.select(context(pool, 120, tmp_path))
    assert selection.metrics["t_used"] == 50.0
    assert 100 <= selection.metrics["algorithm1_kept"] <= 200  # 100 tail + about 50 head


def test_missing_metadata_file_names_the_path_and_the_pool(tmp_path):
    pool = head_and_tail_pool()
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(ConfigError, match=rf"{missing}.*pool 'memory'"):
        MetaCLIP({"metadata": str(missing)}).select(context(pool, 10, tmp_path))


def test_web_pool_without_metadata_is_refused_with_the_fix(tmp_path):
    pool = head_and_tail_pool()
    pool.kind = "shards"  # type: ignore[attr-defined]  # a web pool's view, no `metadata`
    with pytest.raises(ConfigError, match="pool 'memory' names no metadata file.*pool YAML"):
        MetaCLIP().select(context(pool, 10, tmp_path))


def test_synthweb_pool_uses_its_concept_vocabulary(tmp_path):
    entries = concept_entries()
    assert {"circle", "disc", "grey", "red circle", "grey love heart"} <= set(entries)
    assert len(entries) == len(set(entries)) == 447
    captions = ["a small red circle", "click to enlarge", "photo of a grey heart shape"]
    pool = MemoryPool(["a", "b", "c"], captions)
    pool.kind = "synthweb"  # type: ignore[attr-defined]  # what ShardPool's view reports
    selection = MetaCLIP().select(context(pool, 2, tmp_path))
    assert selection.uids == ["a", "c"]  # boilerplate matches no concept
    assert selection.metrics["matched_texts"] == 2.0


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pool_yaml_metadata_reaches_the_strategy(tmp_path):
    samples = [
        (f"{i:09d}", png(), caption, {"uid": f"u{i}"})
        for i, caption in enumerate(["a red circle", "a dog", "a blue square", "image"])
    ]
    write_shard(tmp_path / "shards" / "00000.tar", samples)
    write_entries(tmp_path / "entries.txt", ["red", "blue"])
    config = tmp_path / "mine.yaml"
    config.write_text(f"name: mine\nkind: shards\npath: {tmp_path / 'shards'}\n")
    assert resolve_pool(str(config)).pool.strategy_view().metadata is None
    config.write_text(config.read_text() + "metadata: entries.txt\n")  # beside the YAML
    view = resolve_pool(str(config)).pool.strategy_view()
    assert view.metadata == str(tmp_path / "entries.txt")
    selection = MetaCLIP().select(context(view, 2, tmp_path))
    assert sorted(selection.uids) == ["u0", "u2"]
    config.write_text(config.read_text().replace("entries.txt", "gone.txt"))
    view = resolve_pool(str(config)).pool.strategy_view()
    with pytest.raises(ConfigError, match=r"gone\.txt of pool 'mine' does not exist"):
        MetaCLIP().select(context(view, 2, tmp_path))


# Default parameters, as tests/test_conformance_kit.py runs every built-in: the kit's
# in-memory pool declares no kind and gets SynthWeb's vocabulary (its captions' words).
@parametrize_with_checks([MetaCLIP()], pool_sizes=(40,))
def test_conforms(strategy, check):
    check(strategy)
