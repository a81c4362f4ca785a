"""Training speed of candidate vision towers for the `tiny` scale, side by side.

Builds the `selbench-tiny` CLIP (configs/models/selbench-tiny.json) with its vision tower
swapped for each candidate, and times full training steps on random data (batch 256,
32 px, forward + backward + AdamW, open_clip's ClipLoss) in one process, one after the
other, so the ratios hold even on a busy machine. Prints samples/s and each candidate's
speed relative to today's tower.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/tiny_tower_speed.py
"""

from __future__ import annotations

import argparse
import json
import time

import open_clip
import torch
from open_clip.loss import ClipLoss

from selbench.paths import config_dir


def candidates(vision: dict) -> dict[str, dict]:
    """Vision configs to compare (open_clip's: a list of layers is a ModifiedResNet)."""
    return {
        "ViT patch 8, width 128 (today)": vision,
        "ViT patch 4, width 96": dict(vision, patch_size=4, width=96, head_width=32),
        "ViT patch 4, width 64, 2 layers": dict(
            vision, patch_size=4, width=64, layers=2, head_width=32
        ),
        "ModifiedResNet [1,1,1,1], width 16": {
            "image_size": vision["image_size"],
            "layers": [1, 1, 1, 1],
            "width": 16,
            "head_width": 32,
        },
        "ModifiedResNet [1,1,1,1], width 32": {
            "image_size": vision["image_size"],
            "layers": [1, 1, 1, 1],
            "width": 32,
            "head_width": 64,
        },
    }


def samples_per_second(config: dict, batch_size: int, steps: int) -> float:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = ClipLoss()
    size = config["vision_cfg"]["image_size"]
    images = torch.randn(batch_size, 3, size, size)
    tokens = torch.randint(0, config["text_cfg"]["vocab_size"], (batch_size, 24))
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            start = time.perf_counter()
        image_features, text_features, logit_scale = model(images, tokens)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return batch_size * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    base = json.loads((config_dir() / "models" / "selbench-tiny.json").read_text())
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch_size}")
    reference = None
    for name, vision in candidates(base["vision_cfg"]).items():
        speed = samples_per_second(dict(base, vision_cfg=vision), args.batch_size, args.steps)
        reference = reference or speed
        print(f"{name:38s} {speed:7.0f} samples/s   x{speed / reference:.2f}", flush=True)


if __name__ == "__main__":
    main()
