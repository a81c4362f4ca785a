"""How right are the reference captioner's captions? Captions held-out SynthWeb images
(clean samples of a pool generated from another seed than the reference corpus, so no
image was trained on) and checks every caption against SynthWeb's ground-truth scene.

    SELBENCH_HOME=... python benchmarks/reference_captioner_quality.py \\
        [--pool synthweb] [--images 1000] [--decoding beam|greedy|nucleus] [--device cpu]

It builds the reference captioner first if it is not cached (``selbench reference
build``; about 27 minutes on 2 CPU cores). Per attribute (colour, shape, size, position)
it prints the share of captions that state a true value (of some object of the image;
synonyms counted, tldr_caption_quality.py's word matching), the share that state any
value of that attribute, and their ratio (how often a stated value is right). The same
judge on the pool's own clean captions (each names every object's colour and shape, and
size and position only sometimes) is the reference row. Then BLEU-1..4 and CIDEr of the
generated captions against the clean captions (selbench.captioning.caption_scores; needs
Java). ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from tldr_caption_quality import mentions

from selbench.captioning import DecodeSettings, caption_scores
from selbench.pools import resolve_pool
from selbench.progress import RichProgress
from selbench.reference_captioner import reference_captioner
from selbench.synthweb.captions import (
    COLOUR_SYNONYMS,
    POSITION_PHRASES,
    SHAPE_SYNONYMS,
    SIZE_SYNONYMS,
)
from selbench.synthweb.scene import COLOUR_NAMES, POSITIONS, SIZES

ATTRIBUTES = ("colour", "shape", "size", "position")


def words(attribute: str, value: str) -> tuple[str, ...]:
    """Every way SynthWeb's captions name ``value`` of ``attribute``."""
    table = {
        "colour": COLOUR_SYNONYMS.get(value, (value,)),
        "shape": SHAPE_SYNONYMS.get(value, (value,)),
        "size": SIZE_SYNONYMS.get(value, (value,)),
        "position": POSITION_PHRASES.get(value, (value,)),
    }
    return table[attribute]


VALUES = {
    "colour": COLOUR_NAMES,
    "shape": tuple(SHAPE_SYNONYMS),
    "size": SIZES,
    "position": POSITIONS,
}


def judge(text: str, scene: dict) -> dict[str, bool]:
    """``{attr}_true``: the text names a value of ``attr`` that some object has;
    ``{attr}_stated``: it names any value of ``attr``."""
    text = text.lower()
    found: dict[str, bool] = {}
    for attribute in ATTRIBUTES:
        true = {o[attribute] for o in scene["objects"]}
        stated = {v for v in VALUES[attribute] if mentions(text, words(attribute, v))}
        found[f"{attribute}_true"] = bool(stated & true)
        found[f"{attribute}_stated"] = bool(stated)
    return found


def shares(judged: list[dict[str, bool]]) -> dict[str, float]:
    out = {}
    for attribute in ATTRIBUTES:
        true = float(np.mean([j[f"{attribute}_true"] for j in judged]))
        stated = float(np.mean([j[f"{attribute}_stated"] for j in judged]))
        out[f"{attribute}_true"] = true
        out[f"{attribute}_stated"] = stated
        out[f"{attribute}_precision"] = true / stated if stated else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="synthweb", help="a SynthWeb pool (another seed)")
    parser.add_argument("--images", type=int, default=1000, help="clean samples to caption")
    parser.add_argument("--decoding", default="beam", choices=("beam", "greedy", "nucleus"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()

    pool = resolve_pool(args.pool).pool
    if not pool.has_ground_truth():
        parser.error(f"pool {args.pool!r} has no SynthWeb ground truth")
    truth = pool.ground_truth()
    clean = [u for u in pool.uids if truth.get(u, {}).get("pathology") == "clean"]
    chosen = clean[: args.images]
    view = pool.strategy_view()
    settings = DecodeSettings(method=args.decoding)  # CLIP_benchmark's defaults for beam
    with RichProgress() as progress:
        captioner = reference_captioner(view, args.device, progress)
        images = dict(view.iter_images(set(chosen)))
        started = time.perf_counter()
        generated = captioner([images[u] for u in chosen], settings, n=1, seed=0, progress=progress)
        seconds = time.perf_counter() - started
    candidates = [options[0] for options in generated]
    references = [truth[u]["clean_caption"] for u in chosen]
    scenes = [truth[u]["scene"] for u in chosen]
    rows = {
        "generated": shares([judge(c, s) for c, s in zip(candidates, scenes, strict=True)]),
        "clean caption": shares([judge(r, s) for r, s in zip(references, scenes, strict=True)]),
    }
    print(f"reference captioner: {captioner.description} ({captioner.weights_digest[:12]})")
    print(f"{len(chosen)} clean held-out images of pool {args.pool!r}, decoding {args.decoding}, "
          f"{seconds:.0f} s")  # fmt: skip
    print(f"{'text':<14}" + "".join(f"{a + ' true/stated/prec':>30}" for a in ATTRIBUTES))
    for name, row in rows.items():
        cells = [
            f"{row[f'{a}_true']:.3f}/{row[f'{a}_stated']:.3f}/{row[f'{a}_precision']:.3f}"
            for a in ATTRIBUTES
        ]
        print(f"{name:<14}" + "".join(f"{c:>30}" for c in cells))
    scores = caption_scores(candidates, [[r] for r in references])
    print("vs clean captions: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    print("examples:")
    for c, r in list(zip(candidates, references, strict=True))[:8]:
        print(f"  generated: {c!r}\n  clean:     {r!r}")
    if args.json:
        record = {"rows": rows, "scores": scores, "images": len(chosen), "seconds": seconds,
                  "decoding": args.decoding, "captioner": captioner.weights_digest}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
