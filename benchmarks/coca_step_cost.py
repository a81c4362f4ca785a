"""What a tiny-coca training step costs, as a ratio to a tiny (CLIP) step.

``--scale tiny-coca`` trains open_clip's CoCa with tiny's recipe (docs/evaluation.md);
its extra cost is the captioning decoder and its projection onto the 49,408-token
vocabulary. This script builds both scales' models, takes one batch of SynthWeb pool
images and captions (the scale's batch size), and times full training steps (forward,
backward, AdamW) of each, alternating which goes first in every repeat, side by side in
one process. It prints each step's seconds and samples/s per repeat, then the median
ratio (tiny-coca / tiny). The run's training time is about that ratio times tiny's;
with ``--pad-positions`` the CoCa step also projects the padding positions onto the
vocabulary, as open_clip's ``CoCa.forward`` does, to show what skipping them saves.

    python benchmarks/coca_step_cost.py                 # 5 repeats
    python benchmarks/coca_step_cost.py --repeats 3 --pad-positions
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from open_clip.loss import ClipLoss, CoCaLoss

from selbench.captioning import CAPTION_LOSS_WEIGHT, CONTRASTIVE_LOSS_WEIGHT, coca_losses
from selbench.configs import load_scale
from selbench.pools import resolve_pool
from selbench.train import build_model, weight_decay_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pad-positions", action="store_true")
    args = parser.parse_args()

    resolved = resolve_pool("synthweb")
    tiny, coca_scale = load_scale("tiny"), load_scale("tiny-coca")
    batch = tiny.batch_size
    clip, preprocess, tokenizer = build_model(tiny.model, seed=0)
    coca, _, coca_tokenizer = build_model(coca_scale.model, seed=0)
    images = []
    for _, image in resolved.pool.iter_images():
        images.append(preprocess(image))
        if len(images) == batch:
            break
    images = torch.stack(images)
    captions = resolved.pool.captions[:batch]
    clip_tokens, coca_tokens = tokenizer(captions), coca_tokenizer(captions)
    clip_loss = ClipLoss()
    coca_loss = CoCaLoss(
        caption_loss_weight=CAPTION_LOSS_WEIGHT, clip_loss_weight=CONTRASTIVE_LOSS_WEIGHT
    )

    def optimiser(model):
        return torch.optim.AdamW(weight_decay_groups(model, tiny.weight_decay), lr=tiny.lr)

    clip_opt, coca_opt = optimiser(clip), optimiser(coca)
    clip.train()
    coca.train()

    def clip_step() -> None:
        image_features, text_features, scale = clip(images, clip_tokens)[:3]
        clip_loss(image_features, text_features, scale).backward()
        clip_opt.step()
        clip_opt.zero_grad(set_to_none=True)

    def coca_step() -> None:
        if args.pad_positions:
            out = coca(images, coca_tokens)
            contrastive, caption = coca_loss(
                out["image_features"], out["text_features"], out["logits"], out["labels"],
                out["logit_scale"],
            )  # fmt: skip
        else:
            contrastive, caption = coca_losses(coca, images, coca_tokens, coca_loss)
        (contrastive + caption).backward()
        coca_opt.step()
        coca_opt.zero_grad(set_to_none=True)

    def timed(step) -> float:
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    clip_step(), coca_step()  # warm-up
    ratios = []
    print(f"batch {batch}, threads {torch.get_num_threads()}")
    for repeat in range(args.repeats):
        order = (clip_step, coca_step) if repeat % 2 == 0 else (coca_step, clip_step)
        seconds = {step.__name__: timed(step) for step in order}
        ratio = seconds["coca_step"] / seconds["clip_step"]
        ratios.append(ratio)
        print(
            f"repeat {repeat}: tiny {seconds['clip_step']:.2f} s/step "
            f"({batch / seconds['clip_step']:.0f} samples/s), tiny-coca "
            f"{seconds['coca_step']:.2f} s/step ({batch / seconds['coca_step']:.0f} samples/s), "
            f"ratio {ratio:.2f}"
        )
    print(f"median ratio tiny-coca / tiny: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
