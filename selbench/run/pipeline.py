"""Running a pipeline plan (:mod:`selbench.run.plan`) as one strategy of a run.

:class:`PipelineStrategy` is what the select stage runs for ``--method "A >> B"``: each
step of the chain runs on a :class:`~selbench.run.views.SubsetView` of the survivors,
with the run's embeddings cut to them, a seed derived from the run's, and its own
scratch folder. Operators (``&``, ``|``, ``fuse``) rank by the scores of their operands
(:mod:`selbench.run.fusion`). The result is an ordinary :class:`~selbench.strategy.Selection`
with the budget exact, plus ``dropped`` (the step that removed each other sample), the
trace as metrics, and ``pipeline_trace.json`` and ``pipeline_funnel.png`` as artifacts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import selbench
from selbench.diagnostics import pathology_fractions
from selbench.errors import ConfigError, PluginError, SelbenchError
from selbench.fileutil import atomic_write_text
from selbench.registry import StrategyInfo
from selbench.run import fusion
from selbench.run.plan import Node, PipelineParams, Step, _expression, build_plan, derive_seed
from selbench.run.spec import parse_method
from selbench.run.views import SubsetView, ViewServices, whole_view
from selbench.strategy import (
    NEEDS,
    Selection,
    SelectionContext,
    Strategy,
    validate_mask,
    validate_scores,
    validate_selection,
)

TRACE_FILE = "pipeline_trace.json"
FUNNEL_FILE = "pipeline_funnel.png"


def run_strategy(info: StrategyInfo, params: Any, ctx: SelectionContext) -> Selection:
    """Build the strategy and run its ``select``; whatever escapes the plugin (an
    exception, or ``sys.exit()``) becomes a PluginError naming the strategy."""
    return validate_selection(
        call_plugin(info, lambda: info.cls(params).select(ctx)),
        ctx.pool.uids,  # a set of them only for a selection of uids (not of positions)
        ctx.budget_count,
        info.name,
        image_size=ctx.image_size,
        pool=ctx.pool,
    )


def call_plugin(info: StrategyInfo, call: Callable[[], Any]) -> Any:
    """``call()``, with anything a plugin lets escape turned into a PluginError naming it."""
    try:
        return call()
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


@dataclass
class _Outcome:
    """What one step of the chain kept (positions in its view, ascending), and why."""

    kept: np.ndarray
    selection: Selection | None = None  # a strategy's own select
    scores: np.ndarray | None = None  # an operator's scores over the view
    metrics: dict[str, float] = field(default_factory=dict)


class PipelineStrategy(Strategy):
    """A pipeline of strategies run as one (``docs/pipelines.md``)."""

    name = "pipeline"
    summary = "A pipeline of strategies: A >> B, A & B, A | B, fuse(A, B, ...)"
    reference = "docs/pipelines.md"
    needs = frozenset(NEEDS)  # each step's context enforces that step's own needs
    Params = PipelineParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.expression: str = getattr(self.params, "expression", "")
        if not self.expression:
            raise ConfigError("a pipeline strategy needs its expression")
        self.plan = build_plan(parse_method(self.expression))
        chain = isinstance(self.plan, Node) and self.plan.op == "chain"
        self.steps = (
            list(self.plan.children) if isinstance(self.plan, Node) and chain else [self.plan]
        )

    def is_stochastic(self) -> bool:
        return any(s.strategy().is_stochastic() for s in leaves(self.plan))

    def select(self, ctx: SelectionContext) -> Selection:
        truth = ctx.truth() if ctx.truth is not None else None
        view = whole_view(ctx.pool)
        dropped: dict[str, str] = {}
        rewrites: dict[str, str] = {}
        trace: list[dict[str, Any]] = []
        metrics: dict[str, float] = {}
        final_scores: Mapping[str, float] | None = None
        for number, step in enumerate(self.steps, 1):
            last = number == len(self.steps)
            label = _expression(step).format()
            if last and len(view) < ctx.budget_count:
                raise ConfigError(
                    f"after step {number - 1} of {self.expression!r}, {len(view):,} "
                    f"samples remain, fewer than the budget's {ctx.budget_count:,}: keep more "
                    "in the steps before the last, or lower --budget"
                )
            started = time.perf_counter()
            outcome = self._step(step, view, ctx, str(number), last)
            seconds = time.perf_counter() - started
            if outcome.selection is not None and outcome.selection.synthesized is not None:
                return _with_trace(outcome.selection, trace, ctx, dropped)
            if last:
                final_scores = _final_scores(outcome, view)
            kept_view = view.subset(outcome.kept)
            kept = set(kept_view.uids)
            dropped.update((u, f"{number}: {label}") for u in view.uids if u not in kept)
            if outcome.selection is not None:
                rewrites.update(outcome.selection.captions or {})
            entry: dict[str, Any] = {
                "step": number,
                "label": label,
                "in": len(view),
                "out": len(kept_view),
                "seconds": seconds,
            }
            if truth is not None:
                fractions = pathology_fractions(truth, kept_view.uids)
                if number == 1:
                    entry["pool_mix"] = _mix(fractions, "diag/pool_frac/")
                entry["mix"] = _mix(fractions, "diag/selected_frac/")
            trace.append(entry)
            for key, value in _step_metrics(outcome).items():
                metrics[f"step{number}/{key}"] = value
            view = kept_view
        selection = Selection(
            uids=list(view.uids),
            captions={u: rewrites[u] for u in view.uids if u in rewrites} or None,
            scores=final_scores,
            metrics={**metrics, **_trace_metrics(trace)},
            dropped=dropped,
        )
        return _with_trace(selection, trace, ctx, dropped)

    # -- one step of the chain ------------------------------------------------------------
    def _step(
        self, step: Step | Node, view: SubsetView, ctx: SelectionContext, path: str, last: bool
    ) -> _Outcome:
        count = ctx.budget_count if last else _keep_count(step, len(view))
        if isinstance(step, Step):
            step_ctx = _context(ctx, step, view, path, count or len(view))
            if count is None:  # its own rule decides (checked: it has one)
                mask = call_plugin(step.info, lambda: step.strategy().passes(step_ctx))
                return _Outcome(np.flatnonzero(validate_mask(mask, len(view), step.name)))
            chosen = run_strategy(step.info, step.params, step_ctx)
            if chosen.synthesized is not None:
                if not last:
                    raise ConfigError(
                        f"{step.name!r} synthesizes new pairs, so it can only be the last step"
                    )
                return _Outcome(np.arange(0), selection=chosen)
            if chosen.positions is not None:  # rows of the step's view already
                return _Outcome(np.sort(chosen.positions), selection=chosen)
            where = {u: i for i, u in enumerate(view.uids)}
            return _Outcome(np.sort([where[u] for u in chosen.uids]), selection=chosen)
        scores, members, metrics = _scores(step, view, ctx, path, count)
        kept = (
            np.sort(fusion.rank(scores)[:count]) if count is not None else np.flatnonzero(members)
        )
        return _Outcome(kept, scores=scores, metrics=metrics)


# -- helpers ------------------------------------------------------------------------------
def leaves(item: Step | Node) -> list[Step]:
    """The strategies of a plan, in expression order."""
    return [item] if isinstance(item, Step) else [s for c in item.children for s in leaves(c)]


def _keep_count(step: Step | Node, n: int) -> int | None:
    """How many a step that is not last keeps: ``keep=`` of its input, or None when its
    own rule decides (a strategy's ``passes``, the members of ``&``/``|``);
    :func:`~selbench.run.plan.build_plan` has refused a step with neither."""
    return max(1, int(round(step.keep * n))) if step.keep is not None else None


def _context(
    ctx: SelectionContext, step: Step, view: SubsetView, path: str, count: int
) -> SelectionContext:
    services = ViewServices(ctx.services, view) if ctx.services is not None else None
    work_dir = ctx.work_dir / f"step-{path}"
    work_dir.mkdir(parents=True, exist_ok=True)
    return SelectionContext(
        pool=view,
        budget_count=count,
        budget_fraction=count / max(len(view), 1),
        seed=derive_seed(ctx.seed, path),
        device=ctx.device,
        work_dir=work_dir,
        progress=ctx.progress,
        services=services,
        strategy=step.name,
        needs=frozenset(step.info.cls.needs),
        image_size=ctx.image_size,
        truth=ctx.truth,
        executor=ctx.executor,
    )


def _scores(
    item: Step | Node,
    view: SubsetView,
    ctx: SelectionContext,
    path: str,
    count: int | None,
    rules: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """An operand's scores over the view, its members, and what it measured. ``count`` is
    the size of the enclosing step's selection (None: its rule decides), the members of an
    operand with neither ``keep=`` nor a rule of its own."""
    n = len(view)
    if isinstance(item, Step):
        step_ctx = _context(ctx, item, view, path, count or n)
        strategy = item.strategy()
        scores = validate_scores(
            call_plugin(item.info, lambda: strategy.score(step_ctx)), n, item.name
        )
        if item.keep is not None:
            members = fusion.top_members(scores, max(1, int(round(item.keep * n))))
        elif rules and item.info.cls.has_rule():
            members = validate_mask(
                call_plugin(item.info, lambda: strategy.passes(step_ctx)), n, item.name
            )
        elif count is not None:
            members = fusion.top_members(scores, count)
        else:
            raise ConfigError(
                f"{item.spec().format()!r} has no keep= and no rule of its own, so it keeps "
                "nothing definite where it stands; give it keep=FRACTION"
            )
        return scores, members, {}
    inner = item.keep and max(1, int(round(item.keep * n)))
    # Inside fuse, an operand votes with its top count (or keep=), not its own rule, so
    # that every vote keeps the same share and the label model compares like with like.
    parts = [
        _scores(child, view, ctx, f"{path}.{i}", inner or count, rules=item.op != "fuse")
        for i, child in enumerate(item.children, 1)
    ]
    scores_list = [p[0] for p in parts]
    masks = [p[1] for p in parts]
    metrics: dict[str, float] = {}
    for i, part in enumerate(parts, 1):
        metrics[f"{path}.{i}/members"] = float(part[1].sum())
        metrics.update(part[2])
    if item.op in ("&", "|"):
        combined = fusion.combine(item.op, scores_list, masks)
        members = np.all(masks, axis=0) if item.op == "&" else np.any(masks, axis=0)
        return combined, members, metrics
    if item.how == "fit":
        fused, model = fusion.fitted(scores_list, masks, (inner or count or n) / max(n, 1))
        for i, (weight, accuracy) in enumerate(zip(model.weights, model.accuracy, strict=True), 1):
            metrics[f"{path}.{i}/fit_weight"] = float(weight)
            metrics[f"{path}.{i}/fit_accuracy"] = float(accuracy)
        metrics[f"{path}/fit_prior"] = model.prior
    else:
        weights = item.weights or tuple(1.0 for _ in parts)
        fused = fusion.weighted(item.how, scores_list, weights)
    size = inner or count
    members = fusion.top_members(fused, size) if size else np.zeros(n, dtype=bool)
    return fused, members, metrics


def _step_metrics(outcome: _Outcome) -> dict[str, float]:
    found = dict(outcome.metrics)
    if outcome.selection is not None:
        found.update({k: float(v) for k, v in (outcome.selection.metrics or {}).items()})
    return found


def _final_scores(outcome: _Outcome, view: SubsetView) -> Mapping[str, float] | None:
    """The last step's scores of the samples it kept (uid -> score)."""
    if outcome.selection is not None:
        return outcome.selection.scores
    if outcome.scores is None:
        return None
    return {view.uids[i]: float(outcome.scores[i]) for i in outcome.kept}


def _mix(fractions: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: v for k, v in fractions.items() if k.startswith(prefix)}


def _trace_metrics(trace: list[dict[str, Any]]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for entry in trace:
        prefix = f"pipeline/{entry['step']}"
        metrics[f"{prefix}/in"] = float(entry["in"])
        metrics[f"{prefix}/out"] = float(entry["out"])
        metrics[f"{prefix}/seconds"] = float(entry["seconds"])
        for pathology, share in entry.get("mix", {}).items():
            metrics[f"{prefix}/mix/{pathology}"] = float(share)
    return metrics


def _with_trace(
    selection: Selection,
    trace: list[dict[str, Any]],
    ctx: SelectionContext,
    dropped: Mapping[str, str],
) -> Selection:
    """The selection with the trace written beside it, as JSON and as a funnel plot."""
    trace_path = Path(ctx.work_dir) / TRACE_FILE
    atomic_write_text(trace_path, json.dumps({"steps": trace}, indent=1))
    artifacts = [*(selection.artifacts or []), trace_path]
    if trace:
        artifacts.append(funnel_plot(trace, Path(ctx.work_dir) / FUNNEL_FILE))
    selection.artifacts = artifacts
    return selection


def funnel_plot(trace: list[dict[str, Any]], path: Path) -> Path:
    """A horizontal funnel: samples entering the pipeline, then after each step, with the
    share of each pathology where the pool records them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["pool", *[f"{e['step']}: {e['label']}" for e in trace]]
    counts = [trace[0]["in"], *[e["out"] for e in trace]]
    fig, ax = plt.subplots(figsize=(9.5, 0.6 * len(labels) + 1.2))
    mixes: list[dict[str, float]] = [
        trace[0].get("pool_mix") or {},
        *[e.get("mix") or {} for e in trace],
    ]
    if all(mixes):
        names = sorted({k for m in mixes for k in m})
        colours = plt.get_cmap("tab10")
        for row, (count, mix) in enumerate(zip(counts, mixes, strict=True)):
            left = 0.0
            for i, name in enumerate(names):
                width = count * mix.get(name, 0.0)
                ax.barh(
                    row, width, left=left, color=colours(i % 10), label=name if row == 0 else None
                )
                left += width
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, title="pathology")
    else:
        ax.barh(range(len(counts)), counts, color="#4c72b0")
    for row, count in enumerate(counts):
        ax.text(count, row, f" {count:,}", va="center", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("samples")
    ax.set_title("pipeline funnel")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PIPELINE_INFO: StrategyInfo = StrategyInfo(
    cls=PipelineStrategy,
    plugin="selbench.run.pipeline",
    package="selbench",
    version=selbench.__version__,
)
