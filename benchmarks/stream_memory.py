"""Peak memory of a whole run on a small and a large pool: streaming vs in-memory training.

A run's memory should be bounded by its buffers, not by its subset. This script runs
``selbench run --method random --budget 1.0`` (every sample selected, materialized and
trained on) on two SynthWeb pools of different sizes (16k and 256k by default) with the
``open_clip`` engine, which streams the materialized shards through open_clip_train's
webdataset loader, and, for contrast, with the ``in-memory`` engine, which decodes the
subset into one float tensor. Training length is the same on both pools (a fixed number
of samples, ``--train-samples``), so only the pool size differs. Each run is a fresh
subprocess; its peak RSS is the largest resident set of any process of the run (the
selbench process, torchrun and its workers: ``RUSAGE_CHILDREN``), printed in MiB with
the ratio large/small per engine (about 1.0 means bounded by buffers).

    python benchmarks/stream_memory.py                        # 16k and 256k pools
    python benchmarks/stream_memory.py --sizes 4000,32000 --engines open_clip
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from selbench.pools import ensure_synthweb

SCALE = """\
name: stream-memory
model: selbench-tiny
engine: {engine}
batch_size: 256
epochs: {epochs}
lr: 2.0e-3
weight_decay: 0.1
warmup_fraction: 0.1
eval_batch_size: 500
workers: 1
"""


def peak_rss_mib(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``command`` in a child; (its tree's largest peak RSS in MiB, seconds)."""
    code = (
        "import resource, subprocess, sys, time\n"
        "t0 = time.perf_counter()\n"
        "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(rc, peak, time.perf_counter() - t0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *command], capture_output=True, text=True, env=env
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"measurement failed: {out.stderr[-2000:]}")
    rc, peak_kib, seconds = out.stdout.split()
    if rc != "0":
        raise SystemExit(f"selbench run exited {rc}: {out.stderr[-3000:]}")
    return int(peak_kib) / 1024, float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16000,256000", help="SynthWeb pool sizes")
    parser.add_argument("--engines", default="open_clip,in-memory")
    parser.add_argument("--train-samples", type=int, default=12_800)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    engines = args.engines.split(",")
    peaks: dict[str, dict[int, float]] = {}
    for size in sizes:
        pool = ensure_synthweb({"n_samples": size})
        print(f"pool {size}: {pool}", flush=True)
        for engine in engines:
            with tempfile.TemporaryDirectory() as tmp:
                scale = Path(tmp) / "scale.yaml"
                scale.write_text(SCALE.format(engine=engine, epochs=args.train_samples / size))
                env = dict(os.environ, SELBENCH_RUN_HOME=str(Path(tmp) / "runs"))
                command = [sys.executable, "-m", "selbench.cli", "run", "--method", "random"]
                command += ["--budget", "1.0", "--pool", str(pool), "--scale", str(scale)]
                command += ["--engine", engine]
                peak, seconds = peak_rss_mib(command, env)
            peaks.setdefault(engine, {})[size] = peak
            print(f"pool {size:>7}, {engine:>9}: peak RSS {peak:8.0f} MiB ({seconds:.0f} s)")
    for engine, by_size in peaks.items():
        if len(by_size) >= 2:
            small, large = by_size[min(by_size)], by_size[max(by_size)]
            ratio = large / small
            print(f"{engine}: peak RSS ratio {max(by_size)}/{min(by_size)} pools = {ratio:.2f}")


if __name__ == "__main__":
    main()
