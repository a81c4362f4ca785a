"""``selbench sweep``: a grid of methods x budgets x seeds as nested MLflow runs.

Every cell is one :func:`selbench.run.lifecycle.execute` call, nested under a sweep parent run.
A cell is identified by the hash of its resolved configuration
(:func:`selbench.run.spec.cell_key`, also tagged on every ``selbench run``), so running the
same sweep again skips the cells that already have a FINISHED run -- whether a sweep or
a plain ``selbench run`` produced it -- and runs the missing and failed ones. A cell
whose run was left RUNNING by a killed process is marked KILLED; a cell stopped after
some of its stages (killed, preempted) is resumed from them rather than rerun.
Embedding caches, proxies and captioners are shared through the usual caches.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selbench import tracking
from selbench.errors import ConfigError
from selbench.pools import decontaminates_by_default
from selbench.progress import NullProgress
from selbench.registry import get_registry
from selbench.run.lifecycle import execute, reap_stale_runs, resume
from selbench.run.plan import resolve_method, resolve_online
from selbench.run.spec import (
    MethodSpec,
    RunRequest,
    cell_key,
    online_label,
    parse_train_samples,
    split_online,
    train_label,
)
from selbench.strategy import check_budget

SWEEP_TAG = "selbench.sweep_key"
CELL_TAG = "selbench.cell_key"


@dataclass
class Cell:
    request: RunRequest
    key: str
    status: str = "pending"  # pending | skipped | running | done | failed
    run_id: str = ""
    error: str = ""
    seconds: float | None = None
    mean_r1: float | None = None

    @property
    def label(self) -> str:
        r = self.request
        method = MethodSpec(r.method, {k: str(v) for k, v in r.params.items()}).format()
        method = train_label(online_label(method, r.online), r.train_samples)
        return f"{method} budget={r.budget:g} seed={r.seed}"


@dataclass
class SweepResult:
    sweep_key: str
    parent_run_id: str
    cells: list[Cell] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.cells)


def plan(
    methods: Sequence[str],
    budgets: Sequence[float],
    seeds: Sequence[int],
    pool: str = "synthweb",
    scale: str = "tiny",
    protocol: str = "fixed-compute",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    full_pool: bool = True,
    device: str | None = None,
    eval_suite: str | None = None,
    train_samples: Sequence[float | str] = (1.0,),
    strict: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
) -> list[Cell]:
    """The grid's cells (validated before anything runs), plus with ``full_pool`` the
    reference cells ``random`` at budget 1.0 for every seed; every cell at each training
    length of ``train_samples`` (multiples of the protocol's samples seen). ``executor``
    and ``ray_address`` say where selection runs; they are in no cell key."""
    if not methods or not budgets or not seeds:
        raise ConfigError("a sweep needs at least one method, one budget and one seed")
    for budget in budgets:
        check_budget(budget)
    combos = [(m, float(b)) for m in methods for b in budgets]
    if full_pool and ("random", 1.0) not in combos:
        combos.append(("random", 1.0))
    lengths = [parse_train_samples(t) for t in train_samples]
    if not lengths:
        raise ConfigError("a sweep needs at least one training length")
    cells = []
    decontaminate = decontaminates_by_default(pool)  # as each run resolves it: one cell key
    for spec, budget in combos:
        # Unknown names, invalid values and pipelines that cannot run fail here.
        offline, online_text = split_online(spec)
        resolved = resolve_method(offline)
        online = resolve_online(online_text) if online_text is not None else None
        for length in lengths:
            for seed in seeds:
                request = RunRequest(
                    method=resolved.method,
                    params=resolved.given,
                    budget=budget,
                    seed=int(seed),
                    pool=pool,
                    scale=scale,
                    protocol=protocol,
                    experiment=experiment,
                    device=device,
                    eval_suite=eval_suite,
                    online=online.label if online else None,
                    train_samples=length,
                    decontaminate=decontaminate,
                    strict=strict,
                    executor=executor,
                    ray_address=ray_address,
                )
                key = cell_key(request, resolved.params, online.params if online else None)
                cells.append(Cell(request, key))
    return cells


def sweep_key(cells: Sequence[Cell]) -> str:
    return hashlib.sha256(json.dumps(sorted(c.key for c in cells)).encode()).hexdigest()[:16]


def _runs_by_cell(recorder: tracking.Recorder, keys: set[str]) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for run in recorder.search():
        key = run.data.tags.get(CELL_TAG)
        if key in keys:
            found.setdefault(key, []).append(run)
    return found


def _parent_run(recorder: tracking.Recorder, key: str, description: str) -> str:
    """The id of this sweep's parent run: the existing one if the sweep ran before."""
    existing = recorder.search(
        f"tags.`{SWEEP_TAG}` = '{key}' and tags.`selbench.sweep_parent` = 'true'"
    )
    if existing:
        return existing[0].info.run_id
    return recorder.create_run(
        f"sweep-{key}",
        tags={SWEEP_TAG: key, "selbench.sweep_parent": "true", "selbench.sweep": description},
    )


def run_sweep(
    cells: list[Cell],
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    progress: Any = None,
    on_update: Callable[[Cell, list[Cell]], None] | None = None,
) -> SweepResult:
    """Run every cell that has no FINISHED run yet. Failed cells are recorded and the
    sweep goes on; a KeyboardInterrupt stops it (the interrupted run ends KILLED)."""
    progress = progress or NullProgress()
    on_update = on_update or (lambda cell, cells: None)
    recorder = tracking.Recorder(experiment)
    reap_stale_runs(recorder)  # cells whose process died: KILLED, resumable
    key = sweep_key(cells)
    description = json.dumps(
        sorted({(c.request.method, c.request.budget, c.request.seed) for c in cells}),
    )[:5000]
    parent = _parent_run(recorder, key, description)
    existing = _runs_by_cell(recorder, {c.key for c in cells})
    resumable: dict[str, str] = {}
    for cell in cells:
        runs = existing.get(cell.key, [])
        finished = [r for r in runs if r.info.status == "FINISHED"]
        for stale in (r for r in runs if r.info.status == "RUNNING"):
            # Left RUNNING by a killed process elsewhere: nothing will ever finish it.
            recorder.set_terminated(stale.info.run_id, "KILLED", "stale: process died")
        if finished:
            cell.status, cell.run_id = "skipped", finished[0].info.run_id
            cell.mean_r1 = finished[0].data.metrics.get("mean_R1")
        else:
            # A cell killed or preempted after some stages continues from them.
            stopped = [
                r
                for r in runs
                if r.info.status in ("KILLED", "SCHEDULED")
                and r.data.tags.get("selbench.stage") in ("materialize", "train", "evaluate")
            ]
            if stopped:
                resumable[cell.key] = stopped[0].info.run_id
        on_update(cell, cells)
    result = SweepResult(key, parent, cells)
    todo = [c for c in cells if c.status == "pending"]
    for cell in todo:
        cell.status = "running"
        on_update(cell, cells)
        started = time.perf_counter()
        with recorder.hold(parent) as held:  # the parent is RUNNING while one of its cells is
            try:
                if cell.key in resumable:
                    outcome = resume(resumable[cell.key], progress=progress, experiment=experiment)
                else:
                    outcome = execute(
                        cell.request, progress, parent_run_id=parent, tags={SWEEP_TAG: key}
                    )
            except KeyboardInterrupt:
                held["status"] = "KILLED"
                cell.status, cell.error = "failed", "interrupted"
                on_update(cell, cells)
                raise
            except Exception as exc:  # the cell's own run has already ended FAILED
                cell.status, cell.error = "failed", f"{type(exc).__name__}: {exc}"
            else:
                cell.status, cell.run_id = "done", outcome.run_id
                cell.mean_r1 = outcome.metrics.get("mean_R1")
        cell.seconds = time.perf_counter() - started
        on_update(cell, cells)
    return result


@dataclass
class SweepOptions:
    """What ``selbench sweep`` was asked for: the grid, where it runs, and its page."""

    methods: list[str]  # as given; ``["all"]`` is every registered strategy
    budgets: list[float]
    seeds: list[int]
    pool: str = "synthweb"
    scale: str = "tiny"
    protocol: str = "fixed-compute"
    full_pool: bool = True
    eval_suite: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    device: str | None = None
    board_name: str | None = None  # write this sweep's leaderboard as NAME.* under out
    out: Path = Path("leaderboards")
    compare_with: str | None = None
    train_samples: list[float] = field(default_factory=lambda: [1.0])
    strict: bool = False  # refuse a pool with a corrupt shard (--strict)
    executor: str = "local"  # where selection runs (--executor; not in any cell key)
    ray_address: str | None = None  # --ray-address

    def resolved_methods(self) -> list[str]:
        if self.methods == ["all"]:
            return sorted(get_registry().names())
        return list(self.methods)

    def command_line(self) -> str:
        """The command that reproduces this sweep, every setting spelled out (the page
        states it)."""
        return shlex.join(
            [
                "selbench", "sweep", "--methods", ",".join(self.methods),
                "--budgets", ",".join(f"{b:g}" for b in self.budgets),
                "--seeds", ",".join(map(str, self.seeds)), "--pool", self.pool,
                "--scale", self.scale, "--protocol", self.protocol,
                "--full-pool" if self.full_pool else "--no-full-pool",
                *(
                    ["--train-samples", ",".join(f"{t:g}x" for t in self.train_samples)]
                    if self.train_samples != [1.0] else []
                ),
                *(["--eval", self.eval_suite] if self.eval_suite else []),
                *(["--strict"] if self.strict else []),
                "--experiment", self.experiment, "--leaderboard", str(self.board_name),
                "--out", str(self.out),
                *(["--compare-with", self.compare_with] if self.compare_with else []),
            ]
        )  # fmt: skip


def run_grid(
    options: SweepOptions,
    progress: Any = None,
    on_update: Callable[[Cell, list[Cell]], None] | None = None,
) -> SweepResult:
    """Plan the grid of ``options`` (every cell validated first) and run it."""
    cells = plan(
        options.resolved_methods(), options.budgets, options.seeds, options.pool,
        options.scale, options.protocol, options.experiment, options.full_pool,
        options.device, options.eval_suite, options.train_samples, options.strict,
        options.executor, options.ray_address,
    )  # fmt: skip
    return run_sweep(cells, options.experiment, progress=progress, on_update=on_update)


def publish(options: SweepOptions, result: SweepResult, seconds: float, console: Any) -> None:
    """Write the leaderboard of this sweep's cells (``--leaderboard NAME``), its page
    saying which command made it and how long the last invocation took."""
    from selbench.leaderboard import generate

    methods, budgets = options.resolved_methods(), [f"{b:g}" for b in options.budgets]
    intro = [
        f"Produced by `{options.command_line()}` ({len(result.cells)} cells: "
        f"{', '.join(methods)} at budgets {', '.join(budgets)} with seeds "
        f"{', '.join(map(str, options.seeds))}"
        + (", and the full pool" if options.full_pool else "")
        + (
            ", each at training lengths " + ", ".join(f"{t:g}x" for t in options.train_samples)
            if options.train_samples != [1.0]
            else ""
        )
        + f"). The last invocation took {seconds / 60:.1f} min of wall time; "
        f"{result.count('done')} cells ran in it and {result.count('skipped')} were "
        "already finished."
    ]
    run_ids = {cell.run_id for cell in result.cells}
    kind, _, table = (options.compare_with or "").partition(":")
    if kind == "published":  # ranked against a paper's table instead of an experiment
        from selbench.leaderboard.published import generate_vs_published

        generate_vs_published(
            options.experiment, options.out, str(options.board_name), table,
            console=console, intro=intro, run_ids=run_ids,
            source="`selbench sweep --leaderboard`",
        )  # fmt: skip
        return
    generate(
        options.experiment,
        options.out,
        str(options.board_name),
        (),  # R@1, zero-shot and the suite's summary columns
        {},
        True,
        intro,
        run_ids=run_ids,
        source="`selbench sweep --leaderboard`",
        compare_with=options.compare_with,
        console=console,
    )
