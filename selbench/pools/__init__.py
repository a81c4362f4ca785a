"""Pools: resolve a ``--pool`` spec to shards plus the eval sets that go with them."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from selbench.configs import EvalSetConfig, PoolConfig, find_config, load_yaml_model
from selbench.errors import ConfigError, PoolError
from selbench.paths import data_home
from selbench.pools.metadata import KIND as METADATA_KIND
from selbench.pools.metadata import (
    MetadataPool,
    refuse_training_without_shards,
    refuse_without_images,
)
from selbench.pools.shards import PoolForStrategies, ShardPool

if TYPE_CHECKING:
    from selbench.synthweb import SynthWebConfig

__all__ = [
    "MetadataPool",
    "PoolForStrategies",
    "ResolvedPool",
    "ShardPool",
    "decontaminates_by_default",
    "refuse_training_without_shards",
    "refuse_without_images",
    "resolve_pool",
    "synthweb_dir",
]

#: The name of SynthWeb's captioning set (its retrieval images and reference captions).
SYNTHWEB_CAPTIONING = "captioning"


@dataclass
class ResolvedPool:
    """A pool ready to use: its shards (or DataComp metadata), its eval sets and where it
    came from."""

    pool: ShardPool | MetadataPool
    eval_sets: list[EvalSetConfig]
    kind: str
    spec: str
    target: Path | None = None
    config: dict = field(default_factory=dict)


def synthweb_dir(overrides: dict) -> tuple[Path, SynthWebConfig]:
    """Where the SynthWeb dataset for these config overrides lives (content-addressed)."""
    from selbench.synthweb import SynthWebConfig

    try:
        config = SynthWebConfig(**overrides)
    except Exception as exc:  # pydantic.ValidationError, with the field names in it
        raise ConfigError(f"invalid SynthWeb settings {overrides}: {exc}") from None
    # The generator's version is part of the key, so a generator change never reuses a
    # dataset written by the old one.
    from selbench.synthweb.generate import GENERATOR_VERSION

    # planted_eval_copies is left out while 0, so the datasets written before it existed
    # keep their folder.
    unplanted = {"planted_eval_copies"} if not config.planted_eval_copies else None
    key = f"{GENERATOR_VERSION}\0{config.model_dump_json(exclude=unplanted)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return data_home() / f"synthweb-{digest}", config


def ensure_synthweb(overrides: dict, progress: Callable[[int, int], None] | None = None) -> Path:
    """Generate SynthWeb for these settings unless it already exists; return its directory."""
    from selbench.synthweb import generate_synthweb

    out_dir, config = synthweb_dir(overrides)
    if (out_dir / "manifest.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        generate_synthweb(out_dir, config, progress=progress)
    except FileExistsError:
        if not (out_dir / "manifest.json").is_file():  # another process finished it
            raise
    return out_dir


def _from_synthweb_dir(root: Path, spec: str, strict: bool = False) -> ResolvedPool:
    manifest = json.loads((root / "manifest.json").read_text())
    eval_sets = []
    for name, rel in manifest["eval_sets"].items():
        task_file = root / rel / "dataset_type.txt"
        task = task_file.read_text().strip() if task_file.exists() else "classification"
        # Validated like a pool YAML's entry: a task file naming no task is an error.
        entry = {"name": name, "task": task, "path": str(root / rel)}
        eval_sets.append(EvalSetConfig.model_validate(entry))
    if "retrieval" in manifest["eval_sets"]:
        # The retrieval set's images with their reference captions are also the captioning
        # set (CLIP_benchmark reads both tasks from the same wds layout); only models that
        # generate are scored on it (selbench.captioning).
        path = str(root / manifest["eval_sets"]["retrieval"])
        eval_sets.append(EvalSetConfig(name=SYNTHWEB_CAPTIONING, task="captioning", path=path))
    target = root / manifest["target"] if manifest.get("target") else None
    pool = ShardPool(root / "pool", name="synthweb", strict=strict)
    pool.kind = "synthweb"
    return ResolvedPool(
        pool=pool,
        eval_sets=eval_sets,
        kind="synthweb",
        spec=spec,
        target=target,
        config=manifest.get("config", {}),
    )


def _metadata_path(metadata: str | None, config_path: Path) -> str | None:
    """The pool YAML's ``metadata`` file as a path: a relative one is read from the YAML's
    folder. Not checked here: only a strategy that reads it needs it (metaclip)."""
    if not metadata:
        return None
    path = Path(metadata).expanduser()
    return str(path if path.is_absolute() else config_path.parent / path)


def resolve_pool(
    spec: str, progress: Callable[[int, int], None] | None = None, strict: bool = False
) -> ResolvedPool:
    """Turn a ``--pool`` value into a :class:`ResolvedPool`.

    ``spec`` is a pool config name (``configs/pools/NAME.yaml``), a path to such a YAML,
    a SynthWeb dataset directory (it has ``manifest.json``) or a directory of shards.
    A corrupt shard is left out of the pool (with a warning naming it), or with ``strict``
    (``--strict``) refused (:mod:`selbench.pools.corrupt`).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return _from_synthweb_dir(path, spec, strict)
        raise PoolError(
            f"pool directory {path} has no eval sets; write a pool config "
            f"(configs/pools/*.yaml, kind: shards) naming its shards and eval sets"
        )
    try:
        config_path = find_config("pools", spec)
    except ConfigError:
        if path.suffix in (".yaml", ".yml") or "/" in spec:
            raise PoolError(f"pool {spec!r} does not exist") from None
        raise
    config = load_yaml_model(config_path, PoolConfig)
    metadata = _metadata_path(config.metadata, config_path)
    if config.features_model and config.kind != METADATA_KIND:
        raise ConfigError(
            f"config file {config_path}: key 'features_model' names the model of a kind: "
            f"{METADATA_KIND} pool's shipped features; a kind: {config.kind} pool embeds its "
            "images and the target's with one model (its 'reference:', or -p embedder=...)"
        )
    if config.kind == "synthweb":
        root = ensure_synthweb(config.synthweb, progress=progress)
        resolved = _from_synthweb_dir(root, spec, strict)
        resolved.pool.name = config.name
        resolved.pool.metadata = metadata
        return resolved
    if not config.path:
        raise ConfigError(
            f"config file {config_path}: key 'path' is required for kind: {config.kind}"
        )
    for key in ("path", "shards"):
        unset = re.findall(r"\$\{?(\w+)", getattr(config, key) or "")
        if unset:
            what = "metadata folder" if key == "path" and config.kind == METADATA_KIND else "shards"
            raise ConfigError(
                f"config file {config_path}: key '{key}' uses ${{{unset[0]}}}, which is not "
                f"set; export it as the directory of the pool's {what}"
            )
    eval_sets = list(config.eval)
    if not eval_sets and config.eval_suite:
        from selbench.evaluate import resolve_eval_suite

        # Not checked here: a run given --eval SUITE never reads the pool's own suite.
        eval_sets = resolve_eval_suite(config.eval_suite, check=False)
    # No sets is allowed here (embedding, export, or a run given --eval SUITE need none);
    # a run that would evaluate on nothing is refused when the run is prepared, naming the fix.
    pool: ShardPool | MetadataPool
    if config.kind == METADATA_KIND:
        folder = _relative(config.path, config_path) or config.path
        pool = MetadataPool(
            folder, config.name, _relative(config.shards, config_path), config.features_model
        )
        pool.reference = config.reference or pool.reference
    else:
        pool = ShardPool(config.path, name=config.name, strict=strict)
        pool.reference = config.reference
    pool.metadata = metadata
    return ResolvedPool(
        pool=pool,
        eval_sets=eval_sets,
        kind=config.kind,
        spec=spec,
        config=config.model_dump(),
    )


def _relative(path: str | None, config_path: Path) -> str | None:
    """A path of a pool YAML, a relative one read from the YAML's folder."""
    if not path:
        return None
    found = Path(path).expanduser()
    return str(found if found.is_absolute() else config_path.parent / found)


def decontaminates_by_default(spec: str) -> bool:
    """Whether a run on pool ``spec`` removes the pool's near-duplicates of the evaluation
    images unless told (``--decontaminate/--no-decontaminate``): yes on a real pool, whose
    web images may hold evaluation images, and on SynthWeb generated with
    ``planted_eval_copies``; no on DataComp metadata (no images to compare); no on plain
    SynthWeb, whose evaluation images are drawn apart from the pool (so its runs select and
    score as before). Reads the config only."""
    path = Path(spec).expanduser()
    if path.is_dir():
        manifest = path / "manifest.json"
        if not manifest.is_file():
            return True
        config = json.loads(manifest.read_text()).get("config", {})
        return bool(config.get("planted_eval_copies", 0))
    try:
        config = load_yaml_model(find_config("pools", spec), PoolConfig)
    except ConfigError:
        return True  # resolve_pool says what is wrong with it
    if config.kind == "synthweb":
        return bool(config.synthweb.get("planted_eval_copies", 0))
    # DataComp's metadata holds no images to compare with the evaluation images; DataComp
    # deduplicated its pool against them before release (Gadre et al. 2023, Sec. 3.2).
    return config.kind != METADATA_KIND
