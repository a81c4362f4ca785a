"""How well does an embedder's image-text cosine tell right pairs from noisy ones?

For each embedder spec given, embeds a SynthWeb pool through the cache (a hit when it is
already there), scores every pair by the cosine of its image and caption embeddings (the
score `clip_score` ranks by and `tldr-release` filters with), and prints against the
pool's ground truth:

- the ROC AUC of the score for "the caption describes the image" (clean and
  near-duplicate pairs) against every other pathology;
- for the top half and the top quarter by score (the release's matching filter and a
  25% `clip_score` selection): the share of the kept pairs that are noisy, and the share
  of each pathology's pairs that survive (a scorer blind to a pathology keeps 50% / 25%).

    SELBENCH_HOME=... python benchmarks/scorer_quality.py proxy proxy:scorer
"""

from __future__ import annotations

import argparse

import numpy as np
from _synthweb import embed_with_ground_truth
from selbench_plugins.clip_score import clip_scores, top_k
from sklearn.metrics import roc_auc_score

RIGHT = ("clean", "near_duplicate")  # the caption describes the image


def survival(scores: np.ndarray, pathology: np.ndarray, fraction: float) -> tuple[float, dict]:
    """(noisy share of the top ``fraction`` by score, per pathology: share of it kept),
    ranked by ``clip_score``'s own ``top_k``."""
    kept = pathology[top_k(scores, int(round(fraction * len(scores))))]
    noisy = float(np.mean(~np.isin(kept, RIGHT)))
    return noisy, {
        p: float(np.sum(kept == p) / np.sum(pathology == p)) for p in np.unique(pathology)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embedders", nargs="+", help="embedder specs (as for selbench)")
    parser.add_argument("--pool", default="synthweb", help="a SynthWeb pool spec")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    view, truth, found = embed_with_ground_truth(parser, args.pool, args.embedders, args.device)
    pathology = np.asarray([truth[uid]["pathology"] for uid in view.uids])
    right = np.isin(pathology, RIGHT)
    print(f"pool: {args.pool} ({len(view)} pairs, {np.mean(~right):.0%} noisy)")
    for spec, emb in found.items():
        scores = clip_scores(emb.image, emb.text)
        print(f"\n{spec}: AUC right vs noisy {roc_auc_score(right, scores):.3f}")
        for fraction in (0.5, 0.25):
            noisy, kept = survival(scores, pathology, fraction)
            shares = ", ".join(f"{p} {share:.0%}" for p, share in sorted(kept.items()))
            print(f"  top {fraction:.0%}: {noisy:.1%} noisy; kept of each: {shares}")


if __name__ == "__main__":
    main()
