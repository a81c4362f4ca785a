"""``selbench embed``, ``reference``, ``cache`` and ``datasets``: data made ahead of runs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from rich.table import Table

from selbench.cli.common import (
    EMBED_EXECUTOR_HELP,
    STRICT_HELP,
    console,
    err_console,
    executor_options,
    friendly_errors,
    main,
    parse_assignments,
)
from selbench.cli.common import (
    quiet_libraries as _quiet_libraries,
)
from selbench.errors import SelbenchError


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
@click.option("--strict", is_flag=True, default=False, help=STRICT_HELP)
@executor_options(EMBED_EXECUTOR_HELP)
@friendly_errors
def embed(
    pool, embedder, device, chunk_size, nproc_per_node, strict, executor, ray_address
) -> None:
    """Fill the embedding cache for POOL with EMBEDDER ahead of runs."""
    _quiet_libraries()
    from selbench.embed_ranks import embed_command

    outcome = embed_command(
        pool, embedder, device, chunk_size, nproc_per_node, err_console, strict=strict,
        executor=executor, ray_address=ray_address,
    )  # fmt: skip
    if outcome.message is not None:
        console.print(outcome.message, soft_wrap=True)
    if outcome.exit_code:
        sys.exit(outcome.exit_code)


@main.group()
def reference() -> None:
    """SynthWeb's reference models: offline stand-ins for a pretrained CLIP and captioner.

    CLIP-score, SemDeDup, the DataComp-era filters and TL;DR score or embed with the
    reference CLIP by default (their papers use OpenAI's CLIP or BLIP); SIEVE and TL;DR's
    refine_captioner=reference caption with the reference captioner (a CoCa; the papers
    use BLIP). Both train once, on the same separate clean SynthWeb corpus, and are cached
    in $SELBENCH_HOME/reference/ (docs/embeddings.md).
    """


@reference.command("build")
@click.option(
    "--recipe",
    default="",
    help="a scale YAML with a 'corpus' (name in configs/scales/ or a path); default "
    "$SELBENCH_REFERENCE_RECIPE, else reference.",
)
@click.option("--device", default=None, help="torch device; default cuda when available, else cpu.")
@click.option(
    "--captioner/--no-captioner",
    default=True,
    show_default=True,
    help="also build the reference captioner; only SIEVE and TL;DR's "
    "refine_captioner=reference use it (a run builds it on first use otherwise).",
)
@friendly_errors
def reference_build(recipe, device, captioner) -> None:
    """Train the reference CLIP (about 4.5 minutes on 2 CPU cores), then the reference
    captioner (a CoCa on the same corpus, about 27 minutes), unless they are cached.

    Runs need them the first time a strategy uses them and build them then; building them
    ahead keeps that time out of the first run, as downloading pretrained weights would.
    Most strategies need only the CLIP: --no-captioner builds it alone.

    \b
    Example:
      selbench reference build --no-captioner && selbench run --method clip_score --budget 0.25
    """
    _quiet_libraries()
    from selbench.progress import RichProgress
    from selbench.reference import build_reference, recipe_spec
    from selbench.reference_captioner import build_reference_captioner
    from selbench.run.spec import default_device

    device = device or default_device()
    builds = [("reference model", build_reference)]
    if captioner:
        builds.append(("reference captioner", build_reference_captioner))
    for label, build in builds:
        started = time.perf_counter()
        with RichProgress(err_console) as progress:
            built = build(recipe, device, progress)
        meta = built.meta
        state = "trained" if built.built else "cached"
        took = f"; this call took {time.perf_counter() - started:.0f} s" if built.built else ""
        name = recipe_spec(recipe) if build is build_reference else meta["recipe"]["name"]
        console.print(
            f"{label} ({name}): {state}, {built.checkpoint}\n"
            f"  sha256 {built.sha256}\n"
            f"  corpus {meta['corpus_dir']} ({meta['corpus_size']} clean pairs), "
            f"{meta['samples_seen']} samples seen, final loss {meta['final_loss']:.4f}, "
            f"trained in {meta['train_seconds']:.0f} s on {meta['device']}" + took,
            highlight=False,
        )


@reference.command("status")
@click.option(
    "--recipe",
    default="",
    help="a scale YAML with a 'corpus'; default $SELBENCH_REFERENCE_RECIPE, else reference.",
)
@friendly_errors
def reference_status(recipe) -> None:
    """Say whether the reference CLIP and the reference captioner are built (builds nothing)."""
    from selbench.reference import load_recipe, recipe_spec, reference_dir
    from selbench.reference_captioner import cached_reference_captioner, captioner_recipe

    clip = reference_dir(load_recipe(recipe)[0]) / "model.pt"
    captioner_name = captioner_recipe(recipe)[0].name
    captioner = cached_reference_captioner(recipe)
    for label, name, path in (
        ("reference model", recipe_spec(recipe), clip if clip.is_file() else None),
        ("reference captioner", captioner_name, captioner),
    ):
        state = f"built, {path}" if path is not None else "not built (selbench reference build)"
        console.print(f"{label} ({name}): {state}", highlight=False, soft_wrap=True)


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

    overrides: dict = dict(parse_assignments(settings, "--set"))
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
