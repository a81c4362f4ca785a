"""What every ``selbench`` command shares: the consoles, the error handling, option
parsers, and the ``main`` group the commands of the other modules join."""

from __future__ import annotations

import functools
import os
import sys

import click
from rich.console import Console

from selbench.errors import SelbenchError

console = Console()
err_console = Console(stderr=True)


#: ``--strict``'s help, the same for every command that reads a pool.
STRICT_HELP = (
    "Refuse a pool holding a corrupt shard (cut short, not a tar, or holding a different "
    "number of samples than its _stats.json records), with an error naming the shard. "
    "Default: leave the shard out with a warning naming it, count its samples as "
    "corrupt_shard in the run's pool_skipped (its name goes in pool_skipped_shards), and "
    "give the pool a fingerprint of its own (docs/reliability.md)."
)


#: ``--executor``'s help: what runs where (selection's row blocks, or embed's ranks).
SELECT_EXECUTOR_HELP = (
    "Where selection's row-block work runs (CLIP scores, k-means assignment, SemDeDup's "
    "clusters). local: in this process. ray: as Ray tasks over row blocks, on the cluster "
    "at --ray-address or on a Ray instance started here; the driver ranks the gathered "
    "scores, so the budget and the selection are exactly the local ones. Needs "
    "`pip install 'selbench[ray]'`; on several nodes the embedding cache (SELBENCH_HOME) "
    "must be on a filesystem every worker sees (docs/scale-out.md)."
)
EMBED_EXECUTOR_HELP = (
    "Where the embedding ranks run. local: here, or under torchrun with --nproc-per-node. "
    "ray: --nproc-per-node ranks (default 1) as Ray tasks on CPU, on the cluster at "
    "--ray-address or on a Ray instance started here; a killed task runs again and resumes "
    "from the parts it wrote. Needs `pip install 'selbench[ray]'`; the embedding cache "
    "(SELBENCH_HOME) must be on a filesystem every worker sees (docs/scale-out.md)."
)


def executor_options(help_text: str):
    """``--executor local|ray`` and ``--ray-address``, for run, sweep and embed."""

    def decorate(func):
        func = click.option(
            "--ray-address",
            default=None,
            metavar="ADDR",
            help="The Ray cluster for --executor ray: the address `ray start --head` "
            "prints (HOST:6379), or auto for the one this node belongs to. Default: start "
            "a Ray instance on this machine.",
        )(func)
        return click.option(
            "--executor",
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help=help_text,
        )(func)

    return decorate


def quiet_libraries() -> None:
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


def parse_assignments(values: tuple[str, ...], option: str) -> dict[str, str]:
    parsed = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        parsed[key.strip()] = value.strip()
    return parsed


def parse_budget(ctx, param, value: float | None) -> float | None:
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
