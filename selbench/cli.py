"""The ``selbench`` command line."""

from __future__ import annotations

import functools
import os
import shlex
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from selbench.errors import SelbenchError

console = Console()
err_console = Console(stderr=True)


def _quiet_libraries() -> None:
    # MLflow's sqlite migrations are noise here. open_clip's "no pretrained weights" notice
    # is dropped where selbench builds its models (selbench.train.build_model); the root
    # logger stays at WARNING so selbench's own warnings (a damaged cache entry) show.
    import logging

    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")


def friendly_errors(func):
    """Print selbench errors as one clear line and exit non-zero, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SelbenchError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(1)

    return wrapper


def _parse_assignments(values: tuple[str, ...], option: str) -> dict[str, str]:
    parsed = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        parsed[key.strip()] = value.strip()
    return parsed


def _budget(ctx, param, value: float | None) -> float | None:
    if value is not None and not 0.0 < value <= 1.0:
        raise click.BadParameter(
            f"{value} is not a fraction in (0, 1]; e.g. 0.25 keeps a quarter of the pool"
        )
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="selbench")
def main() -> None:
    """selbench: benchmark data-selection methods for vision-language pre-training.

    Every method runs at the same budget, through the same training recipe and the same
    evaluation suite, and is logged to MLflow. Start with:

        selbench run --method random --budget 0.25

    Data lives under $SELBENCH_HOME (default ~/.cache/selbench); runs under
    $SELBENCH_RUN_HOME (default $SELBENCH_HOME/runs) unless MLFLOW_TRACKING_URI is set.
    """


@main.command()
@click.option("--method", "-m", default=None, help="Strategy name; `selbench methods` lists them.")
@click.option(
    "--budget",
    "-b",
    type=float,
    default=None,
    callback=_budget,
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
    "--resume",
    "resume_id",
    default=None,
    metavar="RUN_ID",
    help="Continue run RUN_ID from its first unfinished stage (after a crash, a preemption "
    "or a kill); it keeps its own settings, so give no --method/--budget/--pool; "
    "--device, --nproc-per-node and --launcher may change (train on another node).",
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
    resume_id,
    stages,
) -> None:
    """Select a subset with METHOD, train the fixed recipe on it, evaluate, log to MLflow.

    A run is four stages with files between them (select -> selection.parquet ->
    materialize -> subset shards -> train -> checkpoint -> evaluate), all recorded in one
    MLflow run; `--resume RUN_ID` continues one from where it stopped.
    """
    _quiet_libraries()
    from selbench.progress import RichProgress
    from selbench.runner import RunRequest, execute, resume
    from selbench.tracking import ui_command

    ctx = click.get_current_context()
    if resume_id:
        given = [
            "--eval" if name == "eval_suite" else f"--{name}"
            for name in (
                "method",
                "budget",
                "pool",
                "scale",
                "protocol",
                "target",
                "engine",
                "eval_suite",
            )
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        ] + (["--param"] if params else [])
        if given:
            raise click.UsageError(
                f"--resume continues a run with its own settings; drop {', '.join(given)}"
            )
    elif method is None or budget is None:
        raise click.UsageError("give --method and --budget (or --resume RUN_ID)")
    with RichProgress(err_console) as progress:
        if resume_id:
            execution = {
                name: value
                for name, value in (
                    ("device", device),
                    ("nproc_per_node", nproc_per_node),
                    ("launcher", launcher),
                )
                if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
            }
            outcome = resume(resume_id, list(stages) or None, progress, experiment, execution)
        else:
            request = RunRequest(
                method=method,
                budget=budget,
                seed=seed,
                pool=pool,
                scale=scale,
                protocol=protocol,
                params=_parse_assignments(params, "--param"),
                experiment=experiment,
                device=device,
                target=str(target) if target else None,
                engine=engine,
                nproc_per_node=nproc_per_node,
                launcher=launcher,
                eval_suite=eval_suite,
            )
            outcome = execute(request, progress=progress, stages=list(stages) or None)
    if outcome.next_stage is not None:
        console.print(
            f"Ran {', '.join(outcome.stages_run)}; run [bold]{outcome.run_id}[/] is waiting "
            f"for stage {outcome.next_stage}. Continue it with: "
            f"selbench run --resume {outcome.run_id}",
            soft_wrap=True,
        )
        return
    title = f"run {outcome.run_id}" if resume_id else f"{method} @ budget {budget} (seed {seed})"
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
    console.print(
        f"Logged MLflow run [bold]{outcome.run_id}[/] to {outcome.tracking_uri}", soft_wrap=True
    )
    console.print(f"Open it with: {ui_command()}", highlight=False, soft_wrap=True)


@main.command()
@friendly_errors
def methods() -> None:
    """List installed selection strategies, their package, parameters and defaults."""
    from selbench.registry import get_registry

    table = Table(title="selbench strategies", show_lines=True)
    for column in ("name", "package", "parameters (default)", "reference"):
        table.add_column(column, overflow="fold")
    for info in get_registry().infos():
        params = []
        for key, field in info.cls.Params.model_fields.items():
            line = f"{key} = {field.default!r}"
            if field.description:
                line += f"  ({field.description})"
            params.append(line)
        table.add_row(
            f"[bold]{info.name}[/]\n{info.cls.summary}",
            f"{info.package} {info.version}".strip(),
            "\n".join(params) or "-",
            info.cls.reference,
        )
    console.print(table)
    broken = get_registry().broken
    if broken:
        failed = Table(title="broken plugins (not loaded; a run asking for them fails)")
        for column in ("entry point", "package", "module", "error"):
            failed.add_column(column, overflow="fold")
        for plugin in broken:
            failed.add_row(
                plugin.entry_point,
                f"{plugin.package} {plugin.version}".strip(),
                plugin.module,
                plugin.error,
            )
        console.print(failed)
    embedders = Table(title="selbench embedders (--embedder / -p embedder=SPEC)")
    for column in ("name", "package", "spec", "reference"):
        embedders.add_column(column, overflow="fold")
    for info in get_registry().embedder_infos():
        embedders.add_row(
            info.name,
            f"{info.package} {info.version}".strip(),
            info.cls.summary,
            info.cls.reference,
        )
    console.print(embedders)


@main.command()
@click.option("--pool", default="synthweb", show_default=True, help="Pool to embed (as for run).")
@click.option(
    "--embedder",
    "-e",
    default="reference",
    show_default=True,
    help="Embedder spec: reference (the default of the strategies that embed: SynthWeb's "
    "reference model, or the checkpoint the pool YAML names), proxy, proxy:RECIPE, or "
    "open_clip:ARCH:/path/to/weights.pt (`selbench methods` lists them).",
)
@click.option("--device", default=None, help="torch device; default cuda when available.")
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Rows per chunk; an interrupted run resumes from the last complete chunk.",
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=None,
    help="Split the pass over N processes on this host, launched with torchrun "
    "(gloo on CPU; NCCL and one GPU each on GPU). Rerun the same command to resume a killed "
    "pass. On several nodes, start `torchrun ... -m selbench.cli embed` yourself instead.",
)
@friendly_errors
def embed(pool, embedder, device, chunk_size, nproc_per_node) -> None:
    """Fill the embedding cache for POOL with EMBEDDER ahead of runs."""
    _quiet_libraries()
    from selbench import embed_ranks

    if nproc_per_node is not None:
        if embed_ranks.under_torchrun():
            raise SelbenchError(
                "--nproc-per-node launches torchrun, but this is already a torchrun rank; "
                "leave the option out under torchrun"
            )
        args = ["embed", "--pool", pool, "--embedder", embedder, "--chunk-size", str(chunk_size)]
        if device is not None:
            args += ["--device", device]
        sys.exit(embed_ranks.launch(nproc_per_node, args))
    if embed_ranks.under_torchrun():
        _embed_as_rank(pool, embedder, device, chunk_size)
        return
    _embed(pool, embedder, device, chunk_size)


def _embed(pool, embedder, device, chunk_size) -> None:
    from selbench.embedders import EmbeddingService
    from selbench.pools import resolve_pool
    from selbench.progress import RichProgress
    from selbench.registry import get_registry
    from selbench.runner import default_device

    with RichProgress(err_console) as progress:
        resolved = resolve_pool(pool, progress=progress.counter("Generating SynthWeb"))
        service = EmbeddingService(
            resolved.pool.strategy_view(),
            device or default_device(),
            get_registry().make_embedder,
            progress,
            chunk_size=chunk_size,
        )
        found = service.embeddings(embedder)
    _print_embedded(found, service.usage[embedder])


def _embed_as_rank(pool, embedder, device, chunk_size) -> None:
    """``selbench embed`` as one torchrun rank: rank 0 generates the pool and prepares the
    embedder first (the others then find both on disk), then the ranks split the chunks."""
    import contextlib

    from selbench import embed_ranks
    from selbench.embedders import EmbeddingService
    from selbench.pools import resolve_pool
    from selbench.progress import NullProgress, RichProgress
    from selbench.registry import get_registry

    device = embed_ranks.rank_device(device)
    ranks = embed_ranks.join_torchrun(device)
    try:
        leader = ranks.rank == 0
        with RichProgress(err_console) if leader else contextlib.nullcontext() as shown:
            progress = shown if leader else NullProgress()
            resolved = embed_ranks.rank_zero_first(
                ranks,
                lambda: resolve_pool(pool, progress=progress.counter("Generating SynthWeb")),
                "resolving the pool",
            )
            service = EmbeddingService(
                resolved.pool.strategy_view(),
                device,
                get_registry().make_embedder,
                progress,
                chunk_size=chunk_size,
                ranks=ranks,
            )
            embed_ranks.rank_zero_first(
                ranks, lambda: service.embedder(embedder), "preparing the embedder"
            )
            found = service.embeddings(embedder)
    finally:
        embed_ranks.leave_torchrun()
    if leader:
        _print_embedded(found, service.usage[embedder], ranks.world_size)


def _print_embedded(found, usage: dict, world_size: int = 1) -> None:
    verdict = "cache hit" if usage["hit"] else "computed"
    if world_size > 1:
        verdict += f" by {world_size} ranks"
    if usage["resumed_from"] and world_size > 1:
        verdict += f" (resumed: {usage['resumed_from']} samples were done already)"
    elif usage["resumed_from"]:
        verdict += f" (resumed from sample {usage['resumed_from']})"
    console.print(
        f"{verdict}: entry {found.entry_id} ({found.image.shape[0]} x {found.image.shape[1]}, "
        f"{usage['total_seconds']:.1f} s) for embedder {found.embedder_id}",
        soft_wrap=True,
    )


@main.group()
def reference() -> None:
    """SynthWeb's reference model: the offline stand-in for a pretrained CLIP.

    CLIP-score, SemDeDup, the DataComp-era filters and TL;DR score or embed with it by
    default (their papers use OpenAI's CLIP or BLIP). It trains once, on a separate clean
    SynthWeb corpus, and is cached in $SELBENCH_HOME/reference/ (docs/embeddings.md).
    """


@reference.command("build")
@click.option(
    "--recipe",
    default="",
    help="a scale YAML with a 'corpus' (name in configs/scales/ or a path); default "
    "$SELBENCH_REFERENCE_RECIPE, else reference.",
)
@click.option("--device", default=None, help="torch device; default cuda when available, else cpu.")
@friendly_errors
def reference_build(recipe, device) -> None:
    """Train the reference model now (about 4.5 minutes on 2 CPU cores), unless it is cached.

    Runs need it the first time a strategy uses it and build it then; building it ahead
    keeps that time out of the first run, as downloading a pretrained CLIP would.

    \b
    Example:
      selbench reference build && selbench run --method clip_score --budget 0.25
    """
    _quiet_libraries()
    from selbench.progress import RichProgress
    from selbench.reference import build_reference, recipe_spec
    from selbench.runner import default_device

    started = time.perf_counter()
    with RichProgress(err_console) as progress:
        built = build_reference(recipe, device or default_device(), progress)
    meta = built.meta
    state = "trained" if built.built else "cached"
    console.print(
        f"reference model ({recipe_spec(recipe)}): {state}, {built.checkpoint}\n"
        f"  sha256 {built.sha256}\n"
        f"  corpus {meta['corpus_dir']} ({meta['corpus_size']} clean pairs), "
        f"{meta['samples_seen']} samples seen, final loss {meta['final_loss']:.4f}, "
        f"trained in {meta['train_seconds']:.0f} s on {meta['device']}"
        + (f"; this call took {time.perf_counter() - started:.0f} s" if built.built else ""),
        highlight=False,
    )


@main.group()
def cache() -> None:
    """Inspect and remove embedding cache entries ($SELBENCH_HOME/embeddings)."""


@cache.command("ls")
@friendly_errors
def cache_ls() -> None:
    """List cache entries: id, status, pool, embedder, size."""
    from selbench.cache import EmbeddingCache

    table = Table(title="embedding cache")
    for column in ("entry", "status", "samples", "embedder", "size (MB)", "created"):
        table.add_column(column, overflow="fold")
    for row in EmbeddingCache().ls():
        done = row.get("n_samples", "")
        if row.get("status") == "partial":
            done = f"{row.get('done', 0)}/{row.get('n_samples', '?')}"
        table.add_row(
            row["entry_id"],
            row.get("status", ""),
            str(done),
            str(row.get("embedder_id", "")),
            f"{row.get('size_mb', 0):.1f}",
            str(row.get("created", "")),
        )
    console.print(table)


@cache.command("info")
@click.argument("entry_id")
@friendly_errors
def cache_info(entry_id) -> None:
    """Show the manifest of one cache entry."""
    import json

    from selbench.cache import EmbeddingCache

    console.print_json(json.dumps(EmbeddingCache().info(entry_id), default=str))


@cache.command("rm")
@click.argument("entry_ids", nargs=-1, required=True)
@friendly_errors
def cache_rm(entry_ids) -> None:
    """Remove cache entries (complete or partial)."""
    from selbench.cache import EmbeddingCache

    store = EmbeddingCache()
    for entry_id in entry_ids:
        store.rm(entry_id)
        console.print(f"removed {entry_id}")


@main.command()
@click.option("--experiment", default="selbench", show_default=True, help="MLflow experiment.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("leaderboards"),
    show_default=True,
    help="Directory for the markdown, CSV, HTML and PNG files.",
)
@click.option("--name", default=None, help="File name stem (default: the experiment name).")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="Metric column(s) to aggregate, repeatable; the first one is plotted. Default: "
    "mean_R1 and zeroshot_acc1, then the summary columns of every evaluation suite the runs "
    "used (`summary:` in configs/evals/NAME.yaml, e.g. DataComp's average).",
)
@click.option(
    "--where",
    "where",
    multiple=True,
    metavar="KEY=VALUE",
    help="Only runs whose param or selbench tag KEY equals VALUE, repeatable: e.g. "
    "--where git_commit=abc123, --where plugin_package=selbench==0.1.0, --where pool=synthweb.",
)
@click.option("--plots/--no-plots", default=True, show_default=True, help="Draw the PNG plots.")
@click.option(
    "--compare-with",
    "compare_with",
    default=None,
    metavar="EXPERIMENT_OR_POOL",
    help="Rank the methods on a second configuration too and report, per budget, Kendall's "
    "tau between the two rankings (how stable the ranking is). An MLflow experiment name, "
    "or a pool of this experiment's runs (the page then keeps the other pools); write "
    "experiment:NAME or pool:NAME when a name is both. --where filters apply to both "
    "sides except pool=; each side must come down to one pool, scale and protocol.",
)
@click.option(
    "--baseline",
    default="random",
    show_default=True,
    metavar="METHOD",
    help="The method every row is paired with (its method label, as in the tables, e.g. "
    "clip_score or clip_score(mode=threshold)); its budget-1.0 runs are the full-pool row.",
)
@friendly_errors
def leaderboard(experiment, out, name, metrics, where, plots, compare_with, baseline) -> None:
    """Aggregate finished runs: one table per budget with each method's mean and 95% CI
    over seeds, its paired difference from the baseline (--baseline, default random),
    and its selection cost; counts the
    method pairs that differ beyond their paired 95% CI; writes markdown, CSV, HTML and
    plots.

    \b
    Example, the same sweep on a second SynthWeb in experiment synthweb-b:
      selbench leaderboard --experiment synthweb --compare-with synthweb-b
    """
    _quiet_libraries()
    filters = _parse_assignments(where, "--where")
    _write_leaderboard(
        experiment, out, name or experiment, tuple(metrics), filters, plots,
        compare_with=compare_with, baseline=baseline,
    )  # fmt: skip


def _write_leaderboard(
    experiment: str,
    out: Path,
    stem: str,
    metrics: tuple[str, ...],
    filters: dict[str, str],
    plots: bool,
    intro: list[str] | None = None,
    run_ids: set[str] | None = None,
    source: str | None = None,
    compare_with: str | None = None,
    baseline: str = "random",
) -> None:
    from selbench import leaderboard as lb

    runs = lb.load_runs(experiment, filters)
    if run_ids is not None:  # exactly one sweep's cells
        runs = runs[runs["run_id"].isin(run_ids)]
    other = None
    if compare_with:
        runs, other, other_name = lb.comparison_runs(compare_with, experiment, filters, runs)
    board = lb.summarise(runs, metrics or lb.default_metrics(runs), baseline)
    if board.table.empty:
        raise SelbenchError(
            f"no finished runs in MLflow experiment {experiment!r}"
            + (f" matching {filters}" if filters else "")
            + "; start one with `selbench run --method random --budget 0.25`"
        )
    if baseline != "random" and baseline not in set(board.table["method"]):
        raise SelbenchError(
            f"--baseline {baseline!r} has no finished runs in experiment {experiment!r}; "
            f"methods with runs: {', '.join(sorted(set(board.table['method'])))}"
        )
    if other is not None:
        lb.compare(board, other, other_name)
    figures = {}
    if plots:
        from selbench import plots as pl

        figures = pl.all_plots(board, runs, out, stem)
    for part in lb.rich_tables(board, f"selbench leaderboard: {stem}"):
        console.print(part)
    intro = [*(intro or []), *lb.provenance(runs)]
    paths = lb.write(board, out, stem, figures, intro, source or lb.LEADERBOARD_SOURCE)
    _log_leaderboard(experiment, stem, [*paths, *figures.values()])
    console.print(f"Wrote {', '.join(str(p) for p in [*paths, *figures.values()])}")


def _log_leaderboard(experiment: str, stem: str, files: list[Path]) -> None:
    """Keep the leaderboard's files in MLflow too, in a run tagged as a leaderboard."""
    from selbench import tracking

    recorder = tracking.Recorder(experiment)
    recorder.start(f"leaderboard-{stem}", tags={"selbench.leaderboard": "true"})
    try:
        for path in files:
            recorder.artifact(path)
    except BaseException as exc:
        recorder.fail(exc)
        raise
    recorder.finish()


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
    from selbench.sweep import split_methods

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
    help="Comma-separated strategy names, e.g. tldr,clip_score,random; `all` runs every "
    "registered strategy. A method with parameters is NAME(KEY=VALUE,...), e.g. "
    "'tldr(refine=false)', as `selbench run -p KEY=VALUE` would set them.",
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
@click.option("--experiment", default="selbench", show_default=True, help="MLflow experiment.")
@click.option("--device", default=None, help="torch device; default cuda when available, else cpu.")
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
    metavar="EXPERIMENT",
    help="With --leaderboard: also rank the methods on this MLflow experiment (a sweep of "
    "another configuration) and report Kendall's tau per budget, as `selbench leaderboard "
    "--compare-with` does.",
)
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
    experiment,
    device,
    board_name,
    out,
    compare_with,
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

    if compare_with:
        from selbench import leaderboard as lb

        if not board_name:
            raise click.UsageError("--compare-with needs --leaderboard NAME (the page it goes on)")
        kind, sep, name = compare_with.partition(":")
        name = name if sep and kind in ("experiment", "pool") else compare_with
        if not (sep and kind == "pool") and not lb.experiment_exists(name):
            raise click.BadParameter(
                f"no MLflow experiment {name!r} to compare with; run its sweep first",
                param_hint="--compare-with",
            )
    requested = list(methods)
    if methods == ["all"]:
        from selbench.registry import get_registry

        methods = sorted(get_registry().names())
    started = time.perf_counter()
    cells = sw.plan(
        methods, budgets, seeds, pool, scale, protocol, experiment, full_pool, device, eval_suite
    )

    def update(cell, cells) -> None:
        counts = {s: sum(c.status == s for c in cells) for s in ("done", "skipped", "failed")}
        if cell.status == "pending":
            return
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

    with RichProgress(err_console) as progress:
        result = sw.run_sweep(cells, experiment, progress=progress, on_update=update)
    summary = Table(title=f"sweep {result.sweep_key} ({len(cells)} cells)")
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
    if result.count("failed"):
        for cell in result.cells:
            if cell.status == "failed":
                err_console.print(f"[red]failed:[/] {cell.label}: {cell.error}", highlight=False)
        sys.exit(1)
    if board_name:
        minutes = (time.perf_counter() - started) / 60
        budget_list = [f"{b:g}" for b in budgets]
        command = shlex.join(
            [
                "selbench", "sweep", "--methods", ",".join(requested),
                "--budgets", ",".join(budget_list),
                "--seeds", ",".join(map(str, seeds)), "--pool", pool, "--scale", scale,
                "--protocol", protocol, "--full-pool" if full_pool else "--no-full-pool",
                *(["--eval", eval_suite] if eval_suite else []),
                "--experiment", experiment, "--leaderboard", board_name, "--out", str(out),
                *(["--compare-with", compare_with] if compare_with else []),
            ]
        )  # fmt: skip
        intro = [
            f"Produced by `{command}` ({len(cells)} cells: {', '.join(methods)} at budgets "
            f"{', '.join(budget_list)} with seeds {', '.join(map(str, seeds))}"
            + (", and the full pool" if full_pool else "")
            + f"). The last invocation took {minutes:.1f} min of wall time; "
            f"{result.count('done')} cells ran in it and {result.count('skipped')} were "
            "already finished."
        ]
        _write_leaderboard(
            experiment,
            out,
            board_name,
            (),  # R@1, zero-shot and the suite's summary columns
            {},
            True,
            intro,
            run_ids={cell.run_id for cell in result.cells},
            source="`selbench sweep --leaderboard`",
            compare_with=compare_with,
        )


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


@main.group()
def datasets() -> None:
    """Generate and inspect datasets."""


@datasets.command("make")
@click.argument("name", type=click.Choice(["synthweb"]))
@click.option("--seed", type=int, default=None, help="Generator seed (default 0).")
@click.option("--n-samples", type=int, default=None, help="Pool size (default 16000).")
@click.option("--image-size", type=int, default=None, help="Image side in pixels (default 32).")
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other SynthWeb setting, e.g. --set rate_misaligned=0.4 (docs/synthweb.md).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write here instead of the data home (then pass it as --pool DIR).",
)
@friendly_errors
def make(name, seed, n_samples, image_size, settings, out) -> None:
    """Generate a dataset. `--pool synthweb` does this automatically on first use."""
    from selbench.pools import ensure_synthweb, synthweb_dir
    from selbench.progress import RichProgress
    from selbench.synthweb import generate_synthweb

    overrides: dict = dict(_parse_assignments(settings, "--set"))
    for key, value in (("seed", seed), ("n_samples", n_samples), ("image_size", image_size)):
        if value is not None:
            overrides[key] = value
    target, config = synthweb_dir(overrides)
    with RichProgress(err_console) as progress:
        callback = progress.counter("Generating SynthWeb")
        if out is not None:
            if out.exists():
                raise SelbenchError(f"output directory {out} already exists")
            out.parent.mkdir(parents=True, exist_ok=True)
            generate_synthweb(out, config, progress=callback)
            target = out
        else:
            existed = (target / "manifest.json").is_file()
            target = ensure_synthweb(overrides, progress=callback)
            if existed:
                console.print("Already generated (same settings); nothing to do.")
    console.print(f"SynthWeb at {target}")
    if out is not None or overrides:
        console.print(f"Use it with: selbench run --pool {target} --method random --budget 0.25")


if __name__ == "__main__":
    main()
