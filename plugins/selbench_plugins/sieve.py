"""SIEVE (Mahmoud, Elhoushi, Abbas, Yang, Ardalani, Leather, Morcos, "Sieve: Multimodal
Dataset Pruning Using Image Captioning Models", CVPR 2024, arXiv 2310.02110).

An image-text pair is aligned when what a captioner trained on small, clean data says
about the image means what the alt-text says. Per pair (the paper's method, its Fig. 2;
section and equation numbers are not cited here: the paper's text was not at hand, the
release's code was, and every default below cites the release file it comes from):

1. caption the image K times with nucleus sampling (release: BLIP, K = 8,
   ``webdataset_inference.py`` and ``BLIP/models/blip.py``'s sampling branch);
2. mask "medium" phrases ("an image of", "a photo of", ...) in the alt-text and in every
   generated caption (release ``sentence_similarity_inference.py``, ``REMOVE_PHRASES``);
3. embed both with a sentence encoder (paper: a sentence transformer, all-MiniLM-L6-v2 in
   the release) and take the largest cosine similarity over the K captions:
   ``f_SIEVE(I, T) = max_k cos(E(mask(T)), E(mask(C_k(I))))``;
4. fuse with the CLIP score (the paper's default SIEVE + CLIPScore): each signal min-max
   normalised over the pool, then a weighted sum, 0.5 each (release ``baselines.py
   --name generic_filter --keys_to_fuse cap_scores clip_scores --weights_per_key 0.5 0.5``,
   ``baselines/apply_filter.py`` ``normalize_df``);
5. keep the budget's best (``top_k``: DataComp's percentile form).

Offline stand-ins (docs/strategies/sieve.md): the captioner is SynthWeb's reference
captioner (a CoCa trained once on the separate clean corpus,
:mod:`selbench.reference_captioner`), and the sentence encoder is the reference CLIP's
text tower -- the release's own alternative to the sentence transformer
(``--use_clip_text_encoder``, ``sentence_similarity_inference.py --clip_text_encoder``)
-- because no sentence-transformer weights are available offline. On a real pool name a
local CoCa checkpoint (``-p captioner=open_clip:coca_ViT-L-14:/path``) and the pool's
reference CLIP serves as the text encoder.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from selbench import flops
from selbench.toolbox import (
    SAMPLER_VERSION,
    DecodeSettings,
    Selection,
    SelectionContext,
    Strategy,
    cached_directory,
    clip_scores,
    hookimpl,
    reference_captioner,
    selbench_home,
    top_k,
    unit_rows,
)

#: The release's default masked phrases (``sentence_similarity_inference.py``,
#: ``REMOVE_PHRASES``), longest first so "a photo of" goes before "photo".
RELEASE_PHRASES = (
    "an image of",
    "a photo of",
    "stock photo",
    "photo stock",
    "a photo",
    "an image",
    "image",
    "photo",
)
#: The release's longer list (``REMOVE_PHRASES_LONG``): icons, templates, vectors, file types.
LONG_PHRASES = (
    "an image of",
    "a photo of",
    "an icon of",
    "an illustration of",
    "a template of",
    "a thumbnail of",
    "a vector of",
    "photo stock",
    "stock photo",
    "a photo",
    "an image",
    "an icon",
    "an illustration",
    "a template",
    "a thumbnail",
    "image",
    "photo",
    "icon",
    "illustration",
    "template",
    "vector",
    "thumbnail",
    "free",
    "print",
    "sale",
    "quot",
    "png",
    "jpeg",
    "jpg",
)
PHRASE_LISTS: dict[str, tuple[str, ...]] = {
    "release": RELEASE_PHRASES,
    "long": LONG_PHRASES,
    "none": (),
}
#: Pool images captioned per call of the captioner (bounds memory, not the result).
CHUNK = 1024


class SieveParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    captioner: str = Field(
        default="reference",
        description="reference: SynthWeb's reference captioner (a CoCa trained on the "
        "separate clean corpus; selbench reference build), the stand-in for the paper's "
        "BLIP pretrained on 14M curated pairs (release README: model_base_14M.pth); on a real "
        "pool a local CoCa checkpoint, open_clip:ARCH:/path/to/weights.pt",
    )
    captions_per_image: int = Field(
        default=8,
        ge=1,
        description="K captions per image; release: 8 (webdataset_inference.py "
        "num_sequences_to_generate, BLIP num_return_sequences=8)",
    )
    top_p: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="nucleus sampling mass (paper Fig. 2: nucleus sampling; release "
        "generate(sample=True, top_p=0.9))",
    )
    top_k: int = Field(
        default=50,
        ge=0,
        description="tokens kept before top_p; the release passes none, so Hugging Face "
        "generate's sampling default top_k=50 applies (0 = all)",
    )
    repetition_penalty: float = Field(
        default=1.1,
        gt=0,
        description="CTRL repetition penalty (release BLIP/models/blip.py, sampling branch: 1.1)",
    )
    max_length: int = Field(
        default=20,
        ge=2,
        description="most tokens per caption, start token included (release: max_length=20)",
    )
    min_length: int = Field(
        default=5,
        ge=0,
        description="no end token before this many tokens, start included (release: 5)",
    )
    caption_seed: int = Field(
        default=0,
        ge=0,
        description="seed of the sampled captions, shared by every selection seed (the "
        "paper captions the pool once; SIEVE is deterministic given the captions)",
    )
    mask_phrases: Literal["release", "long", "none"] = Field(
        default="release",
        description="medium phrases masked in alt-text and captions (paper Fig. 2; "
        "release sentence_similarity_inference.py: REMOVE_PHRASES, or the longer "
        "REMOVE_PHRASES_LONG); matched case-insensitively as whole words",
    )
    sentence_encoder: str = Field(
        default="reference",
        description="embedder whose text tower embeds alt-text and captions; paper: a "
        "sentence transformer (release all-MiniLM-L6-v2), not available offline; the "
        "release's CLIP-text-encoder option (--use_clip_text_encoder) is what this uses: "
        "SynthWeb's reference CLIP, or the pool YAML's reference",
    )
    clip_weight: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="weight of the min-max normalised CLIP score in the fused score, the "
        "SIEVE score getting 1 - clip_weight; paper's default SIEVE + CLIPScore: 0.5 each "
        "(release README, baselines.py --weights_per_key 0.5 0.5); 0 = SIEVE alone",
    )
    clip_embedder: str = Field(
        default="reference",
        description="embedder of the CLIP score (paper: OpenAI ViT-L/14; SynthWeb: its "
        "reference CLIP)",
    )


def mask_phrases(texts: Sequence[str], phrases: Sequence[str]) -> list[str]:
    """``texts`` with every phrase removed, case-insensitively, as whole words, in the
    order given (longest first), spaces collapsed. The release removes the same phrases
    as plain substrings; whole words keep "photograph" from becoming "graph"."""
    if not phrases:
        return list(texts)
    pattern = re.compile("|".join(rf"\b{re.escape(p)}\b" for p in phrases), flags=re.IGNORECASE)
    return [" ".join(pattern.sub(" ", text).split()) for text in texts]


def minmax(values: np.ndarray) -> np.ndarray:
    """``(v - min) / (max - min)`` (release ``normalize_df``); all zeros when constant."""
    values = np.asarray(values, dtype=np.float64)
    span = float(values.max() - values.min()) if len(values) else 0.0
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def sieve_scores(
    alt_texts: Sequence[str],
    captions: Sequence[Sequence[str]],
    embed: Callable[[list[str]], np.ndarray],
    phrases: Sequence[str] = RELEASE_PHRASES,
) -> np.ndarray:
    """``f_SIEVE`` of every pair: the largest cosine similarity between the masked
    alt-text and the masked generated captions of its image (``embed`` returns one row
    per text; rows are L2-normalised here)."""
    if len(alt_texts) != len(captions):
        raise ValueError(f"{len(alt_texts)} alt-texts for {len(captions)} caption lists")
    k = len(captions[0]) if len(captions) else 0
    if any(len(c) != k for c in captions):
        raise ValueError("every image needs the same number of captions")
    alt = unit_rows(np.asarray(embed(mask_phrases(alt_texts, phrases)), dtype=np.float32))
    flat = [text for options in captions for text in options]
    gen = unit_rows(np.asarray(embed(mask_phrases(flat, phrases)), dtype=np.float32))
    similarity = np.einsum("nd,nkd->nk", alt, gen.reshape(len(alt_texts), k, -1))
    return similarity.max(axis=1)


class Sieve(Strategy):
    """Keep the pairs whose alt-text means what a clean captioner says about the image,
    fused with the CLIP score."""

    name = "sieve"
    summary = "SIEVE: alt-text vs. K sampled captions in a sentence encoder, + CLIP score"
    reference = (
        "Mahmoud et al., Sieve: Multimodal Dataset Pruning Using Image Captioning Models, "
        "CVPR 2024 (arXiv 2310.02110), Fig. 2; release github.com/"
        "facebookresearch/SIEVE (webdataset_inference.py, sentence_similarity_inference.py, "
        "baselines/apply_filter.py)"
    )
    stochastic = False  # the captions are sampled once, with caption_seed
    needs = frozenset({"proxy", "embeddings", "pool_images"})  # captions the pool's images
    Params = SieveParams

    def decode_settings(self) -> DecodeSettings:
        p = self.params
        return DecodeSettings(
            method="nucleus",
            top_p=p.top_p,
            top_k=p.top_k,
            repetition_penalty=p.repetition_penalty,
            min_seq_len=min(p.min_length, p.max_length - 1),
            seq_len=p.max_length,
        )

    def captions(self, ctx: SelectionContext) -> list[list[str]]:
        """K sampled captions of every pool image, cached per pool, captioner, decoding
        settings, sampler version and seed in ``$SELBENCH_HOME/sieve-captions/``."""
        p = self.params
        captioner = reference_captioner(ctx.pool, ctx.device, ctx.progress, spec=p.captioner)
        settings = self.decode_settings()
        key = json.dumps(
            [ctx.pool.fingerprint, captioner.weights_digest, repr(settings),
             p.captions_per_image, p.caption_seed, captioner.batch_size, SAMPLER_VERSION]
        )  # fmt: skip
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        folder = selbench_home() / "sieve-captions" / f"{ctx.pool.fingerprint[:12]}-{digest}"

        def load(entry: Path) -> list[list[str]] | None:
            path = entry / "captions.json"
            return json.loads(path.read_text()) if path.is_file() else None

        def build(tmp: Path) -> None:
            out: list[list[str]] = []
            chunk: list = []
            images = ctx.progress.track(
                ctx.pool.iter_images(), "SIEVE: captioning", total=len(ctx.pool)
            )

            def flush() -> None:
                seed = np.random.SeedSequence([p.caption_seed, len(out)]).generate_state(1)[0]
                out.extend(captioner(chunk, settings, n=p.captions_per_image, seed=int(seed)))
                chunk.clear()

            for _, image in images:
                chunk.append(image)
                if len(chunk) == CHUNK:
                    flush()
            if chunk:
                flush()
            (tmp / "captions.json").write_text(json.dumps(out))

        found, _ = cached_directory(folder, load, build)
        return found

    def embed_texts(self, ctx: SelectionContext, texts: list[str]) -> np.ndarray:
        """Text embeddings by ``sentence_encoder``'s text tower, float32, in batches."""
        encoder = ctx.proxy(self.params.sentence_encoder)
        model = encoder.model.eval()
        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), 1024):
                tokens = encoder.tokenizer(texts[start : start + 1024]).to(ctx.device)
                rows.append(model.encode_text(tokens).float().cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 1), dtype=np.float32)

    def score(self, ctx: SelectionContext) -> np.ndarray:
        """The fused score of every pair, higher is better:
        ``(1 - w) * minmax(f_SIEVE) + w * minmax(CLIP score)`` with ``w = clip_weight``
        (release ``baselines/apply_filter.py``: min-max normalised signals, weighted sum)."""
        p = self.params
        phrases = PHRASE_LISTS[p.mask_phrases]
        with flops.counted("scoring/sieve"):  # captioning and sentence embedding
            sieve = sieve_scores(
                list(ctx.pool.captions),
                self.captions(ctx),
                lambda texts: self.embed_texts(ctx, texts),
                phrases,
            )
        if p.clip_weight == 0:
            return sieve.astype(np.float64)
        found = ctx.embeddings(p.clip_embedder)
        clip = clip_scores(np.asarray(found.image), np.asarray(found.text))
        return (1 - p.clip_weight) * minmax(sieve) + p.clip_weight * minmax(clip)

    def select(self, ctx: SelectionContext) -> Selection:
        scores = self.score(ctx)
        uids = list(ctx.pool.uids)
        chosen = top_k(scores, ctx.budget_count)
        return Selection(
            uids=[uids[i] for i in chosen],
            scores={uid: float(s) for uid, s in zip(uids, scores, strict=True)},
        )


@hookimpl
def register_strategies(register):
    register(Sieve)
