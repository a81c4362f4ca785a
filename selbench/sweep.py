"""``selbench sweep``: a grid of methods x budgets x seeds as nested MLflow runs.

Every cell is one :func:`selbench.runner.execute` call, nested under a sweep parent run.
A cell is identified by the hash of its resolved configuration
(:func:`selbench.runner.cell_key`, also tagged on every ``selbench run``), so running the
same sweep again skips the cells that already have a FINISHED run -- whether a sweep or
a plain ``selbench run`` produced it -- and runs the missing and failed ones. A cell
whose run was left RUNNING by a killed process is marked KILLED; a cell stopped after
some of its stages (killed, preempted) is resumed from them rather than rerun.
Embedding caches, proxies and captioners are shared through the usual caches.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from selbench import tracking
from selbench.errors import ConfigError
from selbench.progress import NullProgress
from selbench.registry import get_registry
from selbench.runner import RunRequest, cell_key, execute, reap_stale_runs, resume
from selbench.strategy import check_budget, parse_params

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
        given = ",".join(f"{k}={v}" for k, v in r.params.items())
        method = f"{r.method}({given})" if given else r.method
        return f"{method} budget={r.budget:g} seed={r.seed}"


@dataclass
class SweepResult:
    sweep_key: str
    parent_run_id: str
    cells: list[Cell] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.cells)


def split_methods(value: str) -> list[str]:
    """``"random,tldr(refine=false,clusters=1)"`` -> ``["random", "tldr(refine=false,
    clusters=1)"]``: commas inside parentheses belong to a method's parameters."""
    specs, depth, current = [], 0, []
    for char in value:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"unbalanced ')' in the method list {value!r}")
        if char == "," and depth == 0:
            specs.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if depth:
        raise ConfigError(f"unclosed '(' in the method list {value!r}")
    specs.append("".join(current).strip())
    return [spec for spec in specs if spec]


def parse_method_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"tldr(refine=false, clusters=1)"`` -> ``("tldr", {"refine": "false", "clusters":
    "1"})``; a bare name has no parameters. Values are parsed by the strategy's Params, as
    ``selbench run -p KEY=VALUE`` values are."""
    name, paren, rest = spec.partition("(")
    name = name.strip()
    if not paren:
        return name, {}
    if not rest.endswith(")"):
        raise ConfigError(f"method {spec!r}: write parameters as NAME(KEY=VALUE,...)")
    params: dict[str, str] = {}
    for item in split_methods(rest[:-1]):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"method {spec!r}: expected KEY=VALUE, got {item!r}")
        params[key.strip()] = value.strip()
    return name, params


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
) -> list[Cell]:
    """The grid's cells (validated before anything runs), plus with ``full_pool`` the
    reference cells ``random`` at budget 1.0 for every seed."""
    if not methods or not budgets or not seeds:
        raise ConfigError("a sweep needs at least one method, one budget and one seed")
    registry = get_registry()
    for budget in budgets:
        check_budget(budget)
    combos = [(m, float(b)) for m in methods for b in budgets]
    if full_pool and ("random", 1.0) not in combos:
        combos.append(("random", 1.0))
    cells = []
    for spec, budget in combos:
        method, given = parse_method_spec(spec)
        info = registry.get(method)  # unknown names fail here, naming the method
        params = parse_params(info.cls, given)  # unknown or invalid values fail here
        for seed in seeds:
            request = RunRequest(
                method=method,
                params=given,
                budget=budget,
                seed=int(seed),
                pool=pool,
                scale=scale,
                protocol=protocol,
                experiment=experiment,
                device=device,
                eval_suite=eval_suite,
            )
            cells.append(Cell(request, cell_key(request, params)))
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
