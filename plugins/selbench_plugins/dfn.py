"""DFN-style filtering (Fang et al., "Data Filtering Networks", ICLR 2024, arXiv 2309.17425).

A data filtering network is a CLIP model whose job is to score, not to transfer: train it
on a small *high-quality* image-text set, then keep the pool pairs its image and text
towers agree on most (the CLIP-score filter, with the DFN as the scorer). The paper's key
finding (Sec. 3) is that a filter's quality follows the quality of the data it was
trained on, not its own downstream accuracy: a model trained on a small clean set makes
a better filter than a stronger model trained on noisy web data.

Here the high-quality set is the run's target set read with its captions: on SynthWeb
the pool's clean target split (1,000 images x 2 clean captions, never the eval sets:
the harness refuses overlap); on real data ``--target PATH``, a CLIP_benchmark ``wds``
retrieval directory (image + ``txt``, one caption per line) or a folder of images with a
``.txt`` of captions beside each. The filter is a ``selbench-tiny`` open_clip CLIP
trained from scratch by ``selbench.train`` with the ``configs/scales/dfn.yaml`` recipe
(the paper's DFNs are ViT-B/32 CLIPs trained on HQITP-350M; its best filter started from
a pretrained CLIP and was fine-tuned on the high-quality data: ``init=proxy`` starts from
the pool proxy instead, the offline analogue). The trained filter and its pool scores
are cached by content: the high-quality pixels and captions, the recipe, the init
weights and the seed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from selbench import flops
from selbench.embedders import preprocess_batch
from selbench.fileutil import temp_sibling
from selbench.target import pixel_hash
from selbench.toolbox import (
    PluginError,
    Selection,
    SelectionContext,
    Strategy,
    build_model,
    build_training_data,
    cached_directory,
    checkpoint_in,
    hookimpl,
    load_scale,
    selbench_home,
    top_k,
    train_clip,
)

SCORE_BATCH = 512  # pool pairs encoded at once when scoring


def _wds_captions(root: Path) -> dict[str, list[str]]:
    """``{"<shard stem>/<key>": [captions]}`` from the ``txt`` members of ``root/test/*.tar``
    (the key format of :func:`selbench.target.read_images`)."""
    found: dict[str, list[str]] = {}
    for shard in sorted((root / "test").glob("*.tar")):
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    key, _, ext = Path(member.name).name.partition(".")
                    if member.isreg() and ext.lower() == "txt":
                        text = tar.extractfile(member).read().decode("utf-8")
                        found[f"{shard.stem}/{key}"] = [
                            line.strip() for line in text.splitlines() if line.strip()
                        ]
        except (tarfile.TarError, OSError) as exc:
            raise PluginError(f"dfn: shard {shard} is corrupt or unreadable: {exc}") from exc
    return found


def target_captions(root: Path, keys: list[str]) -> list[list[str]]:
    """The captions of every target image, in ``keys`` order; a clear error when one has none."""
    root = Path(root)
    if (root / "test").is_dir():
        by_key = _wds_captions(root)
        where = "a txt member beside it in its shard (CLIP_benchmark wds retrieval layout)"
    else:
        by_key = {}
        for key in keys:
            sidecar = (root / key).with_suffix(".txt")
            if sidecar.is_file():
                by_key[key] = [ln.strip() for ln in sidecar.read_text().splitlines() if ln.strip()]
        where = "a .txt file of captions with the same name"
    captions = []
    for key in keys:
        lines = by_key.get(key) or []
        if not lines:
            raise PluginError(
                f"dfn: high-quality image {key} in {root} has no caption; the filtering "
                f"network trains on image-text pairs, so every image needs {where}"
            )
        captions.append(lines)
    return captions


def expand_pairs(images: list[Any], captions: list[list[str]]) -> tuple[list[Any], list[str]]:
    """One training pair per (image, caption): an image with two captions appears twice."""
    pair_images, pair_texts = [], []
    for image, lines in zip(images, captions, strict=True):
        for line in lines:
            pair_images.append(image)
            pair_texts.append(line)
    return pair_images, pair_texts


def filter_key(
    images: list[Any], captions: list[list[str]], recipe_json: str, init: str, seed: int
) -> str:
    """Content key of a filtering network: what it was trained on and how."""
    digest = hashlib.sha256()
    for image, lines in zip(images, captions, strict=True):
        digest.update(pixel_hash(image).encode())
        digest.update(json.dumps(lines).encode())
    digest.update(recipe_json.encode())
    digest.update(init.encode())
    digest.update(str(seed).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def score_pairs(
    model: Any, preprocess: Any, tokenizer: Any, pairs: Any, device: str, total: int
) -> np.ndarray:
    """Cosine of the model's image and text embeddings for every ``(row, image, caption)``,
    written at ``row`` of the result (``total`` rows, each exactly once)."""
    model.eval()
    scores = np.full(total, np.nan, dtype=np.float32)
    rows, images, texts = [], [], []

    def flush() -> None:
        f = model.encode_image(preprocess_batch(images, preprocess).to(device)).float()
        g = model.encode_text(tokenizer(texts).to(device)).float()
        f = torch.nn.functional.normalize(f, dim=-1)
        g = torch.nn.functional.normalize(g, dim=-1)
        scores[rows] = (f * g).sum(dim=-1).cpu().numpy()
        rows.clear(), images.clear(), texts.clear()

    for row, image, text in pairs:
        rows.append(row)
        images.append(image)
        texts.append(text)
        if len(images) == SCORE_BATCH:
            flush()
    if images:
        flush()
    missing = int(np.isnan(scores).sum())
    if missing:
        raise PluginError(f"dfn: {missing} of the pool's {total} pairs could not be scored")
    return scores


class DfnParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipe: str = Field(
        default="dfn",
        description="training recipe of the filtering network (configs/scales/; dfn: "
        "selbench-tiny, 80k samples on SynthWeb); the paper's DFNs are ViT-B/32 CLIPs",
    )
    init: Literal["scratch", "proxy"] = Field(
        default="scratch",
        description="scratch: train the filter from random weights on the high-quality set "
        "(the paper's DFNs trained on HQITP-350M); proxy: fine-tune the pool proxy on it "
        "(the analogue of the paper's best filter, a pretrained CLIP fine-tuned on "
        "high-quality data)",
    )
    init_embedder: str = Field(
        default="proxy",
        description="the proxy fine-tuned when init=proxy (an embedder spec)",
    )
    filter_seed: int = Field(
        default=0,
        description="seed of the filter's training; fixed, so one filter serves every run "
        "seed, as the pool proxy does (selbench choice)",
    )


class Dfn(Strategy):
    """Train a CLIP on the high-quality set, keep the pool pairs it scores highest."""

    name = "dfn"
    summary = "DFN-style filtering: a CLIP trained on a high-quality set scores the pool"
    reference = (
        "Fang et al., Data Filtering Networks (ICLR 2024, arXiv 2309.17425), Sec. 3 "
        "(filter by the DFN's image-text cosine, keep the top share)"
    )
    stochastic = False
    needs = frozenset({"target", "proxy", "pool_images"})  # scores the pool's images
    Params = DfnParams

    def score(self, ctx: SelectionContext) -> np.ndarray:
        """The DFN score of every pool pair (Fang et al. 2024, Sec. 3): the CLIP score under
        the data filtering network ``F`` trained on the high-quality set,
        ``s_i = <F_img(x_i), F_txt(t_i)>`` with L2-normalised embeddings
        (:func:`score_pairs`). Float32; higher means keep, and :meth:`select` keeps exactly
        the top ``budget``. The filter and the scores are cached by content."""
        return self._scored(ctx)[0]

    def _scored(self, ctx: SelectionContext) -> tuple[np.ndarray, dict[str, float]]:
        """:meth:`score` and the metrics of the filter (trained now or cached)."""
        p = self.params
        recipe = load_scale(p.recipe)
        target = ctx.target()
        captions = target_captions(target.path, list(target.keys))
        init_digest = "scratch"
        start_from = None
        if p.init == "proxy":
            proxy = ctx.proxy(p.init_embedder)
            if proxy.architecture != recipe.model:
                raise PluginError(
                    f"dfn: init=proxy needs the proxy's architecture ({proxy.architecture}) "
                    f"to equal the recipe's model ({recipe.model})"
                )
            init_digest = f"proxy:{proxy.weights_digest}"
            start_from = proxy.model
        key = filter_key(
            target.images, captions, recipe.model_dump_json(), init_digest, p.filter_seed
        )
        folder = selbench_home() / "dfn" / f"{recipe.name}-{key}"
        model, preprocess, tokenizer = build_model(recipe.model, p.filter_seed, ctx.device)
        metrics: dict[str, float] = {"hq_images": float(len(target.images)), "filter_trained": 0.0}

        def build(tmp: Path) -> None:
            if start_from is not None:
                model.load_state_dict(copy.deepcopy(start_from.state_dict()))
            metrics.update(
                self._train(ctx, model, preprocess, tokenizer, target, captions, recipe, tmp)
            )

        checkpoint, _ = cached_directory(folder, checkpoint_in, build)
        model.load_state_dict(torch.load(checkpoint, map_location=ctx.device, weights_only=True))
        scores_file = folder / f"scores-{ctx.pool.fingerprint}.npy"
        if scores_file.is_file():
            scores = np.load(scores_file)
        else:  # two processes at once may both score; the file is written atomically
            scores = self._score_pool(ctx, model, preprocess, tokenizer)
            tmp = temp_sibling(scores_file).with_suffix(".npy")
            np.save(tmp, scores)
            os.replace(tmp, scores_file)
        return scores, metrics

    def select(self, ctx: SelectionContext) -> Selection:
        scores, metrics = self._scored(ctx)
        uids = list(ctx.pool.uids)
        chosen = top_k(scores, ctx.budget_count)
        return Selection(
            uids=[uids[i] for i in chosen],
            scores={u: float(s) for u, s in zip(uids, scores, strict=True)},
            metrics=metrics,
        )

    def _train(self, ctx, model, preprocess, tokenizer, target, captions, recipe, folder: Path):
        """Train the filtering network; write ``model.pt`` and ``meta.json`` into ``folder``."""
        pair_images, pair_texts = expand_pairs(list(target.images), captions)
        keys = [str(i) for i in range(len(pair_images))]
        data = build_training_data(
            zip(keys, pair_images, strict=True),
            dict(zip(keys, pair_texts, strict=True)),
            preprocess,
            tokenizer,
        )
        samples = int(round(len(data) * recipe.epochs))
        started = time.perf_counter()
        result = train_clip(
            model, data, recipe, samples, self.params.filter_seed, ctx.device, ctx.progress,
            description="DFN: training filter",
        )  # fmt: skip
        seconds = time.perf_counter() - started
        torch.save(model.state_dict(), folder / "model.pt")
        (folder / "meta.json").write_text(
            json.dumps(
                {
                    "recipe": recipe.model_dump(),
                    "init": self.params.init,
                    "hq_path": str(target.path),
                    "hq_pairs": len(data),
                    "samples_seen": result.samples_seen,
                    "final_loss": result.final_loss,
                    "seconds": seconds,
                    "seed": self.params.filter_seed,
                },
                indent=2,
            )
        )
        return {
            "filter_trained": 1.0,
            "filter_train_seconds": seconds,
            "filter_final_loss": result.final_loss,
        }

    def _score_pool(self, ctx, model, preprocess, tokenizer) -> np.ndarray:
        row_of = {uid: i for i, uid in enumerate(ctx.pool.uids)}
        captions = list(ctx.pool.captions)
        images = ctx.progress.track(ctx.pool.iter_images(), "DFN: scoring pool", len(ctx.pool))
        pairs = ((row_of[uid], image, captions[row_of[uid]]) for uid, image in images)
        scores = score_pairs(model, preprocess, tokenizer, pairs, ctx.device, len(ctx.pool))
        if flops.charging():  # both towers on every pair (the cosines count 0)
            flops.charge(
                "scoring/dfn", flops.embedding_pass_flops(model, None, None, len(ctx.pool))
            )
        return scores


@hookimpl
def register_strategies(register):
    register(Dfn)
