"""The clean-only oracle: it reads the ground truth only through its declared need, keeps
exactly the clean pairs at a budget that fits, and refuses pools without ground truth."""

from __future__ import annotations

import pytest

from selbench.errors import ConfigError, UndeclaredNeedError
from selbench.pools import resolve_pool
from selbench.registry import get_registry
from selbench.strategy import SelectionContext
from selbench.testing import make_memory_pool


def context(tmp_path, pool, count, truth, needs=frozenset({"ground_truth"}), seed=0):
    return SelectionContext(
        pool=pool,
        budget_count=count,
        budget_fraction=count / len(pool),
        seed=seed,
        device="cpu",
        work_dir=tmp_path,
        strategy="oracle",
        needs=needs,
        truth=truth,
    )


def oracle(**params):
    return get_registry().get("oracle").cls(params)


@pytest.fixture(scope="module")
def synthweb(tiny_pool):
    return resolve_pool(str(tiny_pool)).pool


def test_keeps_only_clean_pairs_of_a_synthweb_pool(synthweb, tmp_path):
    truth = synthweb.ground_truth()
    clean = {u for u, t in truth.items() if t["pathology"] == "clean"}
    assert 0 < len(clean) < len(synthweb)
    count = len(clean) // 2
    ctx = context(tmp_path, synthweb.strategy_view(), count, synthweb.ground_truth)
    picked = oracle().select(ctx)
    assert len(picked.uids) == len(set(picked.uids)) == count
    assert set(picked.uids) <= clean
    assert picked.metrics["filled"] == 0
    again = oracle().select(
        context(tmp_path, synthweb.strategy_view(), count, synthweb.ground_truth)
    )
    other = oracle().select(
        context(tmp_path, synthweb.strategy_view(), count, synthweb.ground_truth, seed=1)
    )
    assert again.uids == picked.uids and other.uids != picked.uids


def test_budget_beyond_the_clean_pairs_keeps_all_of_them_and_fills(tmp_path):
    pool = make_memory_pool(20)
    truth = {u: {"pathology": "clean" if i < 5 else "misaligned"} for i, u in enumerate(pool.uids)}
    picked = oracle().select(context(tmp_path, pool, 8, lambda: truth))
    assert set(pool.uids[:5]) <= set(picked.uids) and len(set(picked.uids)) == 8
    assert picked.metrics["filled"] == 3
    # keep= widens what counts as good
    noisy = oracle(keep="clean, misaligned").select(context(tmp_path, pool, 8, lambda: truth))
    assert noisy.metrics["filled"] == 0


def test_refuses_a_pool_without_ground_truth_naming_it(tmp_path):
    pool = make_memory_pool(10)
    with pytest.raises(ConfigError, match="'memory' records none"):
        oracle().select(context(tmp_path, pool, 3, None))
    truth = {u: {"pathology": "misaligned"} for u in pool.uids}
    with pytest.raises(ConfigError, match=r"keep=\['clean'\].*\['misaligned'\]"):
        oracle().select(context(tmp_path, pool, 3, lambda: truth))
    with pytest.raises(ConfigError, match="no ground truth"):
        oracle().select(context(tmp_path, pool, 3, lambda: dict(list(truth.items())[:4])))
    with pytest.raises(ConfigError, match="keep"):
        oracle(keep=" , ")


def test_ground_truth_needs_to_be_declared(tmp_path):
    pool = make_memory_pool(10)
    ctx = context(tmp_path, pool, 3, lambda: {}, needs=frozenset({"embeddings"}))
    with pytest.raises(UndeclaredNeedError, match="ground_truth"):
        ctx.ground_truth()
