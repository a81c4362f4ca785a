"""A run's life: start it, run its stages, resume it, and reap the runs whose process died.

Each stage (:mod:`selbench.run.stages`) reads the previous stage's files from the run
directory (:mod:`selbench.rundir`) and writes its own, so ``selbench run --resume RUN_ID``
continues after a crash, a preemption or a ``kill -9`` from the first unfinished stage,
and ``--stage`` runs one stage alone (select on one node, train on many, evaluate later).

This module is the one place that hands a stage's result to the recorder
(:class:`selbench.tracking.Recorder`, through which every MLflow call goes) and marks it
done in the run directory. A run that fails for any reason ends FAILED (KILLED on
Ctrl-C) with the error as a tag, never RUNNING; a run stopped after a requested stage
ends SCHEDULED with ``selbench.next_stage`` set.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import BaseFileLock

from selbench import tracking
from selbench.errors import ConfigError, SelbenchError
from selbench.pools import refuse_training_without_shards
from selbench.pools.corrupt import skipped_shards_param
from selbench.progress import NullProgress, Progress
from selbench.run.selection_io import selection_from_file, selection_path
from selbench.run.spec import EXECUTION_SETTINGS, RunRequest, cell_key
from selbench.run.stages import (
    STAGE_FUNCTIONS,
    PreparedRun,
    StageContext,
    StageResult,
    prepare,
)
from selbench.rundir import STAGES, RunDir, host
from selbench.strategy import Selection


@dataclass
class RunOutcome:
    run_id: str
    metrics: dict[str, float]
    selection: Selection
    tracking_uri: str
    embeddings: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages_run: list[str] = field(default_factory=list)
    next_stage: str | None = None  # None: the run is complete


@dataclass
class _Session:
    """One process's hold on a run: the prepared run, its directory and its recorder, and
    what this process's stages returned."""

    plan: PreparedRun
    rundir: RunDir
    recorder: tracking.Recorder
    progress: Progress
    metrics: dict[str, float] = field(default_factory=dict)
    embeddings: dict[str, dict[str, Any]] = field(default_factory=dict)
    selection: Selection | None = None

    def context(self) -> StageContext:
        recorder = self.recorder
        return StageContext(
            run=self.plan,
            rundir=self.rundir,
            run_id=str(recorder.run_id),
            progress=self.progress,
            on_step=lambda step, values: recorder.metrics(values, step=step),
        )

    def keep(self, result: StageResult) -> None:
        self.metrics.update(result.metrics)
        if result.selection is not None:
            self.selection = result.selection
            self.embeddings = dict(result.embeddings)


def stages_to_run(rundir: RunDir, stages: list[str] | None, run_id: str) -> list[str]:
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


# -- starting a run ----------------------------------------------------------------------
def execute(
    request: RunRequest,
    progress: Progress | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    stages: list[str] | None = None,
) -> RunOutcome:
    """Start a run and run its stages (all of them, or ``stages``); log it to MLflow.

    Raises SelbenchError on user errors. ``parent_run_id`` nests the run under a sweep's
    parent run; ``tags`` are added to it.
    """
    progress = progress or NullProgress()
    plan = prepare(request, progress)
    request = plan.request  # as resolved: a pipeline's canonical label, however spelt
    if stages and "select" not in stages:
        raise SelbenchError(
            f"a new run starts with the select stage, not {', '.join(stages)}; "
            "continue an existing run with --resume RUN_ID"
        )
    refuse_training_without_shards(plan.resolved.pool, stages)
    recorder = tracking.Recorder(request.experiment)
    reap_stale_runs(recorder)
    run_id = recorder.start(
        run_name=f"{plan.label}@{request.budget}",
        parent_run_id=parent_run_id,
        tags={"selbench.cell_key": run_cell_key(plan), **(tags or {})},
    )
    rundir = RunDir.for_run(run_id)
    recorder.keep_journal(rundir.journal_path)
    session = _Session(plan, rundir, recorder, progress)
    try:
        lock = rundir.acquire(run_id)
        rundir.write_request(asdict(request))
        recorder.tags({"selbench.run_dir": str(rundir.root), "selbench.host": host()})
        run_tags, run_params = run_identity(plan)
        recorder.tags(run_tags)
        recorder.params(run_params)
        return _run_stages(session, stages_to_run(rundir, stages, run_id), lock)
    except BaseException as exc:
        recorder.fail(exc)
        raise


def run_identity(plan: PreparedRun) -> tuple[dict[str, str], dict[str, Any]]:
    """The tags and params that say what a run is: its method, label, plugin, budget,
    recipe, pool and versions (the leaderboard groups and filters runs by them)."""
    request, info, params, pool = plan.request, plan.info, plan.params, plan.resolved.pool
    versions = tracking.package_versions()
    tags = {
        "selbench.method": info.name,
        "selbench.label": plan.label,
        "selbench.plugin_package": info.package,
        "selbench.plugin_version": info.version,
        "selbench.git_commit": tracking.git_commit() or "",
    }
    values = {
        "method": info.name,
        "method_label": plan.label,
        "method_params": json.dumps(params.model_dump(), sort_keys=True),
        "budget": request.budget,
        "budget_count": plan.count,
        "protocol": request.protocol,
        "scale": plan.scale.name,
        "engine": plan.engine,
        "nproc_per_node": request.nproc_per_node,
        "eval_suite": request.eval_suite or "pool",
        "train_samples": float(request.train_samples),
        "online": request.online or "",
        "seed": request.seed,
        "pool": pool.name,
        "pool_spec": request.pool,
        # The pool the strategy chose from: after decontamination, what it left (so runs
        # with and without it never share a leaderboard setting).
        "pool_fingerprint": plan.pool_view.fingerprint,
        "pool_size": plan.pool_size,
        "pool_skipped": json.dumps(dict(pool.scan_stats.skipped), sort_keys=True),
        # Only when a corrupt shard was left out, so a clean pool's runs log what they did.
        **(
            {"pool_skipped_shards": skipped_shards_param(pool.skipped_shards)}
            if pool.skipped_shards
            else {}
        ),
        "device": plan.device,
        "executor": request.executor,  # an execution setting: never in the cell key
        "plugin_package": f"{info.package}=={info.version}",
        **{f"param.{k}": v for k, v in params.model_dump().items()},
        "decontaminate": bool(request.decontaminate),
        **(plan.decontamination.params(pool.fingerprint) if plan.decontamination else {}),
        **online_identity(plan),
        **{f"version.{k}": v for k, v in versions.items()},
    }
    return tags, values


def online_identity(plan: PreparedRun) -> dict[str, Any]:
    """The params of a run's online strategy: its plugin, reference and every parameter
    (none for an offline run)."""
    if plan.online is None:
        return {}
    info = plan.online.info
    return {
        "online_method": info.name,
        "online_plugin_package": f"{info.package}=={info.version}",
        "online_reference": plan.request.online_reference or "reference",
        **{f"online.param.{k}": v for k, v in plan.online.params.model_dump().items()},
    }


def run_cell_key(plan: PreparedRun) -> str:
    """The cell key of a prepared run (:func:`selbench.run.spec.cell_key`)."""
    return cell_key(plan.request, plan.params, plan.online.params if plan.online else None)


# -- resuming a run ----------------------------------------------------------------------
def resume(
    run_id: str,
    stages: list[str] | None = None,
    progress: Progress | None = None,
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
    rundir = _run_directory(run_id, found.data.tags)
    recorded = rundir.read_request()
    request = RunRequest.from_dict(recorded)
    if "decontaminate" not in recorded:  # started before decontamination existed: without
        request.decontaminate = False
    overrides = execution_overrides(execution)
    for key, value in overrides.items():
        setattr(request, key, value)
    if found.info.experiment_id != recorder.experiment_id:
        recorder = tracking.Recorder(tracking.Recorder.experiment_name(found.info.experiment_id))
    todo = stages_to_run(rundir, stages, run_id)
    unlogged = tracking.read_journal(rundir.journal_path)
    if not todo and not unlogged:
        raise SelbenchError(f"run {run_id} has finished every stage; nothing to resume")
    lock = rundir.acquire(run_id)
    try:
        reap_stale_runs(recorder)  # other dead runs; this one's lock is ours now
        plan = prepare(request, progress)
        _check_same_pool(run_id, plan, found.data.params.get("pool_fingerprint"))
        if todo:
            refuse_training_without_shards(plan.resolved.pool, todo)
    except BaseException:
        lock.release()
        raise
    recorder.reopen(run_id)
    session = _Session(plan, rundir, recorder, progress)
    try:
        if unlogged:  # calls made while the server was away, in their order
            recorder.replay(unlogged)
            rundir.journal_path.unlink()
            progress.note(f"Logged {len(unlogged)} MLflow calls kept while the server was away")
        recorder.keep_journal(rundir.journal_path)
        recorder.tags({"selbench.host": host()})
        if overrides:
            recorder.tags({"selbench.resumed_with": json.dumps(overrides, sort_keys=True)})
        return _run_stages(session, todo, lock)
    except BaseException as exc:
        recorder.fail(exc)
        raise


def _run_directory(run_id: str, tags: dict[str, str]) -> RunDir:
    """The run directory of run ``run_id`` on this machine; an error naming where it was."""
    run_dir = tags.get("selbench.run_dir")
    rundir = RunDir(Path(run_dir)) if run_dir else RunDir.for_run(run_id)
    if not rundir.exists():
        raise SelbenchError(
            f"run {run_id} has no run directory at {rundir.root} on this machine "
            f"(host {tags.get('selbench.host', 'unknown')}); copy it there or set "
            "SELBENCH_RUN_HOME to where it lives"
        )
    return rundir


def execution_overrides(execution: dict[str, Any] | None) -> dict[str, Any]:
    """The execution settings a resumed run changes (the given, non-None ones); a
    ConfigError for any other setting, which a resumed run keeps."""
    overrides = {k: v for k, v in (execution or {}).items() if v is not None}
    unknown = set(overrides) - set(EXECUTION_SETTINGS)
    if unknown:
        raise ConfigError(
            f"a resumed run keeps its settings; only {', '.join(EXECUTION_SETTINGS)} may "
            f"change, not {', '.join(sorted(unknown))}"
        )
    return overrides


def _check_same_pool(run_id: str, plan: PreparedRun, recorded: str | None) -> None:
    current = plan.pool_view.fingerprint  # decontaminated as the run was
    if recorded and recorded != current:
        raise SelbenchError(
            f"the pool of run {run_id} ({plan.request.pool}) changed since the run started: "
            f"fingerprint {current}, run recorded {recorded}"
        )


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


# -- running stages ----------------------------------------------------------------------
def _run_stages(session: _Session, todo: list[str], lock: BaseFileLock) -> RunOutcome:
    recorder, rundir = session.recorder, session.rundir
    run_id = str(recorder.run_id)
    try:
        for stage in todo:
            recorder.tags({"selbench.stage": stage})
            started = time.perf_counter()
            result = STAGE_FUNCTIONS[stage](session.context())
            log_result(recorder, result)
            record = result.stage_record()
            record["seconds"] = time.perf_counter() - started
            rundir.mark_done(stage, record)
            recorder.metrics({f"stage_seconds/{stage}": record["seconds"]})
            session.keep(result)
        next_stage = rundir.next_stage()
        if next_stage is None:
            recorder.tags({"selbench.stage": "done"})
            recorder.finish()
        else:
            recorder.pause(next_stage)
    finally:
        lock.release()
    if recorder.unreachable is not None:
        raise _kept_locally(session, run_id)
    return RunOutcome(
        run_id=run_id,
        metrics=_all_metrics(session),
        selection=session.selection or selection_from_file(rundir),
        tracking_uri=tracking.tracking_uri(),
        embeddings=session.embeddings,
        stages_run=todo,
        next_stage=next_stage,
    )


def log_result(recorder: tracking.Recorder, result: StageResult) -> None:
    """Log what a stage returned: params, metrics, series, then artifacts."""
    if result.params:
        recorder.params(result.params)
    if result.usage_metrics:
        recorder.metrics(result.usage_metrics)
    for key, curve in result.series.items():
        recorder.series(key, curve)
    for path, folder in result.artifacts:
        recorder.artifact(path, artifact_path=folder)
    recorder.metrics(result.metrics)


def _kept_locally(session: _Session, run_id: str) -> tracking.TrackingUnreachable:
    """The error a run ends with when its tracking server went away: where its results are."""
    rundir = session.rundir
    kept = [f"the stage records in {rundir.root / 'stages.json'}"]
    if selection_path(rundir).is_file():
        kept.insert(0, f"the selection in {selection_path(rundir)}")
    if rundir.metrics_path.is_file():
        kept.insert(1, f"the metrics in {rundir.metrics_path}")
    calls = len(tracking.read_journal(rundir.journal_path))
    return tracking.TrackingUnreachable(
        f"the MLflow tracking server {tracking.tracking_uri()} became unreachable during run "
        f"{run_id} ({session.recorder.unreachable}); the run went on and kept everything on "
        f"this machine: {', '.join(kept)}, and the {calls} MLflow calls it could not make in "
        f"{rundir.journal_path}. Once the server is back, `selbench run --resume {run_id}` "
        "logs them"
    )


def _all_metrics(session: _Session) -> dict[str, float]:
    """This run's metrics: from every finished stage's record, this process's or not."""
    metrics: dict[str, float] = {}
    for record in session.rundir.stages().values():
        metrics.update(record.get("metrics", {}))
    metrics.update(session.metrics)
    return metrics
