"""Can the tiny CLIP learn SynthWeb? One short training on a SynthWeb pool, then the eval suite.

Generates (or reuses) a SynthWeb dataset with the given config overrides, trains a model
on the whole pool (or on its clean samples only) with selbench's own training loop
(:func:`selbench.train.train_clip`) and reports what the calibration of issue 16 is about:
retrieval R@1 (mean of image->text and text->image) and zero-shot top-1 on the shape and
the colour sets, plus the training time. Each result is also appended as a JSON line to
``--log``, so a grid of settings can be compared afterwards.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/synthweb_calibrate.py \\
        --synthweb n_samples=16000 --model selbench-tiny --set lr=2e-3 --samples 40000

``--model`` is an architecture name (open_clip's or ``configs/models/``) or a path to an
open_clip model JSON; ``--set KEY=VALUE`` overrides fields of the scale (``--scale``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import open_clip
import torch
import yaml

from selbench.configs import ScaleConfig, find_config, load_yaml_model
from selbench.evaluate import evaluate
from selbench.pools import ensure_synthweb, resolve_pool
from selbench.train import build_model, build_training_data, train_clip


def _pairs(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthweb", nargs="*", default=[], help="SynthWebConfig KEY=VALUE")
    parser.add_argument("--scale", default="tiny", help="scale name or YAML (the recipe)")
    parser.add_argument("--set", nargs="*", default=[], help="scale field overrides KEY=VALUE")
    parser.add_argument("--model", default=None, help="architecture name or open_clip JSON path")
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples seen (default: pool size x the scale's epochs)",
    )
    parser.add_argument("--clean-only", action="store_true", help="train on clean samples only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="free text stored with the result")
    parser.add_argument("--log", default="synthweb_calibrate.jsonl", help="JSON-lines results")
    args = parser.parse_args()

    overrides = _pairs(args.synthweb)
    scale = load_yaml_model(find_config("scales", args.scale), ScaleConfig)
    # validated, so "1e-3" (a string to YAML 1.1) becomes a float and typos fail
    scale = ScaleConfig.model_validate({**scale.model_dump(), **_pairs(args.set)})
    model_name = args.model or scale.model
    if model_name.endswith(".json"):
        open_clip.add_model_config(Path(model_name))
        model_name = Path(model_name).stem

    t0 = time.perf_counter()
    root = ensure_synthweb(overrides)
    resolved = resolve_pool(str(root))
    pool = resolved.pool
    generate_s = time.perf_counter() - t0
    uids = None
    if args.clean_only:
        truth = pool.ground_truth()
        uids = [u for u in pool.uids if truth[u]["pathology"] == "clean"]
    torch.manual_seed(args.seed)
    model, preprocess, tokenizer = build_model(model_name, args.seed)
    captions = dict(zip(pool.uids, pool.captions, strict=True))
    data = build_training_data(pool.iter_images(uids), captions, preprocess, tokenizer)
    samples = args.samples or int(round(len(pool) * scale.epochs))
    trained = train_clip(model, data, scale, samples, args.seed)
    metrics = evaluate(model, resolved.eval_sets, preprocess, tokenizer, scale.eval_batch_size)
    result = {
        "tag": args.tag,
        "synthweb": overrides,
        "model": model_name,
        "scale": {k: v for k, v in scale.model_dump().items() if k in _pairs(args.set)},
        "samples_seen": trained.samples_seen,
        "train_size": len(data),
        "seed": args.seed,
        "R1": round(metrics["retrieval/mean_R1"], 4),
        "shape": round(metrics["shape/acc1"], 4),
        "colour": round(metrics["colour/acc1"], 4),
        "train_s": round(trained.seconds, 1),
        "generate_s": round(generate_s, 1),
        "final_loss": round(trained.final_loss, 3),
    }
    line = json.dumps(result)
    print(line)
    with open(args.log, "a") as fh:
        fh.write(line + "\n")


if __name__ == "__main__":
    main()
