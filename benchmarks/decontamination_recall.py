"""Recall and false positives of pool-eval decontamination on planted evaluation copies.

Generates (or reuses) a SynthWeb pool with ``planted_eval_copies`` (selbench/synthweb/
planted.py), compares it with its evaluation sets as a run does (selbench/decontaminate.py),
and prints the recall on the planted copies and the false positive rate on the rest of the
pool: for each detector alone, and for the run's rule (both on one pair) over a grid of
thresholds. The numbers in docs/decontamination.md come from:

    nice -n 10 python benchmarks/decontamination_recall.py --n-samples 16000 --planted 500

(the default SynthWeb size; the reference model is built on first use, or reused).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np

from selbench import decontaminate as dc
from selbench.embedders import EmbeddingService
from selbench.pools import ensure_synthweb, resolve_pool
from selbench.progress import RichProgress
from selbench.registry import get_registry
from selbench.synthweb.planted import planted_uids


def prepared(spec: str, device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """(planted mask, pool hashes, pool embeddings, evaluation image groups)."""
    resolved = resolve_pool(spec)
    pool = resolved.pool
    planted = planted_uids(pool.ground_truth())
    mask = np.array([uid in planted for uid in pool.uids])
    with RichProgress() as progress:
        services = EmbeddingService(
            pool.strategy_view(), device, get_registry().make_embedder, progress
        )
        hashes = dc.pool_hashes(pool, progress)
        image = np.asarray(services.embeddings(dc.EMBEDDER).image)
        groups = dc.eval_images(resolved.eval_sets, services, dc.EMBEDDER, progress)
    return mask, hashes, image, groups


def flags(mask, hashes, image, groups, settings: dc.Settings) -> dict[str, np.ndarray]:
    """Each detector's verdict and the rule's, over every evaluation set together."""
    found = {name: np.zeros(len(mask), dtype=bool) for name in ("hash", "embedding", "both")}
    for group in groups:
        by_hash, by_embedding, flagged, _ = dc._flags(hashes, image, group, settings)
        found["hash"] |= by_hash
        found["embedding"] |= by_embedding
        found["both"] |= flagged
    return found


def line(flag: np.ndarray, mask: np.ndarray) -> str:
    hits, false = int(flag[mask].sum()), int(flag[~mask].sum())
    return (
        f"recall {hits / mask.sum():.4f} ({hits}/{mask.sum()}), false positives "
        f"{false / (~mask).sum():.5f} ({false}/{(~mask).sum()})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-samples", type=int, default=16000)
    parser.add_argument("--planted", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    settings = {"n_samples": args.n_samples, "planted_eval_copies": args.planted}
    root = ensure_synthweb({**settings, "seed": args.seed})
    mask, hashes, image, groups = prepared(str(root), args.device)
    eval_images = int(sum(len(g.hashes) for g in groups))
    print(json.dumps({**settings, "seed": args.seed, "eval_images": eval_images}))
    chosen = dc.Settings()
    found = flags(mask, hashes, image, groups, chosen)
    print(f"hash alone (nearest within {chosen.hash_distance} bits): {line(found['hash'], mask)}")
    print(f"embedding alone (cosine >= {chosen.cosine}): {line(found['embedding'], mask)}")
    fixed = flags(mask, hashes, image, groups, replace(chosen, cosine=0.96, margin=1.0))
    print(f"hash AND a fixed cosine >= 0.96 instead: {line(fixed['both'], mask)}")
    print(f"the rule, {chosen.label()}: {line(found['both'], mask)}")
    print("the rule over a grid (hash distance, margin):")
    for distance in (32, 36, 40, 44, 48):
        for margin in (0.002, 0.005, 0.01, 0.02):
            grid = replace(chosen, hash_distance=distance, margin=margin)
            both = flags(mask, hashes, image, groups, grid)["both"]
            print(f"  {distance:3d}  {margin:.3f}  {line(both, mask)}")


if __name__ == "__main__":
    main()
