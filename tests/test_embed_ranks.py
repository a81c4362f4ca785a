"""`selbench embed --nproc-per-node N`: torchrun ranks (gloo, CPU) sharing one cache entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from selbench.cache import EmbeddingCache, rank_chunks
from selbench.train import build_model

CHUNK = 32  # the tiny pool's 320 samples in 10 chunks: 5 per rank


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """An open_clip embedder with weights made here (no proxy to train)."""
    model, _, _ = build_model("selbench-tiny", seed=7)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return f"open_clip:selbench-tiny:{path}"


def _env(home: Path) -> dict:
    return dict(os.environ, SELBENCH_HOME=str(home), COLUMNS="200")


def _embed_args(pool: Path, spec: str) -> list[str]:
    return ["embed", "--pool", str(pool), "--embedder", spec, "--chunk-size", str(CHUNK)]


def _selbench(home: Path, args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "selbench.cli", *args],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _entry(home: Path) -> Path:
    rows = EmbeddingCache(home / "embeddings").ls()
    assert [row["status"] for row in rows] == ["complete"], rows
    return Path(rows[0]["path"])


def _manifest_without_time(entry: Path) -> dict:
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest.pop("created")
    return manifest


def _assert_same_entry(entry: Path, reference: Path) -> None:
    for name in ("image.npy", "text.npy"):
        assert (entry / name).read_bytes() == (reference / name).read_bytes(), name
    assert _manifest_without_time(entry) == _manifest_without_time(reference)


@pytest.fixture(scope="module")
def one_process_entry(tiny_pool, spec, tmp_path_factory):
    home = tmp_path_factory.mktemp("one")
    _selbench(home, _embed_args(tiny_pool, spec))
    return _entry(home)


def _processes_with_home(home: Path) -> list[int]:
    """Live processes started for ``home`` (ranks, torchrun, decoding helpers)."""
    marker = f"SELBENCH_HOME={home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ.split(b"\0") and state != "Z":
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_two_ranks_write_the_entry_one_process_writes(tiny_pool, spec, one_process_entry, tmp_path):
    proc = _selbench(tmp_path, [*_embed_args(tiny_pool, spec), "--nproc-per-node", "2"])
    assert "computed by 2 ranks" in proc.stdout
    _assert_same_entry(_entry(tmp_path), one_process_entry)


# Rank 1 kills itself with SIGKILL right after writing its second chunk: a real kill -9 at
# a known point (torchrun then stops rank 0 too), with no test hook in selbench itself.
KILL_RANK_1 = textwrap.dedent(
    """
    import os, signal
    import selbench.cache.chunks as cache

    if os.environ["RANK"] == "1":
        write, written = cache._write_chunk, []

        def write_then_die(path, image, text):
            write(path, image, text)
            written.append(path)
            if len(written) == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        cache._write_chunk = write_then_die

    from selbench.cli import main

    main()
    """
)


@pytest.mark.slow
def test_a_rank_killed_midway_resumes_to_the_same_bytes(
    tiny_pool, spec, one_process_entry, tmp_path
):
    home = tmp_path / "home"
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--log-dir={tmp_path / 'torchrun-logs'}",  # not a torchelastic_* folder in /tmp
        "--standalone",
        "--nproc-per-node=2",
        str(script),
        *_embed_args(tiny_pool, spec),
    ]
    killed = subprocess.run(command, env=_env(home), capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0
    assert "Signals.SIGKILL" in killed.stderr or "-9" in killed.stderr, killed.stderr[-3000:]
    rows = EmbeddingCache(home / "embeddings").ls()
    assert [row["status"] for row in rows] == ["partial"], rows
    partial = Path(rows[0]["path"])
    rank_1 = {f"chunk-{i:06d}.npz" for i in rank_chunks(1, 2, 10)}
    written = {p.name for p in partial.glob("chunk-*.npz")}
    assert len(written & rank_1) == 2  # the kill came midway through rank 1's share
    deadline = time.time() + 20  # no rank, agent or decoding helper outlives the job
    while _processes_with_home(home) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_with_home(home) == []

    resumed = _selbench(home, [*_embed_args(tiny_pool, spec), "--nproc-per-node", "2"])
    assert "computed by 2 ranks" in resumed.stdout and "resumed" in resumed.stdout
    _assert_same_entry(_entry(home), one_process_entry)
    assert not partial.exists()
