"""SynthWeb's reference captioner: the stand-in for the pretrained BLIP that SIEVE, TL;DR's
release and recaptioning methods caption a pool with.

Like the reference CLIP (:mod:`selbench.reference`), it is trained once on the separate
clean SynthWeb corpus, never on the pool being filtered: the reference recipe names its
``captioner`` recipe (``configs/scales/reference.yaml`` -> ``reference-captioner.yaml``:
open_clip's CoCa at the tiny scale, selbench's CoCa support in :mod:`selbench.captioning`
and :func:`selbench.train.train_coca`), and the captioner trains on the reference recipe's
corpus. :func:`build_reference_captioner` (``selbench reference build``, after the CLIP)
caches it in ``$SELBENCH_HOME/reference/`` under a key of its recipe, the corpus and the
generator's version, written atomically under a lock (:func:`~selbench.fileutil.cached_directory`).

Strategies get a :class:`Captioner` from :func:`reference_captioner` (also in
:mod:`selbench.toolbox`): ``captioner(images, settings, n=8, seed=0)`` returns ``n``
captions per image. On a real pool the SynthWeb captioner is refused, as the reference
CLIP is: a model of 32-pixel shapes says nothing about photographs. There a local
captioner checkpoint is named instead, ``open_clip:ARCH:/path/to/weights.pt`` with an
open_clip CoCa architecture (e.g. ``coca_ViT-L-14``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from selbench.configs import ScaleConfig, find_config, load_scale
from selbench.errors import ConfigError
from selbench.fileutil import file_sha256
from selbench.paths import selbench_home
from selbench.reference import (
    REFERENCE_SEED,
    Reference,
    build_on_corpus,
    load_recipe,
    recipe_spec,
)

if TYPE_CHECKING:
    import torch

    from selbench.captioning import DecodeSettings
    from selbench.progress import Progress, Tracker

#: What ``captioner="reference"`` means; ``open_clip:ARCH:/path`` names local weights.
REFERENCE_SPEC = "reference"


def captioner_recipe(spec: str = "") -> tuple[ScaleConfig, ScaleConfig, Any]:
    """(captioner recipe, reference recipe, corpus) of reference recipe ``spec``
    (:func:`selbench.reference.recipe_spec`). The captioner's recipe is the one the
    reference recipe names under ``captioner`` (a path relative to the reference recipe's
    folder, or a name in ``configs/scales/``); it must be a CoCa and has no corpus of
    its own: it trains on the reference recipe's."""
    reference, corpus = load_recipe(spec)
    where = find_config("scales", recipe_spec(spec))
    if not reference.captioner:
        raise ConfigError(
            f"reference recipe {where} names no 'captioner': add e.g. "
            "'captioner: reference-captioner' (configs/scales/reference.yaml)"
        )
    relative = where.parent / reference.captioner
    recipe = load_scale(str(relative) if relative.is_file() else reference.captioner)
    if recipe.corpus is not None:
        raise ConfigError(
            f"captioner recipe {reference.captioner!r} has a 'corpus': it trains on its "
            f"reference recipe's ({where}); remove it"
        )
    from selbench.train import model_config

    if "multimodal_cfg" not in model_config(recipe.model):
        raise ConfigError(
            f"captioner recipe {reference.captioner!r}: model {recipe.model!r} is not a CoCa "
            "(no multimodal_cfg); use e.g. selbench-tiny-coca"
        )
    return recipe, reference, corpus


def captioner_dir(recipe: ScaleConfig, corpus: Any) -> Path:
    """The cache folder of a captioner recipe trained on ``corpus`` (a SynthWebConfig):
    the recipe, the corpus and the generator version in its key, as the reference CLIP's."""
    from selbench.synthweb.generate import GENERATOR_VERSION

    settings = json.dumps(corpus.model_dump(), sort_keys=True)
    key = f"{GENERATOR_VERSION}\0{recipe.model_dump_json()}\0{settings}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return selbench_home() / "reference" / f"{recipe.name}-{digest}"


def cached_reference_captioner(spec: str = "") -> Path | None:
    """The checkpoint of recipe ``spec``'s captioner when it is built, else None."""
    recipe, _, corpus = captioner_recipe(spec)
    folder = captioner_dir(recipe, corpus)
    ok = (folder / "model.pt").is_file() and (folder / "meta.json").is_file()
    return folder / "model.pt" if ok else None


def build_reference_captioner(
    spec: str = "", device: str = "cpu", progress: Progress | None = None
) -> Reference:
    """The reference captioner of reference recipe ``spec``, trained now if it is not
    cached: the reference corpus (content-addressed, shared with the reference CLIP), the
    captioner recipe's CoCa trained on all of it with :func:`selbench.train.train_coca`,
    ``model.pt`` and ``meta.json`` written atomically (an interrupted build leaves nothing)."""
    from selbench.train import train_coca

    recipe, reference, corpus = captioner_recipe(spec)

    def train(model: Any, data: Any, samples: int, progress: Progress) -> Any:
        return train_coca(model, data, recipe, samples, REFERENCE_SEED, device, progress)

    return build_on_corpus(
        captioner_dir(recipe, corpus), recipe, corpus, train, device, progress,
        "Reference captioner", meta_extra={"reference_recipe": reference.name},
    )  # fmt: skip


@dataclass
class Captioner:
    """A prepared captioning model: ``captioner(images, settings, n, seed)``.

    ``images`` are PIL images or an already preprocessed ``(N, 3, H, W)`` tensor;
    the result holds ``n`` captions per image, in the images' order. Decoding is
    :func:`selbench.captioning.generate_captions` in batches of ``batch_size`` images
    (each image repeated ``n`` times); nucleus sampling draws from a generator seeded by
    ``seed`` and the batch's first image index, so the same images, settings, seed and
    batch size give the same captions on a device."""

    model: Any
    preprocess: Any
    device: str
    weights_digest: str
    description: str
    details: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 256

    def __call__(
        self,
        images: Sequence[Any] | torch.Tensor,
        settings: DecodeSettings | None = None,
        n: int = 1,
        seed: int = 0,
        progress: Tracker | None = None,
        description: str = "Captioning",
    ) -> list[list[str]]:
        import torch

        from selbench.captioning import generate_captions
        from selbench.progress import NullProgress

        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        count = len(images)
        per_batch = max(1, self.batch_size // n)
        starts = range(0, count, per_batch)
        progress = progress or NullProgress()
        out: list[list[str]] = []
        for start in progress.track(starts, description, total=len(starts)):
            chunk = images[start : start + per_batch]
            if not isinstance(chunk, torch.Tensor):
                chunk = torch.stack([self.preprocess(image) for image in chunk])
            batch = chunk.to(self.device).repeat_interleave(n, dim=0)
            batch_seed = int(np.random.SeedSequence([seed, start]).generate_state(1)[0])
            texts = generate_captions(self.model, batch, settings, seed=batch_seed)
            out += [texts[i : i + n] for i in range(0, len(texts), n)]
        return out


def _load_open_clip(spec: str, device: str) -> Captioner:
    """A CoCa from local weights: ``open_clip:ARCH:/path`` (a state dict or an open_clip
    checkpoint); nothing is downloaded."""
    from selbench.captioning import can_caption
    from selbench.train import build_model, load_checkpoint

    arch, _, weights = spec.partition(":")[2].partition(":")
    path = Path(weights).expanduser()
    if not arch or not path.is_file():
        raise ConfigError(
            f"captioner {spec!r}: name an open_clip CoCa architecture and a local weights "
            "file, open_clip:ARCH:/path/to/weights.pt (e.g. coca_ViT-L-14); selbench does "
            "not download weights"
        )
    model, preprocess, _ = build_model(arch, REFERENCE_SEED, device)
    if not can_caption(model):
        raise ConfigError(f"captioner {spec!r}: {arch!r} is not an open_clip CoCa")
    try:
        load_checkpoint(model, path, device)
    except RuntimeError as exc:
        raise ConfigError(f"captioner weights {path} do not fit {arch!r}: {exc}") from None
    return Captioner(model, preprocess, device, file_sha256(path), spec, {"resolved_to": spec})


def reference_captioner(
    pool: Any,
    device: str = "cpu",
    progress: Progress | None = None,
    spec: str = REFERENCE_SPEC,
) -> Captioner:
    """The captioner a strategy captions ``pool`` with. ``spec``: ``reference`` (or
    ``reference:RECIPE``), SynthWeb's reference captioner, built on first use; refused
    on a pool that is not SynthWeb. ``open_clip:ARCH:/path/to/weights.pt``: a local
    open_clip CoCa checkpoint, on any pool."""
    import torch

    from selbench.train import build_model

    name, _, args = spec.partition(":")
    if name == "open_clip":
        return _load_open_clip(spec, device)
    if name != REFERENCE_SPEC:
        raise ConfigError(
            f"captioner {spec!r}: use 'reference' (SynthWeb's reference captioner) or "
            "'open_clip:ARCH:/path/to/weights.pt' (a local CoCa checkpoint)"
        )
    if getattr(pool, "kind", "synthweb") != "synthweb":
        raise ConfigError(
            f"pool {getattr(pool, 'name', '?')!r} is not SynthWeb: its reference captioner "
            "(a CoCa of 32-pixel shapes) says nothing about photographs. Name a local "
            "captioner checkpoint instead, e.g. -p captioner=open_clip:coca_ViT-L-14:"
            "/path/to/weights.pt (docs/embeddings.md)"
        )
    built = build_reference_captioner(args, device, progress)
    recipe, _, _ = captioner_recipe(args)
    model, preprocess, _ = build_model(recipe.model, REFERENCE_SEED, device)
    model.load_state_dict(torch.load(built.checkpoint, map_location=device, weights_only=True))
    model.to(device).eval()
    details = {
        "resolved_to": f"synthweb reference captioner ({recipe.name})",
        "trained": built.built,
        "checkpoint": str(built.checkpoint),
    }
    return Captioner(model, preprocess, device, built.sha256, f"reference:{recipe.name}", details)
