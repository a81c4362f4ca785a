"""The open_clip engine's translation of a scale into open_clip_train's arguments."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from selbench.cli import main
from selbench.configs import load_scale
from selbench.errors import SelbenchError
from selbench.materialize import Subset
from selbench.train_open_clip import build_command, launcher, plan, world_size


def _subset(tmp_path: Path, n_shards: int) -> Subset:
    shards = tuple(tmp_path / f"{i:05d}.tar" for i in range(n_shards))
    return Subset(tmp_path, shards, {s.name: 10 for s in shards}, "x")


def _args(command: list[str]) -> dict[str, str | bool]:
    parsed: dict[str, str | bool] = {}
    for i, token in enumerate(command):
        if token.startswith("--"):
            following = command[i + 1] if i + 1 < len(command) else "--"
            parsed[token] = True if following.startswith("--") else following
    return parsed


def test_steps_match_the_in_memory_engine_and_split_into_checkpoints():
    scale = load_scale("tiny").model_copy(update={"num_checkpoints": 4})
    numbers = plan(scale, samples_seen=80_000, nproc=2)
    in_memory_steps = math.ceil(80_000 / 256)  # 313
    assert numbers["steps"] >= in_memory_steps
    assert numbers["steps"] - in_memory_steps < 4  # rounded up to whole checkpoints only
    assert numbers["samples_per_epoch"] == numbers["steps"] // 4 * 256
    assert numbers["batch_per_process"] == 128
    assert numbers["warmup"] == int(0.1 * numbers["steps"])
    with pytest.raises(SelbenchError, match="does not split evenly"):
        plan(scale, 80_000, nproc=3)


def test_datacomp_small_gets_datacomps_arguments(tmp_path):
    scale = load_scale("datacomp-small")
    command, numbers = build_command(
        _subset(tmp_path, 3), scale, 12_800_000, 0, tmp_path, "cuda", 8
    )
    args = _args(command)
    assert args["--model"] == "ViT-B-32"
    assert args["--batch-size"] == "512"  # 4096 over 8 GPUs
    assert args["--lr"] == "0.0005" and args["--warmup"] == "500" and args["--wd"] == "0.2"
    assert args["--epochs"] == "5" and args["--precision"] == "amp"
    assert int(args["--train-num-samples"]) * 5 >= 12_800_000
    for flag in ("--local-loss", "--gather-with-grad", "--grad-checkpointing"):
        assert args[flag] is True
    assert args["--dataset-resampled"] is True and args["--resume"] == "latest"
    assert args["--train-data"].endswith("{00000..00002}.tar")
    assert "--dist-backend" not in args  # nccl, open_clip_train's own choice on CUDA
    # 3125 steps = 5 x 625; open_clip_train rounds each epoch up to whole batches per
    # loader worker (4): 5 x 628, as it does for DataComp's own train.py.
    assert numbers["steps"] == 3140


def test_selbench_architectures_go_through_local_dir_configs(tmp_path):
    command, _ = build_command(
        _subset(tmp_path, 1), load_scale("tiny"), 1000, 0, tmp_path, "cpu", 2
    )
    args = _args(command)
    assert args["--model"].startswith("local-dir:")
    config = json.loads((Path(args["--model"][10:]) / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32
    assert config["preprocess_cfg"]["size"] == 32
    assert args["--dist-backend"] == "gloo" and args["--device"] == "cpu"
    assert args["--aug-cfg"] == "scale=(0.9,1.0)"


def test_launchers(monkeypatch):
    assert launcher("torchrun", 4)[-5:] == [
        "--standalone", "--nproc-per-node", "4", "-m", "selbench.open_clip_worker"
    ]  # fmt: skip
    assert launcher("srun", 1)[0] == "srun"
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    with pytest.raises(SelbenchError, match="SLURM allocation"):
        world_size("srun", 1)
    monkeypatch.setenv("SLURM_NTASKS", "32")
    assert world_size("srun", 1) == 32
    assert world_size("torchrun", 8) == 8


def test_run_options_are_checked_before_anything_starts():
    runner = CliRunner()
    result = runner.invoke(main, ["run", "--resume", "abc", "--method", "random"])
    assert result.exit_code == 2 and "drop --method" in result.output
    result = runner.invoke(main, ["run", "--budget", "0.25"])
    assert result.exit_code == 2 and "give --method and --budget" in result.output
    result = runner.invoke(
        main, ["run", "--method", "random", "--budget", "0.25", "--nproc-per-node", "2"]
    )
    assert result.exit_code == 1 and "need --engine open_clip" in result.output
