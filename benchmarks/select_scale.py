"""Time and memory of the select stage on DataComp-style metadata pools of growing size.

For users planning a cluster: how long selection takes and how much memory it holds per
pool sample, locally and on Ray. For every size of ``--rows`` this script

1. generates (once; reused by later invocations with the same ``--work``) a DataComp
   metadata folder: ``NAME.parquet`` (uid as 32 hex digits, url, a short text) +
   ``NAME.npz`` (``b32_img``, ``b32_txt``: 512-d float16 unit rows) pairs of
   ``--shard-rows`` rows. The features are deterministic from ``--seed``: image rows
   around ``--data-clusters`` random centres, 5% near-duplicates of another row of the
   same shard, text rows the image row plus noise of a per-row level (so CLIP scores
   spread). ``l14_*`` is left out: the runs embed with ``datacomp:b32:<folder>``;
2. fills the embedding cache from the npz files with ``selbench embed`` (timed apart:
   ``embed_s``), so the runs below find a cache hit, and runs it once more (a cache hit,
   ``verify_s``): a new entry's first load checks its arrays' sha256 and memoises it,
   which would otherwise fall on the first method measured; then reads the entry and
   the pool index once (``warm_s``), so every method starts from the same page cache;
3. for ``--executors ray``, starts a local Ray instance with ``--ray-cpus`` CPUs (``ray
   start --head --block``, its start-up timed apart: ``ray_start_s``), stopped (by its
   process, not ``ray stop``) after the size;
4. runs ``selbench run --pool <yaml> --method M --budget 0.25 --stage select --executor
   E`` for every method of ``--methods`` in a fresh subprocess with a fresh
   ``SELBENCH_RUN_HOME``, sampling every 0.2 s the RSS of the process tree: the
   selbench process, its children and, on Ray, the cluster's worker processes
   (``ray::*``; not the raylet, the GCS and the node's agents, whose size does not
   follow the pool).

Columns: ``seconds`` (wall time of the run, Python start-up included), ``rows/s``,
``tree_MiB`` (the largest sum of VmRSS over the tree), ``anon_MiB`` (the same sum of
RssAnon: memory no file backs; VmRSS also counts the pages of the memory-mapped
embedding cache a run has read, which the kernel can drop, at 2 KB a row for
clip_score's image and text rows at 512-d), ``driver_MiB`` (the selbench process's own
peak, ``VmHWM`` sampled), ``B/row`` (growth of ``anon_MiB`` per added row from the previous
size, same method and executor) and ``ray/local`` (time ratio at the same size).

semdedup and prototypes run with ``--clusters`` clusters (k-means caps it at
pool_size // 100), ``--niter`` iterations and k-means trained on a sample of
``--max-train-points`` rows: their memory may grow by that sample, not by the pool.

    python benchmarks/select_scale.py                            # 1M, 4M and 8M rows
    python benchmarks/select_scale.py --rows 20000               # quick: under 2 minutes
    python benchmarks/select_scale.py --rows 1000000 --executors local --methods clip_score

Disk: about 2 KB a row for the npz files and as much again for the cache (8M rows: 16 GB
+ 16 GB, and as much again while the cache assembles its chunks); ``--cleanup`` deletes each
size's data and cache entries once that size is measured, so the disk holds one size at a
time, and ``--work`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

DIM = 512
CHUNK = 100_000  # rows generated at once
DUPLICATES = 0.05  # fraction of rows that are near-copies of another row
METHODS = ("clip_score", "semdedup", "prototypes")
SAMPLE_S = 0.2
MIB = 1024 * 1024


# -- the data ----------------------------------------------------------------------------
def generate(root: Path, rows: int, shard_rows: int, seed: int, clusters: int) -> float:
    """The metadata folder of ``rows`` rows in ``root`` (reused when its marker matches);
    the seconds it took (0 when reused)."""
    marker = root / ".generated.json"
    wanted = {"rows": rows, "shard_rows": shard_rows, "seed": seed, "clusters": clusters}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    started = time.perf_counter()
    centres = _unit(np.random.default_rng([seed, 1]).standard_normal((clusters, DIM)))
    for shard, first in enumerate(range(0, rows, shard_rows)):
        write_shard(root, shard, first, min(shard_rows, rows - first), seed, centres)
    marker.write_text(json.dumps(wanted))
    return time.perf_counter() - started


def write_shard(
    root: Path, shard: int, first: int, rows: int, seed: int, centres: np.ndarray
) -> None:
    """One ``NAME.parquet`` + ``NAME.npz`` pair, rows ``first`` to ``first + rows``."""
    image = np.empty((rows, DIM), dtype=np.float16)
    text = np.empty((rows, DIM), dtype=np.float16)
    scene = np.empty(rows, dtype=np.int64)
    for lo in range(0, rows, CHUNK):
        rng = np.random.default_rng([seed, 2, shard, lo])
        n = min(CHUNK, rows - lo)
        scene[lo : lo + n], img, txt = features(rng, centres, n)
        image[lo : lo + n], text[lo : lo + n] = img, txt
    rng = np.random.default_rng([seed, 3, shard])
    uids = hex_uids(rng, rows)
    captions = [f"a photo of scene {c}, item {first + i}" for i, c in enumerate(scene.tolist())]
    table = pa.table(
        {
            "uid": uids,
            "url": pc.binary_join_element_wise("https://example.com/", uids, ".jpg", ""),
            "text": pa.array(captions, pa.string()),
        }
    )
    name = f"{seed:08x}{shard:024x}"  # DataComp names a pair by a 32-hex content hash
    pq.write_table(table, root / f"{name}.parquet")
    np.savez(root / f"{name}.npz", b32_img=image, b32_txt=text)


def features(rng: np.random.Generator, centres: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """(scene, image, text) of ``n`` rows: image rows near a random centre (cosine about
    0.7 to it), a ``DUPLICATES`` fraction of them near-copies of an earlier row (cosine
    about 0.9998), text rows the image row plus noise of a per-row level."""
    scene = rng.integers(0, len(centres), n)
    image = centres[scene] + np.float32(0.03) * rng.standard_normal((n, DIM), dtype=np.float32)
    copies = np.flatnonzero(rng.random(n) < DUPLICATES)
    copies = copies[copies > 0]
    source = (rng.random(len(copies)) * copies).astype(np.int64)  # an earlier row
    noise = rng.standard_normal((len(copies), DIM), dtype=np.float32)
    image[copies] = image[source] + np.float32(0.001) * noise
    scene[copies] = scene[source]
    image = _unit(image)
    level = rng.uniform(0.02, 0.08, size=(n, 1)).astype(np.float32)
    text = _unit(image + level * rng.standard_normal((n, DIM), dtype=np.float32))
    return scene, image.astype(np.float16), text.astype(np.float16)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def hex_uids(rng: np.random.Generator, n: int) -> pa.Array:
    """``n`` random uids of 32 lowercase hex digits, as DataComp's."""
    raw = np.frombuffer(rng.bytes(16 * n), dtype=np.uint8).reshape(n, 16)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    out = np.empty((n, 32), dtype=np.uint8)
    out[:, 0::2], out[:, 1::2] = digits[raw >> 4], digits[raw & 15]
    return pa.array(out.reshape(-1).view("S32")).cast(pa.string())


def pool_yaml(folder: Path, metadata: Path, rows: int) -> Path:
    path = folder / "pool.yaml"
    path.write_text(
        f"name: select-scale-{rows}\nkind: datacomp-metadata\npath: {metadata}\n"
        # Not read by a selection; required of a pool config.
        "eval: [{name: unread, task: retrieval, path: /nonexistent/eval}]\n"
    )
    return path


# -- measuring a process tree ------------------------------------------------------------
def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start of its command line) of every process readable."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read(200).replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent = int(stat[stat.rindex(b")") + 2 :].split()[1])
        found[int(entry)] = (parent, command)
    return found


def _descendants(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    """``roots`` and every process below them."""
    found, grew = set(roots), True
    while grew:
        more = {pid for pid, (parent, _) in table.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def _memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of ``pid`` in KiB; zeros when it is gone."""
    values = _status_kib(pid, "VmRSS:", "RssAnon:")
    return values["VmRSS:"], values["RssAnon:"]


def _status_kib(pid: int, *keys: str) -> dict[str, int]:
    """The fields ``keys`` of ``/proc/PID/status``, in KiB; zeros when it is gone."""
    values = dict.fromkeys(keys, 0)
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key = line.split(None, 1)[0]
                if key in values:
                    values[key] = int(line.split()[1])
    except OSError:
        pass
    return values


def _tree_kib(root: int, ray_root: int | None) -> tuple[int, int]:
    """Summed (VmRSS, RssAnon) in KiB of ``root``'s tree and of ``ray_root``'s ``ray::*``
    worker processes."""
    table = _processes()
    tree = _descendants({root}, table)
    if ray_root is not None:
        workers = _descendants({ray_root}, table)
        tree |= {p for p in workers if _is_worker(table[p][1])}
    sizes = [_memory_kib(p) for p in tree]
    return sum(s[0] for s in sizes), sum(s[1] for s in sizes)


def _is_worker(command: str) -> bool:
    """A Ray worker process (``ray::IDLE``, ``ray::call``), not one of the node's agents
    (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``)."""
    name = command.split(" ", 1)[0]
    return name.startswith("ray::") and not name.endswith("Agent")


def measure(command: list[str], env: dict[str, str], ray_root: int | None, log: Path) -> dict:
    """Run ``command``; its seconds, exit code and peaks (tree RSS, tree anonymous RSS,
    the process's own peak, ``VmHWM``), in MiB. ``ray_root``: a Ray instance's process
    whose ``ray::*`` workers count in the tree."""
    started = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    peak_rss = peak_anon = peak_own = 0
    try:
        while True:
            pid, status, _ = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            rss, anon = _tree_kib(child.pid, ray_root)
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            # VmHWM: the process's own high-water mark since its exec. Not ru_maxrss, which
            # Linux starts from this script's size at the fork (the generated data).
            peak_own = max(peak_own, _status_kib(child.pid, "VmHWM:")["VmHWM:"])
            time.sleep(SAMPLE_S)
    except BaseException:  # interrupted: the run goes too
        child.kill()
        child.wait()
        raise
    child.returncode = os.waitstatus_to_exitcode(status)
    return {
        "seconds": time.perf_counter() - started,
        "rc": child.returncode,
        "tree_mib": peak_rss / 1024,
        "anon_mib": peak_anon / 1024,
        "driver_mib": peak_own / 1024,
    }


# -- Ray -----------------------------------------------------------------------------------
class LocalRay:
    """``ray start --head --block`` with ``cpus`` CPUs in its own temp dir and port; stopped
    by terminating that process (and what it started), never by ``ray stop``."""

    def __init__(self, work: Path, cpus: int, env: dict[str, str]) -> None:
        self.port = 20000 + os.getpid() % 20000
        self.address = f"127.0.0.1:{self.port}"
        self.temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short socket paths
        started = time.perf_counter()
        command = [
            *_ray_command(),
            *("start", "--head", "--block", f"--num-cpus={cpus}", f"--port={self.port}"),
            *(f"--temp-dir={self.temp}", "--include-dashboard=false", "--disable-usage-stats"),
            f"--object-store-memory={512 * MIB}",
        ]
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: list[str] = []
        ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not ready.wait(120) or self.process.poll() is not None:
            self.stop()
            raise SystemExit("ray start failed:\n" + "".join(self.output[-40:]))
        self.start_s = time.perf_counter() - started
        (work / "ray-start.log").write_text("".join(self.output))

    def _read(self, ready: threading.Event) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if "Ray runtime started" in line:
                ready.set()
        ready.set()

    def stop(self) -> None:
        below = _descendants({self.process.pid}, _processes()) - {self.process.pid}
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for pid in below:  # what it started and left behind, by pid
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


def _ray_command() -> list[str]:
    ray = Path(sys.executable).with_name("ray")
    return [str(ray)] if ray.is_file() else ["ray"]


# -- the runs ------------------------------------------------------------------------------
def selbench_command(args: argparse.Namespace, pool: Path, metadata: Path, method: str) -> list:
    spec = f"datacomp:b32:{metadata}"
    command = [
        *(sys.executable, "-m", "selbench.cli", "run", "--pool", str(pool)),
        *("--method", method, "--budget", str(args.budget), "--stage", "select"),
        *("--seed", str(args.seed), "--device", "cpu", "-p", f"embedder={spec}"),
    ]
    if method in ("semdedup", "prototypes"):
        for key, value in (
            ("clusters", args.clusters),
            ("niter", args.niter),
            ("max_train_points", args.max_train_points),
        ):
            command += ["-p", f"{key}={value}"]
    return command


def run_size(args: argparse.Namespace, rows: int, env: dict[str, str]) -> tuple[list, dict]:
    """Every method and executor at one size: the records, and the size's own numbers."""
    folder = args.work / f"rows-{rows}"
    metadata = folder / "metadata"
    made_s = generate(metadata, rows, args.shard_rows, args.seed, args.data_clusters)
    pool = pool_yaml(folder, metadata, rows)
    spec = f"datacomp:b32:{metadata}"
    embed = [sys.executable, "-m", "selbench.cli", "embed", "--pool", str(pool), "-e", spec]
    embedded = measure([*embed, "--device", "cpu"], env, None, folder / "embed.log")
    if embedded["rc"] != 0:
        raise SystemExit(f"selbench embed failed: see {folder / 'embed.log'}")
    # The first load of a new cache entry checks its arrays' sha256 against the manifest
    # (16 GB at 8M rows) and memoises the digests; without this second `embed` (a cache
    # hit), the first method measured would pay that check and the others not.
    verified = measure([*embed, "--device", "cpu"], env, None, folder / "verify.log")
    if verified["rc"] != 0:
        raise SystemExit(f"selbench embed (the cache hit) failed: see {folder / 'verify.log'}")
    size = {"rows": rows, "generate_s": made_s, "embed_s": embedded["seconds"]}
    size["verify_s"] = verified["seconds"]
    size["warm_s"] = warm_page_cache(args.work, folder)
    records = []
    for executor in args.executors:
        ray = LocalRay(folder, args.ray_cpus, env) if executor == "ray" else None
        try:
            if ray is not None:
                size["ray_start_s"] = ray.start_s
            for method in args.methods:
                records.append(run_one(args, rows, method, executor, ray, pool, env))
        finally:
            if ray is not None:
                ray.stop()
    return records, size


def _entries(folder: Path) -> set[tuple[str, str]]:
    """(pool fingerprint, embedder id) of the cache entries ``folder``'s embed.log names."""
    log = folder / "embed.log"
    text = log.read_text() if log.is_file() else ""
    return set(re.findall(r"entry ([0-9a-f]{16})-([0-9a-f]{12})", text))


def warm_page_cache(work: Path, folder: Path) -> float:
    """Read the size's cache entry and pool index once (seconds taken), so that every
    method starts with the same page cache, as far as memory holds it: otherwise the
    first method reads from disk what an earlier size evicted and the later ones not."""
    started = time.perf_counter()
    home = work / "home"
    for pool, embedder in _entries(folder):
        paths = [*(home / "embeddings").glob(f"{pool}-{embedder}/*")]
        paths += [*(home / "pool-index").glob(f"*{pool}*/*")]
        for path in paths:
            with open(path, "rb") as handle:
                while handle.read(16 << 20):
                    pass
    return time.perf_counter() - started


def drop_size(work: Path, rows: int) -> None:
    """Delete one size's metadata folder, its cache entry and its pool index (named by the
    pool's fingerprint, the entry id's first part), and nothing of the other sizes."""
    folder = work / f"rows-{rows}"
    home = work / "home"
    for pool, embedder in _entries(folder):
        doomed = [*(home / "embeddings").glob(f"{pool}-{embedder}*")]
        doomed += [*(home / "pool-index").glob(f"*{pool}*")]
        for path in doomed:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def run_one(
    args: argparse.Namespace,
    rows: int,
    method: str,
    executor: str,
    ray: LocalRay | None,
    pool: Path,
    env: dict[str, str],
) -> dict:
    metadata = pool.parent / "metadata"
    command = [*selbench_command(args, pool, metadata, method), "--executor", executor]
    if ray is not None:
        command += ["--ray-address", ray.address]
    home = pool.parent / f"run-{method}-{executor}"
    shutil.rmtree(home, ignore_errors=True)
    log = pool.parent / f"{method}-{executor}.log"
    found = measure(command, {**env, "SELBENCH_RUN_HOME": str(home)}, _ray_pid(ray), log)
    shutil.rmtree(home, ignore_errors=True)
    if found["rc"] != 0:
        raise SystemExit(f"{method} on {executor} at {rows} rows failed: see {log}")
    record = {"rows": rows, "method": method, "executor": executor, **found}
    record["rows_per_s"] = rows / found["seconds"]
    print(_line(record), flush=True)
    return record


def _ray_pid(ray: LocalRay | None) -> int | None:
    return None if ray is None else ray.process.pid


# -- the table -------------------------------------------------------------------------------
HEADER = (
    "| rows | method | executor | seconds | rows/s | tree MiB | anon MiB | driver MiB "
    "| B/row | ray/local |"
)


def derive(records: list[dict]) -> None:
    """Fill each record's growth per row (from the previous size, same method and executor,
    anonymous RSS of the tree) and its time ratio to the local run at the same size."""
    key = {(r["rows"], r["method"], r["executor"]): r for r in records}
    sizes = sorted({r["rows"] for r in records})
    for r in records:
        smaller = [s for s in sizes if s < r["rows"]]
        before = key.get((smaller[-1], r["method"], r["executor"])) if smaller else None
        if before is not None:
            grown = (r["anon_mib"] - before["anon_mib"]) * MIB
            r["bytes_per_row"] = grown / (r["rows"] - before["rows"])
        local = key.get((r["rows"], r["method"], "local"))
        if r["executor"] == "ray" and local is not None:
            r["ray_over_local"] = r["seconds"] / local["seconds"]


def _line(r: dict) -> str:
    growth = f"{r['bytes_per_row']:.1f}" if "bytes_per_row" in r else ""
    ratio = f"{r['ray_over_local']:.2f}" if "ray_over_local" in r else ""
    return (
        f"| {r['rows']:,} | {r['method']} | {r['executor']} | {r['seconds']:.1f} "
        f"| {r['rows_per_s']:,.0f} | {r['tree_mib']:,.0f} | {r['anon_mib']:,.0f} "
        f"| {r['driver_mib']:,.0f} | {growth} | {ratio} |"
    )


def markdown(records: list[dict], sizes: list[dict], args: argparse.Namespace) -> str:
    lines = [HEADER, "|" + "---|" * 10]
    lines += [_line(r) for r in records]
    lines.append("")
    for size in sizes:
        extra = f", ray start {size['ray_start_s']:.1f} s" if "ray_start_s" in size else ""
        lines.append(
            f"- {size['rows']:,} rows: data generated in {size['generate_s']:.1f} s "
            f"(0: reused), cache filled by `selbench embed` in {size['embed_s']:.1f} s, "
            f"its first load (sha256 check) {size['verify_s']:.1f} s, "
            f"read into the page cache in {size.get('warm_s', 0.0):.1f} s{extra}"
        )
    lines.append(
        f"- semdedup/prototypes: clusters={args.clusters}, niter={args.niter}, "
        f"max_train_points={args.max_train_points}; budget {args.budget}; Ray: "
        f"{args.ray_cpus} CPUs"
    )
    return "\n".join(lines) + "\n"


def disk_usage(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--rows", default="1000000,4000000,8000000", help="pool sizes, comma-separated")
    add("--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)")
    add("--executors", default="local,ray", help="local, ray or both (default: %(default)s)")
    add("--work", type=Path, default=Path(tempfile.gettempdir()) / "selbench-select-scale")
    add("--out", type=Path, default=None, help="write NAME.json and NAME.md here")
    add(
        "--cleanup",
        action="store_true",
        help="delete each size's data and cache once measured, and --work at the end",
    )
    add("--shard-rows", type=int, default=1_000_000, help="rows per parquet/npz pair")
    add("--data-clusters", type=int, default=2000, help="centres of the generated features")
    add("--seed", type=int, default=0, help="seeds the data and the runs")
    add("--budget", type=float, default=0.25)
    add("--clusters", type=int, default=1000, help="semdedup/prototypes k-means clusters")
    add("--niter", type=int, default=20, help="semdedup/prototypes k-means iterations")
    add("--max-train-points", type=int, default=100_000, help="k-means training sample")
    add("--ray-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = parser.parse_args(argv)
    args.sizes = [int(r) for r in str(args.rows).split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    args.executors = [e for e in args.executors.split(",") if e]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A TERM (a killed job) ends the run being measured and the Ray instance too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SELBENCH_HOME": str(args.work / "home"), "PYTHONUNBUFFERED": "1"}
    # A local, single-user Ray instance: no token (Ray >= 2.5x enables token auth by default,
    # and the driver would need the token file in ~/.ray).
    env.setdefault("RAY_AUTH_MODE", "disabled")
    records, sizes = [], []
    print(HEADER, flush=True)
    try:
        for rows in args.sizes:
            found, size = run_size(args, rows, env)
            records += found
            sizes.append(size)
            if args.cleanup:  # the next size needs none of it: free the disk for it
                drop_size(args.work, rows)
        derive(records)
        table = markdown(records, sizes, args)
        print("\n" + table)
        print(f"disk used under {args.work}: {disk_usage(args.work) / 1e9:.2f} GB")
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            payload = {"records": records, "sizes": sizes, "args": _plain(vars(args))}
            args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
            args.out.with_suffix(".md").write_text(table)
    finally:
        if args.cleanup:
            shutil.rmtree(args.work, ignore_errors=True)
    return 0


def _plain(values: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


if __name__ == "__main__":
    raise SystemExit(main())
