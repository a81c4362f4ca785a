"""VAS and VAS-D (arXiv 2402.02055) against cases worked out by hand."""

from pathlib import Path

import numpy as np
import pytest
from selbench_plugins.vas import Vas, VasD, second_moment, variance_alignment, vas_d

from selbench.embedders import Embeddings
from selbench.errors import ConfigError
from selbench.strategy import SelectionContext
from selbench.target import TargetSet
from selbench.testing import MemoryPool, check_strategy

E = np.eye(3)
U = (E[0] + E[1]) / np.sqrt(2)


def test_variance_alignment_by_hand():
    sigma = second_moment(np.array([E[0], E[0], E[1]]))  # diag(2/3, 1/3, 0)
    assert sigma == pytest.approx(np.diag([2 / 3, 1 / 3, 0]))
    scores = variance_alignment(np.array([E[0], E[1], U, E[2]]), sigma)
    assert scores == pytest.approx([2 / 3, 1 / 3, 0.5, 0.0])


def test_vas_d_first_sigma_over_the_pool_or_the_candidates():
    rows = np.array([E[0], E[0], E[1], E[2], E[2], E[2]])
    candidates = np.arange(4)
    # pool moment diag(2, 1, 3)/6: the one e3 candidate scores highest, then e1 (earlier first)
    kept, _ = vas_d(rows, candidates, 2, 1, second_moment(rows))
    assert kept.tolist() == [0, 3]
    # candidates' moment diag(2, 1, 1)/4: the two e1 rows
    kept, _ = vas_d(rows, candidates, 2, 1, second_moment(rows[candidates]))
    assert kept.tolist() == [0, 1]


def test_vas_d_updates_sigma_after_each_step():
    rows = np.array([E[0], E[0], E[1], E[1], U])
    # step 1 (chunk 1) against the pool moment [[.5,.1],[.1,.5]]: U .6, e1 .5, e1, e2 (index 2)
    # step 2 against the moment of {0,1,2,4}: e1 .625 = U .625 > e2 .375 -> {0, 1, 4}
    kept, scores = vas_d(rows, np.arange(5), 3, 2, second_moment(rows))
    assert kept.tolist() == [0, 1, 4]
    final = second_moment(rows[[0, 1, 4]])
    assert scores == pytest.approx(variance_alignment(rows, final))
    assert scores[2] == pytest.approx(0.5 / 3)


class Services:
    def __init__(self, pool, image, text, target):
        self.pool, self.image, self.text, self.target_rows = pool, image, text, target
        self.used = set()

    def embeddings(self, spec):
        self.used.add("embeddings")
        return Embeddings(self.image, self.text, self.pool.uids, spec, "fixed")

    def target(self):
        self.used.add("target")
        return TargetSet(Path("t"), [None] * len(self.target_rows), [], [])

    def embed_images(self, spec, images):
        return self.target_rows


def _ctx(tmp_path, image, text, target, budget):
    uids = [f"u{i}" for i in range(len(image))]
    pool = MemoryPool(uids, ["c"] * len(uids))
    return SelectionContext(
        pool=pool,
        budget_count=budget,
        budget_fraction=budget / len(uids),
        seed=0,
        device="cpu",
        work_dir=tmp_path,
        services=Services(pool, image.astype(np.float32), text.astype(np.float32), target),
    )


def test_vas_keeps_target_aligned_images_among_well_aligned_pairs(tmp_path):
    # u0: along the target, caption wrong; u1: along the target; u2: half along; u3: off it.
    image = np.array([E[0], E[0], U, E[2]])
    text = np.array([E[1], E[0], U, E[2]])
    ctx = _ctx(tmp_path, image, text, np.array([E[0]]), 2)
    picked = Vas().select(ctx)  # CLIP filter keeps 3 (1.5 x 2): u1, u2, u3
    assert picked.uids == ["u1", "u2"]
    assert picked.scores["u0"] == pytest.approx(1.0)
    # without the filter the misaligned u0 is taken
    assert Vas({"prefilter_ratio": 2}).select(ctx).uids == ["u0", "u1"]


def test_vas_d_needs_no_target_and_rejects_bad_steps(tmp_path):
    image = np.array([E[0], E[0], E[1], E[1], U])
    ctx = _ctx(tmp_path, image, image, np.array([E[0]]), 3)
    picked = VasD({"prefilter_ratio": 2, "steps": 2}).select(ctx)
    assert picked.uids == ["u0", "u1", "u4"]
    assert "target" not in ctx.services.used
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        VasD({"steps": 0}).select(ctx)
    with pytest.raises(ConfigError, match="prefilter_ratio must be >= 1"):
        Vas({"prefilter_ratio": 0.9}).select(ctx)


@pytest.mark.parametrize(
    "cls, params",
    [(Vas, {}), (VasD, {}), (VasD, {"initial_sigma": "prefiltered", "steps": 3})],
)
def test_conformance_kit(cls, params):
    check_strategy(cls, params)
