"""TL;DR (Wang, Lin, Zhang, Lei, Shou, "Too Large; Data Reduction for Vision-Language
Pre-Training", ICCV 2023, arXiv 2305.20087), in two presets:

- ``tldr``: the paper. Codebook of K = 3000 entries (Sec. 3.3) initialised with text
  embeddings of the most frequent keywords/keyphrases (Sec. 3.1; Table 2c), patch tokens
  only (L = 196 on ViT-B/16, Sec. 3.3), k-means on the raw index vectors into N = 3000
  clusters (Sec. 3.2; Table 2f), a uniform M% of every cluster (Table 2b), and every
  selected caption refined as T = T_o + T_g (Sec. 3.2; Table 2a).
- ``tldr-release``: the authors' released code (github showlab/datacentric.vlp, commit
  a488102). 1024 codes initialised uniformly in [-1/K, 1/K]; all 197 raw (unprojected,
  unnormalised) ViT tokens quantised, the class token included; index vectors of the whole
  pool PCA-whitened (256 dimensions asked) and L2-normalised before k-means into 1000
  clusters trained on every point; evenly spaced members of each cluster, of which only
  those in the top half by image-text matching score are kept; captions by beam search
  (3 beams, 5 to 20 tokens, prompt "a picture of ").

Both train the captioner with the caption loss plus ||sg(z_q) - z||^2 + 0.25 ||z_q -
sg(z)||^2 (the release's loss, which the paper calls a symmetric commitment loss).
What selbench substitutes offline (no pretrained BLIP/ViT) is listed in
``docs/strategies/tldr.md``.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from selbench import flops
from selbench.toolbox import (
    ConfigError,
    Selection,
    SelectionContext,
    Strategy,
    clip_scores,
    cluster_members,
    hookimpl,
    pool_image_tensor,
    scaled_cluster_count,
    top_k,
)

from .captioner import (
    CaptionerConfig,
    CaptionVocab,
    build_captioner,
    cached_captioner,
    checkpoint_dir,
    extract_codes,
    init_codebook,
    init_from_proxy,
    train_captioner,
)
from .refine import caption_examples, refine_with_codebook, refine_with_reference
from .selection import (
    centre_distances,
    cluster_prototype_distances,
    cluster_size_histogram,
    kmeans_all_points,
    largest_remainder_quotas,
    pick_within_cluster,
    sample_then_filter,
    top_keywords,
    whiten,
)


class TldrParams(BaseModel):
    """The paper's defaults (``tldr``); ``TldrReleaseParams`` holds the release's."""

    model_config = ConfigDict(extra="forbid")

    codebook_size: int = Field(
        default=3000,
        ge=2,
        description="K codebook entries; paper Sec. 3.3: K = 3000 (release: 1024). With "
        "keyword init, at most the number of distinct keywords/keyphrases in the pool",
    )
    codebook_init: Literal["keywords", "uniform"] = Field(
        default="keywords",
        description="keywords: text embeddings of the K most frequent keywords/keyphrases "
        "(paper Sec. 3.1, Table 2c), embedded by the pool proxy's text encoder; uniform: "
        "U[-1/K, 1/K] (release quantize.py)",
    )
    quantize_cls: bool = Field(
        default=False,
        description="quantise the class token too; paper Sec. 3.3: the L = 196 patch "
        "tokens; release: all 197 tokens (blip_pretrain_vq_compress.py:105)",
    )
    token_space: Literal["projected", "raw"] = Field(
        default="projected",
        description="projected: tokens pass a Linear layer (initialised from the proxy's "
        "image projection) and are L2-normalised before the codebook, so keyword text "
        "embeddings can seed it (selbench; the paper does not say); raw: the encoder's "
        "LayerNormed tokens are quantised as they are (release "
        "blip_pretrain_vq_compress.py:96-97, 105-108; needs codebook_init=uniform)",
    )
    clusters: int = Field(
        default=3000,
        ge=1,
        description="N k-means clusters of the index vectors; paper: 3000 on CC3M (Table "
        "2f ablates 100-10K); release: 1000. Scaled down on small pools (min_cluster_size)",
    )
    min_cluster_size: int = Field(
        default=39,
        ge=1,
        description="clusters are reduced to at most candidates // this (selbench; 39 is "
        "faiss's minimum points per centroid for a reliable k-means)",
    )
    whiten: bool = Field(
        default=False,
        description="PCA-whiten (eigen power -0.5) and L2-normalise the index vectors "
        "before k-means; paper: no; release fast_cluster.py: yes",
    )
    whiten_dim: int = Field(
        default=256, ge=1, description="output dimension of the whitening (release: 256)"
    )
    kmeans_iterations: int = Field(
        default=20, ge=1, description="k-means iterations (release fast_cluster.py:77: 20)"
    )
    kmeans_max_points_per_centroid: int = Field(
        default=10_000_000,
        ge=1,
        description="faiss k-means trains on at most this many points per cluster (a "
        "seeded subsample above it); release fast_cluster.py:78 sets 10,000,000 so every "
        "point is used; faiss's own default is 256",
    )
    within_cluster: Literal["uniform", "hard", "far", "caption_loss", "stride"] = Field(
        default="uniform",
        description="which members of a cluster fill its quota: uniform random (paper "
        "default, Table 2b); hard (largest cosine distance of the image embedding to the "
        "cluster's prototype, the hardness of Sorscher et al. 2022 that the paper's "
        "'hard samples' cite); far (largest distance from the k-means centre, Table 2b); "
        "caption_loss (highest captioner caption loss, selbench's own variant, in neither "
        "source); stride (evenly spaced in pool order, the release's every-Nth rule, "
        "codebook_cluster.py:68, at an exact quota)",
    )
    prototype_embedder: str = Field(
        default="reference",
        description="embedder whose image embeddings the hard rule measures prototype "
        "distances in (Sorscher et al.: a self-supervised SwAV model trained on other data; "
        "SynthWeb: its reference CLIP)",
    )
    match_filter: bool = Field(
        default=False,
        description="only samples in the top match_keep fraction by image-text matching "
        "score are eligible; paper: no (Fig. 1 motivates it); release: top half by ITM",
    )
    match_keep: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="fraction kept by the matching filter (release: half, "
        "cc3m_training_success_half_itm.json, codebook_cluster.py:81)",
    )
    match_filter_stage: Literal["after_sampling", "before_clustering"] = Field(
        default="after_sampling",
        description="after_sampling: cluster (and whiten) the whole pool, sample every "
        "cluster, keep only the sampled members that pass the filter (release "
        "codebook_cluster.py:45-49, 60-74, 79-93), sampling as much as the budget needs; "
        "before_clustering: cluster and sample only the samples that pass (selbench's "
        "earlier order)",
    )
    match_embedder: str = Field(
        default="reference",
        description="embedder whose image-text cosine is the matching score (release: a "
        "pretrained BLIP ITM head; SynthWeb: its reference CLIP)",
    )
    refine: bool = Field(
        default=True,
        description="train on 'original; generated' captions of the selected samples "
        "(paper Sec. 3.2, T = T_o + T_g; Table 2a)",
    )
    refine_captioner: str = Field(
        default="codebook",
        description="what generates T_g: codebook, TL;DR's own captioner (paper Sec. "
        "3.2); reference, SynthWeb's reference captioner, a CoCa trained once on a "
        "separate clean corpus, as the release captions with a separately tuned BLIP "
        "(caption_coco.yaml); or a local CoCa checkpoint open_clip:ARCH:/path (real pools)",
    )
    separator: str = Field(
        default="; ",
        min_length=1,
        description="text between the original and the generated caption "
        "(release generate_train_json_w_caption.py)",
    )
    beams: int = Field(
        default=1,
        ge=1,
        description="beam width for generation, 1 = greedy; paper: unspecified (greedy, "
        "the cheapest); release: 3 (BLIP's caption_coco.yaml:26, read by train_caption.py:69, 183)",
    )
    max_length: int = Field(
        default=0,
        ge=0,
        description="most tokens in a generated sequence, start token and prompt "
        "included (Hugging Face generate's count); paper: unspecified, 0 = the "
        "context length; release: 20 (BLIP's caption_coco.yaml:24, read by "
        "train_caption.py:69, 183)",
    )
    min_length: int = Field(
        default=0,
        ge=0,
        description="no end token while the sequence, start token and prompt included, "
        "is shorter than this; paper: unspecified, 0; release: 5 (BLIP's caption_coco.yaml:25)",
    )
    prompt: str = Field(
        default="",
        description="text before every caption, masked from the captioner's loss and "
        "the start of every generated caption (removed from the refined text); paper: "
        "none; release: 'a picture of ' (blip.py:78, caption_coco.yaml)",
    )
    captioner_epochs: float = Field(
        default=3.0,
        gt=0,
        description="captioner training, in epochs of the pool; paper/release: 20 epochs "
        "from a pretrained ViT; 3 from the pool proxy fits the 2-core CPU budget",
    )
    captioner_lr: float = Field(
        default=2e-3,
        gt=0,
        description="AdamW peak learning rate; release codebook_cc3m.yaml: 3e-4 on a "
        "pretrained ViT-B; selbench's tiny-scale CLIP rate (configs/scales/tiny.yaml) here",
    )
    captioner_weight_decay: float = Field(
        default=0.05, ge=0, description="AdamW weight decay (release codebook_cc3m.yaml:18)"
    )
    captioner_batch_size: int = Field(
        default=256, ge=1, description="captioner batch size (selbench tiny scale)"
    )
    captioner_warmup: float = Field(
        default=0.05, ge=0, lt=1, description="warm-up fraction of captioner steps"
    )
    decoder_layers: int = Field(
        default=2,
        ge=1,
        description="caption decoder layers (release: 12-layer BERT; selbench: the tiny "
        "text tower's 2)",
    )
    commitment_weight: float = Field(
        default=1.0,
        ge=0,
        description="weight of ||sg(z_q) - z||^2 (release quantize.py, legacy form)",
    )
    codebook_weight: float = Field(
        default=0.25,
        ge=0,
        description="weight of ||z_q - sg(z)||^2 (release quantize.py: beta = 0.25)",
    )
    dead_code_threshold: float = Field(
        default=0.0,
        ge=0,
        description="re-seed a codebook entry with a random image token of the batch when "
        "its EMA usage per batch falls below this (vector-quantize-pytorch's dead-code "
        "replacement; paper and release: none, 0); against codebook collapse, "
        "docs/strategies/tldr.md",
    )
    captioner_seed: int = Field(
        default=0,
        ge=0,
        description="seed of the captioner, shared by every selection seed so one trained "
        "captioner serves a seed sweep (the paper trains one captioner)",
    )
    proxy: str = Field(
        default="reference",
        description="embedder spec whose image encoder initialises the captioner's and "
        "whose text encoder embeds the keywords (the paper: a pretrained ViT-B/16 and text "
        "encoder; SynthWeb: its reference CLIP; proxy: the CLIP trained on the pool)",
    )

    @field_validator("refine_captioner")
    @classmethod
    def _known_captioner(cls, value: str) -> str:
        if value == "codebook" or value.partition(":")[0] in ("reference", "open_clip"):
            return value
        raise ValueError("use codebook, reference or open_clip:ARCH:/path/to/weights.pt")

    @model_serializer(mode="wrap")
    def _omit_default_captioner(self, handler):
        """The default refine_captioner is left out of dumps, so that every earlier run
        keeps its cell key (selbench.run.spec.cell_key)."""
        data = handler(self)
        if isinstance(data, dict) and data.get("refine_captioner") == "codebook":
            del data["refine_captioner"]
        return data


class TldrReleaseParams(TldrParams):
    """Defaults of the released code (showlab/datacentric.vlp, commit a488102)."""

    codebook_size: int = Field(
        default=1024, ge=2, description="K codebook entries (release quantize.py: n_embed 1024)"
    )
    codebook_init: Literal["keywords", "uniform"] = Field(
        default="uniform", description="U[-1/K, 1/K] (release quantize.py)"
    )
    quantize_cls: bool = Field(
        default=True,
        description="the release quantises all 197 tokens, class token included "
        "(blip_pretrain_vq_compress.py:105-108)",
    )
    token_space: Literal["projected", "raw"] = Field(
        default="raw",
        description="the ViT's LayerNormed tokens, unprojected and unnormalised "
        "(release blip_pretrain_vq_compress.py:96-97, 105-108)",
    )
    clusters: int = Field(
        default=1000, ge=1, description="k-means clusters (release codebook_cluster.py:45)"
    )
    whiten: bool = Field(
        default=True,
        description="PCA whitening (256 dims asked) + L2 norm (release fast_cluster.py:35-56)",
    )
    within_cluster: Literal["uniform", "hard", "far", "caption_loss", "stride"] = Field(
        default="stride",
        description="evenly spaced members in pool order (release codebook_cluster.py:68: "
        "every Nth member)",
    )
    match_filter: bool = Field(
        default=True, description="only the top half by image-text matching score (release)"
    )
    match_embedder: str = Field(
        default="reference",
        description="embedder whose image-text cosine is the matching score (release: a "
        "pretrained BLIP ITM head; SynthWeb: its reference CLIP; proxy:scorer, the pool "
        "CLIP trained 10 epochs, was the default before it, docs/strategies/tldr.md)",
    )
    beams: int = Field(
        default=3, ge=1, description="beam search, 3 beams (BLIP's caption_coco.yaml:26)"
    )
    max_length: int = Field(
        default=20,
        ge=0,
        description="at most 20 tokens, start token and prompt included (BLIP's "
        "caption_coco.yaml:24)",
    )
    min_length: int = Field(
        default=5, ge=0, description="at least 5 tokens, start and prompt included (same)"
    )
    prompt: str = Field(
        default="a picture of ", description="BLIP's caption prompt (release blip.py:78)"
    )


class Tldr(Strategy):
    """TL;DR with the paper's defaults: codebook captioner, index-vector clusters,
    a uniform share of every cluster, captions refined as 'original; generated'."""

    name = "tldr"
    summary = (
        "TL;DR (paper): codebook-captioner clusters, uniform per-cluster sampling, "
        "caption refinement"
    )
    reference = (
        "Wang et al., Too Large; Data Reduction for Vision-Language Pre-Training, ICCV 2023 "
        "(arXiv 2305.20087), Sec. 3, Table 2"
    )
    stochastic = True
    # pool_images: the captioner and the proxy train on the pool's images
    needs = frozenset({"proxy", "embeddings", "pool_images"})  # embeddings: the matching filter
    Params = TldrParams

    def select(self, ctx: SelectionContext) -> Selection:
        p = self.params
        timings: dict[str, float] = {}
        metrics: dict[str, float] = {}
        pool = ctx.pool
        uids = list(pool.uids)
        captions = list(pool.captions)
        n = len(uids)

        # -- stage 1: the captioner --------------------------------------------------
        t0 = time.perf_counter()
        proxy = ctx.proxy(p.proxy)  # trained on first use, then cached per pool
        timings["proxy"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tokenizer = proxy.tokenizer
        images = pool_image_tensor(pool, proxy.preprocess, ctx.progress, "TL;DR: loading pool")
        vocab = CaptionVocab.from_captions(captions, tokenizer, p.prompt)
        prompt_length = len(vocab.prompt_ids)
        timings["loading"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        keywords: list[str] = []
        codebook_size = p.codebook_size
        code_dim = int(proxy.model.text_projection.shape[1])
        if p.codebook_init == "keywords":
            if p.token_space == "raw":
                raise ConfigError(
                    f"{self.name}: codebook_init=keywords puts text embeddings in the "
                    "codebook, which raw image tokens do not share a space with; use "
                    "-p token_space=projected or -p codebook_init=uniform"
                )
            keywords = top_keywords(captions, p.codebook_size)
            if len(keywords) < 2:
                raise ConfigError(
                    "tldr: codebook_init=keywords found fewer than 2 keywords in the pool's "
                    "captions; use -p codebook_init=uniform"
                )
            codebook_size = len(keywords)
        config = CaptionerConfig(
            model=proxy.architecture,
            codebook_size=codebook_size,
            codebook_init=p.codebook_init,
            quantize_cls=p.quantize_cls,
            decoder_layers=p.decoder_layers,
            epochs=p.captioner_epochs,
            lr=p.captioner_lr,
            weight_decay=p.captioner_weight_decay,
            batch_size=p.captioner_batch_size,
            warmup_fraction=p.captioner_warmup,
            commitment_weight=p.commitment_weight,
            codebook_weight=p.codebook_weight,
            visual_init="proxy",
            seed=p.captioner_seed,
            dead_code_threshold=p.dead_code_threshold,
            token_space=p.token_space,
            prompt=p.prompt,
        )
        model, context_length = build_captioner(config, len(vocab), code_dim)
        tokens = vocab.encode(captions, context_length)
        key = f"{config.digest()}-{proxy.weights_digest[:10]}"

        def train() -> dict:
            init_from_proxy(model, proxy.model)
            vectors = None
            if keywords:  # seeding the codebook is part of the captioner's training
                with torch.inference_mode(), flops.counted("training/tldr"):
                    text = proxy.model.encode_text(proxy.tokenizer(keywords).to(ctx.device))
                vectors = torch.nn.functional.normalize(text.float().cpu(), dim=-1)
            init_codebook(model, vectors, p.captioner_seed)
            record = train_captioner(
                model, images, tokens, config, ctx.device, ctx.progress, prompt_length
            )
            return {
                "config": config.model_dump(),
                "pool_fingerprint": pool.fingerprint,
                "proxy_weights": proxy.weights_digest,
                "keywords": keywords[:50],
                "vocab_size": len(vocab),
                **record,
            }

        meta, hit = cached_captioner(checkpoint_dir(pool.fingerprint, key), model, train)
        model.to(ctx.device).eval()
        timings["captioner_training"] = time.perf_counter() - t0
        metrics["captioner_cache_hit"] = float(hit)
        metrics["codebook_size_used"] = float(codebook_size)
        for name, value in meta["final"].items():
            metrics[f"captioner_{name}"] = float(value)

        # -- stage 2: codes, clusters, quotas -----------------------------------------
        t0 = time.perf_counter()
        with flops.counted("scoring/tldr"):  # codes and caption losses of the whole pool
            codes, caption_loss = extract_codes(
                model,
                images,
                tokens,
                device=ctx.device,
                progress=ctx.progress,
                prompt_length=prompt_length,
            )
        timings["code_extraction"] = time.perf_counter() - t0
        metrics["codes_used"] = float(len(np.unique(codes)))
        metrics["distinct_index_vectors"] = float(len(np.unique(codes, axis=0)))

        candidates = np.arange(n)  # what is clustered
        eligible = None  # with the filter after sampling: what may be kept
        if p.match_filter:
            t0 = time.perf_counter()
            kept = self._match_filter(ctx, n)
            metrics["match_filter_kept"] = float(len(kept))
            if p.match_filter_stage == "before_clustering":
                candidates = kept
            else:
                eligible = np.zeros(n, dtype=bool)
                eligible[kept] = True
            timings["matching_filter"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        features = codes[candidates].astype(np.float32)
        if p.whiten:
            features, dim = whiten(features, p.whiten_dim)
            metrics["whiten_dim_effective"] = float(dim)
        k = scaled_cluster_count(p.clusters, len(candidates), p.min_cluster_size)
        centroids, assignment, trained_on = kmeans_all_points(
            features,
            k,
            seed=ctx.seed,
            niter=p.kmeans_iterations,
            max_points_per_centroid=p.kmeans_max_points_per_centroid,
        )
        metrics["kmeans_training_points"] = float(trained_on)
        sizes = np.bincount(assignment, minlength=len(centroids))
        distance = np.zeros(n)
        distance[candidates] = centre_distances(features, centroids, assignment)
        hardness = None
        if p.within_cluster == "hard":
            image = ctx.embeddings(p.prototype_embedder).image
            hardness = np.zeros(n)
            hardness[candidates] = cluster_prototype_distances(
                np.asarray(image, dtype=np.float32)[candidates], assignment, len(centroids)
            )
        members = cluster_members(candidates, assignment, len(centroids))

        def pick(group: np.ndarray, quota: int) -> np.ndarray:
            return pick_within_cluster(
                group,
                quota,
                p.within_cluster,
                ctx.rng,
                hardness=hardness,
                distance=distance,
                caption_loss=caption_loss,
            )

        if eligible is None:
            quotas = largest_remainder_quotas(sizes, ctx.budget_count)
            chosen = [pick(group, int(q)) for group, q in zip(members, quotas, strict=True)]
        else:
            picked, sampled = sample_then_filter(members, eligible, ctx.budget_count, pick)
            chosen = [picked]
            metrics["sampled_before_filter"] = float(sampled)
        selected = np.sort(np.concatenate(chosen))
        timings["clustering"] = time.perf_counter() - t0
        metrics["clusters_used"] = float(len(centroids))
        metrics["clusters_requested"] = float(p.clusters)
        metrics["cluster_size_max"] = float(sizes.max())
        metrics["cluster_size_median"] = float(np.median(sizes))
        histogram = cluster_size_histogram(ctx.work_dir, sizes)

        # -- stage 3: caption refinement --------------------------------------------
        rewrites: dict[str, str] | None = None
        if p.refine:
            t0 = time.perf_counter()
            with flops.counted("generation/tldr"):  # decoding, as it runs
                if p.refine_captioner == "codebook":
                    rewrites, kept = refine_with_codebook(
                        ctx, p, model, vocab, images, selected, context_length
                    )
                else:
                    rewrites, kept = refine_with_reference(ctx, p, vocab, selected, context_length)
                    metrics["refine_reference_captioner"] = 1.0
            timings["generation"] = time.perf_counter() - t0
            metrics["refined_with_generated_text"] = kept
        for stage, seconds in timings.items():
            metrics[f"seconds_{stage}"] = seconds
        return Selection(
            uids=[uids[i] for i in selected],
            captions=rewrites,
            scores={u: float(v) for u, v in zip(uids, caption_loss, strict=True)},
            metrics=metrics,
            artifacts=[histogram, *caption_examples(ctx, uids, captions, rewrites, selected)],
            series={"captioner_caption_loss": meta["caption_loss_curve"]},
        )

    def _match_filter(self, ctx: SelectionContext, n: int) -> np.ndarray:
        """Pool indices in the top ``match_keep`` by image-text cosine (ties to the earlier
        position), in pool order. Refuses a budget larger than what the filter keeps."""
        p = self.params
        keep = int(np.ceil(p.match_keep * n))
        if ctx.budget_count > keep:
            raise ConfigError(
                f"tldr: the budget of {ctx.budget_count} samples exceeds the {keep} that "
                f"match_filter keeps (match_keep={p.match_keep}); lower the budget, raise "
                "-p match_keep, or set -p match_filter=false"
            )
        emb = ctx.embeddings(p.match_embedder)
        return top_k(clip_scores(emb.image, emb.text), keep)


class TldrRelease(Tldr):
    """TL;DR as in the released code: uniform-init 1024-entry codebook on raw tokens,
    whitened index vectors of the whole pool, 1000 clusters, evenly spaced members of
    which only those in the top half by matching score are kept, BLIP's caption settings."""

    name = "tldr-release"
    summary = (
        "TL;DR (released code): whitened codes, 1000 clusters, top-half ITM filter, beam captions"
    )
    reference = (
        "Wang et al., ICCV 2023 (arXiv 2305.20087); released code github.com/showlab/"
        "datacentric.vlp (a488102): quantize.py, fast_cluster.py, codebook_cluster.py"
    )
    stochastic = True
    needs = frozenset({"proxy", "embeddings", "pool_images"})
    Params = TldrReleaseParams


@hookimpl
def register_strategies(register):
    register(Tldr)
    register(TldrRelease)
