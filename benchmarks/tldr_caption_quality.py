"""How right are TL;DR's generated captions on SynthWeb? Reads the selection artifacts of
finished `tldr` / `tldr-release` runs and checks the generated part of every refined
caption against SynthWeb's ground-truth scene.

    SELBENCH_HOME=... python benchmarks/tldr_caption_quality.py [--experiment selbench]

Per run it prints: the share of refined captions whose generated part names the colour
of an object in the image, the shape of an object in the image (any synonym), both for
the same object, and the share naming the pool's most frequent shape -- what a captioner
that ignores the image would say. A baseline row does the same for the pool's original
captions of the same samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import pandas as pd

from selbench import tracking
from selbench.pools import resolve_pool
from selbench.run.selection_io import stored_selection
from selbench.synthweb.captions import COLOUR_SYNONYMS, SHAPE_SYNONYMS
from selbench.synthweb.scene import COLOUR_NAMES


def mentions(text: str, words: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", text) for w in words)


def judge(text: str, scene: dict, head_shape: str) -> dict[str, bool]:
    text = text.lower()
    objects = scene["objects"]
    colour = [mentions(text, COLOUR_SYNONYMS.get(o["colour"], (o["colour"],))) for o in objects]
    shape = [mentions(text, SHAPE_SYNONYMS[o["shape"]]) for o in objects]
    return {
        "colour": any(colour),
        "shape": any(shape),
        "both": any(c and s for c, s in zip(colour, shape, strict=True)),
        "head_shape": mentions(text, SHAPE_SYNONYMS[head_shape]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="selbench")
    args = parser.parse_args()
    tracking.setup(args.experiment)
    pool = resolve_pool("synthweb").pool
    truth = pool.ground_truth()
    head_shape = Counter(
        o["shape"] for t in truth.values() for o in t["scene"]["objects"]
    ).most_common(1)[0][0]
    runs = tracking.Store().finished_runs(args.experiment)
    rows = []
    for _, run in runs.iterrows():
        method = str(run.get("params.method") or "")
        if not method.startswith("tldr") or not run.get("metrics.caption_rewrites", 0):
            continue
        frame = stored_selection(run["run_id"])
        sep = "; "
        generated = [
            t[len(c) + len(sep) :] if t.startswith(c + sep) else ""
            for c, t in zip(frame["caption"], frame["train_caption"], strict=True)
        ]
        gen = [
            judge(g, truth[u]["scene"], head_shape)
            for u, g in zip(frame["uid"], generated, strict=True)
        ]
        orig = [
            judge(c, truth[u]["scene"], head_shape)
            for u, c in zip(frame["uid"], frame["caption"], strict=True)
        ]
        for source, judged in (("generated", gen), ("original", orig)):
            rows.append(
                {
                    "label": run.get("params.method_label") or method,
                    "seed": run.get("params.seed"),
                    "text": source,
                    **{k: sum(j[k] for j in judged) / len(judged) for k in judged[0]},
                }
            )
    if not rows:
        print("no finished tldr runs with refined captions")
        return
    table = pd.DataFrame(rows).sort_values(["label", "seed", "text"])
    print(f"most frequent pool shape: {head_shape}; colour vocabulary {len(COLOUR_NAMES)}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
