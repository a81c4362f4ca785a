"""How well T-MARS's offline text detector finds SynthWeb's rendered text.

Plans a SynthWeb pool with the text-in-image pathology (no files written), renders every
image and runs ``selbench_plugins.tmars.TextDetector`` on it. Prints, per pathology, the
share of images with at least one detected text box (recall on ``text_in_image``, false
positives elsewhere), the share of the signs' ink pixels the boxes cover, and the time
per image.

    python benchmarks/tmars_detector.py --n-samples 4000 --rate 0.10
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
from selbench_plugins.tmars import TextDetector

from selbench.synthweb import SynthWebConfig
from selbench.synthweb.generate import plan_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=4000)
    parser.add_argument("--rate", type=float, default=0.10, help="rate_text_in_image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-edge-fill", type=float, default=0.4)
    args = parser.parse_args()
    config = SynthWebConfig(
        seed=args.seed,
        n_samples=args.n_samples,
        rate_text_in_image=args.rate,
        n_reasoning_train=0,
        n_reasoning_test=0,
    )
    detector = TextDetector(min_edge_fill=args.min_edge_fill)
    found, total, covered = Counter(), Counter(), []
    seconds = 0.0
    for sample in plan_pool(config):
        image = sample.render(config.image_size)
        started = time.perf_counter()
        boxes = detector.boxes(image)
        seconds += time.perf_counter() - started
        total[sample.pathology] += 1
        found[sample.pathology] += bool(boxes)
        if sample.pathology == "text_in_image":
            top, bottom = sample.extra["sign_rows"]
            ink = image[top:bottom].mean(axis=-1) < 128
            mask = np.zeros(image.shape[:2], dtype=bool)
            for x0, y0, x1, y1 in boxes:
                mask[y0:y1, x0:x1] = True
            covered.append((mask[top:bottom] & ink).sum() / max(1, ink.sum()))
    print(f"SynthWeb seed {args.seed}, {args.n_samples} images, rate_text_in_image {args.rate}")
    print(f"{'pathology':<18}{'images':>8}{'text found':>12}")
    for name in sorted(total):
        print(f"{name:<18}{total[name]:>8}{found[name] / total[name]:>12.1%}")
    print(f"ink of the signs inside detected boxes: {np.mean(covered):.1%} (mean over signs)")
    print(f"detector time: {1000 * seconds / sum(total.values()):.2f} ms per image")


if __name__ == "__main__":
    main()
