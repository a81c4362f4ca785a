"""EL2N (Paul et al., NeurIPS 2021): hand-worked scores, the selection window, the
conformance kit and one end-to-end run on a tiny SynthWeb pool."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from selbench_plugins.el2n import El2n, el2n_from_logits, pair_logits, window_indices

from selbench.strategy import SelectionContext
from selbench.testing import check_strategy, make_memory_pool

# -- el2n_from_logits: cases worked out by hand -----------------------------------------


def test_uniform_two_way_prediction():
    # p = [0.5, 0.5], error = [-0.5, 0.5], norm = sqrt(0.5)
    got = el2n_from_logits(np.array([[0.0, 0.0]]), np.array([0]))
    assert got == pytest.approx([0.70710678], abs=1e-8)


def test_three_to_one_prediction():
    # logits [ln 3, 0]: p = [0.75, 0.25], error = [-0.25, 0.25], norm = sqrt(0.125)
    got = el2n_from_logits(np.array([[math.log(3.0), 0.0]]), np.array([0]))
    assert got == pytest.approx([0.35355339], abs=1e-8)


def test_uniform_three_way_prediction_target_in_the_middle():
    # p = [1/3, 1/3, 1/3], error = [1/3, -2/3, 1/3], norm = sqrt(6) / 3
    got = el2n_from_logits(np.zeros((1, 3)), np.array([1]))
    assert got == pytest.approx([0.81649658], abs=1e-8)


def test_confident_right_is_near_zero_and_confident_wrong_near_sqrt2():
    logits = np.array([[30.0, 0.0], [0.0, 30.0]])
    got = el2n_from_logits(logits, np.array([0, 0]))
    assert got[0] == pytest.approx(0.0, abs=1e-12)
    assert got[1] == pytest.approx(1.41421356, abs=1e-8)


def test_rows_are_independent_and_large_logits_are_stable():
    logits = np.array([[1000.0, 1000.0], [1000.0 + math.log(3.0), 1000.0]])
    got = el2n_from_logits(logits, np.array([1, 0]))
    assert got == pytest.approx([0.70710678, 0.35355339], abs=1e-8)


# -- pair_logits: the partner in column 0, the dropped reference left out ----------------


def test_pair_logits_drops_the_named_reference_column():
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    own = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # row 0 is reference sample 0 (drops it); row 1 is not a reference (drops the last)
    got = pair_logits(query, own, reference, torch.tensor([0, 2]), logit_scale=10.0)
    assert got.tolist() == [[10.0, 0.0, -10.0], [0.0, 10.0, 0.0]]


# -- window_indices: exact budget, offsets, ties ----------------------------------------

# Descending order: 0 (.9), 5 (.8), 3 (.7), 7 (.6), 2 (.5), 8 (.4), 4 (.3), 6 (.2), 1 (.1), 9 (0)
SCORES = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.0])


def test_window_without_offset_keeps_the_hardest():
    assert window_indices(SCORES, 3, 0.0).tolist() == [0, 3, 5]


def test_window_with_offset_skips_the_very_hardest():
    assert window_indices(SCORES, 3, 0.1).tolist() == [3, 5, 7]  # ranks 1..3


def test_window_past_the_end_shifts_back_to_keep_the_budget():
    # offset 0.9 would start at rank 9; the window shifts back to ranks 7..9
    assert window_indices(SCORES, 3, 0.9).tolist() == [1, 6, 9]
    assert window_indices(SCORES, 10, 0.5).tolist() == list(range(10))


def test_window_ties_go_to_the_earlier_pool_position():
    tied = np.array([1.0, 2.0, 2.0, 2.0, 0.0])
    assert window_indices(tied, 2, 0.0).tolist() == [1, 2]
    assert window_indices(tied, 2, 0.2).tolist() == [2, 3]


def test_window_rejects_bad_arguments():
    with pytest.raises(ValueError):
        window_indices(SCORES, 0, 0.0)
    with pytest.raises(ValueError):
        window_indices(SCORES, 11, 0.0)
    with pytest.raises(ValueError):
        window_indices(SCORES, 3, 1.0)


# -- the strategy --------------------------------------------------------------------------

FAST = {"runs": 1, "scoring_epochs": 0.5, "negatives": 15}


def test_el2n_conforms():
    check_strategy(El2n, params=FAST)


def test_negatives_are_clipped_to_the_pool_and_every_uid_is_scored():
    pool = make_memory_pool(12, seed=3)
    with tempfile.TemporaryDirectory() as work:
        ctx = SelectionContext(
            pool=pool,
            budget_count=4,
            budget_fraction=1 / 3,
            seed=0,
            device="cpu",
            work_dir=Path(work),
        )
        selection = El2n({**FAST, "negatives": 255, "runs": 2}).select(ctx)
    assert len(selection.uids) == 4 and selection.uids == sorted(selection.uids)
    assert set(selection.scores) == set(pool.uids)
    values = np.array(list(selection.scores.values()))
    assert np.all((values >= 0) & (values <= math.sqrt(2)))
    top = sorted(pool.uids, key=lambda u: (-selection.scores[u], pool.uids.index(u)))[:4]
    assert sorted(top) == selection.uids


# -- end to end ----------------------------------------------------------------------------


@pytest.mark.slow
def test_el2n_end_to_end_on_tiny_synthweb(tiny):
    from selbench.pools import resolve_pool
    from selbench.run.lifecycle import execute
    from selbench.run.spec import RunRequest

    pool, scale = tiny
    # 320 pairs: the proxy recipe (batch 256) would take ~1 step per epoch and learn nothing
    # in a few epochs; the tiny scale's batch of 64 with 10 epochs (50 steps) separates them.
    params = {"runs": 1, "scoring_epochs": 10.0, "negatives": 63, "recipe": str(scale)}
    request = RunRequest(
        method="el2n", budget=0.25, seed=0, pool=str(pool), scale=str(scale), params=params
    )
    outcome = execute(request)
    assert len(outcome.selection.uids) == 80  # round(0.25 * 320)
    truth = resolve_pool(str(pool)).pool.ground_truth()
    scores = outcome.selection.scores
    assert set(scores) == set(truth)
    assert all(0.0 <= v <= math.sqrt(2) for v in scores.values())
    by_kind: dict[str, list[float]] = {}
    for uid, record in truth.items():
        by_kind.setdefault(record["pathology"], []).append(scores[uid])
    means = {kind: round(float(np.mean(v)), 3) for kind, v in sorted(by_kind.items())}
    chosen = [truth[u]["pathology"] for u in outcome.selection.uids]
    counts = {kind: chosen.count(kind) for kind in sorted(set(chosen))}
    print(f"\nEL2N mean score by pathology: {means}\nselected (of 80): {counts}")
    # Misaligned pairs are the hardest for the proxies: mean 0.983-0.985 against 0.935-0.960
    # for clean pairs over seeds 0, 1, 2 when this test was written (docs/strategies/el2n.md).
    assert means["misaligned"] > means["clean"]
