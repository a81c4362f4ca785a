"""One corrupt shard does not sink a pool (issue 32): it is left out, counted, named in a
warning and in the run's params, and recorded by the pool's fingerprint; ``strict``
refuses the pool as before. docs/reliability.md, "Corrupt shards"."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
from e2e_helpers import logged_runs, make_tiny_scale, png_bytes, write_shard

from selbench.errors import PoolError
from selbench.pools import ShardPool
from selbench.pools.corrupt import (
    CORRUPT_SHARD,
    fingerprint_with_skipped,
    readable_samples,
    skipped_shards_param,
)

SHARDS, PER_SHARD = 3, 3


@pytest.fixture
def pool_dir(tmp_path) -> Path:
    """Three clean shards of three samples each (uids s{shard}k{i})."""
    root = tmp_path / "pool"
    for shard in range(SHARDS):
        samples = [
            (f"s{shard}k{i}", png_bytes((40 * shard, 30 * i, 90)), f"caption {shard} {i}", {})
            for i in range(PER_SHARD)
        ]
        write_shard(root / f"{shard:05d}.tar", samples)
    return root


def _cut(shard: Path, size: int = 700) -> None:
    shard.write_bytes(shard.read_bytes()[:size])


def _misrecord(shard: Path, successes: int) -> None:
    stats = shard.with_name(shard.stem + "_stats.json")
    stats.write_text(json.dumps({"count": successes, "successes": successes}))


def _todays_fingerprint(root: Path) -> str:
    """The fingerprint before corrupt shards could be left out, computed afresh."""
    digest = hashlib.sha256()
    for shard in sorted(root.glob("*.tar")):
        digest.update(f"{shard.name}:{hashlib.sha256(shard.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()[:16]


def _index_files(home: Path) -> list[Path]:
    return [p for p in (home / "pool-index").rglob("*") if p.is_file()]


def test_a_cut_shard_is_left_out_counted_and_named(pool_dir, caplog):
    _cut(pool_dir / "00001.tar")
    with caplog.at_level(logging.WARNING, logger="selbench.pools"):
        pool = ShardPool(pool_dir, strict=False)
        uids = pool.uids
    assert uids == [f"s{s}k{i}" for s in (0, 2) for i in range(PER_SHARD)]
    assert pool.index["shard"].tolist() == [0] * PER_SHARD + [2] * PER_SHARD
    # the skipped shard's samples: as many as its _stats.json records
    assert pool.scan_stats.skipped == {CORRUPT_SHARD: PER_SHARD}
    assert pool.scan_stats.kept == 2 * PER_SHARD
    assert pool.skipped_shards == ["00001.tar"]
    assert "00001.tar is truncated or not a tar archive" in caplog.text
    # the rows left point at the right bytes: images read by offset from shards 0 and 2
    assert [uid for uid, _, _ in pool.iter_image_bytes()] == uids


def test_a_cut_shard_without_stats_counts_the_samples_still_listed(pool_dir):
    shard = pool_dir / "00002.tar"
    with tarfile.open(shard) as tar:
        second_sample = tar.getmembers()[3].offset  # s2k1.txt's header: s2k0 is whole
    _cut(shard, second_sample + 100)
    (pool_dir / "00002_stats.json").unlink()
    assert readable_samples(shard) == 1
    pool = ShardPool(pool_dir, strict=False)
    assert pool.skipped_shards == ["00002.tar"] and len(pool) == 2 * PER_SHARD
    assert pool.scan_stats.skipped == {CORRUPT_SHARD: 1}


def test_a_shard_disagreeing_with_its_stats_is_left_out(pool_dir, caplog):
    _misrecord(pool_dir / "00002.tar", 5)
    with caplog.at_level(logging.WARNING, logger="selbench.pools"):
        pool = ShardPool(pool_dir, strict=False)
        assert len(pool) == 2 * PER_SHARD
    assert pool.scan_stats.skipped == {CORRUPT_SHARD: 5}  # what its _stats.json records
    assert pool.skipped_shards == ["00002.tar"]
    assert "00002.tar holds 3 samples but its _stats.json records 5 successes" in caplog.text
    assert not pool.index["uid"].str.startswith("s2").any()


def test_strict_refuses_the_pool_naming_the_shard_even_from_the_cached_index(pool_dir):
    _misrecord(pool_dir / "00001.tar", 9)
    assert ShardPool(pool_dir, strict=False).skipped_shards == ["00001.tar"]  # cached now
    with pytest.raises(PoolError, match=r"00001.tar holds 3 samples.*records 9 successes"):
        len(ShardPool(pool_dir, strict=True))
    _misrecord(pool_dir / "00001.tar", PER_SHARD)  # right again; another shard cut
    _cut(pool_dir / "00002.tar")
    with pytest.raises(PoolError, match="00002.tar is truncated"):
        len(ShardPool(pool_dir))  # the class refuses by default (selbench run does not)


def test_strict_refuses_through_resolve_pool_and_the_default_leaves_out(pool_dir):
    from selbench.pools import _from_synthweb_dir

    _cut(pool_dir / "00000.tar")
    with pytest.raises(PoolError, match="00000.tar"):
        len(_from_synthweb_dir(_synthweb_dir(pool_dir), "spec", strict=True).pool)
    assert _from_synthweb_dir(_synthweb_dir(pool_dir), "spec").pool.skipped_shards == ["00000.tar"]


def test_every_shard_corrupt_is_an_error_naming_them(pool_dir):
    for shard in pool_dir.glob("*.tar"):
        _cut(shard)
    with pytest.raises(PoolError, match=r"no readable samples.*'00000.tar', '00001.tar'"):
        len(ShardPool(pool_dir, strict=False))


def test_a_clean_pool_keeps_todays_fingerprint(pool_dir):
    pool = ShardPool(pool_dir, strict=False)
    assert pool.fingerprint == pool.content_fingerprint == _todays_fingerprint(pool_dir)
    assert pool.skipped_shards == []


def test_pools_leaving_out_different_shards_never_share_a_fingerprint(
    pool_dir, tmp_path, monkeypatch
):
    """Same tars (so the same content fingerprint and index cache key), a different shard
    misrecorded in each copy: each indexed in a home of its own."""
    fingerprints = {}
    for bad in ("00000.tar", "00001.tar"):
        copy = tmp_path / f"without-{bad}"
        shutil.copytree(pool_dir, copy)
        _misrecord(copy / bad, 7)
        monkeypatch.setenv("SELBENCH_HOME", str(tmp_path / f"home-{bad}"))
        pool = ShardPool(copy, strict=False)
        assert pool.content_fingerprint == _todays_fingerprint(pool_dir)
        assert pool.skipped_shards == [bad]
        fingerprints[bad] = pool.fingerprint
    assert len({*fingerprints.values(), _todays_fingerprint(pool_dir)}) == 3
    base = "0123456789abcdef"
    assert fingerprint_with_skipped(base, []) == base
    assert fingerprint_with_skipped(base, ["a.tar", "b.tar"]) == fingerprint_with_skipped(
        base, ["b.tar", "a.tar"]
    )


def test_a_corrupt_shard_leaves_no_rows_behind(pool_dir, isolated_home):
    _cut(pool_dir / "00001.tar")
    pool = ShardPool(pool_dir, strict=False)
    assert pool.skipped_shards == ["00001.tar"]
    index_file = next(p for p in _index_files(isolated_home) if p.name.endswith(".parquet"))
    import pandas as pd

    cached = pd.read_parquet(index_file)
    assert cached["uid"].tolist() == pool.uids and set(cached["shard"]) == {0, 2}
    assert not any(p.suffix == ".parts" for p in (isolated_home / "pool-index").iterdir())


def test_the_skipped_shards_param_is_cut_to_fit_mlflow():
    names = [f"{i:08d}.tar" for i in range(2000)]
    assert skipped_shards_param(names[:3]) == "00000000.tar,00000001.tar,00000002.tar"
    text = skipped_shards_param(list(reversed(names)))
    assert len(text) <= 5000 and text.startswith("00000000.tar,00000001.tar,")
    kept = text.count(".tar,")
    assert text.endswith(f",... (+{2000 - kept} more, 2000 in all)")


def _synthweb_dir(shards: Path) -> Path:
    """A minimal SynthWeb-layout dataset around ``shards``: one (unread) eval set."""
    root = shards.parent / "dataset"
    if not root.exists():
        root.mkdir()
        (root / "pool").symlink_to(shards, target_is_directory=True)
        (root / "eval").mkdir()
        manifest = {"eval_sets": {"shape": "eval"}, "config": {}}
        (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_run_leaves_out_the_corrupt_shard_and_records_it(pool_dir, tmp_path):
    from click.testing import CliRunner

    from selbench.cli import main

    _cut(pool_dir / "00001.tar")
    argv = ["run", "--method", "random", "--budget", "0.5", "--pool", str(_synthweb_dir(pool_dir))]
    argv += ["--scale", str(make_tiny_scale(tmp_path)), "--experiment", "cs", "--stage", "select"]
    assert "--strict" in CliRunner().invoke(main, ["run", "--help"]).output
    result = CliRunner().invoke(main, [*argv, "--strict"])
    assert result.exit_code == 1 and "00001.tar is truncated" in result.output
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    (run,) = [r for r in logged_runs("cs") if r.info.status != "FAILED"]
    params = run.data.params
    assert params["pool_skipped_shards"] == "00001.tar"
    assert json.loads(params["pool_skipped"]) == {CORRUPT_SHARD: PER_SHARD}
    assert params["pool_size"] == str(2 * PER_SHARD)
    pool = ShardPool(pool_dir, strict=False)
    assert params["pool_fingerprint"] == pool.fingerprint != pool.content_fingerprint


def test_a_shard_put_right_comes_back_though_its_index_was_cached(pool_dir):
    _misrecord(pool_dir / "00001.tar", 9)
    assert ShardPool(pool_dir, strict=False).skipped_shards == ["00001.tar"]
    _misrecord(pool_dir / "00001.tar", PER_SHARD)  # same tars: same index cache key
    pool = ShardPool(pool_dir, strict=True)
    assert len(pool) == SHARDS * PER_SHARD and pool.scan_stats.skipped == {}
    assert pool.fingerprint == _todays_fingerprint(pool_dir)
