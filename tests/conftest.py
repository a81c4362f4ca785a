from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from e2e_helpers import (
    TEST_REFERENCE_RECIPE,
    make_tiny_pool,
    make_tiny_scale,
    png_bytes,
    write_shard,
)

# -- the suite leaves nothing behind -------------------------------------------------------
# Every process the tests start inherits this mark (orphans re-parented to init included),
# and every temporary file they make through tempfile lands in a folder of this session's
# own, so the check below sees only this session's leftovers, not other users' of /tmp.
# pytest's own tmp_path folders stay in the same scratch root (see _scratch_root).
SESSION_MARK = f"selbench-tests-{os.getpid()}-{secrets.token_hex(4)}"
# Under pytest-xdist (the README's test command runs `-n 2`) each worker is a session of its
# own: the controller only hands out test files, and each worker sets its own mark and
# temporary folder here. Two workers share the cores, so each runs torch, BLAS and faiss
# (and the commands it starts) on one thread: two workers of two threads each on two cores
# spend their time waiting for each other. OMP_NUM_THREADS set by hand wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _scratch_root() -> str:
    """Where the tests' files go: ``/dev/shm`` (memory) on a host where it has 2 GiB free,
    else the temporary directory. MLflow builds each test's new sqlite store through its
    migrations, each committed with an fsync: 5-6 s a store on the development VM's disk,
    0.8 s in memory. The fsyncs buy durability across power cuts, which no test checks
    (what a process killed with ``kill -9`` wrote is in the kernel's hands already)."""
    try:
        stats = os.statvfs("/dev/shm")
    except (AttributeError, OSError):  # no /dev/shm (macOS), no statvfs (Windows)
        return tempfile.gettempdir()
    roomy = stats.f_bavail * stats.f_frsize >= 2 << 30
    usable = not stats.f_flag & os.ST_NOEXEC and os.access("/dev/shm", os.W_OK)
    return "/dev/shm" if roomy and usable else tempfile.gettempdir()


SCRATCH_ROOT = os.environ.get("PYTEST_DEBUG_TEMPROOT") or _scratch_root()
os.environ["SELBENCH_TEST_SESSION"] = SESSION_MARK
os.environ["PYTEST_DEBUG_TEMPROOT"] = SCRATCH_ROOT  # pytest's tmp_path folders
# torch keeps its compile cache in <temporary directory>/torchinductor_<user> on purpose,
# across sessions; point it where it would be anyway.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}"),
)
SESSION_TMP = Path(tempfile.mkdtemp(prefix="selbench-tests-", dir=SCRATCH_ROOT))
os.environ["TMPDIR"] = str(SESSION_TMP)
tempfile.tempdir = None  # re-read TMPDIR
#: Interpreter-lifetime helpers that end with the pytest process itself, by design.
LIFETIME_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def session_processes() -> dict[int, str]:
    """``{pid: command line}`` of the live processes this test session started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if SESSION_MARK not in (entry / "environ").read_bytes().decode(errors="replace"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, IndexError):
            continue
        if state != "Z" and not any(helper in cmdline for helper in LIFETIME_HELPERS):
            found[int(entry.name)] = cmdline
    return found


def _tree(root: Path) -> set[str]:
    """Files under ``root`` (MLflow's default artifact folder ./mlruns, say)."""
    return {str(p) for p in root.rglob("*")} if root.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def leaves_no_process_or_temporary_file_behind():
    """After the whole session, no process it started is alive, its temporary folder is
    empty, and nothing was written into the current directory (./mlruns included); the
    session's last teardown fails otherwise."""
    on_linux = sys.platform.startswith("linux")
    before = set(session_processes()) if on_linux else set()
    here = Path.cwd()
    in_cwd = _tree(here / "mlruns") | {p.name for p in here.iterdir()}
    yield
    from selbench.decoding import _close_shared

    _close_shared()  # the decoding helpers live as long as their process, by design
    problems = []
    if on_linux:
        deadline = time.monotonic() + 15  # data-loader workers notice a dead parent in 5 s
        while set(session_processes()) - before and time.monotonic() < deadline:
            time.sleep(0.2)
        left_alive = {pid: cmd for pid, cmd in session_processes().items() if pid not in before}
        problems += [f"process {pid} still running: {cmd[:300]}" for pid, cmd in left_alive.items()]
    added = (_tree(here / "mlruns") | {p.name for p in here.iterdir()}) - in_cwd
    problems += [f"written into the current directory: {here / name}" for name in sorted(added)]
    leftovers = sorted(str(p.relative_to(SESSION_TMP)) for p in SESSION_TMP.rglob("*"))
    problems += [f"temporary file left behind: {SESSION_TMP / name}" for name in leftovers[:20]]
    if problems:
        pytest.fail("the test session left things behind:\n" + "\n".join(problems))
    SESSION_TMP.rmdir()


def pytest_unconfigure(config):
    """Under xdist the controller runs no test, so the fixture above never removes its
    (empty) folder; nor does it run in a worker that was handed no test. One with leftovers
    stays."""
    with contextlib.suppress(OSError):
        SESSION_TMP.rmdir()


@pytest.fixture(scope="session")
def shared_reference_models(tmp_path_factory):
    """One folder of reference models for the whole session: the strategies that default
    to the reference model build the tiny test recipe's once, not once per test home."""
    return tmp_path_factory.mktemp("reference-models")


PHASE_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test, for fixtures that clean up after a pass."""
    report = yield
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report
    return report


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables and nothing in them, made once per worker.

    Every test's home starts with a copy (``isolated_home``): MLflow makes a new store by
    running its schema migrations one by one, about 3 s of CPU, and the suite makes a home
    for each of its 1,300 tests. A copy is the file MLflow would have made."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("mlflow-store")
    store = SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", (folder / "mlruns").as_uri())
    store.engine.dispose()
    return folder / "mlflow.db"


@pytest.fixture(autouse=True)
def isolated_home(
    request, tmp_path_factory, monkeypatch, shared_reference_models, empty_mlflow_store
):
    """Every test gets its own data home and run home; nothing touches ~/.cache. The
    reference model (selbench.reference) is the tiny test recipe's, shared by all tests.

    Like ``tmp_path`` under ``tmp_path_retention_policy = "failed"`` (pyproject.toml), the
    home of a test that passed is removed after it: the suite's homes come to 2 GB of
    checkpoints, in memory where the scratch root is ``/dev/shm``."""
    home = tmp_path_factory.mktemp("selbench-home")
    (home / "reference").symlink_to(shared_reference_models, target_is_directory=True)
    (home / "runs").mkdir()
    shutil.copyfile(empty_mlflow_store, home / "runs" / "mlflow.db")
    monkeypatch.setenv("SELBENCH_REFERENCE_RECIPE", str(TEST_REFERENCE_RECIPE))
    monkeypatch.setenv("SELBENCH_HOME", str(home))
    monkeypatch.delenv("SELBENCH_RUN_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield home
    reports = request.node.stash.get(PHASE_REPORTS, {})
    passed = "call" in reports and all(r.passed for r in reports.values())
    if passed and request.config.getini("tmp_path_retention_policy") == "failed":
        shutil.rmtree(home, ignore_errors=True)  # the reference link, not what it names


# -- tiny SynthWeb: one pool and one scale for the whole session ---------------------------
# Tests only read them (a test that damages a pool copies it first), and every cache a run
# builds from them lands in that test's own home.


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory) -> Path:
    """The tiny SynthWeb pool of e2e_helpers.TINY_POOL (320 pairs), generated once."""
    return make_tiny_pool(tmp_path_factory.mktemp("tiny-pool"))


@pytest.fixture(scope="session")
def tiny_scale(tmp_path_factory) -> Path:
    """The one-epoch training scale of e2e_helpers.TINY_SCALE."""
    return make_tiny_scale(tmp_path_factory.mktemp("tiny-scale"))


@pytest.fixture(scope="session")
def tiny(tiny_pool, tiny_scale) -> tuple[Path, Path]:
    """(tiny pool, tiny scale): what an end-to-end run needs."""
    return tiny_pool, tiny_scale


@pytest.fixture
def shard_pool_dir(tmp_path) -> Path:
    """Two shards of 6 samples: one corrupt image, one empty caption, one missing image."""
    root = tmp_path / "pool"
    first = [
        (f"00000{i:04d}", png_bytes((20 * i, 100, 50)), f"a caption {i}", {"key": f"00000{i:04d}"})
        for i in range(3)
    ]
    first[1] = ("000000001", b"\x89PNG not really an image", "broken image", {})
    second = [
        ("000010000", png_bytes(), "", {}),
        ("000010001", None, "no image here", {}),
        (
            "000010002",
            png_bytes((0, 0, 200)),
            "a blue square",
            {"synthweb": {"pathology": "clean"}},
        ),
    ]
    write_shard(root / "00000.tar", first)
    write_shard(root / "00001.tar", second)
    return root
