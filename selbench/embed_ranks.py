"""``selbench embed``, in one process or shared by several under torchrun
(``torch.distributed.run``): :func:`embed_command`.

``selbench embed --nproc-per-node N`` re-launches itself as N torchrun ranks on this host
(:func:`launch`); on a cluster, start ``torchrun ... -m selbench.cli embed ...`` on every
node instead. Each rank joins the process group torchrun describes in its environment
(:func:`join_torchrun`) and calls the embedding cache with a :class:`~selbench.cache.Ranks`:
the ranks split the entry's chunks, and rank 0 assembles the entry once all are done
(docs/scale-out-embedding.md). A single process is a world of one rank and takes the
same steps.

The process group: gloo on CPU; on GPU the default group is NCCL, one GPU per local rank,
and the few small messages the ranks exchange (a hit, each share's outcome) go through a
gloo group beside it, so they need no GPU tensors.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from selbench.cache import Ranks, one_rank
from selbench.errors import ConfigError, SelbenchError

if TYPE_CHECKING:
    from rich.console import Console

    from selbench.embedders import Embeddings

# A rank that finishes its share waits in a collective for the slowest one, which after a
# resume may have hours left; a rank that dies instead ends the job through torchrun.
GROUP_TIMEOUT = timedelta(hours=24)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """Whether this process is a rank started by torchrun (its variables are all set)."""
    return all(name in os.environ for name in _TORCHRUN_VARS)


def torchrun_command(nproc_per_node: int, args: list[str], log_dir: str | None = None) -> list[str]:
    """The command that runs ``selbench <args>`` as ``nproc_per_node`` ranks on this host
    (torchrun keeps its logs in ``log_dir``, else in a folder it leaves in /tmp)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *(["--log-dir", log_dir] if log_dir else []),
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        "-m",
        "selbench.cli",
        *args,
    ]


def launch(nproc_per_node: int, args: list[str]) -> int:
    """Run ``selbench <args>`` under torchrun with ``nproc_per_node`` ranks; its exit code.

    On a CPU host the cores are split between the ranks (``OMP_NUM_THREADS``, unless set):
    torchrun's own default is one thread per rank.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    with tempfile.TemporaryDirectory(prefix="selbench-torchrun-") as logs:
        return subprocess.run(torchrun_command(nproc_per_node, args, logs), env=env).returncode


def rank_device(device: str | None) -> str:
    """This rank's torch device: ``cuda:LOCAL_RANK`` when CUDA is there (or ``device`` is
    ``cuda``), else ``device`` or cpu."""
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU: this host has "
                f"{torch.cuda.device_count()}; use at most that many --nproc-per-node"
            )
        return f"cuda:{local_rank}"
    return device


def join_torchrun(device: str) -> Ranks:
    """Join the process group torchrun set up; gloo on CPU, NCCL (+ gloo) on CUDA."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        gpu = device.startswith("cuda")
        if gpu:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if gpu else "gloo", timeout=GROUP_TIMEOUT)
    # new_group returns a marker instead of a group only on ranks outside the group.
    messages = cast(dist.ProcessGroup, dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT))
    world_size = dist.get_world_size()

    def all_gather(value: Any) -> list[Any]:
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, value, group=messages)
        return out

    return Ranks(dist.get_rank(), world_size, all_gather)


def leave_torchrun() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def rank_zero_first(ranks: Ranks, work: Callable[[], Any], what: str) -> Any:
    """Run ``work`` on rank 0, then on the other ranks: for steps that write shared
    files once (generating SynthWeb, training the proxy) and that the others then read."""
    result = None
    if ranks.rank == 0:
        try:
            result = work()
        except Exception as exc:  # told to the others, which raise too, then re-raised
            ranks.all_gather(f"{type(exc).__name__}: {exc}")
            raise
    failure = ranks.all_gather(None)[0]
    if failure is not None:
        raise SelbenchError(f"rank 0 failed while {what}: {failure}")
    if ranks.rank != 0:
        result = work()
    return result


@dataclass(frozen=True)
class EmbedOutcome:
    """What ``selbench embed`` did in this process: the line to print (rank 0 or the only
    process; None elsewhere), or the exit code of the torchrun it launched."""

    message: str | None = None
    exit_code: int = 0


def embed_command(
    pool: str,
    embedder: str,
    device: str | None,
    chunk_size: int,
    nproc_per_node: int | None,
    console: Console,
    strict: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
) -> EmbedOutcome:
    """Fill the embedding cache entry of ``pool`` by ``embedder`` (progress bars on
    ``console``): here, as one torchrun rank, or by launching ``nproc_per_node`` ranks;
    with ``executor="ray"``, ``nproc_per_node`` (default 1) ranks as Ray tasks on the
    cluster at ``ray_address`` (:mod:`selbench.embed_ray`). ``strict`` refuses a pool
    holding a corrupt shard (:mod:`selbench.pools.corrupt`)."""
    if executor == "ray" and not under_torchrun():
        from selbench.embed_ray import embed_on_ray

        world = nproc_per_node or 1
        message = embed_on_ray(pool, embedder, device, chunk_size, world, ray_address, strict)
        return EmbedOutcome(message)
    if executor not in ("local", "ray"):
        raise ConfigError(f"unknown executor {executor!r}; choose one of local, ray")
    if nproc_per_node is not None:
        if under_torchrun():
            raise SelbenchError(
                "--nproc-per-node launches torchrun, but this is already a torchrun rank; "
                "leave the option out under torchrun"
            )
        args = ["embed", "--pool", pool, "--embedder", embedder, "--chunk-size", str(chunk_size)]
        if device is not None:
            args += ["--device", device]
        args += ["--strict"] if strict else []
        return EmbedOutcome(exit_code=launch(nproc_per_node, args))
    if not under_torchrun():
        from selbench.run.spec import default_device

        device = device or default_device()
        return _embed(pool, embedder, device, chunk_size, console, one_rank(), strict)
    device = rank_device(device)
    ranks = join_torchrun(device)
    try:
        return _embed(pool, embedder, device, chunk_size, console, ranks, strict)
    finally:
        leave_torchrun()


def _embed(
    pool: str,
    embedder: str,
    device: str,
    chunk_size: int,
    console: Console,
    ranks: Ranks,
    strict: bool = False,
) -> EmbedOutcome:
    """Rank 0 generates the pool and prepares the embedder first (the other ranks then
    find both on disk); then the ranks split the entry's chunks."""
    from selbench.embedders import EmbeddingService
    from selbench.pools import resolve_pool
    from selbench.progress import NullProgress, RichProgress
    from selbench.registry import get_registry

    with RichProgress(console) if ranks.leader else contextlib.nullcontext() as shown:
        progress = shown if shown is not None else NullProgress()
        resolved = rank_zero_first(
            ranks,
            lambda: resolve_pool(pool, progress.counter("Generating SynthWeb"), strict),
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
        rank_zero_first(ranks, lambda: service.embedder(embedder), "preparing the embedder")
        found = service.embeddings(embedder)
    if not ranks.leader:
        return EmbedOutcome()
    return EmbedOutcome(embedded_message(found, service.usage[embedder], ranks.world_size))


def embedded_message(found: Embeddings, usage: dict[str, Any], world_size: int = 1) -> str:
    """The line ``selbench embed`` prints: hit or computed (by how many ranks, resumed
    from where), the entry's id and shape, the time taken and the embedder id."""
    verdict = "cache hit" if usage["hit"] else "computed"
    if world_size > 1:
        verdict += f" by {world_size} ranks"
    if usage["resumed_from"] and world_size > 1:
        verdict += f" (resumed: {usage['resumed_from']} samples were done already)"
    elif usage["resumed_from"]:
        verdict += f" (resumed from sample {usage['resumed_from']})"
    return (
        f"{verdict}: entry {found.entry_id} ({found.image.shape[0]} x {found.image.shape[1]}, "
        f"{usage['total_seconds']:.1f} s) for embedder {found.embedder_id}"
    )
