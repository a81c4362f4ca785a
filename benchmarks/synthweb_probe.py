"""Does an embedder see shape and colour? Linear probes on SynthWeb's ground truth.

Embeds a SynthWeb pool through the cache (a hit when it is already there), keeps the
images with exactly one object, and fits a logistic regression (scikit-learn) from the
image embedding to the object's shape and, separately, to its colour, on the first 80%
of those images in pool order; it prints held-out accuracy beside the majority-class rate.
A probe at the majority rate means the embedding carries no linearly readable trace of
that attribute -- which bounds what any method built on it (CLIP-score, SemDeDup,
TL;DR's captioner started from the proxy) can learn about it.

    SELBENCH_HOME=... python benchmarks/synthweb_probe.py                      # proxy
    SELBENCH_HOME=... python benchmarks/synthweb_probe.py --embedder proxy:/path/scale.yaml
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
from _synthweb import embed_with_ground_truth
from sklearn.linear_model import LogisticRegression


def probe(features: np.ndarray, labels: list[str], train_fraction: float = 0.8) -> tuple:
    """(held-out accuracy, majority-class rate on the held-out part) of a linear probe."""
    y = np.asarray(labels)
    cut = int(len(y) * train_fraction)
    clf = LogisticRegression(max_iter=2000).fit(features[:cut], y[:cut])
    majority = Counter(y[:cut]).most_common(1)[0][0]
    return clf.score(features[cut:], y[cut:]), float(np.mean(y[cut:] == majority))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="synthweb", help="a SynthWeb pool spec")
    parser.add_argument("--embedder", default="proxy", help="embedder spec (as for selbench)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    view, truth, found = embed_with_ground_truth(parser, args.pool, [args.embedder], args.device)
    embeddings = found[args.embedder]
    rows, shapes, colours = [], [], []
    for i, uid in enumerate(view.uids):
        objects = truth[uid]["scene"]["objects"]
        if len(objects) == 1:
            rows.append(i)
            shapes.append(objects[0]["shape"])
            colours.append(objects[0]["colour"])
    features = np.asarray(embeddings.image[rows], dtype=np.float32)
    print(f"pool: {args.pool}, embedder: {args.embedder} ({embeddings.embedder_id})")
    print(f"single-object images: {len(rows)} (probe trained on 80%, scored on 20%)")
    for name, labels in (("shape", shapes), ("colour", colours)):
        accuracy, majority = probe(features, labels)
        print(f"{name:7s} probe accuracy {accuracy:.3f}   majority class {majority:.3f}")


if __name__ == "__main__":
    main()
