from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import selbench.cache as cache_mod
import selbench.cache.chunks as cache_chunks
import selbench.cache.entries as cache_entries
from selbench.cache import CACHE_FORMAT, CacheEntry, EmbeddingCache
from selbench.errors import ConfigError, SelbenchError, StorageError

REPO = Path(__file__).resolve().parent.parent
POOL = "0123abcd4567ef89"
EMBEDDER = "open_clip:ViT-B-32/laion2b"
N, DIM, CHUNK = 40, 8, 16


def make_data(n: int = N, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)) * 3, rng.standard_normal((n, dim))


def producer(image, text, batch: int = 7, calls: list | None = None):
    """A produce callable yielding ``batch``-row slices; records (start, rows) in ``calls``."""

    def produce(start):
        for lo in range(start, len(image), batch):
            if calls is not None:
                calls.append((start, min(batch, len(image) - lo)))
            yield image[lo : lo + batch], text[lo : lo + batch]

    return produce


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def compute(cache: EmbeddingCache, data=None, embedder: str = EMBEDDER, **kwargs):
    image, text = data if data is not None else make_data()
    calls: list = []
    result = cache.get_or_compute(
        POOL, embedder, len(image), producer(image, text, calls=calls), chunk_size=CHUNK, **kwargs
    )
    return result, calls


def rows_produced(calls: list) -> int:
    return sum(rows for _, rows in calls)


@pytest.fixture
def cache(tmp_path) -> EmbeddingCache:
    return EmbeddingCache(tmp_path / "emb")


@pytest.fixture
def reference(tmp_path) -> CacheEntry:
    """An uninterrupted run with other batch sizes, in a separate root."""
    image, text = make_data()
    result = EmbeddingCache(tmp_path / "reference").get_or_compute(
        POOL, EMBEDDER, N, producer(image, text, batch=13), chunk_size=CHUNK
    )
    return result.entry


def assert_same(entry: CacheEntry, reference: CacheEntry) -> None:
    assert np.array_equal(np.asarray(entry.image), np.asarray(reference.image))
    assert np.array_equal(np.asarray(entry.text), np.asarray(reference.text))


# -- basics --------------------------------------------------------------------------------
def test_compute_then_hit(cache):
    image, text = make_data()
    result, calls = compute(cache, meta={"pool": "synthweb", "versions": {"torch": "x"}})
    assert not result.hit and result.resumed_from == 0 and result.seconds > 0
    assert calls[0][0] == 0 and rows_produced(calls) == N
    entry = result.entry
    assert isinstance(entry.image, np.memmap) and isinstance(entry.text, np.memmap)
    assert entry.image.dtype == np.float16 and entry.image.shape == (N, DIM)
    assert entry.text.dtype == np.float16 and entry.text.shape == (N, DIM)
    np.testing.assert_allclose(entry.image.astype(np.float64), normalised(image), atol=2e-3)
    np.testing.assert_allclose(entry.text.astype(np.float64), normalised(text), atol=2e-3)
    norms = np.linalg.norm(entry.image.astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)

    manifest = entry.manifest
    assert manifest["format"] == CACHE_FORMAT
    assert manifest["entry_id"] == entry.entry_id == cache.entry_id(POOL, EMBEDDER)
    assert (manifest["pool_fingerprint"], manifest["embedder_id"]) == (POOL, EMBEDDER)
    assert (manifest["n_samples"], manifest["dim"], manifest["chunk_size"]) == (N, DIM, CHUNK)
    assert manifest["dtype"] == "float16" and manifest["normalised"] is True
    assert manifest["pool"] == "synthweb"
    assert manifest["versions"]["torch"] == "x" and "numpy" in manifest["versions"]
    assert set(manifest["sha256"]) == {"image", "text"} and "created" in manifest
    assert json.loads((entry.path / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in entry.path.iterdir()) == [
        "image.npy",
        "manifest.json",
        "text.npy",
    ]
    assert not (cache.root / f"{entry.entry_id}.partial").exists()

    again, calls = compute(cache)
    assert again.hit and again.resumed_from == 0 and calls == []
    assert_same(again.entry, entry)
    loaded = cache.load(POOL, EMBEDDER)
    assert loaded is not None and loaded.entry_id == entry.entry_id


def test_default_root_is_under_selbench_home(isolated_home):
    assert EmbeddingCache().root == isolated_home / "embeddings"
    assert EmbeddingCache().load(POOL, EMBEDDER) is None


def test_entry_id_is_stable_and_safe(cache):
    first = cache.entry_id(POOL, "a/b c:d")
    assert first == cache.entry_id(POOL, "a/b c:d") and first.startswith(f"{POOL}-")
    assert "/" not in first and " " not in first
    assert cache.entry_id(POOL, "other") != first
    for bad in ("../etc", "a/b", "", ".hidden"):
        with pytest.raises(SelbenchError):
            cache.entry_id(bad, EMBEDDER)
    with pytest.raises(SelbenchError):
        cache.entry_id(POOL, "")


def test_batch_sizes_do_not_change_the_result(cache, reference):
    image, text = make_data()
    for i, batch in enumerate((1, 16, N)):
        result = EmbeddingCache(cache.root / str(i)).get_or_compute(
            POOL, EMBEDDER, N, producer(image, text, batch=batch), chunk_size=CHUNK
        )
        assert_same(result.entry, reference)


def test_float16_and_float64_inputs(cache):
    image, text = make_data()
    result = cache.get_or_compute(
        POOL, EMBEDDER, N, producer(image.astype(np.float16), text), chunk_size=CHUNK
    )
    np.testing.assert_allclose(result.entry.image.astype(np.float64), normalised(image), atol=3e-3)


def test_progress_reports_chunks(cache):
    seen: list[tuple[int, int]] = []
    compute(cache, progress=lambda done, n: seen.append((done, n)))
    assert seen == [(0, N), (16, N), (32, N), (40, N)]


def test_meta_may_not_override_core_fields(cache):
    for meta in ({"n_samples": 3}, {"sha256": "x"}, {"versions": "1.0"}, {"x": object()}):
        with pytest.raises(SelbenchError):
            compute(cache, meta=meta)
    assert cache.ls() == []


# -- resume ------------------------------------------------------------------------------
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    from selbench.cache import EmbeddingCache

    rng = np.random.default_rng(0)
    image, text = rng.standard_normal((40, 8)) * 3, rng.standard_normal((40, 8))

    def produce(start):
        for lo in range(start, 40, 7):
            if lo >= 35:  # samples 0..34 produced: chunks 0 and 1 complete
                os.kill(os.getpid(), signal.SIGKILL)
            yield image[lo : lo + 7], text[lo : lo + 7]

    EmbeddingCache(Path(sys.argv[1])).get_or_compute(
        sys.argv[2], sys.argv[3], 40, produce, chunk_size=16)
    """
)


def test_resume_after_kill_9(cache, reference, tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), str(cache.root), POOL, EMBEDDER], env=env, timeout=60
    )
    assert proc.returncode == -9
    entry_id = cache.entry_id(POOL, EMBEDDER)
    partial = cache.root / f"{entry_id}.partial"
    assert sorted(p.name for p in partial.glob("chunk-*")) == [
        "chunk-000000.npz",
        "chunk-000001.npz",
    ]
    assert not (cache.root / entry_id).exists()
    assert cache.load(POOL, EMBEDDER) is None
    listed = cache.ls()
    assert listed[0]["status"] == "partial" and listed[0]["done"] == 32

    result, calls = compute(cache)
    assert not result.hit and result.resumed_from == 32
    assert {start for start, _ in calls} == {32} and rows_produced(calls) == N - 32
    assert_same(result.entry, reference)
    assert not partial.exists()


def test_resume_after_exception(cache, reference):
    image, text = make_data()

    def failing(start):
        for lo in range(start, N, 5):
            if lo >= 35:
                raise RuntimeError("GPU fell over")
            yield image[lo : lo + 5], text[lo : lo + 5]

    with pytest.raises(RuntimeError, match="GPU fell over"):
        cache.get_or_compute(POOL, EMBEDDER, N, failing, chunk_size=CHUNK)
    result, calls = compute(cache)
    assert result.resumed_from == 32 and calls[0][0] == 32
    assert_same(result.entry, reference)


def interrupt(cache: EmbeddingCache, chunk_size: int = CHUNK, dim: int = DIM) -> None:
    """Leave two complete chunks of partial data behind."""
    image, text = make_data(dim=dim)

    def failing(start):
        yield image[:35], text[:35]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(POOL, EMBEDDER, N, failing, chunk_size=chunk_size)


def test_partial_for_another_request_is_discarded(cache, reference, caplog):
    interrupt(cache, chunk_size=8)
    with caplog.at_level(logging.WARNING, logger="selbench.cache"):
        result, calls = compute(cache)
    assert result.resumed_from == 0 and calls[0][0] == 0
    assert "another request" in caplog.text
    assert_same(result.entry, reference)


def test_damaged_and_stray_partial_files_are_ignored(cache, reference):
    interrupt(cache)
    partial = cache.root / f"{cache.entry_id(POOL, EMBEDDER)}.partial"
    (partial / "chunk-000001.npz").write_bytes(b"garbage")
    (partial / ".chunk-000002.npz.123.tmp").write_bytes(b"half a chunk")
    result, calls = compute(cache)
    assert result.resumed_from == 16 and calls[0][0] == 16
    assert_same(result.entry, reference)


def test_dim_change_on_resume_restarts_from_zero(cache, caplog):
    interrupt(cache, dim=4)
    with caplog.at_level(logging.WARNING, logger="selbench.cache"):
        result, calls = compute(cache)
    assert result.resumed_from == 0 and result.entry.image.shape == (N, DIM)
    # produce(32)'s first batch reveals the new dim; then everything comes from produce(0)
    assert calls[0][0] == 32 and {start for start, _ in calls[1:]} == {0}
    assert rows_produced(calls[1:]) == N and "dim 8, chunks have 4" in caplog.text


def test_only_complete_files_are_visible_while_computing(cache):
    image, text = make_data()
    entry_id = cache.entry_id(POOL, EMBEDDER)
    partial = cache.root / f"{entry_id}.partial"
    seen_chunks = []

    def watching(start):
        for lo in range(start, N, 5):
            assert not (cache.root / entry_id).exists()
            chunks = sorted(partial.glob("chunk-*.npz")) if partial.exists() else []
            for path in chunks:
                with np.load(path) as data:
                    assert data["image"].shape == data["text"].shape == (CHUNK, DIM)
            seen_chunks.append(len(chunks))
            yield image[lo : lo + 5], text[lo : lo + 5]

    cache.get_or_compute(POOL, EMBEDDER, N, watching, chunk_size=CHUNK)
    assert seen_chunks == [0, 0, 0, 0, 1, 1, 1, 2]


def test_interrupted_assembly_resumes_without_producing(cache, reference, monkeypatch):
    entry_id = cache.entry_id(POOL, EMBEDDER)

    def broken(path):
        raise OSError("disk fell off")

    monkeypatch.setattr(cache_entries, "file_sha256", broken)
    with pytest.raises(StorageError, match="cannot write embedding cache entry .* disk fell off"):
        compute(cache)
    monkeypatch.undo()
    assert not (cache.root / entry_id).exists()
    assert not list(cache.root.glob(".tmp-*"))
    (cache.root / f".tmp-{entry_id}-12345-deadbeef").mkdir()  # as left by a kill -9
    result, calls = compute(cache)
    assert calls == [] and result.resumed_from == N and not result.hit
    assert_same(result.entry, reference)
    assert not list(cache.root.glob(".tmp-*"))


# -- locking ---------------------------------------------------------------------------
def test_two_concurrent_callers_compute_once(tmp_path):
    image, text = make_data()
    calls: list = []
    results: dict = {}

    def slow(start):
        for lo in range(start, N, 10):
            calls.append((start, min(10, N - lo)))
            time.sleep(0.05)
            yield image[lo : lo + 10], text[lo : lo + 10]

    def worker(name):
        cache = EmbeddingCache(tmp_path / "emb")  # separate instances, as in two processes
        results[name] = cache.get_or_compute(POOL, EMBEDDER, N, slow, chunk_size=CHUNK)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert rows_produced(calls) == N and {start for start, _ in calls} == {0}
    assert sorted(r.hit for r in results.values()) == [False, True]
    assert_same(results[0].entry, results[1].entry)


# -- validation --------------------------------------------------------------------------
def truncate(entry: CacheEntry, tmp_path: Path) -> str:
    path = entry.path / "image.npy"
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    return "image.npy cannot be read"


def reshape(entry: CacheEntry, tmp_path: Path) -> str:
    np.save(entry.path / "image.npy", np.zeros((N, DIM + 1), np.float16))
    return "image.npy has shape"


def retype(entry: CacheEntry, tmp_path: Path) -> str:
    np.save(entry.path / "text.npy", np.asarray(entry.text, dtype=np.float32))
    return "text.npy has dtype float32"


def flip_byte(entry: CacheEntry, tmp_path: Path) -> str:
    path = entry.path / "text.npy"
    with open(path, "r+b") as fh:
        fh.seek(-3, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-3, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0x10]))
    return "text.npy sha256 does not match"


def foreign(entry: CacheEntry, tmp_path: Path) -> str:
    other = EmbeddingCache(tmp_path / "other")
    result, _ = compute(other, data=make_data(seed=1), embedder="another-embedder")
    shutil.rmtree(entry.path)
    shutil.copytree(result.entry.path, entry.path)
    return "manifest entry_id"


def other_embedder(entry: CacheEntry, tmp_path: Path) -> str:
    manifest = json.loads((entry.path / "manifest.json").read_text())
    manifest["embedder_id"] = "another-embedder"
    (entry.path / "manifest.json").write_text(json.dumps(manifest))
    return "manifest embedder_id is 'another-embedder'"


def no_manifest(entry: CacheEntry, tmp_path: Path) -> str:
    (entry.path / "manifest.json").write_text("{not json")
    return "manifest.json is missing or unreadable"


def no_text(entry: CacheEntry, tmp_path: Path) -> str:
    (entry.path / "text.npy").unlink()
    return "text.npy is missing"


DAMAGES = [truncate, reshape, retype, flip_byte, foreign, other_embedder, no_manifest, no_text]


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__ for d in DAMAGES])
def test_damaged_entry_is_detected_and_recomputed(damage, cache, reference, tmp_path, caplog):
    first, _ = compute(cache)
    problem = damage(first.entry, tmp_path)
    with caplog.at_level(logging.WARNING, logger="selbench.cache"):
        result, calls = compute(cache)
    assert problem in caplog.text and first.entry.entry_id in caplog.text
    assert not result.hit and calls[0][0] == 0 and rows_produced(calls) == N
    assert_same(result.entry, reference)
    assert cache.load(POOL, EMBEDDER) is not None


@pytest.mark.parametrize(
    "damage", [truncate, flip_byte, other_embedder], ids=lambda damage: damage.__name__
)
def test_load_removes_a_damaged_entry(damage, cache, tmp_path, caplog):
    first, _ = compute(cache)
    problem = damage(first.entry, tmp_path)
    with caplog.at_level(logging.WARNING, logger="selbench.cache"):
        assert cache.load(POOL, EMBEDDER) is None
    assert problem in caplog.text
    assert not first.entry.path.exists() and cache.ls() == []


def age(entry: CacheEntry, seconds: float = 3600) -> None:
    past = time.time() - seconds
    for path in entry.path.iterdir():
        os.utime(path, (past, past))


def test_sha256_is_memoised_for_unchanged_files(cache, tmp_path, monkeypatch):
    first, _ = compute(cache)
    age(first.entry)
    assert cache.load(POOL, EMBEDDER) is not None  # hashes and memoises
    memo = json.loads((cache.root / ".sha256-memo.json").read_text())
    assert len(memo) == 2

    def no_hashing(path):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(cache_entries, "file_sha256", no_hashing)
    assert cache.load(POOL, EMBEDDER) is not None
    monkeypatch.undo()

    flip_byte(first.entry, tmp_path)  # changes mtime: the memo no longer applies
    assert cache.load(POOL, EMBEDDER) is None


def test_fresh_files_are_not_memoised(cache):
    compute(cache)
    assert cache.load(POOL, EMBEDDER) is not None
    assert not (cache.root / ".sha256-memo.json").exists()


def test_entry_with_other_sample_count_is_recomputed(cache, caplog):
    compute(cache)
    image, text = make_data(n=N + 5)
    with caplog.at_level(logging.WARNING, logger="selbench.cache"):
        result = cache.get_or_compute(POOL, EMBEDDER, N + 5, producer(image, text))
    assert not result.hit and result.entry.image.shape == (N + 5, DIM)
    assert f"holds {N} samples" in caplog.text


# -- produce contract --------------------------------------------------------------------
def batches(*shapes, bad=None):
    """A produce yielding zero batches of the given (rows, image cols, text cols) shapes."""

    def produce(start):
        for rows, image_cols, text_cols in shapes:
            image = np.ones((rows, image_cols))
            if bad is not None:
                image[-1, 0] = bad
            yield image, np.ones((rows, text_cols))

    return produce


CONTRACT_BREAKS = {
    "columns_change": (batches((20, DIM, DIM), (20, DIM + 1, DIM + 1)), "columns"),
    "text_dim_differs": (batches((40, DIM, DIM + 2)), "same dim"),
    "row_mismatch": (lambda s: iter([(np.ones((40, DIM)), np.ones((39, DIM)))]), "rows"),
    "too_many": (batches((20, DIM, DIM), (21, DIM, DIM)), "more than n_samples"),
    "too_few": (batches((20, DIM, DIM), (19, DIM, DIM)), "expected n_samples=40"),
    "nan": (batches((40, DIM, DIM), bad=np.nan), "non-finite"),
    "inf": (batches((40, DIM, DIM), bad=np.inf), "non-finite"),
    "overflow": (batches((40, DIM, DIM), bad=1e300), "non-finite"),
    "not_a_pair": (lambda s: iter([np.ones((40, DIM))]), "pairs"),
    "ints": (lambda s: iter([(np.ones((40, DIM), int), np.ones((40, DIM)))]), "float"),
    "one_dimensional": (lambda s: iter([(np.ones(40), np.ones(40))]), "2-d"),
}


@pytest.mark.parametrize("name", list(CONTRACT_BREAKS))
def test_produce_contract_violations(name, cache):
    produce, message = CONTRACT_BREAKS[name]
    with pytest.raises(SelbenchError, match=message) as raised:
        cache.get_or_compute(POOL, EMBEDDER, N, produce, chunk_size=CHUNK)
    assert EMBEDDER in str(raised.value)
    assert cache.load(POOL, EMBEDDER) is None
    assert cache.ls() == []  # partial data is discarded too


def test_nan_message_names_embedder_and_sample(cache):
    with pytest.raises(SelbenchError, match=r"'clip-x'.*sample 39"):
        cache.get_or_compute(POOL, "clip-x", N, batches((40, DIM, DIM), bad=np.nan))


# -- ls / info / rm ----------------------------------------------------------------------
def test_ls_info_rm(cache):
    assert cache.ls() == []
    first, _ = compute(cache)
    interrupt_cache = EmbeddingCache(cache.root)
    image, text = make_data()

    def failing(start):
        yield image[:20], text[:20]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupt_cache.get_or_compute(POOL, "second", N, failing, chunk_size=CHUNK)

    listed = {row["entry_id"]: row for row in cache.ls()}
    complete, partial = listed[first.entry.entry_id], listed[cache.entry_id(POOL, "second")]
    assert complete["status"] == "complete" and complete["embedder_id"] == EMBEDDER
    assert complete["size_mb"] > 0 and complete["path"] == str(first.entry.path)
    assert partial["status"] == "partial" and partial["done"] == 16
    assert partial["n_samples"] == N and partial["embedder_id"] == "second"

    info = cache.info(first.entry.entry_id)
    assert info["n_samples"] == N and set(info["files"]) == {
        "image.npy",
        "manifest.json",
        "text.npy",
    }
    assert cache.info(partial["entry_id"])["status"] == "partial"

    for bad in ("nope", "../emb", "", f"{first.entry.entry_id}.partial"):
        with pytest.raises(ConfigError, match="selbench cache ls"):
            cache.info(bad)
        with pytest.raises(ConfigError, match="no cache entry"):
            cache.rm(bad)

    cache.rm(partial["entry_id"])
    cache.rm(first.entry.entry_id)
    assert cache.ls() == []
    with pytest.raises(ConfigError):
        cache.rm(first.entry.entry_id)
    assert compute(cache)[0].hit is False


# -- several ranks -----------------------------------------------------------------------
class ThreadRanks:
    """Ranks played by threads of this process, exchanging values through a barrier."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots: list = [None] * world_size

    def ranks(self, rank: int) -> cache_mod.Ranks:
        def all_gather(value):
            self.slots[rank] = value
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out

        return cache_mod.Ranks(rank, self.world_size, all_gather)

    def run(self, root: Path, produce_for, **kwargs) -> list:
        """Call get_or_compute on every rank; the results or exceptions, in rank order."""
        outcomes: list = [None] * self.world_size

        def work(rank):
            try:
                outcomes[rank] = EmbeddingCache(root).get_or_compute(
                    POOL, EMBEDDER, N, produce_for(rank), ranks=self.ranks(rank), **kwargs
                )
            except BaseException as exc:
                outcomes[rank] = exc

        threads = [threading.Thread(target=work, args=(r,)) for r in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        return outcomes


def test_rank_chunks_split_every_chunk_once():
    for total in (1, 2, 7, 10):
        for world in (1, 2, 3, 4, 16):
            shares = [cache_mod.rank_chunks(r, world, total) for r in range(world)]
            assert [i for share in shares for i in share] == list(range(total))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_ranks_write_the_same_entry_as_one_process(world_size, tmp_path, reference):
    image, text = make_data()
    calls: dict[int, list] = {r: [] for r in range(world_size)}
    results = ThreadRanks(world_size).run(
        tmp_path / "emb",
        lambda r: producer(image, text, batch=5, calls=calls[r]),
        chunk_size=8,
    )
    single = EmbeddingCache(tmp_path / "one").get_or_compute(
        POOL, EMBEDDER, N, producer(image, text), chunk_size=8
    )
    for result in results:
        assert isinstance(result, cache_mod.CacheResult) and not result.hit
        assert_same(result.entry, single.entry)
    path = results[0].entry.path
    for name in ("image.npy", "text.npy"):
        assert (path / name).read_bytes() == (single.entry.path / name).read_bytes()
    # each rank produced only its own share (40 rows in 5 chunks of 8), from its first sample
    for rank in range(world_size):
        share = cache_mod.rank_chunks(rank, world_size, 5)
        if len(share):
            assert calls[rank][0][0] == share.start * 8
            assert rows_produced(calls[rank]) >= len(share) * 8
    assert not list((tmp_path / "emb").glob("*.partial"))
    again = ThreadRanks(world_size).run(tmp_path / "emb", lambda r: producer(image, text))
    assert all(r.hit for r in again)


def test_a_failed_rank_fails_every_rank_and_the_rerun_resumes(tmp_path, reference):
    image, text = make_data()

    def produce_for(rank):
        def produce(start):
            for lo in range(start, N, 4):
                if rank == 1 and lo >= 28:
                    raise RuntimeError("rank 1 lost its GPU")
                yield image[lo : lo + 4], text[lo : lo + 4]

        return produce

    outcomes = ThreadRanks(2).run(tmp_path / "emb", produce_for, chunk_size=8)
    assert isinstance(outcomes[1], RuntimeError)
    assert isinstance(outcomes[0], SelbenchError) and "rank 1" in str(outcomes[0])
    cache = EmbeddingCache(tmp_path / "emb")
    assert cache.load(POOL, EMBEDDER) is None
    assert cache.ls()[0]["status"] == "partial"
    # rank 0's share (chunks 0-1) and rank 1's first chunk (2) survive; chunk 3, 4 missing
    calls: dict[int, list] = {0: [], 1: []}
    results = ThreadRanks(2).run(
        tmp_path / "emb", lambda r: producer(image, text, calls=calls[r]), chunk_size=8
    )
    assert calls[0] == [] and calls[1][0][0] == 24
    assert [r.resumed_from for r in results] == [24, 24]  # the ranks' total, on each
    assert_same(results[0].entry, reference)


def test_one_process_fills_the_gaps_a_rank_left(cache, reference):
    """Chunks written by ranks need not be a prefix: a single process computes only the
    missing ones, one produce call per run of missing chunks."""
    image, text = make_data()
    ThreadRanks(3).run(cache.root, lambda r: producer(image, text), chunk_size=8)
    entry = cache.load(POOL, EMBEDDER)
    partial = cache.root / f"{entry.entry_id}.partial"
    partial.mkdir()
    spec = {
        "format": CACHE_FORMAT,
        "entry_id": entry.entry_id,
        "pool_fingerprint": POOL,
        "embedder_id": EMBEDDER,
        "n_samples": N,
        "chunk_size": 8,
        "dim": DIM,
    }
    (partial / "partial.json").write_text(json.dumps(spec))
    for index in (0, 2, 4):  # chunks 1 and 3 missing
        rows = slice(index * 8, index * 8 + 8)
        cache_chunks._write_chunk(
            partial / cache_mod.chunk_name(index), entry.image[rows], entry.text[rows]
        )
    shutil.rmtree(entry.path)
    calls: list = []
    result = cache.get_or_compute(
        POOL, EMBEDDER, N, producer(image, text, batch=3, calls=calls), chunk_size=8
    )
    assert sorted({start for start, _ in calls}) == [8, 24]
    assert result.resumed_from == 24
    assert_same(result.entry, reference)


def test_ranks_that_disagree_on_the_request_stop(tmp_path):
    image, text = make_data()
    group = ThreadRanks(2)
    outcomes: list = [None, None]

    def work(rank):
        try:
            EmbeddingCache(tmp_path / "emb").get_or_compute(
                POOL,
                EMBEDDER,
                N,
                producer(image, text),
                chunk_size=8 + rank,
                ranks=group.ranks(rank),
            )
        except BaseException as exc:
            outcomes[rank] = exc

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for outcome in outcomes:
        assert isinstance(outcome, SelbenchError) and "chunk_size" in str(outcome)
