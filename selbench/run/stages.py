"""The four stages of a run, as functions from a prepared run to a :class:`StageResult`.

    select -> selection.parquet -> materialize -> subset shards -> train -> checkpoint
           -> evaluate -> metrics.json

A stage reads the previous stage's files from the run directory and writes its own
outputs there; what it measured comes back in its result (metrics, params, series,
artifacts, and the record ``stages.json`` keeps). A stage never calls the recorder and
never marks itself done: :mod:`selbench.run.lifecycle` does both, in one place. The one
live channel is :attr:`StageContext.on_step`, through which the open_clip engine's
per-step metrics reach MLflow while it trains.

:func:`prepare` resolves a request against the configs and the pool before anything is
written, into a :class:`PreparedRun` the stages share.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from selbench import flops, tracking
from selbench.configs import ScaleConfig, load_scale
from selbench.decontaminate import Decontamination, decontaminate_run
from selbench.diagnostics import concept_coverage, pathology_fractions
from selbench.embedders import EmbeddingService
from selbench.errors import ConfigError, SelbenchError
from selbench.evaluate import evaluate, resolve_eval_suite
from selbench.executors import make_executor
from selbench.fileutil import atomic_write_text
from selbench.materialize import Subset, load_subset, materialize, materialize_synthesized
from selbench.pools import ResolvedPool, refuse_without_images, resolve_pool
from selbench.progress import Progress
from selbench.registry import StrategyInfo, get_registry
from selbench.run.compute import load_reference, selection_compute, total_compute, training_compute
from selbench.run.pipeline import run_strategy
from selbench.run.plan import ResolvedOnline, resolve_method, resolve_online
from selbench.run.selection_io import (
    is_synthesized,
    read_pixels,
    read_selection,
    training_captions,
    write_selection,
)
from selbench.run.spec import (
    RunRequest,
    default_device,
    online_label,
    parse_train_samples,
    selection_hash,
    set_seeds,
    split_online,
    train_label,
    usage_key,
)
from selbench.run.views import SubsetView, ViewServices
from selbench.rundir import RunDir
from selbench.strategy import Selection, SelectionContext, budget_count, check_budget
from selbench.target import load_target
from selbench.train import (
    ENGINES,
    PROTOCOLS,
    TrainResult,
    build_model,
    build_training_data,
    load_checkpoint,
    model_config,
    planned_samples_seen,
    save_checkpoint,
    train_model,
)


@dataclass(frozen=True)
class PreparedRun:
    """A request resolved against the configs, the registry and the pool."""

    request: RunRequest
    info: StrategyInfo
    params: BaseModel  # the strategy's Params, defaults filled in
    scale: ScaleConfig
    engine: str
    resolved: ResolvedPool
    count: int  # the budget in samples
    device: str
    label: str  # the canonical label (selbench.run.plan.resolve_method)
    needs: frozenset[str] = frozenset()  # what the strategy (every step of a pipeline) uses
    online: ResolvedOnline | None = None  # the online strategy choosing each batch, if any
    decontamination: Decontamination | None = None  # what --decontaminate took out

    @cached_property
    def pool_view(self) -> Any:
        """The pool strategies see: the whole pool, or what decontamination left of it."""
        view = self.resolved.pool.strategy_view()
        cleaned = self.decontamination
        return view if cleaned is None else SubsetView(view, cleaned.kept_rows)

    @property
    def pool_size(self) -> int:
        """The pool's size after decontamination: what the budget and the protocol count."""
        return len(self.pool_view)


@dataclass(frozen=True)
class StageContext:
    """What a stage runs with: the prepared run, its directory, and where to report."""

    run: PreparedRun
    rundir: RunDir
    run_id: str
    progress: Progress
    on_step: Callable[[int, dict[str, float]], None]  # live training metrics: (step, values)


@dataclass
class StageResult:
    """What a stage did, for the lifecycle to log and record.

    ``metrics`` are the stage's measurements: logged, kept in its ``stages.json`` record
    and returned with the run. ``usage_metrics`` are logged only (the embedding cache's
    timings). ``record`` holds what ``stages.json`` keeps of the stage besides its metrics
    (the checkpoint, the shard count, ...); ``artifacts`` are ``(path, artifact folder or
    None)`` pairs, logged in order."""

    metrics: dict[str, float] = field(default_factory=dict)
    usage_metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    selection: Selection | None = None  # select only
    embeddings: dict[str, dict[str, Any]] = field(default_factory=dict)  # select only

    def stage_record(self) -> dict[str, Any]:
        """The stage's entry in ``stages.json`` (before its seconds are added)."""
        return {"metrics": self.metrics, **self.record}


# -- preparing a run -------------------------------------------------------------------
def training_image_size(scale: ScaleConfig) -> int | None:
    """The side in pixels of the images the scale's model trains on (None: not square)."""
    size = model_config(scale.model).get("vision_cfg", {}).get("image_size")
    if isinstance(size, (list, tuple)):
        return int(size[0]) if len(set(size)) == 1 else None
    return int(size) if size is not None else None


def _check_engine(request: RunRequest, engine: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"unknown training engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if request.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be at least 1, got {request.nproc_per_node}")
    if (request.nproc_per_node > 1 or request.launcher != "torchrun") and engine != "open_clip":
        raise ConfigError(
            f"the {engine} engine trains in one process; --nproc-per-node and "
            "--launcher need --engine open_clip"
        )


def _resolve_pool(request: RunRequest, progress: Progress) -> ResolvedPool:
    """The pool and the sets the run evaluates on; a missing set fails here, before any
    selection or training."""
    eval_sets = resolve_eval_suite(request.eval_suite) if request.eval_suite else None
    counter = progress.counter("Generating SynthWeb")
    resolved = resolve_pool(request.pool, progress=counter, strict=request.strict)
    if eval_sets is not None:
        resolved.eval_sets = eval_sets
    if not resolved.eval_sets:
        raise ConfigError(
            f"pool {request.pool!r} has no evaluation sets: pass --eval SUITE "
            "(configs/evals/), or list sets under 'eval:' or name one with 'eval_suite:' "
            "in the pool's config"
        )
    return resolved


def prepare(request: RunRequest, progress: Progress) -> PreparedRun:
    """Validate a request before anything is written; resolve configs and the pool."""
    if request.protocol not in PROTOCOLS:
        raise SelbenchError(
            f"unknown protocol {request.protocol!r}; choose one of {', '.join(PROTOCOLS)}"
        )
    offline, online_text = split_online(request.method)
    if online_text is not None and request.online is not None:
        raise ConfigError(
            f"method {request.method!r} ends in an online step and --online "
            f"{request.online!r} names another; give the online strategy once"
        )
    method = resolve_method(offline, request.params)
    wanted = online_text or request.online
    online = resolve_online(wanted) if wanted is not None else None
    # The request as the run records it: a strategy's name and parameters, or a
    # pipeline's canonical label, however it was spelt on the command line.
    request = replace(
        request,
        method=method.method,
        params=method.given,
        online=online.label if online else None,
        train_samples=parse_train_samples(request.train_samples),
    )
    scale = load_scale(request.scale)
    engine = request.engine or scale.engine
    _check_engine(request, engine)
    if online is not None and engine != "in-memory":
        raise ConfigError(
            f"online method {online.label!r} needs the in-memory engine (--engine in-memory): "
            f"the {engine} engine trains in open_clip_train's own loop under torchrun, which "
            "draws each batch from its data loader and has no step at which the learner can "
            "score a super-batch first (docs/online.md)"
        )
    check_budget(request.budget)  # before any work
    resolved = _resolve_pool(request, progress)
    refuse_without_images(resolved.pool, method)  # before any work
    request, cleaned = decontaminate_run(
        request, resolved, request.device or default_device(), progress
    )
    return PreparedRun(
        request=request,
        info=method.info,
        params=method.params,
        scale=scale,
        engine=engine,
        resolved=resolved,
        count=budget_count(request.budget, cleaned.kept if cleaned else len(resolved.pool)),
        device=request.device or default_device(),
        label=train_label(
            online_label(method.label, online.label if online else None), request.train_samples
        ),
        needs=method.needs,
        online=online,
        decontamination=cleaned,
    )


# -- stage 1: select -------------------------------------------------------------------
def _target_loader(request: RunRequest, resolved: ResolvedPool) -> Any:
    """A loader for the run's target set (``--target`` or the pool's own split), or None."""
    path = request.target or resolved.target
    if path is None:
        return None
    return partial(load_target, path, resolved.eval_sets)


def embedding_service(stage: StageContext) -> EmbeddingService:
    """The strategy's embeddings, embedders and target set, through the shared cache."""
    run = stage.run
    return EmbeddingService(
        run.resolved.pool.strategy_view(),
        run.device,
        get_registry().make_embedder,
        stage.progress,
        load_target=_target_loader(run.request, run.resolved),
    )


def selection_context(stage: StageContext, services: EmbeddingService) -> SelectionContext:
    """What the strategy sees: the pool's view (decontaminated), the budget, its services
    (the whole pool's embeddings cut to the view) and scratch space."""
    run, pool, view = stage.run, stage.run.resolved.pool, stage.run.pool_view
    return SelectionContext(
        pool=view,
        budget_count=run.count,
        budget_fraction=run.request.budget,
        seed=run.request.seed,
        device=run.device,
        work_dir=stage.rundir.select_dir,
        progress=stage.progress,
        strategy=run.info.name,
        needs=run.needs,
        image_size=training_image_size(run.scale),
        truth=pool.ground_truth if pool.has_ground_truth() else None,
        services=ViewServices(services, view) if isinstance(view, SubsetView) else services,
        executor=make_executor(run.request.executor, run.request.ray_address),
    )


def select_stage(stage: StageContext) -> StageResult:
    run, pool = stage.run, stage.run.resolved.pool
    set_seeds(run.request.seed)
    stage.rundir.select_dir.mkdir(parents=True, exist_ok=True)
    services = embedding_service(stage)
    t0 = time.perf_counter()
    with flops.recording() as ledger:  # models the strategy trains, passes it scores with
        selection = run_strategy(run.info, run.params, selection_context(stage, services))
    selection_s = time.perf_counter() - t0
    result = embedding_usage(services, stage.progress)
    result.params.update(target_params(services))
    compute = {**selection_compute(services, len(pool)), **ledger.as_metrics("flops/selection/")}

    written = write_selection(stage.rundir, run.resolved, selection)
    digest = selection_hash(selection.uids)
    synthesized = selection.synthesized is not None
    result.params.update({"selection_sha256": digest, "synthesized": synthesized})
    result.artifacts += [(path, None) for path in written]
    result.series.update({f"strategy/{k}": v for k, v in (selection.series or {}).items()})
    result.artifacts += [(Path(path), "strategy") for path in selection.artifacts or []]
    metrics = result.metrics = {
        "subset_size": float(len(selection.uids)),
        "selection_seconds": selection_s,
        "caption_rewrites": float(len(selection.captions or {})),
        **compute,
    }
    for key, value in (selection.metrics or {}).items():
        metrics[f"strategy/{key}"] = float(value)
    if run.decontamination is not None:  # what each eval set had in the pool
        metrics.update(run.decontamination.metrics())
    if synthesized:
        # Pool ground truth describes pool samples; synthesized pairs have none, so the
        # pathology and coverage diagnostics do not apply (n/a: not logged).
        metrics["synthesized_samples"] = float(len(selection.uids))
    elif pool.has_ground_truth():
        truth = pool.ground_truth()
        metrics.update(pathology_fractions(truth, selection.uids))
        metrics["diag/concept_coverage"] = concept_coverage(truth, selection.uids)
    result.record = {"selection_sha256": digest}
    result.selection = selection
    return result


def target_params(services: EmbeddingService) -> dict[str, Any]:
    """The params that describe the target set a strategy loaded (none if it loaded none)."""
    target = services.loaded_target
    if target is None:
        return {}
    return {
        "target.path": str(target.path),
        "target.size": len(target.images),
        "target.overlap_checked_against": ",".join(target.checked_against),
        "target.overlap": 0,  # load_target refuses any overlap
        # the model that embedded the target for precomputed pool features (features_model)
        **{f"target.model.{usage_key(s)}": m for s, m in services.image_models.items()},
    }


def embedding_usage(services: EmbeddingService, progress: Progress) -> StageResult:
    """Which cache entries the strategy used, hit or computed, and the seconds: as params
    and metrics per embedder spec, and one line each on the progress display."""
    result = StageResult(embeddings=dict(services.usage))
    for spec, usage in services.usage.items():
        key = usage_key(spec)
        result.params.update(
            {
                f"embeddings.{key}.spec": spec,
                f"embeddings.{key}.entry_id": usage["entry_id"],
                f"embeddings.{key}.embedder_id": usage["embedder_id"],
                f"embeddings.{key}.hit": usage["hit"],
            }
        )
        if "embedder_resolved_to" in usage:
            result.params[f"embeddings.{key}.resolved_to"] = usage["embedder_resolved_to"]
        result.usage_metrics.update(
            {
                f"embeddings/{key}/seconds": usage["total_seconds"],
                f"embeddings/{key}/cache_seconds": usage["cache_seconds"],
                f"embeddings/{key}/hit": float(usage["hit"]),
            }
        )
        if "embedder_train_seconds" in usage:
            seconds = usage["embedder_train_seconds"]
            result.usage_metrics[f"embeddings/{key}/proxy_train_seconds"] = seconds
        verdict = "cache hit" if usage["hit"] else "computed and cached"
        if usage.get("embedder_trained"):
            verdict += f" (its model trained first, {usage['embedder_train_seconds']:.0f} s)"
        if "embedder_resolved_to" in usage:
            verdict += f"; {spec} = {usage['embedder_resolved_to']}"
        progress.note(
            f"Embeddings ({spec}): {verdict}, entry {usage['entry_id']}, "
            f"{usage['total_seconds']:.2f} s"
        )
    return result


# -- stage 2: materialize --------------------------------------------------------------
def materialize_stage(stage: StageContext) -> StageResult:
    run, rundir = stage.run, stage.rundir
    frame = read_selection(rundir)
    uids = frame["uid"].tolist()
    digest = selection_hash(uids)
    t0 = time.perf_counter()
    if is_synthesized(frame):
        subset = materialize_synthesized(
            read_pixels(rundir),
            uids,
            frame["train_caption"].tolist(),
            rundir.subset_dir,
            selection_sha256=digest,
            shard_size=run.scale.shard_size,
            progress=stage.progress.counter("Materializing synthesized shards"),
        )
    else:
        subset = materialize(
            run.resolved.pool,
            uids,
            frame["train_caption"].tolist(),
            frame["caption"].tolist(),
            rundir.subset_dir,
            selection_sha256=digest,
            shard_size=run.scale.shard_size,
            progress=stage.progress.counter("Materializing subset shards"),
        )
    seconds = time.perf_counter() - t0
    metrics = {
        "materialize_seconds": seconds,
        "materialize_shards": float(len(subset.shards)),
        "materialize_samples_per_second": subset.n_samples / max(seconds, 1e-9),
    }
    record = {"shards": len(subset.shards), "samples": subset.n_samples}
    return StageResult(metrics=metrics, record=record)


# -- stage 3: train --------------------------------------------------------------------
def train_stage(stage: StageContext) -> StageResult:
    run, rundir = stage.run, stage.rundir
    subset = load_subset(rundir.subset_dir)
    if subset is None:
        raise SelbenchError(f"{rundir.subset_dir} is not a complete materialized subset")
    request = run.request
    planned = planned_samples_seen(run.scale, request.protocol, run.pool_size, subset.n_samples)
    samples_seen = max(1, int(round(planned * request.train_samples)))
    rundir.train_dir.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[tuple[int, float]]] = {}
    if run.engine == "open_clip":
        from selbench.train_open_clip import train_open_clip

        trained = train_open_clip(
            subset,
            run.scale,
            samples_seen,
            request.seed,
            rundir.train_dir,
            device=run.device,
            nproc_per_node=request.nproc_per_node,
            progress=stage.progress,
            on_log=stage.on_step,
            launch=request.launcher,
        )
        online: dict[str, float] = {}
    else:
        trained, online, online_series = _train_in_process(stage, subset, samples_seen)
        series["train_loss"] = trained.loss_curve
        series.update(online_series)
    metrics = {
        "training_seconds": trained.seconds,
        "training_steps": float(trained.steps),
        "samples_seen": float(trained.samples_seen),
        "final_loss": trained.final_loss,
        "training_samples_per_second": trained.samples_seen / max(trained.seconds, 1e-9),
        **training_compute(run.scale.model, trained),
        **online,
    }
    record = {"checkpoint": str(trained.checkpoint), "samples_seen": trained.samples_seen}
    return StageResult(metrics=metrics, series=series, record=record)


def _train_in_process(
    stage: StageContext, subset: Subset, samples_seen: int
) -> tuple[TrainResult, dict[str, float], dict[str, list[tuple[int, float]]]]:
    """The built-in engine: train the scale's model on the subset (choosing each batch
    with the run's online strategy, if any), save its checkpoint. Returns the result, the
    online selection's metrics and series (empty for an offline run)."""
    run = stage.run
    set_seeds(run.request.seed)
    model, preprocess, tokenizer = build_model(run.scale.model, run.request.seed, run.device)
    captions = training_captions(read_selection(stage.rundir))
    uids: list[str] = []
    data = build_training_data(
        stage.progress.track(
            _subset_images(subset, uids), "Loading subset", total=subset.n_samples
        ),
        captions,
        preprocess,
        tokenizer,
    )
    selector = None
    metrics: dict[str, float] = {}
    if run.online is not None:
        from selbench.online.harness import OnlineSelector

        strategy, reference = run.online.strategy(), None
        if strategy.needs_reference:
            reference, metrics = load_reference(
                run.request.online_reference or "reference",
                run.resolved.pool.strategy_view(),
                run.device,
                stage.progress,
                model,
                run.scale.model,
            )
        selector = OnlineSelector(
            strategy, data.images, data.tokens, uids, model,
            batch_size=min(run.scale.batch_size, len(data)), seed=run.request.seed,
            reference=reference,
        )  # fmt: skip
    trained = train_model(
        model,
        data,
        run.scale,
        samples_seen,
        run.request.seed,
        device=run.device,
        progress=stage.progress,
        online=selector,
    )
    trained.checkpoint = save_checkpoint(model, stage.rundir.train_dir / "model.pt")
    if selector is None:
        return trained, metrics, {}
    metrics.update(selector.metrics())
    metrics.update(selector.compute())
    series = {f"online/{k}": v for k, v in selector.series.items()}
    return trained, metrics, series


def _subset_images(subset: Subset, uids: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    """``(uid, PIL image)`` per materialized sample, in subset order (each uid also
    appended to ``uids`` when given)."""
    from selbench.decoding import decode_image_bytes

    for uid, data, _, _ in subset.iter_samples():
        if uids is not None:
            uids.append(uid)
        yield uid, decode_image_bytes(data)


# -- stage 4: evaluate -----------------------------------------------------------------
def evaluate_stage(stage: StageContext) -> StageResult:
    run, rundir = stage.run, stage.rundir
    record = rundir.stages().get("train", {})
    checkpoint = record.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        raise SelbenchError(
            f"run {stage.run_id} has no trained checkpoint ({checkpoint}); "
            f"run `selbench run --resume {stage.run_id} --stage train` first"
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
        progress=stage.progress,
    )
    metrics["eval_seconds"] = time.perf_counter() - t0
    metrics.update(total_compute(rundir.stages()))
    atomic_write_text(rundir.metrics_path, json.dumps(metrics, indent=1, sort_keys=True))
    config = write_resolved_config(run, rundir, record.get("samples_seen"))
    return StageResult(metrics=metrics, artifacts=[(config, None)])


def write_resolved_config(run: PreparedRun, rundir: RunDir, samples_seen: int | None) -> Path:
    """``config.yaml``: everything the run resolved, for reproducing it; returns its path."""
    request, info, resolved, pool = run.request, run.info, run.resolved, run.resolved.pool
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
            "decontaminated_size": run.pool_size,
            "kind": resolved.kind,
            "config": resolved.config,
            "eval_sets": [e.model_dump() for e in resolved.eval_sets],
        },
        "budget_count": run.count,
        "samples_seen": samples_seen,
        "device": run.device,
        "versions": tracking.package_versions(),
        "run_dir": str(rundir.root),
        "python": sys.version.split()[0],
    }
    path = rundir.root / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


#: Each stage's function, in run order (:data:`selbench.rundir.STAGES`).
STAGE_FUNCTIONS: dict[str, Callable[[StageContext], StageResult]] = {
    "select": select_stage,
    "materialize": materialize_stage,
    "train": train_stage,
    "evaluate": evaluate_stage,
}
