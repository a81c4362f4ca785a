"""clip_score's scoring math against cases worked out by hand (DataComp's CLIP score)."""

import numpy as np
import pytest
from selbench_plugins.clip_score import ClipScore, clip_scores, top_k

from selbench.errors import PluginError
from selbench.testing import RecordingServices, make_memory_pool


def test_clip_score_is_the_per_pair_cosine():
    s = np.sqrt(0.5)
    image = np.array([[1.0, 0.0], [0.0, 1.0], [s, s]])
    text = np.array([[1.0, 0.0], [1.0, 0.0], [s, -s]])
    # pair 0 identical -> 1; pair 1 orthogonal -> 0; pair 2 at 90 degrees too -> 0
    assert clip_scores(image, text) == pytest.approx([1.0, 0.0, 0.0])


def test_top_k_keeps_the_highest_and_breaks_ties_by_pool_position():
    scores = np.array([0.2, 0.9, 0.5, 0.9, 0.1])
    assert top_k(scores, 2).tolist() == [1, 3]
    assert top_k(scores, 3).tolist() == [1, 2, 3]
    assert top_k(np.array([0.5, 0.5, 0.5]), 2).tolist() == [0, 1]


def _ctx(tmp_path, budget_count, seed=0):
    from selbench.strategy import SelectionContext

    pool = make_memory_pool(40)
    return SelectionContext(
        pool=pool,
        budget_count=budget_count,
        budget_fraction=budget_count / 40,
        seed=seed,
        device="cpu",
        work_dir=tmp_path,
        services=RecordingServices(pool),
    )


def test_threshold_mode_samples_only_pairs_above_the_threshold(tmp_path):
    ctx = _ctx(tmp_path, 5)
    found = ctx.embeddings()
    scores = clip_scores(np.asarray(found.image), np.asarray(found.text))
    threshold = float(np.sort(scores)[-10])  # exactly 10 pairs pass
    picked = ClipScore({"mode": "threshold", "threshold": threshold}).select(ctx)
    passing = {ctx.pool.uids[i] for i in np.flatnonzero(scores >= threshold)}
    assert len(picked.uids) == 5 and set(picked.uids) <= passing


def test_threshold_mode_names_the_shortfall(tmp_path):
    ctx = _ctx(tmp_path, 5)
    with pytest.raises(PluginError, match="only 0 pairs score >= 1.5, the budget is 5"):
        ClipScore({"mode": "threshold", "threshold": 1.5}).select(ctx)
