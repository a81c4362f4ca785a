"""Selection memory that does not grow per sample (issue 32): CLIP scores in blocks, a shard
pool's uids and captions as Arrow-backed sequences over a memory-mapped index, k-means on
a sample with every row assigned in blocks. Each path must give exactly what the plain
computation gives (docs/scale-out.md, "Memory per sample in selection")."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from e2e_helpers import png_bytes, write_shard

from selbench import neighbours
from selbench.pools import ShardPool
from selbench.pools.arrow import ArrowStrings, frame_rows, mapped_frame, repeated_string
from selbench.run.spec import selection_hash
from selbench.toolbox import clip_scores, kmeans, unit_rows


# -- 1. clip_score in blocks -------------------------------------------------------------
def test_clip_scores_in_blocks_are_the_full_matrix_scores_bit_for_bit():
    rng = np.random.default_rng(0)
    image = unit_rows(rng.standard_normal((5003, 48))).astype(np.float16)
    text = unit_rows(rng.standard_normal((5003, 48))).astype(np.float16)
    full = np.einsum("ij,ij->i", image.astype(np.float32), text.astype(np.float32))
    for rows in (1, 7, 1000, 4096, 5002, 65536):  # block boundaries inside the pool
        got = clip_scores(image, text, rows=rows)
        assert got.dtype == np.float32 and np.array_equal(got, full), rows


def test_clip_scores_read_the_cache_memory_maps_in_place(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("image", "text"):
        np.save(tmp_path / f"{name}.npy", rng.standard_normal((3000, 16)).astype(np.float16))
    image, text = (np.load(tmp_path / f"{n}.npy", mmap_mode="r") for n in ("image", "text"))
    full = np.einsum("ij,ij->i", np.asarray(image, np.float32), np.asarray(text, np.float32))
    assert np.array_equal(clip_scores(image, text, rows=1024), full)
    assert not image.flags.writeable  # read-only maps are read, never written
    with pytest.raises(ValueError, match="one 2-d shape"):
        clip_scores(image, text[:10])


# -- 2. Arrow-backed uids and captions ---------------------------------------------------
@pytest.fixture
def arrow_pool(tmp_path) -> Path:
    root = tmp_path / "pool"
    for shard in range(2):
        samples = [
            (f"s{shard}k{i}", png_bytes((40 * shard, 30 * i, 90)), f"caption {shard} {i}", {})
            for i in range(4)
        ]
        write_shard(root / f"{shard:05d}.tar", samples)
    return root


def test_arrow_strings_behave_as_the_list_for_what_consumers_do():
    plain = [f"u{i}" for i in range(300)]
    seq = ArrowStrings(pa.chunked_array([pa.array(plain[:100]), pa.array(plain[100:])]))
    assert seq == plain and plain == seq and not (seq != plain)
    assert seq != plain[:-1] and seq != [*plain[:-1], "x"] and seq != tuple(plain)
    assert list(seq) == plain and len(seq) == len(plain)
    assert seq[0] == plain[0] and seq[-1] == plain[-1] and seq[np.int64(150)] == plain[150]
    assert seq[95:105] == plain[95:105] and seq[::7] == plain[::7] and seq[5:2] == []
    assert "u123" in seq and "zz" not in seq and seq.index("u250") == 250
    assert sorted(seq) == sorted(plain) and set(seq) == set(plain)
    assert dict(zip(seq, seq, strict=True)) == dict(zip(plain, plain, strict=True))
    assert json.dumps(list(seq)) == json.dumps(plain)
    assert selection_hash(list(seq)) == selection_hash(plain)
    assert [seq[i] for i in np.array([3, 299, 0])] == [plain[3], plain[299], plain[0]]
    assert seq.take(np.array([3, 299, 0])) == [plain[3], plain[299], plain[0]]
    with pytest.raises(IndexError):
        seq[300]
    with pytest.raises(TypeError):
        hash(seq)


@pytest.mark.parametrize("kind", [pa.string(), pa.large_string()])
def test_the_uniqueness_check_in_partitions_finds_what_a_set_finds(monkeypatch, kind):
    """repeated_string splits a column by a hash of each string's last bytes: a repeat must
    land in one partition whatever the strings' lengths (empty, shorter than the 8 bytes
    hashed, longer), chunks or slices; a column without repeats gives None."""
    import selbench.pools.arrow as arrow

    rng = np.random.default_rng(5)
    for partition_rows in (1 << 19, 64, 7):
        monkeypatch.setattr(arrow, "UNIQUE_PARTITION_ROWS", partition_rows)
        for trial in range(20):
            n = int(rng.integers(1, 600))
            words = {
                "".join(rng.choice(list("ab0é"), size=int(rng.integers(0, 12)))) for _ in range(n)
            }
            words = sorted(words)
            rng.shuffle(words)
            values = list(words)
            if trial % 2 and len(values) > 1:  # one repeat, anywhere
                i, j = rng.choice(len(values), size=2, replace=False)
                values[j] = values[i]
            cut = int(rng.integers(0, len(values) + 1))
            whole = pa.array(["pad", *values], kind).slice(1)  # a sliced chunk: offset 1
            chunks = [whole.slice(0, cut), whole.slice(cut)]
            found = repeated_string(pa.chunked_array(chunks, kind))
            repeats = {v for v in values if values.count(v) > 1}
            assert (found is None) == (not repeats)
            if repeats:
                assert found in repeats


def test_take_rows_gathers_chunk_by_chunk_what_arrows_take_gathers(monkeypatch):
    """take_rows equals Arrow's own take for rows in any order, repeated rows, empty and
    sliced chunks; rows in pool order come back as one chunk per chunk read (Arrow's take
    of a chunked column copies the whole column first: issue 32)."""
    from selbench.columns import take_rows

    rng = np.random.default_rng(3)
    for trial in range(30):
        sizes = rng.integers(0, 40, size=int(rng.integers(1, 6)))
        values = [f"s{i}-{'x' * int(rng.integers(0, 5))}" for i in range(int(sizes.sum()) + 1)]
        whole = pa.array(values).slice(1)  # offset 1: the chunks are slices
        starts = np.concatenate([[0], np.cumsum(sizes)])
        column = pa.chunked_array(
            [whole.slice(a, b - a) for a, b in zip(starts, starts[1:], strict=False)]
        )
        n = len(column)
        if n == 0:
            continue
        rows = rng.integers(0, n, size=int(rng.integers(0, 2 * n)))
        if trial % 3 == 0:
            rows = np.sort(rows)
        got = take_rows(column, rows)
        assert got.to_pylist() == column.take(pa.array(rows, pa.int64())).to_pylist()
        if trial % 3 == 0 and len(rows):
            touched = len(set(np.searchsorted(starts, rows, side="right") - 1))
            assert isinstance(got, pa.ChunkedArray) and got.num_chunks == touched
    # The selection hash sorts and gathers a block at a time, the same digest as Python's.
    import selbench.run.spec as spec

    uids = [f"{int(v):08x}" for v in rng.integers(0, 1 << 32, size=50)]
    chunked = ArrowStrings(pa.chunked_array([pa.array(uids[:20]), pa.array(uids[20:])]))
    for block in (1, 3, 7, 1 << 18):
        monkeypatch.setattr(spec, "HASH_BLOCK", block)
        assert selection_hash(chunked) == selection_hash(list(uids))
    with pytest.raises(IndexError, match="outside a column of 3"):
        take_rows(pa.chunked_array([pa.array(["a"]), pa.array(["b", "c"])]), [0, 3])


def test_a_shard_pool_hands_arrow_uids_and_captions_equal_to_its_lists(arrow_pool):
    built = ShardPool(arrow_pool)
    uids, captions = built.uids, built.captions  # first use: the index just scanned
    assert isinstance(uids, ArrowStrings) and isinstance(captions, ArrowStrings)
    expected = [f"s{s}k{i}" for s in range(2) for i in range(4)]
    assert uids == expected and list(uids) == built.index["uid"].tolist()
    assert captions == [f"caption {s} {i}" for s in range(2) for i in range(4)]

    again = ShardPool(arrow_pool)  # a second process: the index from the cache
    assert again.uids == expected and again.captions == captions
    assert [uid for uid, _ in again.iter_images()] == again.uids
    columns = ("uid", "shard", "offset", "size", "ext")
    whole = list(zip(*(again.index[name].tolist() for name in columns), strict=True))
    for block in (1, 3, 8, 65_536):  # iter_image_bytes' rows, a block at a time
        assert list(frame_rows(again.index, columns, block)) == whole


def test_the_cached_index_is_read_memory_mapped_and_equals_the_parquet(arrow_pool):
    assert len(ShardPool(arrow_pool).uids) == 8  # builds the parquet index
    pool = ShardPool(arrow_pool)
    parquet = pool._index_path()
    plain = pd.read_parquet(parquet)
    mapped = pool.index
    assert parquet.with_suffix(".arrow").is_file()
    assert mapped.equals(plain) and (mapped.dtypes == plain.dtypes).all()
    # a torn or stale Arrow copy is written again from the parquet
    parquet.with_suffix(".arrow").write_bytes(b"ARROW1 torn")
    assert mapped_frame(parquet).equals(plain)
    assert mapped_frame(parquet).equals(plain)  # and read back from the new copy


# -- 3. k-means on a sample, assigned in blocks -------------------------------------------
def _plain_kmeans(x, k, seed, niter, spherical):
    """k-means as the helper ran before: every row converted, trained on, searched at once."""
    data = np.ascontiguousarray(x, dtype=np.float32)
    clustering = faiss.Kmeans(
        data.shape[1],
        k,
        niter=niter,
        seed=seed,
        spherical=spherical,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=256,
    )
    clustering.train(data)
    scores, assignment = clustering.index.search(data, 1)
    return clustering.centroids, assignment.reshape(-1), scores.reshape(-1)


@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_on_faiss_subsample_assigned_in_blocks_is_bit_identical(spherical):
    # 300,000 rows > 256 x 4: faiss would subsample; the helper draws that sample itself
    # and assigns in two blocks (131,072 and the rest).
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300_000, 8)).astype(np.float16)
    rows = unit_rows(x) if spherical else x
    want = _plain_kmeans(rows, 4, 7, 4, spherical)
    got = kmeans(x, 4, seed=7, niter=4, spherical=spherical, return_scores=True, unit=spherical)
    assert len(neighbours.assign_blocks(len(x))) == 2
    for mine, theirs in zip(got, want, strict=True):
        assert np.array_equal(mine, theirs)


def test_assign_blocks_cover_every_row_once():
    assert neighbours.assign_blocks(10, rows=4) == [(0, 4), (4, 10)]
    assert neighbours.assign_blocks(12, rows=4) == [(0, 4), (4, 8), (8, 12)]
    assert neighbours.assign_blocks(7, rows=4) == [(0, 7)]
    assert neighbours.assign_blocks(1, rows=4) == [(0, 1)]


def test_max_train_points_samples_assigns_every_row_and_is_seeded():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 12)).astype(np.float32)
    centroids, assignment, scores = kmeans(
        x, 5, seed=11, niter=5, max_train_points=500, return_scores=True
    )
    assert assignment.shape == (3000,) and set(assignment) <= set(range(5))
    index = faiss.IndexFlatL2(12)
    index.add(centroids)
    nearest_scores, nearest = index.search(x, 1)
    assert np.array_equal(assignment, nearest.reshape(-1))  # every row: its nearest centroid
    assert np.array_equal(scores, nearest_scores.reshape(-1))
    again = kmeans(x, 5, seed=11, niter=5, max_train_points=500)
    assert np.array_equal(again[0], centroids) and np.array_equal(again[1], assignment)
    other = kmeans(x, 5, seed=12, niter=5, max_train_points=500)
    assert not np.array_equal(other[0], centroids)
    # a cap at or above the pool samples nothing: the plain computation
    plain = kmeans(x, 5, seed=11, niter=5)
    capped = kmeans(x, 5, seed=11, niter=5, max_train_points=3000)
    assert all(np.array_equal(a, b) for a, b in zip(plain, capped, strict=True))
    with pytest.raises(ValueError, match="max_train_points"):
        kmeans(x, 5, seed=11, max_train_points=4)


def test_kmeans_before_this_change_gives_the_same_results_on_a_small_pool():
    """The strategies' default (no max_train_points, pools under 256 x k rows): exactly the
    plain computation, for L2 and spherical k-means, with unit rows made as read."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2000, 16)).astype(np.float16)
    for spherical in (True, False):
        rows = unit_rows(x) if spherical else x
        want = _plain_kmeans(rows, 20, 5, 5, spherical)
        got = kmeans(
            x, 20, seed=5, niter=5, spherical=spherical, return_scores=True, unit=spherical
        )
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_released_rows_of_a_memory_map_read_the_same_and_leave_the_resident_set(tmp_path):
    from selbench.executors import release_rows

    values = np.arange(4096 * 64, dtype=np.float32).reshape(4096, 64)
    np.save(tmp_path / "x.npy", values)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    view = np.asarray(mapped)

    def resident_file_kib() -> int:  # file pages, or shared memory where tmp is a tmpfs
        with open("/proc/self/status") as handle:
            kinds = ("RssFile:", "RssShmem:")
            return sum(int(line.split()[1]) for line in handle if line.startswith(kinds))

    assert float(view.sum()) == float(values.sum())  # every page read: resident
    before = resident_file_kib()
    release_rows(view, 0, len(view))
    assert resident_file_kib() < before - 512  # the 1 MiB of pages left the resident set
    assert np.array_equal(view, values) and np.array_equal(view[10:20], values[10:20])
    release_rows(values, 0, 10)  # an array in memory: nothing happens
    assert values[5, 5] == 5 * 64 + 5
