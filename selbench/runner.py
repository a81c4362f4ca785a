"""One benchmark run, as a chain of resumable stages recorded in one MLflow run.

    select -> selection.parquet -> materialize -> subset shards -> train -> checkpoint
           -> evaluate -> metrics

Each stage reads the previous stage's files from the run directory
(:mod:`selbench.rundir`) and writes its own, so ``selbench run --resume RUN_ID`` continues
after a crash, a preemption or a ``kill -9`` from the first unfinished stage, and
``--stage`` runs one stage alone (select on one node, train on many, evaluate later).
Every MLflow call goes through a :class:`selbench.tracking.Recorder`. A run that fails
for any reason ends FAILED (KILLED on Ctrl-C) with the error as a tag, never RUNNING; a
run stopped after a requested stage ends SCHEDULED with ``selbench.next_stage`` set.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from selbench import tracking
from selbench.configs import ScaleConfig, load_scale
from selbench.diagnostics import concept_coverage, pathology_fractions
from selbench.embedders import EmbeddingService
from selbench.errors import ConfigError, PluginError, SelbenchError
from selbench.evaluate import evaluate, resolve_eval_suite
from selbench.fileutil import atomic_write_text, writing
from selbench.materialize import load_subset, materialize, materialize_synthesized
from selbench.pools import ResolvedPool, resolve_pool
from selbench.progress import NullProgress
from selbench.registry import StrategyInfo, get_registry
from selbench.rundir import STAGES, RunDir, host
from selbench.strategy import (
    Selection,
    SelectionContext,
    Synthesized,
    budget_count,
    check_budget,
    parse_params,
    validate_selection,
)
from selbench.target import load_target
from selbench.train import (
    ENGINES,
    PROTOCOLS,
    build_model,
    build_training_data,
    load_checkpoint,
    model_config,
    planned_samples_seen,
    save_checkpoint,
    train_model,
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
    engine: str | None = None  # training engine; default: the scale's
    nproc_per_node: int = 1  # training processes (open_clip engine, under torchrun)
    launcher: str = "torchrun"  # open_clip engine: torchrun on this node, or srun (SLURM)
    eval_suite: str | None = None  # configs/evals/NAME or a YAML; default: the pool's sets

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRequest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class RunOutcome:
    run_id: str
    metrics: dict[str, float]
    selection: Selection
    tracking_uri: str
    embeddings: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages_run: list[str] = field(default_factory=list)
    next_stage: str | None = None  # None: the run is complete


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


def training_image_size(scale: ScaleConfig) -> int | None:
    """The side in pixels of the images the scale's model trains on (None: not square)."""
    size = model_config(scale.model).get("vision_cfg", {}).get("image_size")
    if isinstance(size, (list, tuple)):
        return int(size[0]) if len(set(size)) == 1 else None
    return int(size) if size is not None else None


def _run_strategy(info: StrategyInfo, params: Any, ctx: SelectionContext) -> Selection:
    """Build the strategy and run its ``select``; whatever escapes the plugin (an
    exception, or ``sys.exit()``) becomes a PluginError naming the strategy."""
    try:
        result = info.cls(params).select(ctx)
    except SelbenchError:
        raise
    except SystemExit as exc:
        # A plugin calling sys.exit() is a plugin failure, not the end of selbench.
        raise PluginError(
            f"strategy {info.name!r} (package {info.package!r}) called sys.exit({exc.code!r}); "
            "a strategy returns a Selection or raises an exception"
        ) from exc
    except Exception as exc:
        raise PluginError(
            f"strategy {info.name!r} (package {info.package!r}) raised {type(exc).__name__}: {exc}"
        ) from exc
    return validate_selection(
        result, set(ctx.pool.uids), ctx.budget_count, info.name, image_size=ctx.image_size
    )


def _target_loader(request: RunRequest, resolved: ResolvedPool) -> Any:
    """A loader for the run's target set (``--target`` or the pool's own split), or None."""
    path = request.target or resolved.target
    if path is None:
        return None
    return partial(load_target, path, resolved.eval_sets)


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


def selection_hash(uids: list[str]) -> str:
    """sha256 of the sorted selected uids: equal for equal subsets, whatever their order."""
    return hashlib.sha256("\n".join(sorted(uids)).encode()).hexdigest()


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
    if request.engine is not None:  # only when overridden, so older cells keep their key
        resolved["engine"] = request.engine
    if request.eval_suite is not None:
        resolved["eval"] = request.eval_suite
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:24]


# -- the run's shared state -------------------------------------------------------------
@dataclass
class _Run:
    """Everything the stages share: the request resolved against configs and the pool."""

    request: RunRequest
    info: StrategyInfo
    params: Any
    scale: ScaleConfig
    engine: str
    resolved: ResolvedPool
    count: int
    device: str
    label: str
    rundir: RunDir
    recorder: tracking.Recorder
    progress: Any
    metrics: dict[str, float] = field(default_factory=dict)
    embeddings: dict[str, dict[str, Any]] = field(default_factory=dict)
    selection: Selection | None = None


def _prepare(request: RunRequest, progress: Any) -> dict[str, Any]:
    """Validate a request before anything is written; resolve configs and the pool."""
    if request.protocol not in PROTOCOLS:
        raise SelbenchError(
            f"unknown protocol {request.protocol!r}; choose one of {', '.join(PROTOCOLS)}"
        )
    info = get_registry().get(request.method)
    params = parse_params(info.cls, request.params)
    scale = load_scale(request.scale)
    engine = request.engine or scale.engine
    if engine not in ENGINES:
        raise ConfigError(f"unknown training engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if request.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be at least 1, got {request.nproc_per_node}")
    if (request.nproc_per_node > 1 or request.launcher != "torchrun") and engine != "open_clip":
        raise ConfigError(
            f"the {engine} engine trains in one process; --nproc-per-node and "
            "--launcher need --engine open_clip"
        )
    check_budget(request.budget)  # before any work
    # Checked on disk first, so a missing set fails before any selection or training.
    eval_sets = resolve_eval_suite(request.eval_suite) if request.eval_suite else None
    resolved = resolve_pool(request.pool, progress=progress.counter("Generating SynthWeb"))
    if eval_sets is not None:
        resolved.eval_sets = eval_sets
    if not resolved.eval_sets:
        raise ConfigError(
            f"pool {request.pool!r} has no evaluation sets: pass --eval SUITE "
            "(configs/evals/), or list sets under 'eval:' or name one with 'eval_suite:' "
            "in the pool's config"
        )
    count = budget_count(request.budget, len(resolved.pool))
    defaults = info.cls.Params().model_dump()
    return dict(
        info=info,
        params=params,
        scale=scale,
        engine=engine,
        resolved=resolved,
        count=count,
        device=request.device or default_device(),
        label=method_label(info.name, params.model_dump(), defaults),
    )


def _stages_to_run(rundir: RunDir, stages: list[str] | None, run_id: str) -> list[str]:
    """The stages this invocation runs: the given ones, or every unfinished one."""
    done = rundir.stages()
    if not stages:
        return [s for s in STAGES if s not in done]
    for stage in stages:
        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    wanted = [s for s in STAGES if s in stages]
    for stage in wanted:
        if stage in done and stage != "evaluate":
            raise SelbenchError(
                f"stage {stage!r} of run {run_id} is already done; "
                f"`selbench run --resume {run_id}` runs the stages left"
            )
        for earlier in STAGES[: STAGES.index(stage)]:
            if earlier not in done and earlier not in wanted:
                raise SelbenchError(
                    f"stage {stage!r} of run {run_id} needs stage {earlier!r} first; run "
                    f"`selbench run --resume {run_id} --stage {earlier}`"
                )
    return wanted


def execute(
    request: RunRequest,
    progress: Any = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    stages: list[str] | None = None,
) -> RunOutcome:
    """Start a run and run its stages (all of them, or ``stages``); log it to MLflow.

    Raises SelbenchError on user errors. ``parent_run_id`` nests the run under a sweep's
    parent run; ``tags`` are added to it.
    """
    progress = progress or NullProgress()
    prepared = _prepare(request, progress)
    if stages and "select" not in stages:
        raise SelbenchError(
            f"a new run starts with the select stage, not {', '.join(stages)}; "
            "continue an existing run with --resume RUN_ID"
        )
    recorder = tracking.Recorder(request.experiment)
    reap_stale_runs(recorder)
    run_id = recorder.start(
        run_name=f"{prepared['label']}@{request.budget}",
        parent_run_id=parent_run_id,
        tags={"selbench.cell_key": cell_key(request, prepared["params"]), **(tags or {})},
    )
    rundir = RunDir.for_run(run_id)
    recorder.keep_journal(rundir.journal_path)
    run = _Run(request, **prepared, rundir=rundir, recorder=recorder, progress=progress)
    try:
        lock = rundir.acquire(run_id)
        rundir.write_request(asdict(request))
        recorder.tags({"selbench.run_dir": str(rundir.root), "selbench.host": host()})
        _log_run_params(run)
        return _run_stages(run, _stages_to_run(rundir, stages, run_id), lock)
    except BaseException as exc:
        recorder.fail(exc)
        raise


# How a run executes, not what it measures: a resumed run may change these (train on
# another node, with more GPUs) without becoming a different benchmark cell.
EXECUTION_SETTINGS = ("device", "nproc_per_node", "launcher")


def resume(
    run_id: str,
    stages: list[str] | None = None,
    progress: Any = None,
    experiment: str | None = None,
    execution: dict[str, Any] | None = None,
) -> RunOutcome:
    """Continue run ``run_id`` from its first unfinished stage (or run ``stages``).

    ``execution`` overrides the run's execution settings (:data:`EXECUTION_SETTINGS`)
    for this invocation, e.g. ``{"nproc_per_node": 8, "launcher": "srun"}``.
    """
    progress = progress or NullProgress()
    recorder = tracking.Recorder(experiment or tracking.DEFAULT_EXPERIMENT)
    found = recorder.get_run(run_id)
    run_dir = found.data.tags.get("selbench.run_dir")
    rundir = RunDir(Path(run_dir)) if run_dir else RunDir.for_run(run_id)
    if not rundir.exists():
        raise SelbenchError(
            f"run {run_id} has no run directory at {rundir.root} on this machine "
            f"(host {found.data.tags.get('selbench.host', 'unknown')}); copy it there or set "
            "SELBENCH_RUN_HOME to where it lives"
        )
    request = RunRequest.from_dict(rundir.read_request())
    overrides = {k: v for k, v in (execution or {}).items() if v is not None}
    unknown = set(overrides) - set(EXECUTION_SETTINGS)
    if unknown:
        raise ConfigError(
            f"a resumed run keeps its settings; only {', '.join(EXECUTION_SETTINGS)} may "
            f"change, not {', '.join(sorted(unknown))}"
        )
    for key, value in overrides.items():
        setattr(request, key, value)
    if found.info.experiment_id != recorder.experiment_id:
        recorder = tracking.Recorder(_experiment_name(found.info.experiment_id))
    todo = _stages_to_run(rundir, stages, run_id)
    unlogged = tracking.read_journal(rundir.journal_path)
    if not todo and not unlogged:
        raise SelbenchError(f"run {run_id} has finished every stage; nothing to resume")
    lock = rundir.acquire(run_id)
    try:
        reap_stale_runs(recorder)  # other dead runs; this one's lock is ours now
        prepared = _prepare(request, progress)
        fingerprint = found.data.params.get("pool_fingerprint")
        if fingerprint and fingerprint != prepared["resolved"].pool.fingerprint:
            raise SelbenchError(
                f"the pool of run {run_id} ({request.pool}) changed since the run started: "
                f"fingerprint {prepared['resolved'].pool.fingerprint}, run recorded {fingerprint}"
            )
    except BaseException:
        lock.release()
        raise
    recorder.reopen(run_id)
    run = _Run(request, **prepared, rundir=rundir, recorder=recorder, progress=progress)
    try:
        if unlogged:  # calls made while the server was away, in their order
            recorder.replay(unlogged)
            rundir.journal_path.unlink()
            progress.note(f"Logged {len(unlogged)} MLflow calls kept while the server was away")
        recorder.keep_journal(rundir.journal_path)
        recorder.tags({"selbench.host": host()})
        if overrides:
            recorder.tags({"selbench.resumed_with": json.dumps(overrides, sort_keys=True)})
        return _run_stages(run, todo, lock)
    except BaseException as exc:
        recorder.fail(exc)
        raise


def _experiment_name(experiment_id: str) -> str:
    import mlflow

    return mlflow.get_experiment(experiment_id).name


def reap_stale_runs(recorder: tracking.Recorder) -> list[str]:
    """Mark KILLED the runs of this experiment left RUNNING by a dead process on this host.

    A run is stale when MLflow says RUNNING, it was started on this host, and nobody holds
    its run directory's lock (the lock dies with its process, ``kill -9`` included).
    """
    reaped = []
    for found in recorder.search("attributes.status = 'RUNNING'"):
        tags = found.data.tags
        run_dir = tags.get("selbench.run_dir")
        if not run_dir or tags.get("selbench.host") != host():
            continue
        rundir = RunDir(Path(run_dir))
        if rundir.owner_alive():
            continue
        stage = rundir.next_stage() or "evaluate"
        what = f"process died during stage {stage}"
        if rundir.journal_path.is_file():
            what = "the tracking server was unreachable when the run ended; its results are kept"
        recorder.set_terminated(
            found.info.run_id,
            "KILLED",
            f"{what}; `selbench run --resume {found.info.run_id}` continues it",
        )
        reaped.append(found.info.run_id)
    return reaped


def _run_stages(run: _Run, todo: list[str], lock: Any) -> RunOutcome:
    stage_functions = {
        "select": _stage_select,
        "materialize": _stage_materialize,
        "train": _stage_train,
        "evaluate": _stage_evaluate,
    }
    try:
        for stage in todo:
            run.recorder.tags({"selbench.stage": stage})
            started = time.perf_counter()
            record = stage_functions[stage](run) or {}
            record["seconds"] = time.perf_counter() - started
            run.rundir.mark_done(stage, record)
            run.recorder.metrics({f"stage_seconds/{stage}": record["seconds"]})
        next_stage = run.rundir.next_stage()
        run_id = run.recorder.run_id
        if next_stage is None:
            run.recorder.tags({"selbench.stage": "done"})
            run.recorder.finish()
        else:
            run.recorder.pause(next_stage)
    finally:
        lock.release()
    if run.recorder.unreachable is not None:
        raise _kept_locally(run, run_id)
    return RunOutcome(
        run_id=run_id,
        metrics=_all_metrics(run),
        selection=run.selection or _selection_from_file(run.rundir),
        tracking_uri=tracking.tracking_uri(),
        embeddings=run.embeddings,
        stages_run=todo,
        next_stage=next_stage,
    )


def _kept_locally(run: _Run, run_id: str) -> tracking.TrackingUnreachable:
    """The error a run ends with when its tracking server went away: where its results are."""
    rundir = run.rundir
    kept = [f"the stage records in {rundir.root / 'stages.json'}"]
    if rundir.selection_path.is_file():
        kept.insert(0, f"the selection in {rundir.selection_path}")
    if rundir.metrics_path.is_file():
        kept.insert(1, f"the metrics in {rundir.metrics_path}")
    calls = len(tracking.read_journal(rundir.journal_path))
    return tracking.TrackingUnreachable(
        f"the MLflow tracking server {tracking.tracking_uri()} became unreachable during run "
        f"{run_id} ({run.recorder.unreachable}); the run went on and kept everything on this "
        f"machine: {', '.join(kept)}, and the {calls} MLflow calls it could not make in "
        f"{rundir.journal_path}. Once the server is back, `selbench run --resume {run_id}` "
        "logs them"
    )


def _all_metrics(run: _Run) -> dict[str, float]:
    """This run's metrics: from every finished stage's record, this process's or not."""
    metrics: dict[str, float] = {}
    for record in run.rundir.stages().values():
        metrics.update(record.get("metrics", {}))
    metrics.update(run.metrics)
    return metrics


# -- params --------------------------------------------------------------------------
def _log_run_params(run: _Run) -> None:
    request, info, params, pool = run.request, run.info, run.params, run.resolved.pool
    versions = tracking.package_versions()
    run.recorder.tags(
        {
            "selbench.method": info.name,
            "selbench.label": run.label,
            "selbench.plugin_package": info.package,
            "selbench.plugin_version": info.version,
            "selbench.git_commit": tracking.git_commit() or "",
        }
    )
    run.recorder.params(
        {
            "method": info.name,
            "method_label": run.label,
            "method_params": json.dumps(params.model_dump(), sort_keys=True),
            "budget": request.budget,
            "budget_count": run.count,
            "protocol": request.protocol,
            "scale": run.scale.name,
            "engine": run.engine,
            "nproc_per_node": request.nproc_per_node,
            "eval_suite": request.eval_suite or "pool",
            "seed": request.seed,
            "pool": pool.name,
            "pool_spec": request.pool,
            "pool_fingerprint": pool.fingerprint,
            "pool_size": len(pool),
            "pool_skipped": json.dumps(dict(pool.scan_stats.skipped), sort_keys=True),
            "device": run.device,
            "plugin_package": f"{info.package}=={info.version}",
            **{f"param.{k}": v for k, v in params.model_dump().items()},
            **{f"version.{k}": v for k, v in versions.items()},
        }
    )


# -- stage 1: select -----------------------------------------------------------------
def _stage_select(run: _Run) -> dict[str, Any]:
    request, resolved, pool = run.request, run.resolved, run.resolved.pool
    set_seeds(request.seed)
    run.rundir.select_dir.mkdir(parents=True, exist_ok=True)
    ctx = SelectionContext(
        pool=pool.strategy_view(),
        budget_count=run.count,
        budget_fraction=request.budget,
        seed=request.seed,
        device=run.device,
        work_dir=run.rundir.select_dir,
        progress=run.progress,
        strategy=run.info.name,
        needs=frozenset(run.info.cls.needs),
        image_size=training_image_size(run.scale),
        truth=pool.ground_truth if pool.has_ground_truth() else None,
        services=EmbeddingService(
            pool.strategy_view(),
            run.device,
            get_registry().make_embedder,
            run.progress,
            load_target=_target_loader(request, resolved),
        ),
    )
    t0 = time.perf_counter()
    selection = _run_strategy(run.info, run.params, ctx)
    selection_s = time.perf_counter() - t0
    _log_embedding_usage(run, ctx.services)
    _log_target(run, ctx.services)

    frame = _selection_frame(resolved, selection)
    if selection.pixels is not None:  # synthesized pairs: their pixels, before the parquet
        with writing(run.rundir.synthesized_path, "the synthesized images") as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, selection.pixels)
    with writing(run.rundir.selection_path, "the selection") as tmp:
        frame.to_parquet(tmp, index=False)
    digest = selection_hash(selection.uids)
    synthesized = selection.synthesized is not None
    run.recorder.params({"selection_sha256": digest, "synthesized": synthesized})
    run.recorder.artifact(run.rundir.selection_path)
    if synthesized:
        run.recorder.artifact(run.rundir.synthesized_path)
    metrics: dict[str, float] = {
        "subset_size": float(len(selection.uids)),
        "selection_seconds": selection_s,
        "caption_rewrites": float(len(selection.captions or {})),
    }
    for key, value in (selection.metrics or {}).items():
        metrics[f"strategy/{key}"] = float(value)
    for key, curve in (selection.series or {}).items():
        run.recorder.series(f"strategy/{key}", curve)
    for path in selection.artifacts or []:
        run.recorder.artifact(path, artifact_path="strategy")
    if synthesized:
        # Pool ground truth describes pool samples; synthesized pairs have none, so the
        # pathology and coverage diagnostics do not apply (n/a: not logged).
        metrics["synthesized_samples"] = float(len(selection.uids))
    elif pool.has_ground_truth():
        truth = pool.ground_truth()
        metrics.update(pathology_fractions(truth, selection.uids))
        metrics["diag/concept_coverage"] = concept_coverage(truth, selection.uids)
    run.recorder.metrics(metrics)
    run.metrics.update(metrics)
    run.selection = selection
    return {"metrics": metrics, "selection_sha256": digest}


def _log_target(run: _Run, services: EmbeddingService) -> None:
    target = services.loaded_target
    if target is None:
        return
    run.recorder.params(
        {
            "target.path": str(target.path),
            "target.size": len(target.images),
            "target.overlap_checked_against": ",".join(target.checked_against),
            "target.overlap": 0,  # load_target refuses any overlap
        }
    )


def _log_embedding_usage(run: _Run, services: EmbeddingService) -> None:
    """Record which cache entries the strategy used, hit or computed, and the seconds."""
    for spec, usage in services.usage.items():
        key = usage_key(spec)
        run.recorder.params(
            {
                f"embeddings.{key}.spec": spec,
                f"embeddings.{key}.entry_id": usage["entry_id"],
                f"embeddings.{key}.embedder_id": usage["embedder_id"],
                f"embeddings.{key}.hit": usage["hit"],
                **(
                    {f"embeddings.{key}.resolved_to": usage["embedder_resolved_to"]}
                    if "embedder_resolved_to" in usage
                    else {}
                ),
            }
        )
        metrics = {
            f"embeddings/{key}/seconds": usage["total_seconds"],
            f"embeddings/{key}/cache_seconds": usage["cache_seconds"],
            f"embeddings/{key}/hit": float(usage["hit"]),
        }
        if "embedder_train_seconds" in usage:
            metrics[f"embeddings/{key}/proxy_train_seconds"] = usage["embedder_train_seconds"]
        run.recorder.metrics(metrics)
        verdict = "cache hit" if usage["hit"] else "computed and cached"
        if usage.get("embedder_trained"):
            verdict += f" (its model trained first, {usage['embedder_train_seconds']:.0f} s)"
        if "embedder_resolved_to" in usage:
            verdict += f"; {spec} = {usage['embedder_resolved_to']}"
        run.progress.note(
            f"Embeddings ({spec}): {verdict}, entry {usage['entry_id']}, "
            f"{usage['total_seconds']:.2f} s"
        )
    run.embeddings = dict(services.usage)


def _selection_frame(resolved: ResolvedPool, selection: Selection) -> pd.DataFrame:
    if selection.synthesized is not None:
        made = list(selection.synthesized.captions)
        sources = selection.synthesized.sources or [None] * len(made)
        return pd.DataFrame(
            {
                "uid": selection.uids,
                "caption": made,
                "train_caption": made,
                "score": np.full(len(made), np.nan),
                "synthesized": np.ones(len(made), dtype=bool),
                "source_uid": pd.array(list(sources), dtype="string"),
            }
        )
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


def _read_selection(rundir: RunDir) -> pd.DataFrame:
    try:
        return pd.read_parquet(rundir.selection_path)
    except FileNotFoundError:
        raise SelbenchError(
            f"{rundir.selection_path} is missing: the select stage's output is gone"
        ) from None


def _selection_from_file(rundir: RunDir) -> Selection:
    frame = _read_selection(rundir)
    columns = zip(frame["uid"], frame["train_caption"], frame["caption"], strict=True)
    rewrites = {u: t for u, t, c in columns if t != c}
    scored = zip(frame["uid"], frame["score"], strict=True)
    scores = {u: float(s) for u, s in scored if not pd.isna(s)}
    if _is_synthesized(frame):
        pixels = np.load(rundir.synthesized_path)
        made = frame["train_caption"].tolist()
        return Selection(
            uids=frame["uid"].tolist(),
            synthesized=Synthesized(pixels, made, frame["source_uid"].tolist()),
            pixels=pixels,
        )
    return Selection(uids=frame["uid"].tolist(), captions=rewrites or None, scores=scores or None)


def _is_synthesized(frame: pd.DataFrame) -> bool:
    """Whether a selection.parquet holds synthesized pairs (its ``synthesized`` column)."""
    return "synthesized" in frame.columns and bool(frame["synthesized"].all())


# -- stage 2: materialize ------------------------------------------------------------
def _stage_materialize(run: _Run) -> dict[str, Any]:
    frame = _read_selection(run.rundir)
    digest = selection_hash(frame["uid"].tolist())
    t0 = time.perf_counter()
    if _is_synthesized(frame):
        try:
            pixels = np.load(run.rundir.synthesized_path)
        except FileNotFoundError:
            raise SelbenchError(
                f"{run.rundir.synthesized_path} is missing: the select stage's synthesized "
                "images are gone"
            ) from None
        subset = materialize_synthesized(
            pixels,
            frame["uid"].tolist(),
            frame["train_caption"].tolist(),
            run.rundir.subset_dir,
            selection_sha256=digest,
            shard_size=run.scale.shard_size,
            progress=run.progress.counter("Materializing synthesized shards"),
        )
    else:
        subset = _materialize_pool(run, frame, digest)
    seconds = time.perf_counter() - t0
    metrics = {
        "materialize_seconds": seconds,
        "materialize_shards": float(len(subset.shards)),
        "materialize_samples_per_second": subset.n_samples / max(seconds, 1e-9),
    }
    run.recorder.metrics(metrics)
    run.metrics.update(metrics)
    return {"metrics": metrics, "shards": len(subset.shards), "samples": subset.n_samples}


def _materialize_pool(run: _Run, frame: pd.DataFrame, digest: str) -> Any:
    return materialize(
        run.resolved.pool,
        frame["uid"].tolist(),
        frame["train_caption"].tolist(),
        frame["caption"].tolist(),
        run.rundir.subset_dir,
        selection_sha256=digest,
        shard_size=run.scale.shard_size,
        progress=run.progress.counter("Materializing subset shards"),
    )


# -- stage 3: train ------------------------------------------------------------------
def _stage_train(run: _Run) -> dict[str, Any]:
    subset = load_subset(run.rundir.subset_dir)
    if subset is None:
        raise SelbenchError(f"{run.rundir.subset_dir} is not a complete materialized subset")
    request, scale = run.request, run.scale
    samples_seen = planned_samples_seen(
        scale, request.protocol, len(run.resolved.pool), subset.n_samples
    )
    run.rundir.train_dir.mkdir(parents=True, exist_ok=True)
    if run.engine == "open_clip":
        from selbench.train_open_clip import train_open_clip

        trained = train_open_clip(
            subset,
            scale,
            samples_seen,
            request.seed,
            run.rundir.train_dir,
            device=run.device,
            nproc_per_node=request.nproc_per_node,
            progress=run.progress,
            on_log=lambda step, values: run.recorder.metrics(values, step=step),
            launch=request.launcher,
        )
    else:
        set_seeds(request.seed)
        model, preprocess, tokenizer = build_model(scale.model, request.seed, run.device)
        frame = _read_selection(run.rundir)
        captions = dict(zip(frame["uid"], frame["train_caption"], strict=True))
        data = build_training_data(
            run.progress.track(_subset_images(subset), "Loading subset", total=subset.n_samples),
            captions,
            preprocess,
            tokenizer,
        )
        trained = train_model(
            model, data, scale, samples_seen, request.seed, device=run.device, progress=run.progress
        )
        trained.checkpoint = save_checkpoint(model, run.rundir.train_dir / "model.pt")
        run.recorder.series("train_loss", trained.loss_curve)
    metrics = {
        "training_seconds": trained.seconds,
        "training_steps": float(trained.steps),
        "samples_seen": float(trained.samples_seen),
        "final_loss": trained.final_loss,
        "training_samples_per_second": trained.samples_seen / max(trained.seconds, 1e-9),
    }
    run.recorder.metrics(metrics)
    run.metrics.update(metrics)
    return {
        "metrics": metrics,
        "checkpoint": str(trained.checkpoint),
        "samples_seen": trained.samples_seen,
    }


def _subset_images(subset: Any):
    """``(uid, PIL image)`` per materialized sample, in subset order."""
    from selbench.decoding import decode_image_bytes

    for uid, data, _, _ in subset.iter_samples():
        yield uid, decode_image_bytes(data)


# -- stage 4: evaluate ---------------------------------------------------------------
def _stage_evaluate(run: _Run) -> dict[str, Any]:
    record = run.rundir.stages().get("train", {})
    checkpoint = record.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        raise SelbenchError(
            f"run {run.recorder.run_id} has no trained checkpoint ({checkpoint}); "
            f"run `selbench run --resume {run.recorder.run_id} --stage train` first"
        )
    model, preprocess, tokenizer = build_model(run.scale.model, run.request.seed, run.device)
    load_checkpoint(model, Path(checkpoint), run.device)
    t0 = time.perf_counter()
    metrics = evaluate(
        model,
        run.resolved.eval_sets,
        preprocess,
        tokenizer,
        batch_size=run.scale.eval_batch_size,
        device=run.device,
        progress=run.progress,
    )
    metrics["eval_seconds"] = time.perf_counter() - t0
    run.recorder.metrics(metrics)
    run.metrics.update(metrics)
    atomic_write_text(run.rundir.metrics_path, json.dumps(metrics, indent=1, sort_keys=True))
    _log_resolved_config(run, record.get("samples_seen"))
    return {"metrics": metrics}


def _log_resolved_config(run: _Run, samples_seen: int | None) -> None:
    request, info, pool, resolved = run.request, run.info, run.resolved.pool, run.resolved
    config = {
        "request": asdict(request),
        "method": {"name": info.name, "package": info.package, "params": run.params.model_dump()},
        "scale": run.scale.model_dump(),
        "engine": run.engine,
        "pool": {
            "spec": request.pool,
            "name": pool.name,
            "fingerprint": pool.fingerprint,
            "size": len(pool),
            "kind": resolved.kind,
            "config": resolved.config,
            "eval_sets": [e.model_dump() for e in resolved.eval_sets],
        },
        "budget_count": run.count,
        "samples_seen": samples_seen,
        "device": run.device,
        "versions": tracking.package_versions(),
        "run_dir": str(run.rundir.root),
        "python": sys.version.split()[0],
    }
    path = run.rundir.root / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    run.recorder.artifact(path)
