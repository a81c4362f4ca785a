"""``selbench run``, ``sweep`` and ``export``: runs, grids of runs, and their subsets."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource
from rich.table import Table

from selbench.cli.common import (
    SELECT_EXECUTOR_HELP,
    STRICT_HELP,
    console,
    err_console,
    executor_options,
    friendly_errors,
    main,
    parse_assignments,
    parse_budget,
)
from selbench.cli.common import (
    quiet_libraries as _quiet_libraries,
)
from selbench.cli.methods import complete_method_list, complete_online, complete_run_method
from selbench.errors import SelbenchError

if TYPE_CHECKING:
    from selbench.run.lifecycle import RunOutcome
    from selbench.sweep import Cell, SweepResult


@main.command()
@click.option(
    "--method",
    "-m",
    default=None,
    shell_complete=complete_run_method,
    help="Strategy name (`selbench methods` lists them), NAME(KEY=VALUE,...), a pipeline "
    "such as 'semdedup(keep=0.8) >> clip_score' or 'fuse(clip_score, normsim)', or "
    "recipe:NAME (configs/recipes/); docs/pipelines.md has the grammar.",
)
@click.option(
    "--budget",
    "-b",
    type=float,
    default=None,
    callback=parse_budget,
    help="Fraction of the pool to keep, in (0, 1]; the subset is exactly round(budget x size).",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seeds selection and training."
)
@click.option(
    "--pool",
    default="synthweb",
    show_default=True,
    help="Pool config name (configs/pools/), a pool YAML, or a SynthWeb dataset directory.",
)
@click.option(
    "--scale", default="tiny", show_default=True, help="Training recipe (configs/scales/)."
)
@click.option(
    "--protocol",
    type=click.Choice(["fixed-compute", "fixed-epochs"]),
    default="fixed-compute",
    show_default=True,
    help="fixed-compute: samples seen = pool size x epochs (DataComp); "
    "fixed-epochs: subset size x epochs (TL;DR).",
)
@click.option(
    "--param",
    "-p",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Strategy parameter, repeatable (see `selbench methods`).",
)
@click.option("--experiment", default="selbench", show_default=True, help="MLflow experiment.")
@click.option("--device", default=None, help="torch device; default cuda when available, else cpu.")
@click.option(
    "--target",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Target data for target-aware methods (knn_target): a CLIP_benchmark wds "
    "directory or an image folder. Default: the pool's target split (SynthWeb has one). "
    "A target sharing any image with an eval set is refused.",
)
@click.option(
    "--engine",
    type=click.Choice(["in-memory", "open_clip"]),
    default=None,
    help="Training engine; default: the scale's. in-memory: selbench's loop over the "
    "decoded subset (fast for tiny on CPU); open_clip: open_clip_train under torchrun, "
    "streaming the subset's shards (DDP, amp, checkpoints; docs/scale-out.md).",
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Training processes on this node (open_clip engine; one per GPU).",
)
@click.option(
    "--eval",
    "eval_suite",
    default=None,
    metavar="SUITE",
    help="Evaluation suite: a name in configs/evals/ (seed, datacomp-38) or a suite YAML. "
    "Default: the pool's own eval sets (SynthWeb's held-out sets).",
)
@click.option(
    "--launcher",
    type=click.Choice(["torchrun", "srun"]),
    default="torchrun",
    show_default=True,
    help="How the open_clip engine starts its workers: torchrun on this node "
    "(--nproc-per-node of them), or srun over every task of the current SLURM allocation "
    "(multi-node; docs/scale-out.md).",
)
@click.option(
    "--online",
    default=None,
    metavar="NAME(K=V)",
    shell_complete=complete_online,
    help="Choose every training batch while the model trains, from a super-batch `ratio` "
    "times larger drawn from METHOD's selection: jest, learnability, easy-reference, "
    "hard-learner or uniform (the control), e.g. 'jest(ratio=2)'. In-memory engine only. "
    "Same as ending the method with '>> online:NAME'; docs/online.md.",
)
@click.option(
    "--online-reference",
    default=None,
    metavar="EMBEDDER",
    help="The frozen reference model online methods score with, as an embedder spec. "
    "Default `reference`: SynthWeb's reference CLIP, or the model a real pool's YAML names "
    "(open_clip:ARCH:/path/weights.pt).",
)
@click.option(
    "--train-samples",
    default="1x",
    show_default=True,
    metavar="Nx",
    help="Training length as a multiple of the protocol's samples seen (0.5x, 2x): trace "
    "a method's curve against compute (docs/compute.md).",
)
@click.option(
    "--decontaminate/--no-decontaminate",
    default=None,
    help="Remove the pool samples that are near-duplicates of the evaluation images "
    "before selection (perceptual hash or reference-embedding neighbours; the budget "
    "counts the pool left). Default: on for a real pool and for SynthWeb generated with "
    "planted_eval_copies, off for plain SynthWeb (docs/decontamination.md).",
)
@click.option("--strict", is_flag=True, default=False, help=STRICT_HELP)
@click.option(
    "--resume",
    "resume_id",
    default=None,
    metavar="RUN_ID",
    help="Continue run RUN_ID from its first unfinished stage (after a crash, a preemption "
    "or a kill); it keeps its own settings, so give no --method/--budget/--pool; "
    "--device, --nproc-per-node, --launcher, --executor and --ray-address may change "
    "(train on another node).",
)
@click.option(
    "--stage",
    "stages",
    multiple=True,
    type=click.Choice(["select", "materialize", "train", "evaluate"]),
    help="Run only this stage (repeatable): `--stage select` starts a run and stops after "
    "selecting; `--resume RUN_ID --stage train` trains it, e.g. on another node. Without "
    "it every stage left runs.",
)
@executor_options(SELECT_EXECUTOR_HELP)
@friendly_errors
def run(
    method,
    budget,
    seed,
    pool,
    scale,
    protocol,
    params,
    experiment,
    device,
    target,
    engine,
    nproc_per_node,
    eval_suite,
    launcher,
    online,
    online_reference,
    train_samples,
    decontaminate,
    strict,
    resume_id,
    stages,
    executor,
    ray_address,
) -> None:
    """Select a subset with METHOD, train the fixed recipe on it, evaluate, log to MLflow.

    A run is four stages with files between them (select -> selection.parquet ->
    materialize -> subset shards -> train -> checkpoint -> evaluate), all recorded in one
    MLflow run; `--resume RUN_ID` continues one from where it stopped.
    """
    _quiet_libraries()
    from selbench.progress import RichProgress
    from selbench.run.lifecycle import execute, resume
    from selbench.run.spec import EXECUTION_SETTINGS, RunRequest, parse_train_samples

    ctx = click.get_current_context()
    if resume_id:
        _refuse_settings_with_resume(ctx, bool(params))
    elif method is None or budget is None:
        raise click.UsageError("give --method and --budget (or --resume RUN_ID)")
    with RichProgress(err_console) as progress:
        if resume_id:
            execution = {name: ctx.params[name] for name in _given(ctx, EXECUTION_SETTINGS)}
            outcome = resume(resume_id, list(stages) or None, progress, experiment, execution)
        else:
            request = RunRequest(
                method=method,
                budget=budget,
                seed=seed,
                pool=pool,
                scale=scale,
                protocol=protocol,
                params=parse_assignments(params, "--param"),
                experiment=experiment,
                device=device,
                target=str(target) if target else None,
                engine=engine,
                nproc_per_node=nproc_per_node,
                launcher=launcher,
                eval_suite=eval_suite,
                online=online,
                online_reference=online_reference,
                train_samples=parse_train_samples(train_samples),
                decontaminate=decontaminate,
                strict=strict,
                executor=executor,
                ray_address=ray_address,
            )
            outcome = execute(request, progress=progress, stages=list(stages) or None)
    title = f"run {outcome.run_id}" if resume_id else f"{method} @ budget {budget} (seed {seed})"
    _print_outcome(outcome, title)


# The options that name what a run measures; a resumed run keeps its own.
_RUN_SETTINGS = (
    "method", "budget", "pool", "scale", "protocol", "target", "engine", "eval_suite",
    "online", "online_reference", "train_samples", "decontaminate", "strict",
)  # fmt: skip


def _given(ctx: click.Context, names: Iterable[str]) -> list[str]:
    """Which of the options ``names`` the command line set (not their defaults)."""
    return [n for n in names if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]


def _refuse_settings_with_resume(ctx: click.Context, has_params: bool) -> None:
    given = [
        "--eval" if n == "eval_suite" else "--" + n.replace("_", "-")
        for n in _given(ctx, _RUN_SETTINGS)
    ]
    given += ["--param"] if has_params else []
    if given:
        raise click.UsageError(
            f"--resume continues a run with its own settings; drop {', '.join(given)}"
        )


def _print_outcome(outcome: RunOutcome, title: str) -> None:
    """The finished run's metrics as a table and one line of headline numbers, or where a
    run stopped after its requested stages."""
    if outcome.next_stage is not None:
        console.print(
            f"Ran {', '.join(outcome.stages_run)}; run [bold]{outcome.run_id}[/] is waiting "
            f"for stage {outcome.next_stage}. Continue it with: "
            f"selbench run --resume {outcome.run_id}",
            soft_wrap=True,
        )
        return
    from selbench.tracking import ui_command

    summary = Table(title=title)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    shown = [k for k in outcome.metrics if not k.startswith(("diag/", "stage_seconds/"))]
    for key in sorted(shown, key=lambda k: (k not in ("mean_R1", "zeroshot_acc1"), k)):
        value = outcome.metrics[key]
        summary.add_row(key, f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}")
    console.print(summary)
    nan = float("nan")
    console.print(
        f"R@1 (mean of image->text and text->image): {outcome.metrics.get('mean_R1', nan):.4f}"
        f"   zero-shot top-1: {outcome.metrics.get('zeroshot_acc1', nan):.4f}"
    )
    for key in sorted(k for k in outcome.metrics if k.endswith("/bleu4")):
        captions = key.removesuffix("/bleu4")
        console.print(
            f"Captioning ({captions}): BLEU@4 {outcome.metrics[key]:.4f}"
            f"   CIDEr {outcome.metrics.get(f'{captions}/cider', nan):.4f}"
        )
    from selbench.leaderboard.context import context_table

    compared = context_table(outcome.run_id, outcome.metrics)  # never raises
    if compared is not None:
        console.print(compared)
    console.print(
        f"Logged MLflow run [bold]{outcome.run_id}[/] to {outcome.tracking_uri}", soft_wrap=True
    )
    console.print(f"Open it with: {ui_command()}", highlight=False, soft_wrap=True)


def _list(kind: type, option: str):
    def parse(ctx, param, value: str):
        try:
            items = [kind(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
        if not items:
            raise click.BadParameter("empty list", param_hint=option)
        return items

    return parse


def _method_list(ctx, param, value: str) -> list[str]:
    _quiet_libraries()  # before the import below pulls in the libraries it quiets (tqdm)
    from selbench.run.spec import split_methods

    try:
        items = split_methods(value)
    except SelbenchError as exc:
        raise click.BadParameter(str(exc)) from None
    if not items:
        raise click.BadParameter("empty list", param_hint="--methods")
    return items


@main.command()
@click.option(
    "--methods",
    required=True,
    callback=_method_list,
    shell_complete=complete_method_list,
    help="Comma-separated strategy names, e.g. tldr,clip_score,random; `all` runs every "
    "registered strategy. A method with parameters is NAME(KEY=VALUE,...), e.g. "
    "'tldr(refine=false)', as `selbench run -p KEY=VALUE` would set them; a pipeline "
    "('semdedup(keep=0.8) >> clip_score', 'fuse(clip_score,normsim)') or recipe:NAME "
    "is one method (docs/pipelines.md).",
)
@click.option(
    "--budgets",
    default="0.1,0.25,0.5",
    show_default=True,
    callback=_list(float, "--budgets"),
    help="Comma-separated fractions in (0, 1].",
)
@click.option(
    "--seeds",
    default="0,1,2",
    show_default=True,
    callback=_list(int, "--seeds"),
    help="Comma-separated seeds.",
)
@click.option("--pool", default="synthweb", show_default=True, help="Pool, as for `run`.")
@click.option("--scale", default="tiny", show_default=True, help="Training recipe.")
@click.option(
    "--protocol",
    type=click.Choice(["fixed-compute", "fixed-epochs"]),
    default="fixed-compute",
    show_default=True,
)
@click.option(
    "--full-pool/--no-full-pool",
    default=True,
    show_default=True,
    help="Add the full pool (random at budget 1.0) for every seed as a reference row.",
)
@click.option(
    "--eval",
    "eval_suite",
    default=None,
    metavar="SUITE",
    help="Evaluation suite for every cell (configs/evals/); default: the pool's eval sets.",
)
@click.option(
    "--train-samples",
    default="1x",
    show_default=True,
    callback=_list(str, "--train-samples"),
    metavar="Nx,...",
    help="Training lengths, multiples of the protocol's samples seen, e.g. 0.5x,1x,2x: every "
    "cell runs at each, so methods compare at equal training compute (docs/compute.md).",
)
@click.option("--experiment", default="selbench", show_default=True, help="MLflow experiment.")
@click.option("--device", default=None, help="torch device; default cuda when available, else cpu.")
@click.option("--strict", is_flag=True, default=False, help=STRICT_HELP)
@click.option(
    "--leaderboard",
    "board_name",
    default=None,
    metavar="NAME",
    help="When every cell has finished, write the leaderboard of this sweep's cells "
    "(not other runs of the experiment) as NAME.md/.csv/.html and plots under --out.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("leaderboards"),
    show_default=True,
    help="Directory for --leaderboard's files.",
)
@click.option(
    "--compare-with",
    "compare_with",
    default=None,
    metavar="EXPERIMENT|published:TABLE",
    help="With --leaderboard: also rank the methods on this MLflow experiment (a sweep of "
    "another configuration), or against a paper's numbers (published:datacomp-small; "
    "leaderboards/published/), and report Kendall's tau per budget, as `selbench "
    "leaderboard --compare-with` does.",
)
@executor_options(SELECT_EXECUTOR_HELP)
@friendly_errors
def sweep(
    methods,
    budgets,
    seeds,
    pool,
    scale,
    protocol,
    full_pool,
    eval_suite,
    train_samples,
    experiment,
    device,
    strict,
    board_name,
    out,
    compare_with,
    executor,
    ray_address,
) -> None:
    """Run methods x budgets x seeds as nested MLflow runs under one sweep run.

    Resumable: a cell (identified by the hash of its resolved config) that already has a
    finished run, from this sweep or any `selbench run`, is skipped; missing and failed
    cells run. Run one sweep per experiment at a time: a run left RUNNING by a killed
    process is marked KILLED when the sweep starts again.
    """
    _quiet_libraries()
    from selbench import sweep as sw
    from selbench.progress import RichProgress
    from selbench.run.spec import parse_train_samples

    _check_compare_with(compare_with, board_name)
    options = sw.SweepOptions(
        methods, budgets, seeds, pool, scale, protocol, full_pool, eval_suite, experiment,
        device, board_name, out, compare_with,
        train_samples=[parse_train_samples(t) for t in train_samples], strict=strict,
        executor=executor, ray_address=ray_address,
    )  # fmt: skip
    started = time.perf_counter()
    with RichProgress(err_console) as progress:
        result = sw.run_grid(options, progress, on_update=_print_cell)
    _print_sweep(result)
    if result.count("failed"):
        sys.exit(1)
    if board_name:
        sw.publish(options, result, time.perf_counter() - started, console)


def _check_compare_with(compare_with: str | None, board_name: str | None) -> None:
    """``--compare-with`` is checked before any cell runs: it needs a page to go on, and
    the experiment it names must exist."""
    if not compare_with:
        return
    from selbench import leaderboard as lb

    if not board_name:
        raise click.UsageError("--compare-with needs --leaderboard NAME (the page it goes on)")
    prefix, _, table = compare_with.partition(":")
    if prefix == "published":  # a paper's table: it must load before any cell runs
        from selbench.leaderboard.published import load_table

        load_table(table)
        return
    kind, name = lb.parse_compare_target(compare_with)
    if kind != "pool" and not lb.experiment_exists(name):
        raise click.BadParameter(
            f"no MLflow experiment {name!r} to compare with; run its sweep first",
            param_hint="--compare-with",
        )


def _print_cell(cell: Cell, cells: list[Cell]) -> None:
    """One line per cell that changed state, with the sweep's counts so far."""
    if cell.status == "pending":
        return
    counts = {s: sum(c.status == s for c in cells) for s in ("done", "skipped", "failed")}
    left = sum(c.status in ("pending", "running") for c in cells)
    detail = ""
    if cell.mean_r1 is not None and cell.status in ("done", "skipped"):
        detail = f" R@1 {cell.mean_r1:.4f}"
    if cell.seconds is not None:
        detail += f" ({cell.seconds:.0f} s)"
    if cell.error:
        detail += f": {cell.error}"
    err_console.print(
        f"[{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed, "
        f"{left} to go] {cell.label}: [bold]{cell.status}[/]{detail}",
        highlight=False,
        soft_wrap=True,
    )


def _print_sweep(result: SweepResult) -> None:
    summary = Table(title=f"sweep {result.sweep_key} ({len(result.cells)} cells)")
    for column in ("cell", "status", "mean R@1", "run"):
        summary.add_column(column)
    for cell in result.cells:
        r1 = "" if cell.mean_r1 is None else f"{cell.mean_r1:.4f}"
        summary.add_row(cell.label, cell.status, r1, cell.run_id or cell.error)
    console.print(summary)
    console.print(
        f"{result.count('done')} ran, {result.count('skipped')} already finished, "
        f"{result.count('failed')} failed. Parent run {result.parent_run_id}; "
        "`selbench leaderboard` aggregates them."
    )
    for cell in result.cells:
        if cell.status == "failed":
            err_console.print(f"[red]failed:[/] {cell.label}: {cell.error}", highlight=False)


@main.command()
@click.argument("run_id")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["datacomp", "parquet", "shards"]),
    default="parquet",
    show_default=True,
    help="datacomp: DataComp's sorted u8,u8 uid .npy, which its resharder.py reads "
    "(pools with DataComp uids only); parquet: uid, caption, train_caption, score; "
    "shards: webdataset shards of the selected samples, from the run's pool.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory to write RUN_ID.npy, RUN_ID.parquet or the shard folder RUN_ID/ into.",
)
@friendly_errors
def export(run_id, fmt, out) -> None:
    """Write the subset that run RUN_ID selected, for others to train on (docs/real-data.md)."""
    _quiet_libraries()
    from selbench.export import export_run

    path = export_run(run_id, fmt, out)
    console.print(f"Wrote {path}")
