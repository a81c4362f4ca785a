"""Materialize throughput (images/s) as a ratio to a plain copy of the same bytes.

The materialize stage (``selbench.materialize``) writes every selected sample of a pool
into new webdataset shards: it looks each uid up in the pool index, reads the image
bytes at their recorded offset, and writes them with the training caption and a json
into fixed-size shards, in parallel over processes. Its floor is copying those bytes.
So this script materializes a whole pool (every uid, hence the same image bytes as the
pool's shards) and, side by side in the same process, copies the pool's shard files
with ``shutil.copyfile``; each repeat runs both back to back, alternating which goes
first, and prints images/s for each and their ratio (materialize / copy; 1.0 = as fast
as a copy). The last line is the median ratio per worker count.

    python benchmarks/materialize_throughput.py                      # 100k-sample pool
    python benchmarks/materialize_throughput.py --n-samples 20000 --repeats 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from selbench.materialize import materialize
from selbench.pools import ensure_synthweb
from selbench.pools.shards import ShardPool


def copy_pool(pool: ShardPool, out: Path) -> float:
    out.mkdir()
    t0 = time.perf_counter()
    for shard in pool.shards:
        shutil.copyfile(shard, out / shard.name)
    return time.perf_counter() - t0


def materialize_pool(pool: ShardPool, out: Path, workers: int, shard_size: int) -> float:
    uids, captions = pool.uids, pool.captions
    t0 = time.perf_counter()
    materialize(pool, uids, captions, captions, out, "bench", shard_size, workers)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=100_000, help="SynthWeb pool size")
    parser.add_argument("--pool", default=None, help="a pool directory of shards instead")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--shard-size", type=int, default=10_000)
    args = parser.parse_args()

    if args.pool:
        pool = ShardPool(args.pool)
    else:
        root = ensure_synthweb({"n_samples": args.n_samples})
        pool = ShardPool(root / "pool")
    n = len(pool)  # indexes the pool once (cached), outside the timings
    size_mb = sum(s.stat().st_size for s in pool.shards) / 2**20
    print(f"pool: {n} samples in {len(pool.shards)} shards, {size_mb:.0f} MB ({pool.root})")
    ratios: dict[int, list[float]] = {}
    for repeat in range(args.repeats):
        for workers in [int(w) for w in args.workers.split(",")]:
            with tempfile.TemporaryDirectory(dir=pool.root.parent) as tmp:
                tmp_path = Path(tmp)
                if repeat % 2 == 0:
                    copy_s = copy_pool(pool, tmp_path / "copy")
                    mat_s = materialize_pool(pool, tmp_path / "subset", workers, args.shard_size)
                else:
                    mat_s = materialize_pool(pool, tmp_path / "subset", workers, args.shard_size)
                    copy_s = copy_pool(pool, tmp_path / "copy")
            ratio = copy_s / mat_s
            ratios.setdefault(workers, []).append(ratio)
            print(
                f"repeat {repeat} workers {workers}: materialize {n / mat_s:,.0f} images/s "
                f"({mat_s:.2f} s), plain copy {n / copy_s:,.0f} images/s ({copy_s:.2f} s), "
                f"ratio {ratio:.3f}"
            )
    for workers, values in ratios.items():
        print(
            f"median ratio materialize/copy, {workers} worker(s): {statistics.median(values):.3f}"
        )


if __name__ == "__main__":
    main()
