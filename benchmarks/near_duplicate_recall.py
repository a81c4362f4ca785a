"""Can an embedder's image embeddings find SynthWeb's planted near-duplicates at all?

SemDeDup (Abbas et al., 2023, Algorithm 1) removes a point when another point of its
k-means cluster has cosine similarity above 1 - eps to it. That only finds a planted
near-duplicate if the duplicate sits closer to its original than to the pool's other
images. For each embedder spec given, this embeds a SynthWeb pool through the cache and,
for every near-duplicate in the ground truth (``duplicate_of`` names its original),
prints:

- how often the original is the duplicate's nearest neighbour among all pool images
  (exact search, faiss ``IndexFlatIP`` on unit rows), and how often it is in the top 10;
- the median cosine to the original, and the median cosine to the nearest image that is
  not the original: when the second is as high as the first, no threshold separates
  duplicates from ordinary neighbours.

    python benchmarks/near_duplicate_recall.py proxy proxy:scorer reference
"""

from __future__ import annotations

import argparse

import faiss
import numpy as np
from _synthweb import embed_with_ground_truth

from selbench.neighbours import unit_rows

NEIGHBOURS = 11  # the point itself, then 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embedders", nargs="+", help="embedder specs (as for selbench)")
    parser.add_argument("--pool", default="synthweb", help="a SynthWeb pool spec")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    view, truth, found = embed_with_ground_truth(parser, args.pool, args.embedders, args.device)
    uids = list(view.uids)
    row = {uid: i for i, uid in enumerate(uids)}
    pairs = [
        (row[uid], row[gt["duplicate_of"]])
        for uid, gt in truth.items()
        if gt["pathology"] == "near_duplicate" and gt.get("duplicate_of") in row
    ]
    if not pairs:
        parser.error(f"pool {args.pool!r} has no near-duplicates with a recorded original")
    dups, originals = (np.asarray(side) for side in zip(*pairs, strict=True))
    print(f"pool: {args.pool} ({len(uids)} pairs, {len(pairs)} planted near-duplicates)")
    print("| embedder | original is the nearest | in the top 10 | median cosine to the "
          "original | median cosine to the nearest other |")  # fmt: skip
    print("|---|---|---|---|---|")
    for spec, emb in found.items():
        x = unit_rows(np.asarray(emb.image))
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        sims, ids = index.search(x[dups], NEIGHBOURS)
        others = ids != dups[:, None]  # drop the point itself wherever it sits
        first = np.array([i[o][0] for i, o in zip(ids, others, strict=True)])
        top10 = np.array([originals[k] in ids[k][others[k]][:10] for k in range(len(dups))])
        to_original = np.einsum("ij,ij->i", x[dups], x[originals])
        not_original = others & (ids != originals[:, None])
        nearest_other = np.array(
            [s[m][0] if m.any() else np.nan for s, m in zip(sims, not_original, strict=True)]
        )
        print(
            f"| `{spec}` | {np.mean(first == originals):.1%} | {np.mean(top10):.1%} | "
            f"{np.median(to_original):.4f} | {np.nanmedian(nearest_other):.4f} |"
        )


if __name__ == "__main__":
    main()
