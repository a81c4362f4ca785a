"""The online selection contract: what an online strategy receives at each training step
and what it must return.

Offline strategies (:mod:`selbench.strategy`) choose a subset of the pool once, before
training. An *online* strategy chooses at every step: the harness draws a *super-batch*
of ``ratio x batch_size`` examples, hands it to :meth:`OnlineStrategy.choose` as a
:class:`SuperBatch` (the examples, the learner being trained, an optional frozen
reference model, a seeded generator) and trains the step on the ``keep`` examples the
strategy returns. The harness, not the strategy, enforces the count
(:func:`validate_choice`; :func:`choose_checked` runs a strategy with every check).

Scoring a super-batch is the cost of online selection: :class:`SuperBatch` computes each
model's logits once, under ``torch.no_grad()`` and in eval mode, caches them for every
strategy that asks, and counts the examples each model evaluated (``forward_passes``) so
that the harness can charge the FLOPs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from selbench.errors import ConfigError, PluginError
from selbench.online.losses import softmax_losses
from selbench.strategy import parse_params


class OnlineParams(BaseModel):
    """Parameters every online strategy has: the super-batch ratio."""

    model_config = ConfigDict(extra="forbid")

    ratio: int = Field(
        default=4,
        ge=1,
        description="super-batch size / batch size; selbench's default, shared by the "
        "built-ins so that they compare at one scoring cost (JEST, Evans et al. 2024, "
        "reports filtering ratios 50%, 80% and 90%: ratios 2, 5 and 10)",
    )


class OnlineStrategy:
    """Base class for online (per-step) selection strategies.

    Subclasses set ``name`` (the method's name), ``summary`` (one line), ``reference``
    (the paper, with the equation, algorithm or table its defaults come from),
    ``needs_reference`` (whether :meth:`choose` uses ``batch.reference``; the harness then
    must supply one), ``stochastic`` (whether the generator changes the choice under the
    default parameters; override :meth:`is_stochastic` when a parameter changes that) and
    ``Params`` (a pydantic model with ``extra="forbid"`` and a ``ratio: int`` field, ge=1;
    every field has a default and a description naming its source; subclass
    :class:`OnlineParams`). They implement :meth:`choose`. ``expected_check_failures``
    maps an online conformance check's name (:mod:`selbench.online.kit`) to the reason
    this strategy is expected to fail it.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    needs_reference: ClassVar[bool] = False
    stochastic: ClassVar[bool] = True
    Params: ClassVar[type[BaseModel]] = OnlineParams
    expected_check_failures: ClassVar[dict[str, str]] = {}

    def __init__(self, params: BaseModel | Mapping[str, Any] | None = None) -> None:
        if "ratio" not in self.Params.model_fields:
            name = getattr(self, "name", type(self).__name__)
            raise PluginError(
                f"online strategy {name!r}: its Params has no `ratio` field "
                "(super-batch size / batch size); subclass selbench.online.OnlineParams"
            )
        if isinstance(params, self.Params):
            self.params: Any = params
        elif isinstance(params, BaseModel):
            self.params = parse_online_params(type(self), params.model_dump())
        else:
            self.params = parse_online_params(type(self), dict(params or {}))

    @property
    def ratio(self) -> int:
        """Super-batch size / batch size."""
        return int(self.params.ratio)

    def super_batch_size(self, batch_size: int) -> int:
        """How many examples the harness draws for a step that trains on ``batch_size``."""
        return self.ratio * int(batch_size)

    def is_stochastic(self) -> bool:
        """Whether the generator changes the choice with these parameters (default: the
        class's ``stochastic``)."""
        return bool(self.stochastic)

    def expected_failures(self) -> dict[str, str]:
        """Online conformance checks (:mod:`selbench.online.kit`) expected to fail with
        these parameters, with the reason (default: the class's ``expected_check_failures``)."""
        return dict(self.expected_check_failures)

    def choose(self, batch: SuperBatch) -> np.ndarray | torch.Tensor:  # pragma: no cover
        """The indices into ``batch`` (``0 <= i < len(batch)``) of exactly ``batch.keep``
        distinct examples to train this step on. All randomness from ``batch.generator``."""
        raise NotImplementedError(f"online strategy {self.name!r} does not implement choose()")


def parse_online_params(cls: type[OnlineStrategy], values: Mapping[str, Any]) -> BaseModel:
    """Validate ``values`` against ``cls.Params``; errors name the strategy and the key."""
    return parse_params(cls, values, kind="online method")


def _model_device(model: torch.nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    return None


def _unpack(output: Any) -> tuple[Any, Any, Any, Any]:
    """(image_features, text_features, logit_scale, logit_bias or None) from an open_clip
    model's output: a dict (``output_dict=True``) or a tuple ``(img, txt, scale[, bias])``."""
    if isinstance(output, Mapping):
        try:
            img, txt, scale = (
                output["image_features"],
                output["text_features"],
                output["logit_scale"],
            )
        except KeyError as exc:
            raise ConfigError(
                f"the model's output has no {exc.args[0]!r}; online selection expects "
                "open_clip's CLIP output (image_features, text_features, logit_scale)"
            ) from None
        return img, txt, scale, output.get("logit_bias")
    if isinstance(output, (tuple, list)) and len(output) in (3, 4):
        bias = output[3] if len(output) == 4 else None
        return output[0], output[1], output[2], bias
    raise ConfigError(
        f"the model returned {type(output).__name__}; online selection expects open_clip's "
        "CLIP output: a dict with image_features, text_features, logit_scale (and "
        "logit_bias), or the tuple (image_features, text_features, logit_scale[, logit_bias])"
    )


@dataclass(kw_only=True)
class SuperBatch:
    """One step's candidates and what a strategy may score them with.

    ``images`` (N x 3 x H x W) and ``texts`` (N x context tokens) are the preprocessed
    examples, ``uids`` their pool uids, ``keep`` how many the step trains on (the scale's
    batch size, ``1 <= keep <= N``). ``learner`` is the model being trained (an open_clip
    CLIP), ``reference`` an optional frozen model (JEST's pretrained reference),
    ``generator`` the seeded source of all randomness, ``step`` the training step.
    ``score_batch_size`` splits the scoring forward passes into chunks of that many
    examples (None: one pass).

    The scores are computed on first request and cached: :meth:`learner_logits`,
    :meth:`reference_logits` (N x N, ``logit_scale * img @ txt.T + logit_bias``) and
    :meth:`learner_losses`, :meth:`reference_losses` (per-example CLIP loss within the
    super-batch). A model scores under ``torch.no_grad()`` in eval mode, and every module's
    previous mode is restored afterwards. ``forward_passes`` counts, per model
    (``"learner"``, ``"reference"``), the examples it evaluated.
    """

    images: torch.Tensor
    texts: torch.Tensor
    uids: Sequence[str]
    keep: int
    learner: torch.nn.Module
    generator: torch.Generator
    reference: torch.nn.Module | None = None
    step: int = 0
    score_batch_size: int | None = None
    forward_passes: dict[str, int] = field(default_factory=dict, init=False)
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.images)
        if len(self.texts) != n or len(self.uids) != n:
            raise ConfigError(
                f"super-batch of {n} images has {len(self.texts)} texts and "
                f"{len(self.uids)} uids; expected one of each per image"
            )
        if not 1 <= int(self.keep) <= n:
            raise ConfigError(f"super-batch keep={self.keep} is outside [1, {n}] (N = {n})")
        if self.score_batch_size is not None and self.score_batch_size < 1:
            raise ConfigError(f"score_batch_size={self.score_batch_size} must be >= 1")

    def __len__(self) -> int:
        return len(self.images)

    def learner_logits(self) -> torch.Tensor:
        """The learner's N x N image-text logits (rows: images, columns: texts)."""
        return self._logits("learner")

    def reference_logits(self) -> torch.Tensor:
        """The reference model's N x N image-text logits; ConfigError without one."""
        return self._logits("reference")

    def learner_losses(self) -> torch.Tensor:
        """The learner's per-example symmetric CLIP loss within the super-batch."""
        return self._losses("learner")

    def reference_losses(self) -> torch.Tensor:
        """The reference model's per-example symmetric CLIP loss within the super-batch."""
        return self._losses("reference")

    def _losses(self, which: str) -> torch.Tensor:
        key = f"{which}_losses"
        if key not in self._cache:
            self._cache[key] = softmax_losses(self._logits(which))
        return self._cache[key]

    def _logits(self, which: str) -> torch.Tensor:
        key = f"{which}_logits"
        if key not in self._cache:
            model = self.learner if which == "learner" else self.reference
            if model is None:
                raise ConfigError(
                    "this super-batch has no reference model, and the online strategy "
                    "scores with one (needs_reference); pass SuperBatch(reference=...)"
                )
            self._cache[key] = self._score(model)
            self.forward_passes[which] = self.forward_passes.get(which, 0) + len(self)
        return self._cache[key]

    def _score(self, model: torch.nn.Module) -> torch.Tensor:
        """``model``'s logits over the super-batch, in eval mode, without gradients."""
        modes = [(module, module.training) for module in model.modules()]
        device = _model_device(model)
        step = self.score_batch_size or len(self)
        images, texts, scale, bias = [], [], None, None
        try:
            model.eval()
            with torch.no_grad():
                for start in range(0, len(self), step):
                    img = self.images[start : start + step]
                    txt = self.texts[start : start + step]
                    if device is not None:
                        img, txt = img.to(device), txt.to(device)
                    out_img, out_txt, scale, bias = _unpack(model(img, txt))
                    images.append(out_img)
                    texts.append(out_txt)
                logits = _logit_matrix(torch.cat(images), torch.cat(texts), scale, bias)
        finally:
            for module, mode in modes:
                module.train(mode)
        return logits


def _logit_matrix(img: Any, txt: Any, scale: Any, bias: Any) -> torch.Tensor:
    """``scale * img @ txt.T (+ bias)``, half precision promoted to float32, detached."""
    img, txt = torch.as_tensor(img).detach(), torch.as_tensor(txt).detach()
    scale = torch.as_tensor(scale).detach()
    bias = None if bias is None else torch.as_tensor(bias).detach()
    if img.dtype in (torch.float16, torch.bfloat16):
        img, txt = img.float(), txt.float()
    logits = torch.as_tensor(scale, dtype=img.dtype, device=img.device) * img @ txt.T
    if bias is not None:
        logits = logits + torch.as_tensor(bias, dtype=img.dtype, device=img.device)
    return logits


def validate_choice(indices: Any, batch: SuperBatch, name: str) -> torch.Tensor:
    """``indices`` as a CPU LongTensor, checked: one dimension, integers, exactly
    ``batch.keep`` of them, unique, in ``[0, len(batch))``; else PluginError naming the
    strategy (the harness enforces the count, not the strategy)."""
    if isinstance(indices, torch.Tensor):
        found = indices.detach().cpu()
    else:
        try:
            found = torch.from_numpy(np.asarray(indices))
        except (TypeError, ValueError) as exc:
            raise PluginError(
                f"online strategy {name!r} returned {type(indices).__name__}, not indices: {exc}"
            ) from None
    if found.dtype == torch.bool or torch.is_floating_point(found) or torch.is_complex(found):
        raise PluginError(
            f"online strategy {name!r} returned indices of dtype {found.dtype}; expected "
            "integers (positions in the super-batch)"
        )
    found = found.to(torch.long).reshape(-1) if found.ndim == 0 else found.to(torch.long)
    n, keep = len(batch), int(batch.keep)
    if found.ndim != 1 or len(found) != keep:
        count = found.numel()
        raise PluginError(
            f"online strategy {name!r} chose {count} examples of a super-batch of {n} "
            f"(shape {tuple(found.shape)}); expected exactly {keep}, one dimension: "
            "the harness enforces the count"
        )
    outside = found[(found < 0) | (found >= n)]
    if len(outside):
        raise PluginError(
            f"online strategy {name!r} chose index {int(outside[0])}, outside the "
            f"super-batch [0, {n}) ({len(outside)} such indices)"
        )
    unique = torch.unique(found)
    if len(unique) != keep:
        values, counts = torch.unique(found, return_counts=True)
        raise PluginError(
            f"online strategy {name!r} chose index {int(values[counts > 1][0])} more than "
            f"once ({keep - len(unique)} duplicates among {keep}); indices must be unique"
        )
    return found


def choose_checked(strategy: OnlineStrategy, batch: SuperBatch) -> torch.Tensor:
    """Run ``strategy.choose(batch)`` the way the harness does: refuse a strategy that
    needs a reference model when the batch has none, then :func:`validate_choice`."""
    if strategy.needs_reference and batch.reference is None:
        raise ConfigError(
            f"online method {strategy.name!r} scores with a reference model "
            "(needs_reference) and the super-batch has none"
        )
    return validate_choice(strategy.choose(batch), batch, strategy.name)
