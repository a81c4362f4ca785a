"""TL;DR's caption refinement (paper Sec. 3.2, T = T_o + T_g; Table 2a): the selected
samples' captions become "original; generated", the generated part by

- ``codebook`` (the default, the paper's): TL;DR's own codebook captioner, trained on the
  pool (the model the clusters come from);
- ``reference``: SynthWeb's reference captioner, a CoCa trained once on a separate clean
  corpus (:mod:`selbench.reference_captioner`), as the release generates its captions with
  a separately tuned BLIP (BLIP's ``caption_coco`` settings); or a local CoCa checkpoint,
  ``open_clip:ARCH:/path/to/weights.pt``, on a real pool.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from selbench.toolbox import DecodeSettings, SelectionContext, reference_captioner

from .selection import refine_caption, truncate_to_context

#: Images captioned at once.
BATCH = 512


def _rewrite(
    ctx: SelectionContext,
    index: list[int],
    generated: list[str],
    separator: str,
    tokenizer: Any,
    context_length: int,
    rewrites: dict[str, str],
) -> int:
    """Add the refined captions of pool rows ``index`` to ``rewrites``; how many of them
    got generated text."""
    captions, uids = ctx.pool.captions, ctx.pool.uids
    with_generated = 0
    for i, text in zip(index, generated, strict=True):
        original = captions[i]
        refined = truncate_to_context(
            refine_caption(original, text, separator), tokenizer, context_length
        )
        if not refined.strip():
            continue
        with_generated += len(refined) > len(original)
        rewrites[uids[i]] = refined
    return with_generated


def refine_with_codebook(
    ctx: SelectionContext, params: Any, model, vocab, images, selected, context_length
) -> tuple[dict[str, str], float]:
    """Generate with TL;DR's codebook captioner (its beams, lengths and prompt)."""
    rewrites: dict[str, str] = {}
    with_generated = 0
    starts = range(0, len(selected), BATCH)
    for start in ctx.progress.track(starts, "TL;DR: generating captions", total=len(starts)):
        index = selected[start : start + BATCH]
        generated = model.generate(
            images[torch.from_numpy(index)].to(ctx.device),
            beams=params.beams,
            max_length=params.max_length or None,
            min_length=params.min_length,
            prompt=vocab.prompt_ids,
        )
        texts = [vocab.decode(ids) for ids in generated]
        with_generated += _rewrite(
            ctx, index.tolist(), texts, params.separator, vocab.tokenizer, context_length, rewrites
        )
    return rewrites, with_generated / max(1, len(selected))


def reference_settings(params: Any) -> DecodeSettings:
    """TL;DR's generation parameters as CoCa decoding settings: ``beams`` 1 = greedy,
    else beam search with that many beams in one group; ``max_length`` (0: open_clip's
    30, cut to the model's context) and ``min_length`` count the start token, as
    :class:`DecodeSettings` does. CoCa takes no prompt, so ``prompt`` is not used."""
    seq_len = params.max_length or 30
    min_len = min(params.min_length, seq_len - 1)
    if params.beams == 1:
        return DecodeSettings(method="greedy", min_seq_len=min_len, seq_len=seq_len)
    return DecodeSettings(
        method="beam",
        num_beams=params.beams,
        num_beam_groups=1,
        min_seq_len=min_len,
        seq_len=seq_len,
    )


def refine_with_reference(
    ctx: SelectionContext, params: Any, vocab, selected: np.ndarray, context_length: int
) -> tuple[dict[str, str], float]:
    """Generate with the reference captioner (``params.refine_captioner``)."""
    captioner = reference_captioner(
        ctx.pool, ctx.device, ctx.progress, spec=params.refine_captioner
    )
    settings = reference_settings(params)
    uids = ctx.pool.uids
    wanted = {uids[i] for i in selected.tolist()}
    found = dict(ctx.pool.iter_images(wanted))
    rewrites: dict[str, str] = {}
    with_generated = 0
    starts = range(0, len(selected), BATCH)
    for start in ctx.progress.track(starts, "TL;DR: reference captions", total=len(starts)):
        index = selected[start : start + BATCH].tolist()
        generated = captioner([found[uids[i]] for i in index], settings, n=1, seed=ctx.seed)
        texts = [options[0] for options in generated]
        with_generated += _rewrite(
            ctx, index, texts, params.separator, vocab.tokenizer, context_length, rewrites
        )
    return rewrites, with_generated / max(1, len(selected))


def caption_examples(ctx: SelectionContext, uids, captions, rewrites, selected, count: int = 30):
    """A markdown table of the first ``count`` selected samples' original and training
    captions (``tldr_caption_examples.md``), as a list of artifacts (empty: no rewrites)."""
    if not rewrites:
        return []
    lines = ["| uid | original | training caption |", "|---|---|---|"]
    for i in selected[:count].tolist():
        lines.append(f"| {uids[i]} | {captions[i]} | {rewrites.get(uids[i], captions[i])} |")
    path = ctx.work_dir / "tldr_caption_examples.md"
    path.write_text("\n".join(lines) + "\n")
    return [path]
