"""SynthWeb's reference model: the stand-in for the pretrained CLIP that real pipelines use.

CLIP-score filtering (DataComp: OpenAI's ViT-L/14), SemDeDup (a pretrained CLIP image
encoder), the DataComp-era filters and TL;DR's release (BLIP) all score or embed a pool
with a model trained on *other* data. Offline there are no such weights, and a CLIP trained
on the very pool being filtered (the ``proxy`` embedders) has learnt that pool's noise
too. The reference model closes that gap on SynthWeb: a CLIP trained once, by
:func:`build_reference` (``selbench reference build``), on a separate clean SynthWeb
corpus that shares no image with any pool or evaluation set generated from another seed,
at four times the default pool's size (``configs/scales/reference.yaml``). It is cached in
``$SELBENCH_HOME/reference/`` under a key of its recipe, its corpus and the generator's
version, so a changed recipe or generator never reuses old weights.

On a real pool the same strategy parameters take the paper's own weights from a local
file (``open_clip:ViT-L-14:/path/to/weights.pt``); the reference model is refused there,
because a model of 32-pixel shapes says nothing about photographs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selbench.configs import ScaleConfig, find_config, load_scale
from selbench.errors import ConfigError
from selbench.fileutil import cached_directory, file_sha256
from selbench.paths import selbench_home

if TYPE_CHECKING:
    from selbench.progress import Progress

#: The recipe ``reference`` means; the environment variable names another one (a scale
#: YAML with a ``corpus``), e.g. a small one for tests.
DEFAULT_RECIPE = "reference"
RECIPE_VARIABLE = "SELBENCH_REFERENCE_RECIPE"
#: Seed of the reference model's initialisation and data order (one model per recipe).
REFERENCE_SEED = 0


@dataclass(frozen=True)
class Reference:
    """A built reference model: its checkpoint, the checkpoint's sha256 and what built it."""

    checkpoint: Path
    sha256: str
    meta: dict[str, Any]
    built: bool  # True when this call trained it, False on a cache hit


def recipe_spec(spec: str = "") -> str:
    """The recipe a ``reference[:RECIPE]`` spec names: ``RECIPE``, else
    ``$SELBENCH_REFERENCE_RECIPE``, else ``reference``."""
    return spec or os.environ.get(RECIPE_VARIABLE) or DEFAULT_RECIPE


def load_recipe(spec: str = "") -> tuple[ScaleConfig, Any]:
    """The reference recipe and its corpus (a validated ``SynthWebConfig``). The corpus
    must be clean: a reference model stands for a pretrained one, trained on data
    without the pool's pathologies."""
    from selbench.synthweb import PATHOLOGIES, SynthWebConfig
    from selbench.synthweb.config import rate_field

    name = recipe_spec(spec)
    recipe = load_scale(name)
    where = find_config("scales", name)
    if recipe.corpus is None:
        raise ConfigError(
            f"recipe {where} has no 'corpus': a reference recipe names the SynthWeb settings "
            "of the separate clean corpus it trains on (see configs/scales/reference.yaml)"
        )
    try:
        corpus = SynthWebConfig(**recipe.corpus)
    except Exception as exc:  # pydantic.ValidationError names the field
        raise ConfigError(f"recipe {where}: invalid 'corpus': {exc}") from None
    noisy = [p for p in PATHOLOGIES if getattr(corpus, rate_field(p)) > 0]
    if noisy:
        raise ConfigError(
            f"recipe {where}: the reference corpus must be clean, but it sets "
            + ", ".join(f"{rate_field(p)}={getattr(corpus, rate_field(p))}" for p in noisy)
            + " (set them to 0)"
        )
    return recipe, corpus


def reference_dir(recipe: ScaleConfig) -> Path:
    """The cache folder of a recipe's reference model (recipe, corpus and generator
    version in its key)."""
    from selbench.synthweb.generate import GENERATOR_VERSION

    corpus = json.dumps(recipe.corpus, sort_keys=True)  # not in model_dump_json()
    key = f"{GENERATOR_VERSION}\0{recipe.model_dump_json()}\0{corpus}"
    return (
        selbench_home()
        / "reference"
        / f"{recipe.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    )


def build_reference(
    spec: str = "", device: str = "cpu", progress: Progress | None = None
) -> Reference:
    """The reference model of recipe ``spec`` (see :func:`recipe_spec`), trained now if it
    is not cached: generate the clean corpus (content-addressed, like every SynthWeb),
    train the recipe's CLIP on all of it with selbench's own training loop, and write
    ``model.pt`` and ``meta.json`` atomically (an interrupted build leaves nothing)."""
    from selbench.train import train_clip

    recipe, corpus = load_recipe(spec)

    def train(model: Any, data: Any, samples: int, progress: Progress) -> Any:
        return train_clip(
            model, data, recipe, samples, REFERENCE_SEED, device, progress,
            description="Reference: training",
        )  # fmt: skip

    return build_on_corpus(
        reference_dir(recipe), recipe, corpus, train, device, progress, "Reference corpus"
    )


def build_on_corpus(
    folder: Path,
    recipe: ScaleConfig,
    corpus: Any,
    train: Any,
    device: str,
    progress: Progress | None,
    label: str,
    meta_extra: dict[str, Any] | None = None,
) -> Reference:
    """One model of the reference family, cached in ``folder``: generate the clean
    ``corpus``, build ``recipe.model`` from :data:`REFERENCE_SEED`, load the corpus and call
    ``train(model, data, samples, progress)`` for ``recipe.epochs`` over it, then write
    ``model.pt`` and ``meta.json`` atomically (:func:`cached_directory`). Shared by the
    reference CLIP and the reference captioner (:mod:`selbench.reference_captioner`)."""
    from selbench.pools import ensure_synthweb
    from selbench.pools.shards import ShardPool
    from selbench.progress import NullProgress
    from selbench.train import build_model, load_training_data

    progress = progress or NullProgress()

    def load(entry: Path) -> Path | None:
        ok = (entry / "model.pt").is_file() and (entry / "meta.json").is_file()
        return entry / "model.pt" if ok else None

    def build(tmp: Path) -> None:
        import torch

        started = time.perf_counter()
        corpus_dir = ensure_synthweb(
            corpus.model_dump(), progress=progress.counter("Reference corpus: generating")
        )
        pool = ShardPool(corpus_dir / "pool", name="synthweb-reference-corpus")
        model, preprocess, tokenizer = build_model(recipe.model, REFERENCE_SEED, device)
        data = load_training_data(pool, preprocess, tokenizer, progress, f"{label}: loading")
        result = train(model, data, int(round(len(data) * recipe.epochs)), progress)
        torch.save(model.state_dict(), tmp / "model.pt")
        meta = {
            "recipe": recipe.model_dump(),
            **(meta_extra or {}),
            "corpus": corpus.model_dump(),
            "corpus_dir": corpus_dir.name,
            "corpus_fingerprint": pool.fingerprint,
            "corpus_size": len(data),
            "samples_seen": result.samples_seen,
            "final_loss": result.final_loss,
            "train_seconds": result.seconds,
            "build_seconds": time.perf_counter() - started,
            "seed": REFERENCE_SEED,
            "device": device,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    checkpoint, hit = cached_directory(folder, load, build)
    meta = json.loads((checkpoint.parent / "meta.json").read_text())
    return Reference(checkpoint, file_sha256(checkpoint), meta, built=not hit)
