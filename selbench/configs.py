"""YAML configs (scales, pools, eval suites) validated with pydantic; errors name file and key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selbench.errors import ConfigError
from selbench.paths import config_dir

M = TypeVar("M", bound=BaseModel)


class ScaleConfig(BaseModel):
    """A training recipe, shared by every method at this scale (``configs/scales/*.yaml``).

    Defaults follow open_clip's CLIP recipe (AdamW, beta2 0.98, eps 1e-6, cosine decay
    after linear warmup, no weight decay on gains/biases/logit scale) shrunk to a model
    that trains on 2 CPU cores.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    model: str = Field(description="open_clip architecture: a name or a JSON in configs/models/")
    batch_size: int = Field(gt=0)
    epochs: float = Field(
        gt=0,
        description="fixed-compute: samples seen = pool size x epochs (DataComp); "
        "fixed-epochs: subset size x epochs (TL;DR)",
    )
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_fraction: float = Field(ge=0, lt=1, description="share of steps with linear warmup")
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1.0e-6
    grad_clip_norm: float | None = None
    random_resized_crop_scale: tuple[float, float] | None = Field(
        default=(0.9, 1.0),
        description="training crop area range (open_clip's train transform); null disables",
    )
    eval_batch_size: int = Field(default=256, gt=0)
    precision: Literal["fp32", "amp"] = "fp32"
    warmup_steps: int | None = Field(
        default=None,
        ge=0,
        description="linear warmup in optimizer steps (DataComp: 500); overrides "
        "warmup_fraction when set",
    )
    corpus: dict[str, Any] | None = Field(
        default=None,
        # Left out of dumps, so the cache keys and run params of every recipe without a
        # corpus stay what they were; selbench.reference keys on it explicitly.
        exclude=True,
        description="reference recipes only (configs/scales/reference.yaml): SynthWebConfig "
        "settings of the separate clean corpus the reference model trains on, instead of "
        "the pool (selbench.reference)",
    )
    captioner: str | None = Field(
        default=None,
        # Left out of dumps like ``corpus``: the reference CLIP's cache key stays the same.
        exclude=True,
        description="reference recipes only: the scale recipe of the reference captioner "
        "(a CoCa trained on the same clean corpus; selbench.reference_captioner), a name in "
        "configs/scales/ or a path relative to this recipe's folder",
    )
    engine: Literal["in-memory", "open_clip"] = Field(
        default="in-memory",
        description="in-memory: selbench's loop over the decoded subset (tiny, CPU); "
        "open_clip: open_clip_train under torchrun, streaming the subset's shards",
    )
    shard_size: int = Field(
        default=10_000, gt=0, description="samples per materialized subset shard (DataComp)"
    )
    num_checkpoints: int = Field(
        default=1,
        gt=0,
        description="open_clip engine: the run is split into this many open_clip 'epochs' of "
        "samples_seen / num_checkpoints samples each, with a checkpoint after each one "
        "(DataComp's train.py uses 8); a killed training resumes from the last one",
    )
    workers: int = Field(default=1, ge=0, description="open_clip engine: data loader workers")
    local_loss: bool = Field(default=False, description="open_clip_train --local-loss")
    gather_with_grad: bool = Field(default=False, description="open_clip_train --gather-with-grad")
    grad_checkpointing: bool = Field(
        default=False, description="open_clip_train --grad-checkpointing"
    )


class EvalSetConfig(BaseModel):
    """One evaluation set: CLIP_benchmark ``wds`` layout for retrieval, classification and
    captioning (images with their reference captions, as retrieval sets hold them; scored
    only for models that generate, :mod:`selbench.captioning`), NLVR2's layout for
    ``reasoning`` (the nlvr2-probe, :mod:`selbench.probe`)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    task: Literal["retrieval", "classification", "reasoning", "captioning"]
    path: str
    main_metric: (
        Literal["acc1", "mean_per_class_recall", "mean_R1", "f1_macro", "bleu4", "cider"] | None
    ) = Field(
        default=None,
        description="the set's headline number (DataComp's tasklist.yml main_metric); "
        "logged as {name}/main",
    )


class EvalSuiteConfig(BaseModel):
    """A named evaluation suite (``configs/evals/*.yaml``), chosen with ``--eval SUITE``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    sets: list[EvalSetConfig] = Field(min_length=1)
    # The metrics a leaderboard of runs on this suite shows beside R@1 and zero-shot top-1
    # (its headline columns, e.g. DataComp's average), as MLflow metric names.
    summary: list[str] = Field(default_factory=list)


class PoolConfig(BaseModel):
    """A pool (``configs/pools/*.yaml``): SynthWeb (generated), img2dataset shards, or
    DataComp's metadata folder without images (``datacomp-metadata``, docs/real-data.md)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["synthweb", "shards", "datacomp-metadata"]
    synthweb: dict[str, Any] = Field(default_factory=dict, description="SynthWebConfig overrides")
    path: str | None = Field(
        default=None,
        description="kind: shards: the shard directory; kind: datacomp-metadata: the folder of "
        "NAME.parquet + NAME.npz pairs",
    )
    shards: str | None = Field(
        default=None,
        description="kind: datacomp-metadata: the folder of the pool's image shards, read only "
        "to materialize a selection for training; unset: select and export only",
    )
    eval: list[EvalSetConfig] = Field(default_factory=list)
    eval_suite: str | None = Field(
        default=None, description="a suite in configs/evals/ to use when 'eval' is empty"
    )
    reference: str | None = Field(
        default=None,
        description="kind: shards: the embedder spec the strategies' default `reference` "
        "model means on this pool, the paper's pretrained CLIP as local weights (e.g. "
        "open_clip:ViT-L-14:/models/openai-vit-l-14.pt); unset: the pool's own proxy:scorer, "
        "with a warning (docs/embeddings.md)",
    )
    features_model: str | dict[Literal["l14", "b32"], str] | None = Field(
        default=None,
        description="kind: datacomp-metadata: the local checkpoint of the model that computed "
        "the shipped features, which embeds images that are not the pool's (a target set) "
        "into their space: an embedder spec for the L/14 features (e.g. "
        "open_clip:ViT-L-14-quickgelu:/models/openai-vit-l-14.pt), or a mapping l14/b32 -> "
        "spec; unset: target-aware strategies are refused (docs/real-data.md)",
    )
    metadata: str | None = Field(
        default=None,
        description="a text file of metadata entries, one per line, for metadata-curated "
        "selection (metaclip: docs/strategies/metaclip.md); a relative path is read from "
        "the pool YAML's folder; unset on a SynthWeb pool: its concept vocabulary",
    )


def load_yaml_model(path: Path, model: type[M]) -> M:
    """Read ``path`` and validate it as ``model``; errors name the file and the key."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(raw).__name__}")
    raw = _expand_env(raw)
    try:
        return model(**raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"key '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"config file {path}: {problems}") from None


def _expand_env(value: Any) -> Any:
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def available(kind: str) -> list[str]:
    """Names of the YAML configs of one kind (``scales``, ``pools`` or ``evals``)."""
    return sorted(p.stem for p in (config_dir() / kind).glob("*.yaml"))


def find_config(kind: str, spec: str) -> Path:
    """A config given as a path to a YAML file or as a name in ``configs/<kind>/``."""
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    named = config_dir() / kind / f"{spec}.yaml"
    if named.is_file():
        return named
    raise ConfigError(
        f"unknown {kind[:-1]} {spec!r}: not a YAML file, and not one of {available(kind)}"
    )


def load_scale(spec: str) -> ScaleConfig:
    return load_yaml_model(find_config("scales", spec), ScaleConfig)
