"""Clustering-based selection at scale: time and peak memory against raw faiss k-means.

Runs the clustering step of each clustering-based strategy -- prototypes (Sorscher et
al.), SemDeDup (Abbas et al.) and TL;DR's stage 2 (Wang et al.) -- on ``--n`` x ``--dim``
embeddings, and beside each, raw faiss k-means (``faiss.Kmeans``: train, then assign
every point) with the same k, iterations and metric on the same data. The embeddings
are a seeded Gaussian mixture, L2-normalised and stored as float16 in an ``.npy`` file
that every step memory-maps, as it would a cache entry.

A strategy's step is what its ``select`` does with the embeddings, by the plugin's own
functions, up to the chosen indices (building uid lists and the Selection record is
left out): prototypes: unit rows, spherical k-means, distance to the prototype, top
scores; SemDeDup: unit rows, spherical k-means, per-cluster duplicate scores, epsilon,
exact budget; TL;DR: the index vectors (here: the embeddings) as float32, k-means,
quotas, distance to the centre, per-cluster picks. k and the iterations are each
strategy's defaults (scaled to the pool as the strategy scales them); ``--max-niter``
caps the iterations of both sides, which makes the time ratio an upper bound (k-means is
the part that grows with iterations).

Every step runs in a fresh Python process that imports what it needs, maps the data and
reports its seconds (after the imports) and the peak RSS it adds to what the process held
before it started (``getrusage``; mapped file pages count once read). The imports alone
(the plugins bring torch) take about 0.9 GiB, whatever the pool's size. Raw k-means and
the strategy alternate, ``--repeats`` times, so a slow spell of a shared machine hits
both; the ratios printed are medians of the paired ratios. Goals: time <= 1.5x raw
k-means, peak RSS <= 2x the embeddings' float16 size.

    python benchmarks/cluster_scale.py                      # quick: 200k x 256
    python benchmarks/cluster_scale.py --n 1000000          # the documented run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STRATEGIES = ("prototypes", "semdedup", "tldr")
BUDGET = 0.25
SEED = 0


# -- data --------------------------------------------------------------------------------
def make_embeddings(path: Path, n: int, dim: int, components: int, seed: int) -> None:
    """A Gaussian mixture of ``components`` unit-norm centres with spread 0.5/sqrt(dim),
    rows L2-normalised, written as a float16 ``.npy`` in blocks (never all in float32)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((components, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.dirichlet(np.full(components, 0.5))  # unequal cluster sizes, as in web data
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for lo in range(0, n, 65536):
        hi = min(lo + 65536, n)
        labels = rng.choice(components, size=hi - lo, p=weights)
        block = centres[labels] + rng.standard_normal((hi - lo, dim), dtype=np.float32) * (
            0.5 / np.sqrt(dim)
        )
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[lo:hi] = block.astype(np.float16)
    out.flush()
    del out


# -- the steps (run in a child process) ------------------------------------------------
def settings(name: str, n: int, max_niter: int | None) -> dict:
    """k, iterations and metric of a strategy's clustering at pool size ``n`` (its defaults)."""
    from selbench_plugins.prototypes import MIN_POINTS_PER_CLUSTER as PROTO_MIN
    from selbench_plugins.prototypes import PrototypesParams
    from selbench_plugins.semdedup import MIN_POINTS_PER_CLUSTER as SEMDEDUP_MIN
    from selbench_plugins.semdedup import SemDeDupParams
    from selbench_plugins.tldr import TldrParams

    from selbench.neighbours import scaled_cluster_count

    if name == "prototypes":
        p = PrototypesParams()
        k, niter, seed = scaled_cluster_count(p.clusters, n, PROTO_MIN), p.niter, SEED
        spherical = True
    elif name == "semdedup":
        p = SemDeDupParams()
        k, niter, seed = scaled_cluster_count(p.clusters, n, SEMDEDUP_MIN), p.niter, p.kmeans_seed
        spherical = True
    else:
        p = TldrParams()
        k = scaled_cluster_count(p.clusters, n, p.min_cluster_size)
        niter, seed, spherical = p.kmeans_iterations, SEED, False
    if max_niter is not None:
        niter = min(niter, max_niter)
    return {"k": k, "niter": niter, "seed": seed, "spherical": spherical}


def run_raw(x: np.ndarray, s: dict) -> None:
    """Raw faiss k-means: float32 copy of the data, train, assign every point."""
    import faiss

    data = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(
        data.shape[1],
        s["k"],
        niter=s["niter"],
        seed=s["seed"],
        spherical=s["spherical"],
        verbose=False,
        min_points_per_centroid=1,
    )
    km.train(data)
    km.index.search(data, 1)


def run_prototypes(x: np.ndarray, s: dict) -> None:
    from selbench_plugins.prototypes import select_by_score

    from selbench.neighbours import kmeans, unit_rows

    image = unit_rows(np.asarray(x))
    _, _, similarity = kmeans(
        image, s["k"], seed=s["seed"], niter=s["niter"], spherical=True, return_scores=True
    )
    scores = (1.0 - similarity).astype(np.float32)
    select_by_score(scores, int(BUDGET * len(x)), "hard")


def run_semdedup(x: np.ndarray, s: dict) -> None:
    from selbench_plugins.semdedup import choose_epsilon, exact_budget, kept_mask, semdedup_scores

    from selbench.neighbours import kmeans, unit_rows

    image = unit_rows(np.asarray(x))
    centroids, assignment = kmeans(image, s["k"], seed=s["seed"], niter=s["niter"], spherical=True)
    rng = np.random.default_rng(0)
    scores = semdedup_scores(image, centroids, assignment, "farthest", rng, normalized=True)
    budget = int(BUDGET * len(x))
    epsilon = choose_epsilon(scores, budget)
    exact_budget(scores, kept_mask(scores, epsilon), budget)


def run_tldr(x: np.ndarray, s: dict) -> None:
    from selbench_plugins.tldr.selection import (
        centre_distances,
        largest_remainder_quotas,
        pick_within_cluster,
    )

    from selbench.neighbours import cluster_members, kmeans

    n = len(x)
    rng = np.random.default_rng(SEED)
    candidates = np.arange(n)
    features = np.asarray(x)[candidates].astype(np.float32)
    centroids, assignment = kmeans(features, s["k"], seed=s["seed"], niter=s["niter"])
    sizes = np.bincount(assignment, minlength=len(centroids))
    quotas = largest_remainder_quotas(sizes, int(BUDGET * n))
    distance = np.zeros(n)
    distance[candidates] = centre_distances(features, centroids, assignment)
    members = cluster_members(candidates, assignment, len(centroids))
    chosen = [
        pick_within_cluster(group, int(quota), "uniform", rng, None, distance)
        for group, quota in zip(members, quotas, strict=True)
    ]
    np.sort(np.concatenate(chosen))


def child(step: str, strategy: str, data: str, max_niter: int | None) -> None:
    """One measurement in this (fresh) process: prints ``{"seconds", "peak_rss"}``."""
    import resource

    import faiss  # noqa: F401  (imported before timing, as the plugins are)
    import selbench_plugins.prototypes  # noqa: F401
    import selbench_plugins.semdedup  # noqa: F401
    import selbench_plugins.tldr.selection  # noqa: F401

    x = np.load(data, mmap_mode="r")
    s = settings(strategy, len(x), max_niter)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    if step == "raw":
        run_raw(x, s)
    else:
        {"prototypes": run_prototypes, "semdedup": run_semdedup, "tldr": run_tldr}[strategy](x, s)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "rss_after_imports": baseline, **s}))


def measure(step: str, strategy: str, data: Path, max_niter: int | None) -> dict:
    command = [sys.executable, __file__, "--child", step, strategy, str(data)]
    if max_niter is not None:
        command += ["--max-niter", str(max_niter)]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{step} {strategy} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="embeddings (documented: 1M)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--components", type=int, default=1000, help="mixture components")
    parser.add_argument("--repeats", type=int, default=1, help="alternating pairs per strategy")
    parser.add_argument("--max-niter", type=int, default=None, help="cap k-means iterations")
    parser.add_argument("--only", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--child", nargs=3, metavar=("STEP", "STRATEGY", "DATA"), help="internal")
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.max_niter)
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "embeddings.npy"
        started = time.perf_counter()
        make_embeddings(data, args.n, args.dim, args.components, SEED)
        size = args.n * args.dim * 2
        print(
            f"{args.n:,} x {args.dim} float16 embeddings ({size / 2**20:.0f} MiB), "
            f"{args.components} mixture components, made in {time.perf_counter() - started:.0f} s; "
            f"{os.cpu_count()} CPUs"
        )
        header = (
            f"{'strategy':<11} {'k':>6} {'niter':>5} {'raw s':>8} {'step s':>8} "
            f"{'time x':>7} {'raw RSS x':>9} {'step RSS x':>10}"
        )
        print(header)
        for strategy in args.only:
            times, raws, peaks, raw_peaks = [], [], [], []
            for _ in range(args.repeats):
                raw = measure("raw", strategy, data, args.max_niter)
                step = measure("step", strategy, data, args.max_niter)
                raws.append(raw["seconds"])
                times.append(step["seconds"] / raw["seconds"])
                peaks.append((step["peak_rss"] - step["rss_after_imports"]) / size)
                raw_peaks.append((raw["peak_rss"] - raw["rss_after_imports"]) / size)
            print(
                f"{strategy:<11} {step['k']:>6} {step['niter']:>5} {statistics.median(raws):>8.1f} "
                f"{step['seconds']:>8.1f} {statistics.median(times):>7.2f} "
                f"{statistics.median(raw_peaks):>9.2f} {statistics.median(peaks):>10.2f}",
                flush=True,
            )
        print(
            "time x: strategy step / raw faiss k-means (goal <= 1.5); RSS x: what the step adds "
            "to the process's peak RSS / the embeddings' float16 size (goal <= 2); before the "
            f"step (imports done, data mapped) a process holds "
            f"{step['rss_after_imports'] / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
