"""Does the scorer read? CLIP scores of each SynthWeb pathology before and after T-MARS's
masking.

For a SynthWeb pool with the text-in-image pathology (``--pool synthweb-text``), prints
per pathology the mean CLIP score (cosine of the pair's image and caption embeddings by
``--embedder``), its mean percentile among all the pool's scores, and the same two after
T-MARS masks the text it detects. CLIP-score filtering keeps text-only pairs when the
scorer has learned to read the printed words: then their percentile is high before
masking and drops after. Embeddings come from the cache ``selbench run`` uses.

    python benchmarks/tmars_scores.py --pool synthweb-text --embedder proxy:scorer
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from selbench.embedders import EmbeddingService
from selbench.pools import resolve_pool
from selbench.registry import get_registry
from selbench.strategy import SelectionContext
from selbench.toolbox import clip_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="synthweb-text")
    parser.add_argument("--embedder", default="proxy:scorer")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    pool = resolve_pool(args.pool).pool
    if not pool.has_ground_truth():
        parser.error(f"pool {args.pool!r} has no SynthWeb ground truth")
    truth = pool.ground_truth()
    view = pool.strategy_view()
    registry = get_registry()
    services = EmbeddingService(view, args.device, registry.make_embedder)
    found = services.embeddings(args.embedder)
    before = clip_scores(np.asarray(found.image), np.asarray(found.text))
    with tempfile.TemporaryDirectory() as work:
        ctx = SelectionContext(view, len(view), 1.0, 0, args.device, Path(work))
        ctx.services = services
        selection = registry.get("tmars").cls({"embedder": args.embedder}).select(ctx)
    after = np.array([selection.scores[u] for u in view.uids])
    pct_before = 100 * rankdata(before) / len(before)
    pct_after = 100 * rankdata(after) / len(after)
    rows = defaultdict(list)
    for i, uid in enumerate(view.uids):
        rows[truth[uid]["pathology"]].append(i)
    print(f"pool {args.pool} ({len(view)} pairs), embedder {args.embedder}")
    print("| pathology | pairs | score | percentile | score, masked | percentile, masked |")
    print("|---|---|---|---|---|---|")
    for name in sorted(rows):
        idx = np.asarray(rows[name])
        print(
            f"| {name} | {len(idx)} | {before[idx].mean():.3f} | {pct_before[idx].mean():.1f} "
            f"| {after[idx].mean():.3f} | {pct_after[idx].mean():.1f} |"
        )


if __name__ == "__main__":
    main()
