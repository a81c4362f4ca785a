"""``selbench embed --executor ray``: the multi-rank embedding path of
:mod:`selbench.embed_ranks`, its ranks as Ray tasks instead of torchrun processes.

Each of the R ranks is one Ray task (on CPU) that runs exactly what a torchrun rank runs
(:func:`selbench.embed_ranks._embed` with a :class:`~selbench.cache.Ranks`): the ranks
split the entry's chunks and write them into the entry's partial folder, and rank 0
assembles the entry once every share is done. The ranks' few collective messages go
through a small Ray actor (:class:`Rendezvous`) instead of a process group. A task whose
worker dies runs again (``max_retries``): it replays the messages it had exchanged (the
rendezvous answers them from what it kept) and resumes its share from the chunks already
on disk, which the cache checks as it does after any kill (docs/cache.md).

The cache (``SELBENCH_HOME``) must be on a filesystem every Ray node mounts at the same
path; the tasks get this process's ``SELBENCH_*`` variables.
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any

from selbench.cache import Ranks
from selbench.errors import ConfigError
from selbench.executors import RAY_MAX_RETRIES, call, import_ray


class Rendezvous:
    """``all_gather`` for R ranks that are Ray tasks: round ``n`` of every rank returns
    once all R have given their value for it. A retried rank's replayed rounds are
    answered from the values kept (a round stays open until it is complete, and a value
    given again replaces the one before)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.rounds: dict[int, dict[int, Any]] = {}
        self.changed = threading.Condition()

    def gather(self, round_number: int, rank: int, value: Any) -> list[Any]:
        with self.changed:
            values = self.rounds.setdefault(round_number, {})
            if len(values) < self.world_size:
                values[rank] = value
                self.changed.notify_all()
            self.changed.wait_for(lambda: len(values) == self.world_size)
            return [values[r] for r in range(self.world_size)]


def ray_ranks(rank: int, world_size: int, rendezvous: Any) -> Ranks:
    """Rank ``rank`` of ``world_size`` whose collectives go through ``rendezvous`` (an
    actor handle of :class:`Rendezvous`)."""
    import ray

    rounds = iter(range(1 << 62))

    def all_gather(value: Any) -> list[Any]:
        return list(ray.get(rendezvous.gather.remote(next(rounds), rank, value)))

    return Ranks(rank, world_size, all_gather)


def embed_rank(
    env: dict[str, str],
    rendezvous: Any,
    rank: int,
    world_size: int,
    args: tuple[str, str, str, int, bool],
) -> str | None:
    """One rank of ``selbench embed`` in a Ray task: the message rank 0 prints, or None."""
    from rich.console import Console

    from selbench.embed_ranks import _embed

    os.environ.update(env)
    pool, embedder, device, chunk_size, strict = args
    console = Console(file=io.StringIO())  # no progress bars from a worker
    ranks = ray_ranks(rank, world_size, rendezvous)
    return _embed(pool, embedder, device, chunk_size, console, ranks, strict).message


def embed_on_ray(
    pool: str,
    embedder: str,
    device: str | None,
    chunk_size: int,
    world_size: int,
    address: str | None,
    strict: bool = False,
) -> str | None:
    """Fill the cache entry of ``pool`` by ``embedder`` with ``world_size`` ranks as Ray
    tasks on the cluster at ``address`` (None: a Ray instance started here); the line
    rank 0 prints."""
    device = device or "cpu"
    if device != "cpu":
        raise ConfigError(f"--executor ray embeds on CPU; drop --device {device}")
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if world_size > cpus:  # ranks wait for each other: all of them must run at once
        raise ConfigError(
            f"--nproc-per-node {world_size} ranks need {world_size} CPUs at once; the Ray "
            f"cluster has {cpus}"
        )
    rendezvous = (
        ray.remote(num_cpus=0, max_concurrency=world_size + 1)(Rendezvous)
        .remote(world_size)
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k.startswith("SELBENCH_")}
    task = ray.remote(num_cpus=1, max_retries=RAY_MAX_RETRIES)(call)
    args = (pool, embedder, device, chunk_size, strict)
    refs = [
        task.remote(embed_rank, (env, rendezvous, rank, world_size, args))
        for rank in range(world_size)
    ]
    pending = list(refs)
    try:
        while pending:  # the first failure ends the wait (ranks left waiting end with it)
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
    finally:
        ray.kill(rendezvous)  # ranks still waiting in a collective fail at once
    return ray.get(refs[0])
