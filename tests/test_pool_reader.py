import pytest

from selbench.errors import PoolError
from selbench.pools import ShardPool


def test_reader_keeps_readable_pairs_in_shard_order_and_counts_skips(shard_pool_dir):
    pool = ShardPool(shard_pool_dir)
    assert pool.uids == ["000000000", "000000002", "000010002"]
    assert pool.captions == ["a caption 0", "a caption 2", "a blue square"]
    assert dict(pool.scan_stats.skipped) == {
        "unreadable_image": 1,
        "empty_caption": 1,
        "missing_image": 1,
    }
    assert pool.scan_stats.total == 6


def test_images_stream_in_pool_order_and_filter_by_uid(shard_pool_dir):
    pool = ShardPool(shard_pool_dir)
    streamed = list(pool.iter_images())
    assert [uid for uid, _ in streamed] == pool.uids
    assert streamed[0][1].mode == "RGB"
    only = list(pool.iter_images(["000010002"]))
    assert [uid for uid, _ in only] == ["000010002"]
    assert only[0][1].getpixel((0, 0)) == (0, 0, 200)


def test_fingerprint_is_stable_and_tracks_content(shard_pool_dir):
    first = ShardPool(shard_pool_dir).fingerprint
    assert ShardPool(shard_pool_dir).fingerprint == first
    shard = shard_pool_dir / "00001.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF  # flip a byte inside a member
    shard.write_bytes(bytes(data))
    assert ShardPool(shard_pool_dir).fingerprint != first


def test_index_is_cached_and_reused(shard_pool_dir, monkeypatch):
    assert len(ShardPool(shard_pool_dir).uids) == 3
    monkeypatch.setattr(ShardPool, "_scan", lambda self: pytest.fail("rescanned"))
    again = ShardPool(shard_pool_dir)
    assert len(again) == 3
    assert again.scan_stats.skipped["empty_caption"] == 1


def test_strategy_view_has_no_ground_truth(shard_pool_dir):
    pool = ShardPool(shard_pool_dir)
    assert pool.ground_truth() == {"000010002": {"pathology": "clean"}}
    view = pool.strategy_view()
    assert not hasattr(view, "ground_truth")
    assert list(view.uids) == pool.uids


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(PoolError, match="does not exist"):
        ShardPool(tmp_path / "nowhere")


def test_directory_without_shards_is_a_clear_error(tmp_path):
    with pytest.raises(PoolError, match="no .tar shards"):
        ShardPool(tmp_path)


def test_truncated_shard_is_an_error_naming_the_shard(shard_pool_dir):
    shard = shard_pool_dir / "00001.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(PoolError, match="00001.tar"):
        assert len(ShardPool(shard_pool_dir).uids) == 3


def test_shard_cut_or_removed_after_indexing_is_an_error_when_read(shard_pool_dir):
    pool = ShardPool(shard_pool_dir)
    complete = [data for _, data, _ in pool.iter_image_bytes()]
    assert [len(data) for data in complete] == pool.index["size"].tolist()
    shard = shard_pool_dir / "00001.tar"
    cut = int(pool.index["offset"].iloc[-1]) + 1  # inside the last sample's image
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(PoolError, match="00001.tar changed since it was indexed"):
        list(pool.iter_image_bytes())
    shard.unlink()
    with pytest.raises(PoolError, match="cannot be read"):
        list(pool.iter_image_bytes())
