"""clip_score's scoring math against cases worked out by hand (DataComp's CLIP score)."""

import numpy as np
import pytest
from selbench_plugins.clip_score import ClipScore

from selbench.errors import PluginError
from selbench.testing import RecordingServices, make_memory_pool
from selbench.toolbox import clip_scores


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
