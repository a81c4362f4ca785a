"""The one training recipe every strategy's subset goes through.

An open_clip CLIP built from a JSON architecture (``configs/models/``), open_clip's
``ClipLoss``, AdamW with linear warmup and cosine decay (open_clip's recipe; the
schedule is open_clip_train's ``cosine_lr``). Read top to bottom: build, load, train.

Protocols:
- ``fixed-compute`` (default, as DataComp): samples seen = pool size x epochs, whatever
  the subset size, so a 25% subset is seen four times as often as the full pool.
- ``fixed-epochs`` (as TL;DR): samples seen = subset size x epochs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from open_clip_train.scheduler import cosine_lr

from selbench.configs import ScaleConfig
from selbench.errors import ConfigError
from selbench.fileutil import temp_sibling
from selbench.paths import config_dir
from selbench.progress import NullProgress

PROTOCOLS = ("fixed-compute", "fixed-epochs")
# in-memory: this module's loop over a decoded subset (tiny scales on CPU);
# open_clip: open_clip_train under torchrun, streaming the subset's shards
# (selbench.train_open_clip). Both follow the same recipe (configs/scales/).
ENGINES = ("in-memory", "open_clip")


@cache
def _register_model_configs() -> None:
    models = config_dir() / "models"
    if models.is_dir():
        open_clip.add_model_config(models)


def model_config(model_name: str) -> dict[str, Any]:
    """The open_clip architecture config (``vision_cfg``, ``text_cfg``, ...) of a model name,
    selbench's own architectures (``configs/models``) included."""
    _register_model_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ConfigError(
            f"unknown model architecture {model_name!r}; add configs/models/{model_name}.json "
            f"or use an open_clip name"
        )
    return config


def build_model(model_name: str, seed: int, device: str = "cpu") -> tuple[Any, Any, Any]:
    """A randomly initialised open_clip model, its eval preprocess and its tokenizer."""
    _register_model_configs()
    if model_name not in open_clip.list_models():
        raise ConfigError(
            f"unknown model architecture {model_name!r}; add configs/models/{model_name}.json "
            f"or use an open_clip name"
        )
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, device=device)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, preprocess, tokenizer


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


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # open_clip's rule: no weight decay on gains, biases, norms and the logit scale.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
        (no_decay if exempt or "logit_scale" in name else decay).append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
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


def train_clip(
    model: torch.nn.Module,
    data: TrainingData,
    scale: ScaleConfig,
    samples_seen: int,
    seed: int,
    device: str = "cpu",
    progress: Any = None,
) -> TrainResult:
    """Train ``model`` contrastively on ``data`` for ``samples_seen`` samples."""
    progress = progress or NullProgress()
    batch_size = min(scale.batch_size, len(data))
    steps = max(1, math.ceil(samples_seen / batch_size))
    warmup = (
        scale.warmup_steps if scale.warmup_steps is not None else int(scale.warmup_fraction * steps)
    )
    torch.manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        _param_groups(model, scale.weight_decay),
        lr=scale.lr,
        betas=(scale.beta1, scale.beta2),
        eps=scale.eps,
    )
    schedule = cosine_lr(optimizer, scale.lr, warmup, steps)
    loss_fn = ClipLoss()
    use_amp = scale.precision == "amp" and device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    curve: list[tuple[int, float]] = []
    running = float("nan")
    start = time.perf_counter()
    batches = _batch_indices(len(data), batch_size, steps, seed)
    crop_rng = torch.Generator().manual_seed(seed)
    for step, idx in enumerate(progress.track(batches, "Training", total=steps)):
        schedule(step)
        index = torch.from_numpy(idx)
        images = data.images[index].to(device, non_blocking=True)
        if scale.random_resized_crop_scale is not None:
            images = random_resized_crop(images, scale.random_resized_crop_scale, crop_rng)
        tokens = data.tokens[index].to(device, non_blocking=True)
        with torch.autocast(device_type="cuda", enabled=use_amp):
            image_features, text_features, logit_scale = model(images, tokens)[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if scale.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), scale.grad_clip_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        # open_clip clamps the learnable temperature at 100 after each step.
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step}")
        running = value if math.isnan(running) else 0.95 * running + 0.05 * value
        if step % 10 == 0 or step == steps - 1:
            curve.append((step, value))
            if hasattr(progress, "set_info"):
                progress.set_info("Training", f"loss {running:.3f}")
    model.eval()
    return TrainResult(
        steps=steps,
        samples_seen=steps * batch_size,
        batch_size=batch_size,
        seconds=time.perf_counter() - start,
        final_loss=running,
        loss_curve=curve,
    )
