"""Pool indexing throughput (samples/s) with 1 worker process and with N, side by side.

Indexing a pool reads every shard once: it groups tar members into samples, decodes every
image (so an unreadable one is skipped now, not in a training run), reads captions and
json (uids), and records each image's byte offset. It runs once per pool content; this
measures how long that takes and how it scales with worker processes
(``ShardPool(workers=N)``, ``SELBENCH_INDEX_WORKERS``). Each pass starts from an empty
index home, so nothing is reused between passes; the shard fingerprint (a sha256 of every
shard, memoised) is computed before the clock starts and is not part of the figure. Passes
alternate between the worker counts, so a slow spell of a shared machine hits both.

A 200k-sample pool of 16-px images:

    selbench datasets make synthweb --n-samples 200000 --image-size 16 --out /tmp/sw200k
    python benchmarks/index_throughput.py /tmp/sw200k/pool --workers 1,2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from selbench.pools import ShardPool


def timed_index(root: Path, workers: int, memo: Path) -> tuple[float, int]:
    """Seconds to build the index of ``root`` from scratch with ``workers`` processes."""
    with tempfile.TemporaryDirectory(prefix="selbench-index-bench-") as home:
        os.environ["SELBENCH_HOME"] = home
        (Path(home) / "pool-index").mkdir()
        shutil.copy(memo, Path(home) / "pool-index" / "shard-digests.json")
        pool = ShardPool(root, workers=workers)  # fingerprint: memoised, outside the clock
        start = time.perf_counter()
        n = len(pool.index)
        return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pool", type=Path, help="a directory of img2dataset-layout shards")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="selbench-index-memo-") as home:
        os.environ["SELBENCH_HOME"] = home
        shards = ShardPool(args.pool).shards  # computes and memoises the shard digests
        memo = Path(home) / "pool-index" / "shard-digests.json"
        size_mb = sum(s.stat().st_size for s in shards) / 2**20
        print(f"pool {args.pool}: {len(shards)} shards, {size_mb:.0f} MiB, {os.cpu_count()} CPUs")
        rates: dict[int, list[float]] = {w: [] for w in counts}
        samples = 0
        for repeat in range(args.repeats):
            for workers in counts:
                seconds, samples = timed_index(args.pool, workers, memo)
                rates[workers].append(samples / seconds)
                print(
                    f"repeat {repeat}: {workers} worker(s): {samples} samples in "
                    f"{seconds:.1f} s = {samples / seconds:,.0f} samples/s"
                )
    base = statistics.median(rates[counts[0]])
    for workers in counts:
        median = statistics.median(rates[workers])
        print(
            f"median {workers} worker(s): {median:,.0f} samples/s "
            f"({median / base:.2f}x {counts[0]} worker(s)), {samples} samples"
        )


if __name__ == "__main__":
    main()
