"""One benchmark run: pool -> strategy.select -> budget check -> train -> eval -> MLflow.

Everything a run decides is recorded in its MLflow run; a run that fails for any
reason is marked FAILED (KILLED on Ctrl-C) with the error as a tag, never left RUNNING.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from selbench import tracking
from selbench.configs import load_scale
from selbench.diagnostics import concept_coverage, pathology_fractions
from selbench.embedders import EmbeddingService
from selbench.errors import PluginError, SelbenchError
from selbench.evaluate import evaluate
from selbench.pools import ResolvedPool, resolve_pool
from selbench.progress import NullProgress
from selbench.registry import StrategyInfo, get_registry
from selbench.strategy import (
    Selection,
    SelectionContext,
    budget_count,
    check_budget,
    parse_params,
    validate_selection,
)
from selbench.target import load_target
from selbench.train import (
    PROTOCOLS,
    build_model,
    build_training_data,
    planned_samples_seen,
    train_clip,
)


@dataclass
class RunRequest:
    """What the user asked for (``selbench run`` options)."""

    method: str
    budget: float
    seed: int = 0
    pool: str = "synthweb"
    scale: str = "tiny"
    protocol: str = "fixed-compute"
    params: dict[str, Any] = field(default_factory=dict)
    experiment: str = tracking.DEFAULT_EXPERIMENT
    device: str | None = None
    target: str | None = None  # target data for target-aware methods; default: the pool's


@dataclass
class RunOutcome:
    run_id: str
    metrics: dict[str, float]
    selection: Selection
    tracking_uri: str
    embeddings: dict[str, dict[str, Any]] = field(default_factory=dict)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def method_label(name: str, params: dict[str, Any], defaults: dict[str, Any]) -> str:
    """``name``, plus the parameters that differ from the defaults: ``name(k=v)``."""
    changed = {k: v for k, v in params.items() if defaults.get(k) != v}
    if not changed:
        return name
    return f"{name}(" + ",".join(f"{k}={changed[k]}" for k in sorted(changed)) + ")"


def _run_strategy(info: StrategyInfo, strategy: Any, ctx: SelectionContext) -> Selection:
    try:
        result = strategy.select(ctx)
    except SelbenchError:
        raise
    except Exception as exc:
        raise PluginError(
            f"strategy {info.name!r} (package {info.package!r}) raised {type(exc).__name__}: {exc}"
        ) from exc
    return validate_selection(result, set(ctx.pool.uids), ctx.budget_count, info.name)


def _target_loader(request: RunRequest, resolved: ResolvedPool) -> Any:
    """A loader for the run's target set (``--target`` or the pool's own split), or None."""
    path = request.target or resolved.target
    if path is None:
        return None
    return partial(load_target, path, resolved.eval_sets)


def _log_target(services: EmbeddingService) -> None:
    import mlflow

    target = services.loaded_target
    if target is None:
        return
    mlflow.log_params(
        {
            "target.path": str(target.path),
            "target.size": len(target.images),
            "target.overlap_checked_against": ",".join(target.checked_against),
            "target.overlap": 0,  # load_target refuses any overlap
        }
    )


def usage_key(spec: str) -> str:
    """The MLflow key of an embedder spec, one per spec: ``proxy`` -> ``proxy``,
    ``proxy:scorer`` -> ``proxy_scorer``; a spec with a path or other characters MLflow
    keys cannot hold -> its name and a hash of the whole spec (``open_clip_1a2b3c4d``)."""
    name, _, args = spec.partition(":")
    if not args:
        return name
    if re.fullmatch(r"[A-Za-z0-9_-]{1,40}", args):
        return f"{name}_{args}"
    return f"{name}_{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def _log_embedding_usage(services: EmbeddingService, progress: Any) -> None:
    """Record which cache entries the strategy used, hit or computed, and the seconds."""
    import mlflow

    for spec, usage in services.usage.items():
        key = usage_key(spec)
        mlflow.log_params(
            {
                f"embeddings.{key}.spec": spec,
                f"embeddings.{key}.entry_id": usage["entry_id"],
                f"embeddings.{key}.embedder_id": usage["embedder_id"],
                f"embeddings.{key}.hit": usage["hit"],
            }
        )
        metrics = {
            f"embeddings/{key}/seconds": usage["total_seconds"],
            f"embeddings/{key}/cache_seconds": usage["cache_seconds"],
            f"embeddings/{key}/hit": float(usage["hit"]),
        }
        if "embedder_train_seconds" in usage:
            metrics[f"embeddings/{key}/proxy_train_seconds"] = usage["embedder_train_seconds"]
        mlflow.log_metrics(metrics)
        verdict = "cache hit" if usage["hit"] else "computed and cached"
        if usage.get("embedder_trained"):
            verdict += f" (its proxy trained first, {usage['embedder_train_seconds']:.0f} s)"
        progress.note(
            f"Embeddings ({spec}): {verdict}, entry {usage['entry_id']}, "
            f"{usage['total_seconds']:.2f} s"
        )


def selection_hash(uids: list[str]) -> str:
    """sha256 of the sorted selected uids: equal for equal subsets, whatever their order."""
    return hashlib.sha256("\n".join(sorted(uids)).encode()).hexdigest()


def _selection_frame(resolved: ResolvedPool, selection: Selection) -> pd.DataFrame:
    captions = dict(zip(resolved.pool.uids, resolved.pool.captions, strict=True))
    rewrites = selection.captions or {}
    scores = selection.scores or {}
    return pd.DataFrame(
        {
            "uid": selection.uids,
            "caption": [captions[u] for u in selection.uids],
            "train_caption": [rewrites.get(u, captions[u]) for u in selection.uids],
            "score": [float(scores[u]) if u in scores else np.nan for u in selection.uids],
        }
    )


def cell_key(request: RunRequest, params: Any) -> str:
    """sha256 of the resolved configuration of a run: method, every parameter (defaults
    filled in), budget, seed, pool, scale, protocol, target. Runs with the same key are
    the same benchmark cell; ``selbench sweep`` skips a cell that already has one."""
    resolved = {
        "method": request.method,
        "params": params.model_dump(mode="json"),
        "budget": float(request.budget),
        "seed": int(request.seed),
        "pool": request.pool,
        "scale": request.scale,
        "protocol": request.protocol,
        "target": request.target,
    }
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:24]


def execute(
    request: RunRequest,
    progress: Any = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> RunOutcome:
    """Run one benchmark cell and log it to MLflow. Raises SelbenchError on user errors.

    ``parent_run_id`` nests the run under a sweep's parent run; ``tags`` are added to it.
    """
    import mlflow

    progress = progress or NullProgress()
    if request.protocol not in PROTOCOLS:
        raise SelbenchError(
            f"unknown protocol {request.protocol!r}; choose one of {', '.join(PROTOCOLS)}"
        )
    info = get_registry().get(request.method)
    params = parse_params(info.cls, request.params)
    scale = load_scale(request.scale)
    check_budget(request.budget)  # before any work
    device = request.device or default_device()

    resolved = resolve_pool(request.pool, progress=progress.counter("Generating SynthWeb"))
    pool = resolved.pool
    n_pool = len(pool)
    count = budget_count(request.budget, n_pool)

    experiment_id = tracking.setup(request.experiment)
    defaults = info.cls.Params().model_dump()
    label = method_label(info.name, params.model_dump(), defaults)
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=f"{label}@{request.budget}",
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
        tags={"selbench.cell_key": cell_key(request, params), **(tags or {})},
    )
    try:
        with tempfile.TemporaryDirectory(prefix="selbench-run-") as work:
            outcome = _execute_in_run(
                request, info, params, scale, resolved, count, device, label, Path(work), progress
            )
    except KeyboardInterrupt:
        mlflow.set_tag("selbench.error", "interrupted")
        mlflow.end_run(status="KILLED")
        raise
    except BaseException as exc:
        mlflow.set_tag("selbench.error", f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")
    outcome.run_id = run.info.run_id
    return outcome


def _execute_in_run(
    request: RunRequest,
    info: StrategyInfo,
    params: Any,
    scale: Any,
    resolved: ResolvedPool,
    count: int,
    device: str,
    label: str,
    work_dir: Path,
    progress: Any,
) -> RunOutcome:
    import mlflow

    pool = resolved.pool
    versions = tracking.package_versions()
    mlflow.set_tags(
        {
            "selbench.method": info.name,
            "selbench.label": label,
            "selbench.plugin_package": info.package,
            "selbench.plugin_version": info.version,
            "selbench.git_commit": tracking.git_commit() or "",
        }
    )
    run_params = {
        "method": info.name,
        "method_label": label,
        "method_params": json.dumps(params.model_dump(), sort_keys=True),
        "budget": request.budget,
        "budget_count": count,
        "protocol": request.protocol,
        "scale": scale.name,
        "seed": request.seed,
        "pool": pool.name,
        "pool_spec": request.pool,
        "pool_fingerprint": pool.fingerprint,
        "pool_size": len(pool),
        "pool_skipped": json.dumps(dict(pool.scan_stats.skipped), sort_keys=True),
        "device": device,
        "plugin_package": f"{info.package}=={info.version}",
        **{f"param.{k}": v for k, v in params.model_dump().items()},
        **{f"version.{k}": v for k, v in versions.items()},
    }
    mlflow.log_params({k: str(v)[:6000] for k, v in run_params.items()})

    # -- select ----------------------------------------------------------------------
    set_seeds(request.seed)
    ctx = SelectionContext(
        pool=pool.strategy_view(),
        budget_count=count,
        budget_fraction=request.budget,
        seed=request.seed,
        device=device,
        work_dir=work_dir,
        progress=progress,
        services=EmbeddingService(
            pool.strategy_view(),
            device,
            get_registry().make_embedder,
            progress,
            load_target=_target_loader(request, resolved),
        ),
    )
    t0 = time.perf_counter()
    strategy = info.cls(params)
    selection = _run_strategy(info, strategy, ctx)
    selection_s = time.perf_counter() - t0
    _log_embedding_usage(ctx.services, progress)
    _log_target(ctx.services)
    frame = _selection_frame(resolved, selection)
    frame.to_parquet(work_dir / "selection.parquet", index=False)
    mlflow.log_param("selection_sha256", selection_hash(selection.uids))
    mlflow.log_artifact(str(work_dir / "selection.parquet"))
    metrics: dict[str, float] = {
        "subset_size": float(len(selection.uids)),
        "selection_seconds": selection_s,
        "caption_rewrites": float(len(selection.captions or {})),
    }
    for key, value in (selection.metrics or {}).items():
        metrics[f"strategy/{key}"] = float(value)
    for key, curve in (selection.series or {}).items():
        for step, value in curve:
            mlflow.log_metric(f"strategy/{key}", float(value), step=int(step))
    for path in selection.artifacts or []:
        mlflow.log_artifact(str(path), artifact_path="strategy")
    if pool.has_ground_truth():
        truth = pool.ground_truth()
        metrics.update(pathology_fractions(truth, selection.uids))
        metrics["diag/concept_coverage"] = concept_coverage(truth, selection.uids)

    # -- train -----------------------------------------------------------------------
    set_seeds(request.seed)
    model, preprocess, tokenizer = build_model(scale.model, request.seed, device)
    samples_seen = planned_samples_seen(scale, request.protocol, len(pool), count)
    captions = dict(zip(frame["uid"], frame["train_caption"], strict=True))
    data = build_training_data(
        progress.track(pool.iter_images(selection.uids), "Loading subset", total=count),
        captions,
        preprocess,
        tokenizer,
    )
    trained = train_clip(
        model, data, scale, samples_seen, request.seed, device=device, progress=progress
    )
    metrics.update(
        {
            "training_seconds": trained.seconds,
            "training_steps": float(trained.steps),
            "samples_seen": float(trained.samples_seen),
            "final_loss": trained.final_loss,
        }
    )
    for step, value in trained.loss_curve:
        mlflow.log_metric("train_loss", value, step=step)

    # -- evaluate ---------------------------------------------------------------------
    t0 = time.perf_counter()
    metrics.update(
        evaluate(
            model,
            resolved.eval_sets,
            preprocess,
            tokenizer,
            batch_size=scale.eval_batch_size,
            device=device,
            progress=progress,
        )
    )
    metrics["eval_seconds"] = time.perf_counter() - t0
    mlflow.log_metrics(metrics)

    resolved_config = {
        "request": asdict(request),
        "method": {"name": info.name, "package": info.package, "params": params.model_dump()},
        "scale": scale.model_dump(),
        "pool": {
            "spec": request.pool,
            "name": pool.name,
            "fingerprint": pool.fingerprint,
            "size": len(pool),
            "kind": resolved.kind,
            "config": resolved.config,
            "eval_sets": [e.model_dump() for e in resolved.eval_sets],
        },
        "budget_count": count,
        "samples_seen": trained.samples_seen,
        "device": device,
        "versions": versions,
    }
    (work_dir / "config.yaml").write_text(yaml.safe_dump(resolved_config, sort_keys=False))
    mlflow.log_artifact(str(work_dir / "config.yaml"))
    return RunOutcome(
        run_id="",
        metrics=metrics,
        selection=selection,
        tracking_uri=tracking.tracking_uri(),
        embeddings=dict(ctx.services.usage),
    )
