"""Built-in embedders: ``proxy`` (trained on the pool, offline default), ``reference``
(SynthWeb's stand-in for a pretrained CLIP, :mod:`selbench.reference`), ``open_clip``
(any open_clip architecture with weights from a local file) and ``datacomp`` (DataComp
CommonPool's precomputed CLIP features, :mod:`selbench.datacomp_metadata`)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from selbench import hookimpl
from selbench.configs import find_config, load_scale
from selbench.datacomp_metadata import DataCompFeaturesEmbedder
from selbench.embedders import Embedder
from selbench.errors import ConfigError
from selbench.paths import selbench_home
from selbench.toolbox import (
    build_model,
    cached_directory,
    checkpoint_in,
    file_sha256,
    load_training_data,
    train_clip,
)

log = logging.getLogger(__name__)

PROXY_SEED = 0  # one proxy per (pool, recipe), shared by every strategy seed


class ProxyEmbedder(Embedder):
    """A small open_clip CLIP trained contrastively on the pool itself.

    Spec: ``proxy`` or ``proxy:RECIPE`` (a scale in ``configs/scales/``, default ``proxy``:
    the tiny architecture, 2 epochs of the pool). The checkpoint is cached per (pool
    fingerprint, recipe) under ``$SELBENCH_HOME/proxies`` and reused like the embeddings.
    """

    name = "proxy"
    summary = "small CLIP trained on the pool itself (offline default)"
    reference = (
        "TL;DR (arXiv 2305.20087) and EL2N (Paul et al., 2021) score with models "
        "trained on the source data"
    )

    def __init__(self, args: str = "") -> None:
        super().__init__(args)
        self.recipe = load_scale(args or "proxy")
        self.recipe_path = find_config("scales", args or "proxy")

    @property
    def architecture(self) -> str:
        return self.recipe.model

    def checkpoint_dir(self, pool_fingerprint: str) -> Path:
        recipe = hashlib.sha256(self.recipe.model_dump_json().encode()).hexdigest()[:10]
        return selbench_home() / "proxies" / f"{pool_fingerprint}-{self.recipe.name}-{recipe}"

    def prepare(self, pool: Any, device: str, progress: Any) -> None:
        self.device = device
        model, preprocess, tokenizer = build_model(self.recipe.model, PROXY_SEED, device)

        def build(folder: Path) -> None:
            self._train(model, preprocess, tokenizer, pool, device, progress, folder)

        checkpoint, hit = cached_directory(
            self.checkpoint_dir(pool.fingerprint), checkpoint_in, build
        )
        self.details["trained"] = not hit
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state)
        model.eval()
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.weights_digest = file_sha256(checkpoint)
        self.details["checkpoint"] = str(checkpoint)

    def _train(self, model, preprocess, tokenizer, pool, device, progress, folder: Path) -> None:
        """Train the proxy on the pool; write ``model.pt`` and ``meta.json`` into ``folder``."""
        data = load_training_data(pool, preprocess, tokenizer, progress, "Proxy: loading pool")
        samples = int(round(len(data) * self.recipe.epochs))
        started = time.perf_counter()
        # its FLOPs are charged to training/proxy, or training/proxy_<recipe> for another recipe
        recipe = "" if self.recipe.name == "proxy" else f" {self.recipe.name}"
        result = train_clip(
            model,
            data,
            self.recipe,
            samples,
            PROXY_SEED,
            device,
            progress,
            description=f"Proxy{recipe}: training",
        )
        self.details["train_seconds"] = time.perf_counter() - started
        self.details["train_final_loss"] = result.final_loss
        torch.save(model.state_dict(), folder / "model.pt")
        (folder / "meta.json").write_text(
            json.dumps(
                {
                    "recipe": self.recipe.model_dump(),
                    "pool_fingerprint": pool.fingerprint,
                    "samples_seen": result.samples_seen,
                    "final_loss": result.final_loss,
                    "seconds": result.seconds,
                    "seed": PROXY_SEED,
                },
                indent=2,
            )
        )


class ReferenceEmbedder(Embedder):
    """The pretrained model a paper scores with, per pool (:mod:`selbench.reference`).

    Spec: ``reference`` or ``reference:RECIPE``. On a SynthWeb pool: SynthWeb's reference
    CLIP, trained once on a separate clean SynthWeb corpus (recipe default
    ``configs/scales/reference.yaml``, or ``$SELBENCH_REFERENCE_RECIPE``). On a real pool:
    the embedder its pool YAML names under ``reference`` (the paper's checkpoint as local
    weights, ``open_clip:ViT-L-14:/path``); when it names none, the pool's own
    ``proxy:scorer``, with a warning that says how to name one. ``details["resolved_to"]``
    records which, and the embedder id carries its weights' digest.
    """

    name = "reference"
    summary = "the paper's pretrained model: SynthWeb's reference CLIP, or the pool YAML's"
    reference = (
        "stand-in for the pretrained CLIP of DataComp's CLIP-score filter (Gadre et al., "
        "2023), SemDeDup (Abbas et al., 2023) and TL;DR's release (BLIP)"
    )

    def __init__(self, args: str = "") -> None:
        super().__init__(args)
        from selbench.reference import load_recipe

        self.recipe, _ = load_recipe(args)  # a bad recipe fails before any work
        self._architecture = self.recipe.model

    @property
    def architecture(self) -> str:
        return self._architecture

    def prepare(self, pool: Any, device: str, progress: Any) -> None:
        self.device = device
        if getattr(pool, "kind", "synthweb") == "synthweb":
            self._prepare_synthweb(device, progress)
            return
        from selbench.registry import get_registry

        spec = getattr(pool, "reference", None)
        if not spec:
            spec = "proxy:scorer"
            log.warning(
                "pool %r names no reference model, so `reference` falls back to its own "
                "proxy:scorer (a CLIP trained on the pool); to score as the paper did, add "
                "to its pool YAML: reference: open_clip:ViT-L-14:/path/to/weights.pt "
                "(docs/embeddings.md)",
                getattr(pool, "name", "?"),
            )
        if spec.split(":", 1)[0] == self.name:
            raise ConfigError(f"pool {pool.name!r}: its reference cannot be {spec!r} itself")
        delegate = get_registry().make_embedder(spec)
        delegate.prepare(pool, device, progress)
        self.model, self.preprocess, self.tokenizer = (
            delegate.model,
            delegate.preprocess,
            delegate.tokenizer,
        )
        self.weights_digest, self._architecture = delegate.weights_digest, delegate.architecture
        precomputed = getattr(delegate, "precomputed_batches", None)
        if precomputed is not None:  # features shipped with the pool (datacomp:l14:PATH)
            self.precomputed_batches = precomputed
            self.temperature = getattr(delegate, "temperature", None)
            # and the model that computed them, for a target set's images (features_model)
            self.image_embedder = getattr(delegate, "image_embedder", None)
        self.details.update(delegate.details)
        self.details["resolved_to"] = spec

    def _prepare_synthweb(self, device: str, progress: Any) -> None:
        from selbench.reference import build_reference

        built = build_reference(self.args, device, progress)
        model, preprocess, tokenizer = build_model(self.recipe.model, 0, device)
        model.load_state_dict(torch.load(built.checkpoint, map_location=device, weights_only=True))
        model.eval()
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.weights_digest = built.sha256
        self.details["resolved_to"] = f"synthweb reference ({self.recipe.name})"
        self.details["trained"] = built.built
        self.details["checkpoint"] = str(built.checkpoint)
        if built.built:
            self.details["train_seconds"] = built.meta["train_seconds"]
            self.details["train_final_loss"] = built.meta["final_loss"]


class OpenClipEmbedder(Embedder):
    """Any open_clip architecture with weights from a local file.

    Spec: ``open_clip:ARCH:/path/to/weights.pt`` (a state dict or an open_clip
    checkpoint). Nothing is downloaded: open_clip's pretrained tags need the internet, so
    fetch the weights once on a connected machine and pass the file.
    """

    name = "open_clip"
    summary = "open_clip model with local weights: open_clip:ARCH:/path/to/weights.pt"
    reference = "OpenCLIP (Cherti et al., CVPR 2023; Ilharco et al., 2021)"

    def __init__(self, args: str = "") -> None:
        super().__init__(args)
        arch, _, weights = args.partition(":")
        if not arch or not weights:
            raise ConfigError(
                f"embedder 'open_clip:{args}' needs an architecture and a local weights file: "
                "open_clip:ARCH:/path/to/weights.pt (download the weights once on a machine "
                "with internet, e.g. with open_clip.create_model_and_transforms, and pass the file)"
            )
        self.arch, self.weights = arch, Path(weights).expanduser()
        if not self.weights.is_file():
            raise ConfigError(
                f"weights file {self.weights} for open_clip:{arch} does not exist; selbench does "
                "not download weights at run time, pass a local file"
            )

    @property
    def architecture(self) -> str:
        return self.arch

    def prepare(self, pool: Any, device: str, progress: Any) -> None:
        self.device = device
        # Validates the name and registers selbench's own architectures (configs/models).
        model, preprocess, tokenizer = build_model(self.arch, seed=0, device=device)
        state = torch.load(self.weights, map_location=device, weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(
                f"weights {self.weights} do not fit open_clip architecture {self.arch!r}: {exc}"
            ) from None
        model.eval()
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.weights_digest = file_sha256(self.weights)


@hookimpl
def register_embedders(register):
    register(ProxyEmbedder)
    register(ReferenceEmbedder)
    register(OpenClipEmbedder)
    register(DataCompFeaturesEmbedder)
