"""Online selection inside selbench's training recipe (the in-memory engine).

:class:`OnlineSelector` is what :func:`selbench.train.train_clip` calls at every step when
a run names an online strategy: the recipe draws ``ratio x batch_size`` indices from its
seeded permutation stream (a *super-batch*) instead of ``batch_size``, the selector hands
them to the strategy as a :class:`~selbench.online.contract.SuperBatch` (the preprocessed
images and tokens, the learner, the frozen reference model, a seeded generator of its
own), checks the choice (:func:`~selbench.online.contract.choose_checked`: exactly
``batch_size`` distinct indices) and returns the chosen pool indices; the recipe then
crops and trains on those alone. Nothing else of the recipe changes: the optimiser,
schedule, crop generator and step count are those of plain training, so ``uniform`` at
ratio 1 trains bit-identically to a run without online selection.

The selector counts what scoring cost: each model's forward passes (examples scored) and
the super-batch logit matrices, and turns them into FLOPs (:meth:`OnlineSelector.compute`)
with the counter of :mod:`selbench.flops`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from selbench.errors import ConfigError
from selbench.online.contract import OnlineStrategy, SuperBatch, choose_checked

#: Steps between two points of the selector's series (as the training loss curve).
SERIES_EVERY = 10


def online_seed(seed: int) -> int:
    """The seed of a run's online generator: derived from the run's seed, independent of
    the recipe's permutation and crop generators."""
    digest = hashlib.sha256(f"selbench-online:{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2**31


def input_shapes(model: Any) -> tuple[tuple[int, ...], int, int]:
    """(image size, context length, vocabulary size) an open_clip model takes."""
    size = getattr(getattr(model, "visual", None), "image_size", None)
    image = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    vocab = getattr(model, "vocab_size", None)
    if vocab is None:
        embedding = getattr(model, "token_embedding", None)
        vocab = getattr(embedding, "num_embeddings", None)
    return image, getattr(model, "context_length", None), vocab  # type: ignore[return-value]


def check_reference(learner: Any, reference: Any, learner_name: str, reference_name: str) -> None:
    """Refuse a reference model that cannot score the learner's super-batch: online
    scoring feeds both models the same preprocessed images and tokens."""
    mine, theirs = input_shapes(learner), input_shapes(reference)
    if mine != theirs:
        raise ConfigError(
            f"online reference {reference_name!r} takes images of {theirs[0]} px, "
            f"{theirs[1]} tokens from a vocabulary of {theirs[2]}; the learner "
            f"({learner_name}) takes {mine[0]} px, {mine[1]} tokens, vocabulary {mine[2]}. "
            "Both score the same super-batch, so they must match: name a reference of the "
            "learner's input shapes with --online-reference"
        )


class OnlineSelector:
    """One run's online selection: the ``train_clip`` hook (``draw_size``, ``choose``).

    ``images`` and ``tokens`` are the training data (the recipe's ``TrainingData``),
    ``uids`` their pool uids in the same order, ``batch_size`` the step's batch. When the
    data holds fewer than ``ratio x batch_size`` examples, the super-batch is the whole
    data (``effective_ratio`` says so).
    """

    def __init__(
        self,
        strategy: OnlineStrategy,
        images: torch.Tensor,
        tokens: torch.Tensor,
        uids: Sequence[str],
        learner: torch.nn.Module,
        batch_size: int,
        seed: int,
        reference: torch.nn.Module | None = None,
        score_batch_size: int | None = None,
    ) -> None:
        if strategy.needs_reference and reference is None:
            raise ConfigError(
                f"online method {strategy.name!r} scores with a reference model and none was given"
            )
        if len(uids) != len(images):
            raise ConfigError(f"{len(images)} training images but {len(uids)} uids")
        self.strategy, self.images, self.tokens, self.uids = strategy, images, tokens, uids
        self.learner = learner
        self.reference = reference if strategy.needs_reference else None
        self.keep = int(batch_size)
        self.draw_size = min(strategy.super_batch_size(self.keep), len(images))
        self.generator = torch.Generator().manual_seed(online_seed(seed))
        self.score_batch_size = score_batch_size
        self.step = 0
        self.forward_passes: dict[str, int] = {}
        self.scored_batches: dict[str, int] = {}
        self.seconds = 0.0
        self.series: dict[str, list[tuple[int, float]]] = {}

    @property
    def effective_ratio(self) -> float:
        return self.draw_size / self.keep

    def choose(self, drawn: torch.Tensor) -> torch.Tensor:
        """The pool indices, among the ``drawn`` super-batch, to train this step on."""
        started = time.perf_counter()
        drawn = drawn.reshape(-1).to(torch.long)
        batch = SuperBatch(
            images=self.images[drawn],
            texts=self.tokens[drawn],
            uids=[self.uids[i] for i in drawn.tolist()],
            keep=self.keep,
            learner=self.learner,
            reference=self.reference,
            generator=self.generator,
            step=self.step,
            score_batch_size=self.score_batch_size,
        )
        chosen = choose_checked(self.strategy, batch)
        for model, examples in batch.forward_passes.items():
            self.forward_passes[model] = self.forward_passes.get(model, 0) + examples
            self.scored_batches[model] = self.scored_batches.get(model, 0) + 1
        if self.step % SERIES_EVERY == 0:
            self._record(batch, chosen)
        self.step += 1
        self.seconds += time.perf_counter() - started
        return drawn[chosen]

    def _record(self, batch: SuperBatch, chosen: torch.Tensor) -> None:
        """Every SERIES_EVERY steps, the mean per-example loss of what was chosen and of
        the whole super-batch, for each model the strategy scored with (the cached
        scores: recording costs no forward pass)."""
        for model in batch.forward_passes:
            losses = batch.learner_losses() if model == "learner" else batch.reference_losses()
            chosen_mean = float(losses[chosen.to(losses.device)].mean())
            self.series.setdefault(f"{model}_loss_chosen", []).append((self.step, chosen_mean))
            self.series.setdefault(f"{model}_loss_superbatch", []).append(
                (self.step, float(losses.mean()))
            )

    def compute(self) -> dict[str, float]:
        """``flops/online/<model>``: each scoring model's forward FLOPs per example (both
        towers, :func:`selbench.flops.clip_forward_flops`) times the examples it scored,
        plus one super-batch logit matrix (``N x N x d``) per scored super-batch."""
        from selbench.flops import clip_forward_flops, clip_loss_flops, embed_dim

        found: dict[str, float] = {}
        for name, model in (("learner", self.learner), ("reference", self.reference)):
            examples = self.forward_passes.get(name, 0)
            if model is None or not examples:
                found[f"flops/online/{name}"] = 0.0
                continue
            per_example = sum(clip_forward_flops(model, None, None).values())
            loss = clip_loss_flops(self.draw_size, embed_dim(model), matmuls=1)
            logits = self.scored_batches[name] * loss
            found[f"flops/online/{name}"] = float(per_example * examples + logits)
        return found

    def metrics(self) -> dict[str, float]:
        """What the run logs of its online selection besides FLOPs."""
        return {
            "online/ratio": float(self.strategy.ratio),
            "online/effective_ratio": self.effective_ratio,
            "online/super_batch_size": float(self.draw_size),
            "online/steps": float(self.step),
            "online/seconds": self.seconds,
            **{f"online/examples_scored/{k}": float(v) for k, v in self.forward_passes.items()},
        }
