"""Selection on Ray (issue 32, part 3): the row blocks of CLIP scores, k-means assignment
and SemDeDup's clusters run as Ray tasks, and the selection is the local one, bit for bit
(docs/scale-out.md, "Selecting on Ray"). One local Ray instance of 2 worker CPUs serves
the whole module."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from selbench import executors, neighbours, toolbox
from selbench.errors import ConfigError
from selbench.executors import LocalExecutor, MappedFile, RayExecutor, make_executor, mapped_file
from selbench.run.spec import selection_hash
from selbench.strategy import SelectionContext
from selbench.testing import FixedEmbeddings, MemoryPool, _as_instance

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'selbench[ray]'")

POOL = 1200  # > 256 x 2 prototypes: k-means trains on a sample and assigns in blocks
BLOCK = 200  # rows a task: 6 blocks of the pool, so several tasks of every kind


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for the module; its session files in a folder of its own
    (short: Ray's socket paths must stay under 108 characters), removed at the end."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # The tests' own task functions (the fault hook) travel by value: the workers cannot
    # import a test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    try:
        yield
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks small enough that the pool is several tasks (the same on both executors)."""
    monkeypatch.setattr(toolbox, "ROWS_AT_ONCE", BLOCK)
    monkeypatch.setattr(neighbours, "ASSIGN_ROWS", BLOCK)
    from selbench_plugins import semdedup

    monkeypatch.setattr(semdedup, "ROWS_PER_TASK", BLOCK)


@pytest.fixture(scope="module")
def cache_files(tmp_path_factory) -> Path:
    """Image and text embeddings as the cache stores them: float16 .npy files, unit rows,
    text near its image, and a tenth of the images near-duplicates of others."""
    rng = np.random.default_rng(0)
    image = rng.standard_normal((POOL, 16)).astype(np.float32)
    copies = rng.choice(POOL, size=POOL // 10, replace=False)
    image[copies] = image[rng.choice(POOL, size=len(copies))] + 0.01 * rng.standard_normal(
        (len(copies), 16)
    ).astype(np.float32)
    text = image + rng.uniform(0.2, 2.0, (POOL, 1)).astype(np.float32) * rng.standard_normal(
        (POOL, 16)
    ).astype(np.float32)
    root = tmp_path_factory.mktemp("cache")
    for name, rows in (("image", image), ("text", text)):
        np.save(root / f"{name}.npy", toolbox.unit_rows(rows).astype(np.float16))
    return root


def _context(cache: Path, executor, work_dir: Path, seed: int = 3) -> SelectionContext:
    image, text = (np.load(cache / f"{n}.npy", mmap_mode="r") for n in ("image", "text"))
    pool = MemoryPool([f"u{i:05d}" for i in range(POOL)], [f"caption {i}" for i in range(POOL)])
    return SelectionContext(
        pool=pool,
        budget_count=POOL // 4,
        budget_fraction=0.25,
        seed=seed,
        device="cpu",
        work_dir=work_dir,
        services=FixedEmbeddings(pool, image, text),
        executor=executor,
    )


def _select(method: str, cache: Path, executor, work_dir: Path):
    return _as_instance(method).select(_context(cache, executor, work_dir))


METHODS = [
    "clip_score",
    "semdedup",
    "semdedup(keep=random)",
    "prototypes(clusters=2)",
    "prototypes(clusters=2,max_train_points=300)",
    "random",
]


@pytest.mark.parametrize("method", METHODS)
def test_selection_hash_is_the_same_on_ray_and_locally(
    method, ray_cluster, small_blocks, cache_files, tmp_path
):
    local = _select(method, cache_files, LocalExecutor(), tmp_path)
    on_ray = _select(method, cache_files, make_executor("ray"), tmp_path)
    assert len(on_ray.uids) == POOL // 4
    assert selection_hash(on_ray.uids) == selection_hash(local.uids)
    assert on_ray.scores == local.scores  # every float, not only the top of the ranking


def test_tasks_map_the_cache_files_and_put_arrays_in_memory_once(ray_cluster, cache_files):
    mapped = np.load(cache_files / "image.npy", mmap_mode="r")
    handle = mapped_file(np.asarray(mapped[10:20]))  # a view of the map, as strategies hold
    assert isinstance(handle, MappedFile) and handle.path == str(cache_files / "image.npy")
    assert np.array_equal(handle.get(), mapped[10:20])
    assert mapped_file(np.asarray(mapped)[:, :4]) is None  # not contiguous: not a file view
    executor = RayExecutor()
    assert isinstance(executor.share(np.asarray(mapped)), MappedFile)
    in_memory = executor.share(np.arange(6.0))
    assert isinstance(in_memory, executors.PutArray)
    assert executor.map(_row_sum, [(in_memory, 0, 3), (in_memory, 3, 6)]) == [3.0, 12.0]
    assert os.getpid() not in executor.map(os.getpid, [(), ()])  # in Ray's workers
    gone = MappedFile(str(cache_files / "missing.npy"), 0, "<f2", (4, 16))
    with pytest.raises(ray.exceptions.RayTaskError, match="filesystem every node"):
        executor.map(_row_sum, [(gone, 0, 2)])


def _row_sum(shared, lo: int, hi: int) -> float:
    return float(np.asarray(shared.get())[lo:hi].sum())


# -- a worker killed mid-selection -------------------------------------------------------
def _die_once(marker: str, fn, *args):
    """``fn(*args)``, but the first task to create ``marker`` (O_EXCL: exactly one does)
    kills its own worker first, as an OOM killer or a lost node would."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return fn(*args)
    os.kill(os.getpid(), signal.SIGKILL)


class DiesOnce(RayExecutor):
    """Ray, with the test's fault hook wrapped around every task function."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = str(marker)

    def map(self, fn, tasks):
        return super().map(functools.partial(_die_once, self.marker, fn), tasks)


def test_a_worker_killed_mid_selection_is_retried_and_the_selection_is_unchanged(
    ray_cluster, small_blocks, cache_files, tmp_path
):
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "killed-once"
    want = _select("semdedup", cache_files, LocalExecutor(), work)
    got = _select("semdedup", cache_files, DiesOnce(marker), work)
    assert marker.exists()  # a worker did die
    assert selection_hash(got.uids) == selection_hash(want.uids)
    assert got.scores == want.scores
    assert list(work.iterdir()) == []  # nothing half-written


# -- errors ------------------------------------------------------------------------------
def test_an_unknown_executor_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="unknown executor 'dask'.*local, ray"):
        make_executor("dask")


def test_ray_missing_is_an_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'selbench\[ray\]'"):
        make_executor("ray")


def test_importing_selbench_imports_no_ray():
    code = (
        "import sys, selbench, selbench.toolbox, selbench.executors, selbench.cli\n"
        "import selbench_plugins.clip_score, selbench_plugins.semdedup\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# -- the command line --------------------------------------------------------------------
def test_run_select_with_executor_ray_logs_the_local_selection(ray_cluster, tiny):
    from click.testing import CliRunner
    from e2e_helpers import logged_runs

    from selbench.cli import main

    pool, scale = tiny
    digests = {}
    for executor in ("local", "ray"):
        result = CliRunner().invoke(
            main,
            [
                "run", "-m", "clip_score", "-b", "0.25", "--pool", str(pool),
                "--scale", str(scale), "--stage", "select", "--experiment", "ray-cli",
                "--executor", executor,
            ],
        )  # fmt: skip
        assert result.exit_code == 0, result.output[-2000:]
    for found in logged_runs("ray-cli"):
        digests[found.data.params["executor"]] = found.data.params["selection_sha256"]
    assert set(digests) == {"local", "ray"} and digests["ray"] == digests["local"]


# -- selbench embed --executor ray ---------------------------------------------------------
CHUNK = 32  # the tiny pool's 320 samples in 10 chunks: 5 for each of 2 ranks


@pytest.fixture(scope="module")
def embedder_spec(tmp_path_factory) -> str:
    """An open_clip embedder with weights made here (no model to train)."""
    import torch

    from selbench.train import build_model

    model, _, _ = build_model("selbench-tiny", seed=7)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return f"open_clip:selbench-tiny:{path}"


def _embed(pool: Path, spec: str, *extra: str) -> str:
    from click.testing import CliRunner

    from selbench.cli import main

    args = ["embed", "--pool", str(pool), "--embedder", spec, "--chunk-size", str(CHUNK)]
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 0, result.output[-3000:]
    return result.output


def _entry_bytes(home: Path) -> dict[str, bytes]:
    from selbench.cache import EmbeddingCache

    rows = EmbeddingCache(home / "embeddings").ls()
    assert [row["status"] for row in rows] == ["complete"], rows
    entry = Path(rows[0]["path"])
    return {name: (entry / name).read_bytes() for name in ("image.npy", "text.npy")}


def _rank_1_dies_after_a_chunk(marker: str, env, rendezvous, rank, world_size, args):
    """``embed_rank``, but rank 1's first attempt kills its worker right after writing
    its first chunk (a real kill -9 at a known point; no hook in selbench itself)."""
    from selbench import embed_ray

    if rank == 1:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            import selbench.cache.chunks as chunks

            write = chunks._write_chunk

            def write_then_die(path, image, text):
                write(path, image, text)
                os.kill(os.getpid(), signal.SIGKILL)

            chunks._write_chunk = write_then_die
    return embed_ray.embed_rank(env, rendezvous, rank, world_size, args)


def test_embed_on_ray_ranks_retried_after_a_kill_write_the_local_entry(
    ray_cluster, tiny_pool, embedder_spec, isolated_home, tmp_path, monkeypatch
):
    from selbench import embed_ray

    _embed(tiny_pool, embedder_spec)  # one process, here
    want = _entry_bytes(isolated_home)
    ray_home, marker = tmp_path / "ray-home", tmp_path / "killed-once"
    monkeypatch.setenv("SELBENCH_HOME", str(ray_home))
    monkeypatch.setattr(
        embed_ray, "embed_rank", functools.partial(_rank_1_dies_after_a_chunk, str(marker))
    )
    output = _embed(tiny_pool, embedder_spec, "--executor", "ray", "--nproc-per-node", "2")
    assert marker.exists() and "computed by 2 ranks" in output
    assert _entry_bytes(ray_home) == want
    assert not list((ray_home / "embeddings").glob("**/.tmp*"))  # nothing half-written
