"""Materialize: DataComp resharder semantics, atomic shards, resume shard by shard."""

from __future__ import annotations

import json
import tarfile

import pytest

from selbench.errors import SelbenchError
from selbench.materialize import load_subset, materialize
from selbench.pools import ShardPool

KEEP = ["000000000", "000000002", "000010002"]  # the readable samples of shard_pool_dir


def _write(pool, out, uids, **kw):
    captions = [f"train {u}" for u in uids]
    originals = [f"orig {u}" for u in uids]
    return materialize(pool, uids, captions, originals, out, selection_sha256="x", **kw)


def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def test_each_listed_uid_is_written_as_often_as_listed_with_unique_keys(shard_pool_dir, tmp_path):
    pool = ShardPool(shard_pool_dir)
    subset = _write(pool, tmp_path / "out", [KEEP[2], KEEP[0], KEEP[2]])
    samples = list(subset.iter_samples())
    # pool order, repeats kept; image bytes exactly the pool's
    assert [s[0] for s in samples] == [KEEP[0], KEEP[2], KEEP[2]]
    assert [s[3] for s in samples] == [f"train {KEEP[0]}", f"train {KEEP[2]}", f"train {KEEP[2]}"]
    pool_bytes = {uid: data for uid, data, _ in pool.iter_image_bytes()}
    assert all(data == pool_bytes[uid] for uid, data, _, _ in samples)
    names = [name for name, _ in _members(subset.shards[0])]
    keys = {name.split(".")[0] for name in names}
    assert len(keys) == 3
    meta = [json.loads(d) for n, d in _members(subset.shards[0]) if n.endswith(".json")]
    assert [m["caption"] for m in meta] == [f"orig {KEEP[0]}", f"orig {KEEP[2]}", f"orig {KEEP[2]}"]


def test_shards_hold_a_fixed_number_of_samples(shard_pool_dir, tmp_path):
    pool = ShardPool(shard_pool_dir)
    subset = _write(pool, tmp_path / "out", KEEP + KEEP[:2], shard_size=2)
    assert [p.name for p in subset.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert subset.sizes == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == subset.sizes
    assert subset.shard_pattern().endswith("{00000..00002}.tar")
    assert load_subset(tmp_path / "out").n_samples == 5


def test_same_plan_gives_identical_bytes_in_parallel_and_resumes_only_missing_shards(
    shard_pool_dir, tmp_path
):
    pool = ShardPool(shard_pool_dir)
    uids = KEEP * 3
    serial = _write(pool, tmp_path / "serial", uids, shard_size=2, workers=1)
    parallel = _write(pool, tmp_path / "parallel", uids, shard_size=2, workers=2)
    assert [p.read_bytes() for p in serial.shards] == [p.read_bytes() for p in parallel.shards]

    # A run killed after some shards: the manifest is gone and one shard is missing.
    (tmp_path / "serial" / "manifest.json").unlink()
    serial.shards[1].unlink()
    kept = serial.shards[0].stat().st_mtime_ns
    resumed = _write(pool, tmp_path / "serial", uids, shard_size=2, workers=1)
    assert serial.shards[0].stat().st_mtime_ns == kept  # not rewritten
    assert [p.read_bytes() for p in resumed.shards] == [p.read_bytes() for p in parallel.shards]
    assert not list((tmp_path / "serial").glob(".*tmp"))


def test_unknown_uid_is_an_error_naming_it_and_leaves_no_subset(shard_pool_dir, tmp_path):
    pool = ShardPool(shard_pool_dir)
    with pytest.raises(SelbenchError, match="not-a-uid"):
        _write(pool, tmp_path / "out", [KEEP[0], "not-a-uid"])
    assert load_subset(tmp_path / "out") is None


def test_a_different_plan_replaces_leftovers(shard_pool_dir, tmp_path):
    pool = ShardPool(shard_pool_dir)
    _write(pool, tmp_path / "out", KEEP, shard_size=1)
    (tmp_path / "out" / "manifest.json").unlink()  # as if killed before finishing
    subset = _write(pool, tmp_path / "out", KEEP[:1], shard_size=1)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar"]
    assert [s[0] for s in subset.iter_samples()] == KEEP[:1]
