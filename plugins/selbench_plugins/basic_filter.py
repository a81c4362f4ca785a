"""DataComp's basic filtering (Gadre et al., "DataComp: In search of the next generation of
multimodal datasets", NeurIPS 2023 Datasets & Benchmarks, Sec. 3.4 and the appendix on the
filtering baselines; released code: ``baselines/apply_filter.py``,
``load_uids_with_basic_filter_helper``).

Keep a pair when its caption has more than two words (whitespace-separated) and more than
five characters, and its image's smaller side is at least 200 pixels and its aspect ratio
(longer side over shorter side) at most 3, and its caption is English. DataComp labels
the language with fastText's identifier (``lid.176.bin``), a download that selbench
neither ships nor fetches (it runs offline); here langid.py (Lui and Baldwin, "langid.py:
An off-the-shelf language identification tool", ACL 2012 demos), which ships its model,
labels it instead. ``english=auto`` applies the rule except on SynthWeb, whose captions
are generated in English (and whose two-word captions a language identifier reads
unreliably).

The image rules read each image's size from its encoded header; DataComp reads the
``original_width``/``original_height`` that img2dataset recorded before resizing, which a
strategy does not see. On a pool whose images all have one size (SynthWeb renders every
image at 32x32; img2dataset's fixed-size resize modes do the same) the stored size says
nothing about the source image, so ``image_rules=auto`` skips those two rules there.
"""

from __future__ import annotations

import io
import logging
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from selbench.toolbox import Selection, SelectionContext, Strategy, hookimpl, top_k

log = logging.getLogger(__name__)

CAPTION_RULES = ("words", "chars")
LANGUAGE_RULE = "english"
IMAGE_RULES = ("min_side", "aspect")


class BasicFilterParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_words: int = Field(
        default=2,
        ge=0,
        description="keep captions with strictly more whitespace-separated words than this; "
        "DataComp's basic filter: more than 2 (Gadre et al. 2023, Sec. 3.4; "
        "apply_filter.py: len(text.split()) > 2)",
    )
    min_chars: int = Field(
        default=5,
        ge=0,
        description="keep captions with strictly more characters than this; DataComp's "
        "basic filter: more than 5 (Sec. 3.4; apply_filter.py: len(text) > 5)",
    )
    min_side: int = Field(
        default=200,
        ge=0,
        description="keep images whose smaller side is at least this many pixels; "
        "DataComp's basic filter: 200 (Sec. 3.4; apply_filter.py: min_image_dim >= 200)",
    )
    max_aspect: float = Field(
        default=3.0,
        ge=1.0,
        description="keep images whose aspect ratio (longer side / shorter side) is at most "
        "this; DataComp's basic filter: 3 (Sec. 3.4; apply_filter.py: aspect_ratio <= 3.0)",
    )
    english: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="keep captions langid.py labels English (DataComp's basic filter, "
        "with fastText's lid.176 there): auto applies it unless the pool is SynthWeb "
        "(captions generated in English); on: always; off: never (selbench)",
    )
    image_rules: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="whether the image-size and aspect rules apply: auto applies them "
        "unless the pool is SynthWeb or every image has the same size (a pool rendered or "
        "resized to one fixed size, where the stored size says nothing about the source "
        "image; DataComp reads the original size img2dataset recorded); on: always; "
        "off: captions only (selbench)",
    )


@dataclass
class RuleResult:
    """Which active rule each sample passes (``table``: samples x rules, in ``rules``)."""

    rules: tuple[str, ...]
    table: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def passes(self) -> np.ndarray:
        return self.table.all(axis=1)

    @property
    def score(self) -> np.ndarray:
        return self.table.mean(axis=1, dtype=np.float64)


def caption_rules(captions: list[str], min_words: int, min_chars: int) -> np.ndarray:
    """(n, 2) booleans: more than ``min_words`` whitespace-separated words; more than
    ``min_chars`` characters (DataComp: ``len(text.split()) > 2``, ``len(text) > 5``)."""
    table = np.empty((len(captions), 2), dtype=bool)
    for i, caption in enumerate(captions):
        text = caption if isinstance(caption, str) else ""
        table[i, 0] = len(text.split()) > min_words
        table[i, 1] = len(text) > min_chars
    return table


def english_rule(captions: list[str]) -> np.ndarray:
    """(n, 1) booleans: langid.py labels the caption English (DataComp keeps captions
    fastText's identifier labels English). Deterministic: langid.py has no randomness."""
    import langid  # its model loads on first use (about a second)

    column = np.empty((len(captions), 1), dtype=bool)
    for i, caption in enumerate(captions):
        text = caption if isinstance(caption, str) else ""
        column[i, 0] = bool(text.strip()) and langid.classify(text)[0] == "en"
    return column


def image_rules(sizes: np.ndarray, min_side: int, max_aspect: float) -> np.ndarray:
    """(n, 2) booleans from (n, 2) ``(width, height)`` sizes (0 where unknown): the smaller
    side is at least ``min_side``; longer / shorter side is at most ``max_aspect``. An image
    whose size could not be read fails both."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    short = sizes.min(axis=1)
    long = sizes.max(axis=1)
    known = short > 0
    aspect = np.divide(long, short, out=np.full(len(sizes), np.inf), where=known)
    return np.stack([known & (short >= min_side), known & (aspect <= max_aspect)], axis=1)


def header_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from an encoded image's header (PIL decodes no pixels for
    this); ``(0, 0)`` when the bytes are not an image PIL can identify."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        return int(width), int(height)
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError):
        return 0, 0


def image_sizes(ctx: SelectionContext) -> np.ndarray:
    """(n, 2) ``(width, height)`` of every pool image, in pool order: read from the
    headers when the pool serves encoded bytes (``iter_image_bytes``), else from the
    images it serves."""
    uids = list(ctx.pool.uids)
    position = {uid: i for i, uid in enumerate(uids)}
    sizes = np.zeros((len(uids), 2), dtype=np.int64)
    read_bytes = getattr(ctx.pool, "iter_image_bytes", None)
    stream: Iterator[tuple[str, Any]]
    if read_bytes is not None:
        stream = ((uid, header_size(data)) for uid, data, _ in read_bytes())
    else:
        stream = ((uid, image.size) for uid, image in ctx.pool.iter_images())
    for uid, size in ctx.progress.track(stream, "Reading image sizes", total=len(uids)):
        sizes[position[uid]] = size
    return sizes


def note(ctx: SelectionContext, message: str) -> None:
    """A line in the run's progress output (where the progress reporter has notes) and
    the log."""
    log.info(message)
    write = getattr(ctx.progress, "note", None)
    if callable(write):
        write(message)


class BasicFilter(Strategy):
    """DataComp's basic filtering: caption length, English captions (langid.py in place
    of fastText), image size and aspect ratio rules (Gadre et al., NeurIPS 2023, Sec. 3.4)."""

    name = "basic"
    summary = (
        "DataComp basic filtering: English captions of more than 2 words and 5 characters, "
        "images >= 200 px on the short side with aspect ratio <= 3"
    )
    reference = (
        "Gadre et al., DataComp (NeurIPS 2023 Datasets & Benchmarks), Sec. 3.4 and the "
        "appendix on baselines (basic filtering); released baselines/apply_filter.py"
    )
    stochastic = True  # more passing samples than the budget: a seeded uniform sample
    needs = frozenset()  # captions and image headers come from ctx.pool itself
    Params = BasicFilterParams

    def __init__(self, params: BaseModel | dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self._memo: tuple[weakref.ref, RuleResult] | None = None

    def rules(self, ctx: SelectionContext) -> RuleResult:
        """Every active rule for every sample of ``ctx.pool`` (computed once per context)."""
        if self._memo is not None and self._memo[0]() is ctx:
            return self._memo[1]
        p = self.params
        captions = list(ctx.pool.captions)
        table = caption_rules(captions, p.min_words, p.min_chars)
        rules: tuple[str, ...] = CAPTION_RULES
        metrics: dict[str, float] = {}
        synthweb = getattr(ctx.pool, "kind", None) == "synthweb"
        if p.english == "on" or (p.english == "auto" and not synthweb):
            table = np.concatenate([table, english_rule(captions)], axis=1)
            rules += (LANGUAGE_RULE,)
        skip_reason = None
        if p.image_rules == "off":
            skip_reason = "image_rules=off"
        elif p.image_rules == "auto" and synthweb:
            skip_reason = "SynthWeb renders every image at one fixed size"
        else:
            sizes = image_sizes(ctx)
            distinct = np.unique(sizes, axis=0) if len(sizes) else sizes
            metrics["unreadable_images"] = float((sizes.min(axis=1) <= 0).sum())
            if p.image_rules == "auto" and len(sizes) > 1 and len(distinct) == 1:
                width, height = (int(v) for v in distinct[0])
                skip_reason = f"every image of the pool is {width}x{height}"
            else:
                table = np.concatenate(
                    [table, image_rules(sizes, p.min_side, p.max_aspect)], axis=1
                )
                rules += IMAGE_RULES
        if skip_reason is not None:
            note(ctx, f"basic: image-size and aspect rules skipped ({skip_reason})")
        metrics["image_rules_applied"] = float(skip_reason is None)
        for j, rule in enumerate(rules):
            metrics[f"failed_{rule}"] = float((~table[:, j]).sum())
        result = RuleResult(rules, table, metrics)
        result.metrics["passing"] = float(result.passes.sum())
        self._memo = (weakref.ref(ctx), result)
        return result

    def score(self, ctx: SelectionContext) -> np.ndarray:
        """The fraction of the active rules each sample passes (1.0: passes them all)."""
        return self.rules(ctx).score

    def passes(self, ctx: SelectionContext) -> np.ndarray:
        """The samples that pass every active rule: what DataComp trains on."""
        return self.rules(ctx).passes

    def select(self, ctx: SelectionContext) -> Selection:
        result = self.rules(ctx)
        passing = np.flatnonzero(result.passes)
        scores = result.score
        if len(passing) >= ctx.budget_count:
            # DataComp trains on everything that passes; at a matched budget the passing
            # pool is subsampled uniformly.
            chosen = np.sort(ctx.rng.choice(passing, size=ctx.budget_count, replace=False))
        else:
            # Every passing sample scores 1.0, the maximum: top_k keeps them all, then the
            # samples that pass the most rules, ties to the earlier pool position.
            chosen = top_k(scores, ctx.budget_count)
        uids = list(ctx.pool.uids)
        metrics = dict(result.metrics)
        metrics["passing_fraction"] = len(passing) / max(1, len(uids))
        return Selection(
            uids=[uids[i] for i in chosen],
            scores={uid: float(s) for uid, s in zip(uids, scores, strict=True)},
            metrics=metrics,
        )


@hookimpl
def register_strategies(register):
    register(BasicFilter)
