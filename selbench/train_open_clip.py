"""The ``open_clip`` training engine: open_clip_train under torchrun on the subset's shards.

This is how CLIP is trained in the field (open_clip's model zoo, DataComp's ``train.py``):
DDP over any number of processes and nodes, webdataset streaming, amp, local loss,
gradient checkpointing, checkpoints to resume from. selbench does not reimplement any
of it; like DataComp's ``train.py`` it turns a scale config (``configs/scales/``) into
open_clip_train's arguments and launches it:

    python -m torch.distributed.run --standalone --nproc-per-node N \\
        -m selbench.open_clip_worker        # open_clip_train.main's arguments in the env

``selbench.open_clip_worker`` makes each worker die with its launcher and calls
``open_clip_train.main.main`` with the arguments unchanged. ``train/command.txt`` in the
run directory holds the equivalent plain ``python -m open_clip_train.main ...`` command
(what a SLURM job runs, ``docs/scale-out.md``).

The recipe matches the in-memory engine's: AdamW with open_clip's weight-decay
exemptions, linear warmup then cosine decay, the logit scale clamped at 100, the same
random-resized-crop range, the same samples seen. As DataComp does, the run is cut into
``num_checkpoints`` open_clip "epochs" of ``samples_seen / num_checkpoints`` samples drawn
with replacement from the shards (``--dataset-resampled``); each ends with a checkpoint,
and a killed training resumes from the last one (``--resume latest``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from selbench.configs import ScaleConfig
from selbench.errors import ConfigError, SelbenchError
from selbench.open_clip_worker import ARGS_VARIABLE, die_with_parent
from selbench.progress import NullProgress, Progress
from selbench.train import TrainResult, model_config

if TYPE_CHECKING:
    from selbench.materialize import Subset

RUN_NAME = "open_clip"

# open_clip_train.train logs one line per --log-every-n-steps on rank 0:
# "Train Epoch: 0 [  512/4096 (12%)] Data (t): ... Batch (t): 0.210, 2431.1/s, 2431.1/s/gpu
#  LR: 0.000100 Logit Scale: 14.285 Contrastive_loss: 4.1523 (4.3011)"
_TRAIN_LINE = re.compile(
    r"Train Epoch: (?P<epoch>\d+) \[\s*(?P<done>\d+)/(?P<per_epoch>\d+).*?"
    r"Batch \(t\): [\d.]+, (?P<rate>[\d.eE+-]+)/s.*?"
    r"LR: (?P<lr>[\d.eE+-]+).*?Logit Scale: (?P<scale>[\d.eE+-]+)\s+(?P<losses>.*)$"
)
_LOSS = re.compile(r"(\w+): ([\d.eE+-]+) \(")


#: The progress bar of the training (its loss and rate are shown beside it).
_BAR = "Training (open_clip_train)"


class TrainingError(SelbenchError):
    """open_clip_train exited with an error."""


def model_argument(model_name: str, out_dir: Path) -> str:
    """open_clip_train's ``--model``: an open_clip name as is; selbench's own
    architectures (``configs/models/``) as ``local-dir:`` holding ``open_clip_config.json``
    (open_clip_train registers no configs of ours)."""
    import open_clip

    config = model_config(model_name)  # registers selbench's configs, checks the name
    if "multimodal_cfg" in config and _is_selbench_model(model_name):
        # open_clip_train picks CoCaLoss only when the --model name says "coca", which a
        # local-dir: path does not, and would leave the decoder uninitialised
        # (selbench.captioning.init_decoder): not wired up, so refused.
        raise ConfigError(
            f"model {model_name!r} is a CoCa; the open_clip engine does not train selbench's "
            f"CoCa architectures yet: use --engine in-memory"
        )
    if model_name in open_clip.list_models() and not _is_selbench_model(model_name):
        return model_name
    return write_local_model(config, out_dir)


def write_local_model(config: dict, out_dir: Path) -> str:
    """Write open_clip model config ``config`` (with OpenAI preprocessing) where
    open_clip_train's ``local-dir:`` reads it, under ``out_dir/model``; returns the
    ``--model`` value naming it."""
    import open_clip

    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    preprocess = {
        "size": config["vision_cfg"]["image_size"],
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    payload = {"model_cfg": config, "preprocess_cfg": preprocess}
    (model_dir / "open_clip_config.json").write_text(json.dumps(payload, indent=1))
    return f"local-dir:{model_dir}"


def _is_selbench_model(model_name: str) -> bool:
    from selbench.paths import config_dir

    return (config_dir() / "models" / f"{model_name}.json").is_file()


def plan(scale: ScaleConfig, samples_seen: int, nproc: int) -> dict[str, int]:
    """Batch per process, samples per open_clip epoch, epochs, steps and warmup steps.

    The steps are the in-memory engine's, ``ceil(samples_seen / batch)``, spread over
    ``num_checkpoints`` epochs and rounded up to whole batches per data-loader worker,
    the way open_clip_train rounds ``--train-num-samples`` (so it takes ours unchanged).
    """
    if scale.batch_size % nproc:
        raise SelbenchError(
            f"scale {scale.name!r}: global batch {scale.batch_size} does not split evenly over "
            f"{nproc} processes"
        )
    epochs = scale.num_checkpoints
    total_steps = max(1, math.ceil(samples_seen / scale.batch_size))
    per_epoch = math.ceil(total_steps / epochs)
    workers = max(1, scale.workers)
    per_epoch = math.ceil(per_epoch / workers) * workers
    steps = per_epoch * epochs
    warmup = scale.warmup_steps
    if warmup is None:
        warmup = int(scale.warmup_fraction * steps)
    return {
        "batch_per_process": scale.batch_size // nproc,
        "samples_per_epoch": per_epoch * scale.batch_size,
        "epochs": epochs,
        "steps": steps,
        "warmup": warmup,
    }


def build_command(
    subset: Subset,
    scale: ScaleConfig,
    samples_seen: int,
    seed: int,
    out_dir: Path,
    device: str,
    processes: int,
) -> tuple[list[str], dict[str, int]]:
    """open_clip_train.main's arguments for this training, and its plan (:func:`plan`)."""
    numbers = plan(scale, samples_seen, processes)
    accelerator = "cuda" if device.startswith("cuda") else "cpu"
    args = [
        "--train-data", subset.shard_pattern(),
        "--train-num-samples", str(numbers["samples_per_epoch"]),
        "--dataset-type", "webdataset",
        "--dataset-resampled",
        "--epochs", str(numbers["epochs"]),
        "--batch-size", str(numbers["batch_per_process"]),
        "--lr", repr(scale.lr),
        "--wd", repr(scale.weight_decay),
        "--beta1", repr(scale.beta1),
        "--beta2", repr(scale.beta2),
        "--eps", repr(scale.eps),
        "--warmup", str(numbers["warmup"]),
        "--precision", scale.precision,
        "--workers", str(scale.workers),
        "--seed", str(seed),
        "--model", model_argument(scale.model, out_dir),
        "--logs", str(out_dir),
        "--name", RUN_NAME,
        "--save-frequency", "1",
        "--save-most-recent",
        "--delete-previous-checkpoint",
        "--resume", "latest",
        "--zeroshot-frequency", "0",
        "--val-frequency", "0",
        "--log-every-n-steps", str(max(1, min(100, numbers["steps"] // 50))),
        "--device", accelerator,
    ]  # fmt: skip
    if scale.random_resized_crop_scale is not None:
        low, high = scale.random_resized_crop_scale
        args += ["--aug-cfg", f"scale=({low},{high})"]
    if scale.grad_clip_norm:
        args += ["--grad-clip-norm", repr(scale.grad_clip_norm)]
    if accelerator == "cpu":
        args += ["--dist-backend", "gloo"]
    for flag, on in (
        ("--local-loss", scale.local_loss),
        ("--gather-with-grad", scale.gather_with_grad),
        ("--grad-checkpointing", scale.grad_checkpointing),
    ):
        if on:
            args.append(flag)
    return args, numbers


LAUNCHERS = ("torchrun", "srun")


def launcher(kind: str, nproc_per_node: int, log_dir: Path | None = None) -> list[str]:
    """The command that starts the workers; each reads open_clip_train's arguments from
    the environment (``selbench.open_clip_worker``).

    ``torchrun``: this node, ``nproc_per_node`` workers. ``srun``: every task of the
    current SLURM allocation (``--ntasks-per-node`` = GPUs per node, across all its
    nodes); open_clip_train reads its rank and world size from SLURM's variables, as in
    open_clip's own SLURM example, and ``MASTER_ADDR``/``MASTER_PORT`` must be exported
    (``docs/scale-out.md``). ``log_dir``: torchrun's log folder; without one torchrun makes
    a ``torchelastic_*`` folder in the temporary directory per launch and never removes it.
    """
    worker = [sys.executable, "-m", "selbench.open_clip_worker"]
    if kind == "srun":
        return ["srun", "--kill-on-bad-exit=1", *worker]
    if kind != "torchrun":
        raise SelbenchError(f"unknown launcher {kind!r}; choose one of {', '.join(LAUNCHERS)}")
    logs = ["--log-dir", str(log_dir)] if log_dir is not None else []
    return [
        sys.executable, "-m", "torch.distributed.run", *logs,
        "--standalone", "--nproc-per-node", str(nproc_per_node),
        "-m", "selbench.open_clip_worker",
    ]  # fmt: skip


def world_size(kind: str, nproc_per_node: int) -> int:
    """Training processes in all: ``nproc_per_node`` (torchrun) or the allocation's tasks."""
    if kind != "srun":
        return nproc_per_node
    tasks = os.environ.get("SLURM_NTASKS")
    if not tasks:
        raise SelbenchError("--launcher srun runs inside a SLURM allocation (SLURM_NTASKS unset)")
    return int(tasks)


def checkpoint_path(out_dir: Path) -> Path:
    return out_dir / RUN_NAME / "checkpoints" / "epoch_latest.pt"


def train_open_clip(
    subset: Subset,
    scale: ScaleConfig,
    samples_seen: int,
    seed: int,
    out_dir: Path,
    device: str = "cpu",
    nproc_per_node: int = 1,
    progress: Progress | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    launch: str = "torchrun",
) -> TrainResult:
    """Train with open_clip_train on ``subset``'s shards; resume from ``out_dir`` if a
    previous attempt left a checkpoint there. ``on_log(step, metrics)`` receives the
    loss, learning rate and samples/s of every logged step."""
    progress = progress or NullProgress()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processes = world_size(launch, nproc_per_node)
    args, numbers = build_command(subset, scale, samples_seen, seed, out_dir, device, processes)
    plain = ["python", "-m", "open_clip_train.main", *args]
    (out_dir / "command.txt").write_text(shlex.join(plain) + "\n")
    command = launcher(launch, nproc_per_node, log_dir=out_dir / "torchelastic")
    total = numbers["steps"] * scale.batch_size
    bar = progress.counter(_BAR)
    bar(0, total)
    started = time.perf_counter()
    proc = _start(command, args)
    try:
        per_epoch = numbers["samples_per_epoch"]
        seen = _follow(proc, per_epoch, scale.batch_size, bar, total, progress, on_log)
        code = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    if code != 0:
        log = out_dir / RUN_NAME / "out.log"
        raise TrainingError(
            f"open_clip_train exited with code {code} (log: {log}); last lines:\n"
            + "\n".join(seen.tail)
        )
    checkpoint = checkpoint_path(out_dir)
    if not checkpoint.is_file():
        raise TrainingError(f"open_clip_train finished without writing {checkpoint}")
    bar(total, total)
    return TrainResult(
        steps=numbers["steps"],
        samples_seen=numbers["steps"] * scale.batch_size,
        batch_size=scale.batch_size,
        seconds=time.perf_counter() - started,
        final_loss=seen.loss,
        loss_curve=seen.curve,
        checkpoint=checkpoint,
    )


def _start(command: list[str], args: list[str]) -> subprocess.Popen[str]:
    """Start the launcher in a session of its own (its workers join it), with
    open_clip_train's arguments in its environment and its output piped back as text."""
    env = dict(os.environ)
    env.setdefault("TQDM_DISABLE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env[ARGS_VARIABLE] = json.dumps(args)
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        start_new_session=True,
    )


@dataclass
class _Followed:
    """What the launcher's output said: the last loss logged, the loss curve by step and
    the last lines (for an error message)."""

    loss: float = float("nan")
    curve: list[tuple[int, float]] = field(default_factory=list)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))


def _follow(
    proc: subprocess.Popen[str],
    samples_per_epoch: int,
    batch_size: int,
    bar: Callable[[int, int], None],
    total: int,
    progress: Progress,
    on_log: Callable[[int, dict[str, float]], None] | None,
) -> _Followed:
    """Read the launcher's output to its end; report every logged training step (on the
    ``bar`` of ``total`` samples, the loss and rate beside it, to ``on_log``)."""
    seen = _Followed()
    assert proc.stdout is not None  # a PIPE
    for line in proc.stdout:
        line = line.rstrip()
        seen.tail.append(line)
        match = _TRAIN_LINE.search(line)
        if not match:
            continue
        done = int(match["epoch"]) * samples_per_epoch + int(match["done"])
        step = done // batch_size
        losses = {k.lower(): float(v) for k, v in _LOSS.findall(match["losses"])}
        # "Loss" is the total when open_clip logs several terms (CoCa); else the one term.
        seen.loss = losses.get("loss", sum(losses.values())) if losses else seen.loss
        rate = float(match["rate"])
        seen.curve.append((step, seen.loss))
        bar(min(done, total), total)
        progress.set_info(_BAR, f"loss {seen.loss:.3f}, {rate:.0f}/s")
        if on_log is not None:
            values = {"train_loss": seen.loss, "lr": float(match["lr"]), "samples_per_second": rate}
            on_log(step, values)
    return seen


def _stop(proc: subprocess.Popen) -> None:
    """Stop the launcher and its workers (they share its session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    except OSError:
        proc.kill()
