"""The one training recipe every strategy's subset goes through.

An open_clip CLIP built from a JSON architecture (``configs/models/``), open_clip's
``ClipLoss``, AdamW with linear warmup and cosine decay (open_clip's recipe; the
schedule is open_clip_train's ``cosine_lr``). Read top to bottom: build, load, train.

A CoCa architecture (``configs/models/selbench-tiny-coca.json``) trains with
:func:`train_coca` instead: the same loop, optimiser, schedule and crop, with open_clip's
``CoCaLoss`` (contrastive + captioning; :mod:`selbench.captioning`).

Protocols:
- ``fixed-compute`` (default, as DataComp): samples seen = pool size x epochs, whatever
  the subset size, so a 25% subset is seen four times as often as the full pool.
- ``fixed-epochs`` (as TL;DR): samples seen = subset size x epochs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from selbench.configs import ScaleConfig
from selbench.errors import ConfigError
from selbench.fileutil import temp_sibling
from selbench.paths import config_dir
from selbench.progress import NullProgress, Tracker

if TYPE_CHECKING:
    from selbench.strategy import PoolView

PROTOCOLS = ("fixed-compute", "fixed-epochs")
# in-memory: this module's loop over a decoded subset (tiny scales on CPU);
# open_clip: open_clip_train under torchrun, streaming the subset's shards
# (selbench.train_open_clip). Both follow the same recipe (configs/scales/).
ENGINES = ("in-memory", "open_clip")


# open_clip is imported inside the functions that use it, not at the top: it takes seconds
# to import (torchvision, transformers), and commands that train nothing (`selbench
# methods`, `leaderboard`, a refused run) import this module through the plugins.


@cache
def _open_clip() -> Any:
    """open_clip, with selbench's own architectures (``configs/models``) registered."""
    import open_clip

    models = config_dir() / "models"
    if models.is_dir():
        open_clip.add_model_config(models)
    return open_clip


def model_config(model_name: str) -> dict[str, Any]:
    """The open_clip architecture config (``vision_cfg``, ``text_cfg``, ...) of a model name,
    selbench's own architectures (``configs/models``) included."""
    config = _open_clip().get_model_config(model_name)
    if config is None:
        raise ConfigError(
            f"unknown model architecture {model_name!r}; add configs/models/{model_name}.json "
            f"or use an open_clip name"
        )
    return config


def build_model(model_name: str, seed: int, device: str = "cpu") -> tuple[Any, Any, Any]:
    """A randomly initialised open_clip model, its eval preprocess and its tokenizer."""
    open_clip = _open_clip()
    if model_name not in open_clip.list_models():
        raise ConfigError(
            f"unknown model architecture {model_name!r}; add configs/models/{model_name}.json "
            f"or use an open_clip name"
        )
    torch.manual_seed(seed)
    with _no_random_init_notice():
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, device=device)
    if isinstance(model, open_clip.CoCa):
        from selbench.captioning import init_decoder

        init_decoder(model)  # open_clip leaves its vocabulary projection uninitialised
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, preprocess, tokenizer


def _drop_random_init_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextmanager
def _no_random_init_notice() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning
    while building a model: random initialisation is what selbench asks for. open_clip
    logs it on the root logger, so muting the ``open_clip`` logger misses it; this filter
    drops that one message and leaves every other warning alone."""
    root = logging.getLogger()
    root.addFilter(_drop_random_init_notice)
    try:
        yield
    finally:
        root.removeFilter(_drop_random_init_notice)


@dataclass
class TrainingData:
    """Preprocessed images and tokenised training captions of a subset, in memory."""

    images: torch.Tensor  # float, (N, 3, H, W), already normalised
    tokens: torch.Tensor  # long, (N, context_length)

    def __len__(self) -> int:
        return len(self.images)


def build_training_data(
    images: Iterable[tuple[str, Any]],
    captions: dict[str, str],
    preprocess: Any,
    tokenizer: Any,
) -> TrainingData:
    """Preprocess ``(uid, PIL image)`` pairs and tokenise ``captions[uid]`` for each."""
    tensors, texts = [], []
    for uid, image in images:
        tensors.append(preprocess(image))
        texts.append(captions[uid])
    if not tensors:
        raise ValueError("no training samples")
    return TrainingData(images=torch.stack(tensors), tokens=tokenizer(texts))


def load_training_data(
    pool: PoolView,
    preprocess: Any,
    tokenizer: Any,
    progress: Tracker | None = None,
    description: str = "Loading pool",
) -> TrainingData:
    """A whole pool (``uids``, ``captions``, ``iter_images()``) as :class:`TrainingData`,
    in pool order, with a progress bar."""
    progress = progress or NullProgress()
    captions = dict(zip(pool.uids, pool.captions, strict=True))
    images = progress.track(pool.iter_images(), description, total=len(pool))
    return build_training_data(images, captions, preprocess, tokenizer)


def planned_samples_seen(
    scale: ScaleConfig, protocol: str, pool_size: int, subset_size: int
) -> int:
    """Total training samples for a protocol (see module docstring)."""
    if protocol == "fixed-compute":
        return int(round(pool_size * scale.epochs))
    if protocol == "fixed-epochs":
        return int(round(subset_size * scale.epochs))
    raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


@dataclass
class TrainResult:
    steps: int
    samples_seen: int
    batch_size: int
    seconds: float
    final_loss: float
    loss_curve: list[tuple[int, float]]
    checkpoint: Path | None = None


def save_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """Write the model's weights to ``path`` atomically (a plain state dict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        torch.save({"state_dict": model.state_dict()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(model: torch.nn.Module, path: Path, device: str = "cpu") -> None:
    """Load weights saved by :func:`save_checkpoint` or by open_clip_train (its
    ``state_dict`` key; DDP's ``module.`` prefix removed), tensors only."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state)
    model.to(device).eval()


def open_clip_no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """open_clip's rule: no weight decay on gains, biases, norms and the logit scale."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def weight_decay_groups(
    model: torch.nn.Module,
    weight_decay: float,
    no_decay: Callable[[str, torch.nn.Parameter], bool] = open_clip_no_decay,
) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` on every trainable parameter except those
    ``no_decay(name, param)`` exempts (default: open_clip's rule)."""
    decay: list[torch.nn.Parameter] = []
    exempt: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (exempt if no_decay(name, param) else decay).append(param)
    return [
        {"params": exempt, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def random_resized_crop(
    images: torch.Tensor, scale: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """open_clip's training crop (RandomResizedCrop, ratio 3/4..4/3), one crop per image.

    Done by hand as one batched ``affine_grid``/``grid_sample``: torchvision's transform
    draws one crop per call, and a Python loop over every image of every batch costs more
    than the tiny model's step on CPU.
    """
    n = images.shape[0]
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = torch.exp(log_ratio)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    shift_x = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    shift_y = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width, shift_x
    theta[:, 1, 1], theta[:, 1, 2] = height, shift_y
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(
        images, grid.to(images.device), mode="bilinear", padding_mode="border", align_corners=False
    )


def _batch_indices(n: int, batch_size: int, steps: int, seed: int) -> Iterable[np.ndarray]:
    """Batches of indices from successive seeded permutations (an epoch never repeats a sample)."""
    rng = np.random.default_rng(seed)
    buffer = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        while len(buffer) < batch_size:
            buffer = np.concatenate([buffer, rng.permutation(n)])
        batch, buffer = buffer[:batch_size], buffer[batch_size:]
        yield batch


class OnlineChoice(Protocol):
    """What :func:`train_clip` asks of online selection (:mod:`selbench.online.harness`):
    how many indices to draw per step, and which of them (a subset, as pool indices) to
    train the step on."""

    draw_size: int

    def choose(self, drawn: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LoopResult:
    """What :func:`training_loop` ran: steps, wall seconds, the final running average of
    every loss term (exponential, 0.95) and ``curve``: ``(step, loss)`` every 10 steps."""

    steps: int
    seconds: float
    running: dict[str, float]
    curve: list[tuple[int, float]]


def training_loop(
    model: torch.nn.Module,
    batch_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    n_samples: int,
    batch_size: int,
    steps: int,
    seed: int,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    no_decay: Callable[[str, torch.nn.Parameter], bool] = open_clip_no_decay,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    grad_clip_norm: float | None = None,
    amp: bool = False,
    after_step: Callable[[], None] | None = None,
    device: str = "cpu",
    progress: Tracker | None = None,
    description: str = "Training",
    curve_key: str = "loss",
    draw_size: int | None = None,
) -> LoopResult:
    """The one training loop: every model selbench trains (the recipe's CLIP, proxies,
    EL2N's and DFN's scorers, TL;DR's captioner) goes through it.

    AdamW (:func:`weight_decay_groups` with ``no_decay``) with linear warmup and cosine
    decay (open_clip_train's ``cosine_lr``), batches of ``batch_size`` indices from
    successive seeded permutations of ``range(n_samples)``. ``batch_loss(indices)`` returns
    the batch's loss and its named terms as floats (``curve_key`` is the one plotted);
    ``draw_size`` (online selection's super-batch) draws that many indices per step instead
    of ``batch_size``; ``after_step()`` runs after each optimiser step. ``amp`` (CUDA
    only) scales the loss. A non-finite term stops training with FloatingPointError.
    """
    from open_clip_train.scheduler import cosine_lr

    progress = progress or NullProgress()
    torch.manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        weight_decay_groups(model, weight_decay, no_decay), lr=lr, betas=betas, eps=eps
    )
    schedule = cosine_lr(optimizer, lr, warmup_steps, steps)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    curve: list[tuple[int, float]] = []
    running: dict[str, float] = {}
    start = time.perf_counter()
    batches = _batch_indices(n_samples, draw_size or batch_size, steps, seed)
    for step, idx in enumerate(progress.track(batches, description, total=steps)):
        schedule(step)
        with torch.autocast(device_type="cuda", enabled=amp):
            loss, values = batch_loss(torch.from_numpy(idx))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if after_step is not None:
            after_step()
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(
                f"{description}: loss became non-finite at step {step}: {values}"
            )
        for key, value in values.items():
            running[key] = value if key not in running else 0.95 * running[key] + 0.05 * value
        if step % 10 == 0 or step == steps - 1:
            curve.append((step, values[curve_key]))
            if hasattr(progress, "set_info"):
                progress.set_info(description, f"loss {running[curve_key]:.3f}")
    model.eval()
    return LoopResult(steps, time.perf_counter() - start, running, curve)


def train_model(
    model: torch.nn.Module,
    data: TrainingData,
    scale: ScaleConfig,
    samples_seen: int,
    seed: int,
    device: str = "cpu",
    progress: Tracker | None = None,
    online: OnlineChoice | None = None,
) -> TrainResult:
    """Train with the loss the architecture calls for: :func:`train_coca` for an open_clip
    ``CoCa``, :func:`train_clip` for a CLIP (``online``: see :func:`train_clip`)."""
    from selbench.captioning import can_caption

    train = train_coca if can_caption(model) else train_clip
    return train(
        model, data, scale, samples_seen, seed, device=device, progress=progress, online=online
    )


def train_coca(
    model: torch.nn.Module,
    data: TrainingData,
    scale: ScaleConfig,
    samples_seen: int,
    seed: int,
    device: str = "cpu",
    progress: Tracker | None = None,
    online: OnlineChoice | None = None,
) -> TrainResult:
    """Train an open_clip ``CoCa`` on ``data`` with open_clip's ``CoCaLoss``: the weighted
    sum of the contrastive and the captioning loss (weights 1 and 2: CoCa, Yu et al. 2022,
    Section 4.1; open_clip_train's defaults), through :func:`train_clip`'s recipe (the
    scale's optimiser, schedule, crop and temperature clamp). ``final_loss`` and the curve
    are the weighted sum; ``running`` also holds each term."""
    from open_clip.loss import CoCaLoss

    from selbench.captioning import CAPTION_LOSS_WEIGHT, CONTRASTIVE_LOSS_WEIGHT, coca_losses

    loss_fn = CoCaLoss(
        caption_loss_weight=CAPTION_LOSS_WEIGHT,
        clip_loss_weight=CONTRASTIVE_LOSS_WEIGHT,
        pad_id=model.pad_id,
    )

    def forward_loss(images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        contrastive, caption = coca_losses(model, images, tokens, loss_fn)
        loss = contrastive + caption
        return loss, {
            "loss": float(loss.detach()),
            "contrastive_loss": float(contrastive.detach()),
            "caption_loss": float(caption.detach()),
        }

    return train_clip(
        model, data, scale, samples_seen, seed, device=device, progress=progress,
        forward_loss=forward_loss, online=online,
    )  # fmt: skip


def train_clip(
    model: torch.nn.Module,
    data: TrainingData,
    scale: ScaleConfig,
    samples_seen: int,
    seed: int,
    device: str = "cpu",
    progress: Tracker | None = None,
    forward_loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]] | None = None,
    after_step: Callable[[], None] | None = None,
    description: str = "Training",
    online: OnlineChoice | None = None,
) -> TrainResult:
    """Train ``model`` contrastively on ``data`` for ``samples_seen`` samples (open_clip's
    ``ClipLoss``, the scale's optimiser and crop, through :func:`training_loop`).
    ``forward_loss(images, tokens) -> (loss, named terms)`` replaces the loss
    (:func:`train_coca`); ``after_step()`` runs after each step, once the temperature is
    clamped (distill's experts snapshot their weights there). ``online`` chooses each
    step's batch from ``online.draw_size`` drawn indices (:mod:`selbench.online.harness`)."""
    batch_size = min(scale.batch_size, len(data))
    steps = max(1, math.ceil(samples_seen / batch_size))
    warmup = scale.warmup_steps
    warmup = int(scale.warmup_fraction * steps) if warmup is None else warmup
    loss_fn = _open_clip().loss.ClipLoss()
    crop_rng = torch.Generator().manual_seed(seed)

    def batch_loss(index: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if online is not None:
            index = online.choose(index)
        images = data.images[index].to(device, non_blocking=True)
        if scale.random_resized_crop_scale is not None:
            images = random_resized_crop(images, scale.random_resized_crop_scale, crop_rng)
        tokens = data.tokens[index].to(device, non_blocking=True)
        if forward_loss is not None:
            return forward_loss(images, tokens)
        image_features, text_features, logit_scale = model(images, tokens)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        return loss, {"loss": float(loss.detach())}

    def clamp_temperature() -> None:
        # open_clip clamps the learnable temperature at 100 after each step.
        temperature = model.logit_scale
        assert isinstance(temperature, torch.Tensor)  # a Parameter of every CLIP model
        with torch.no_grad():
            temperature.clamp_(0, math.log(100))
        if after_step is not None:
            after_step()

    result = training_loop(
        model,
        batch_loss,
        len(data),
        batch_size,
        steps,
        seed,
        lr=scale.lr,
        warmup_steps=warmup,
        weight_decay=scale.weight_decay,
        betas=(scale.beta1, scale.beta2),
        eps=scale.eps,
        grad_clip_norm=scale.grad_clip_norm,
        amp=scale.precision == "amp" and device.startswith("cuda"),
        after_step=clamp_temperature,
        device=device,
        progress=progress,
        description=description,
        draw_size=None if online is None else online.draw_size,
    )
    from selbench.flops import charge_training

    # the open FLOP ledger's "training/<description>" (no-op when none is open)
    charge_training(model, description, steps * batch_size, steps, batch_size)
    return TrainResult(
        steps=steps,
        samples_seen=steps * batch_size,
        batch_size=batch_size,
        seconds=result.seconds,
        final_loss=result.running["loss"],
        loss_curve=result.curve,
    )
