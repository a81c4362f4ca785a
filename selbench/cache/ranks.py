"""The processes that compute one entry together: a world of ranks, and its collective steps.

A single process is a world of one rank (:func:`one_rank`), so it goes through the same
steps as torchrun's ranks do; its collectives return at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from selbench.cache.layout import EntrySpec, is_int
from selbench.errors import SelbenchError


@dataclass
class Ranks:
    """This process's place among ``world_size`` processes computing one entry together.

    ``all_gather(value)`` must return every rank's ``value`` in rank order (a collective
    call: every rank calls it the same number of times), e.g. torch.distributed's
    ``all_gather_object``; :mod:`selbench.embed_ranks` builds one under torchrun. Rank
    ``r`` computes the missing chunks of its contiguous share (:func:`rank_chunks`).
    """

    rank: int
    world_size: int
    all_gather: Callable[[Any], list[Any]]

    def __post_init__(self) -> None:
        if not (is_int(self.world_size) and is_int(self.rank, 0) and self.rank < self.world_size):
            raise SelbenchError(
                f"rank {self.rank!r} is not in range for a world of {self.world_size!r} ranks"
            )

    @property
    def leader(self) -> bool:
        """Rank 0: it holds the entry's lock, checks for a hit and assembles the entry."""
        return self.rank == 0

    @property
    def alone(self) -> bool:
        """A world of one: this process owns the entry's whole partial folder."""
        return self.world_size == 1


def one_rank() -> Ranks:
    """The world of a process that computes an entry by itself."""
    return Ranks(0, 1, lambda value: [value])


def rank_chunks(rank: int, world_size: int, total: int) -> range:
    """The contiguous, balanced share of ``total`` chunks that ``rank`` of ``world_size``
    computes (empty when there are more ranks than chunks)."""
    return range(total * rank // world_size, total * (rank + 1) // world_size)


def check_agreement(ranks: Ranks, spec: EntrySpec) -> None:
    """SelbenchError on every rank unless all ranks ask for the same entry."""
    mine = spec.as_dict()
    for rank, other in enumerate(ranks.all_gather(mine)):
        differ = sorted(k for k in mine if other.get(k) != mine[k])
        if differ:
            raise SelbenchError(
                f"embedding ranks disagree on {', '.join(differ)}: rank {ranks.rank} has "
                f"{ {k: mine[k] for k in differ} }, rank {rank} has "
                f"{ {k: other.get(k) for k in differ} } (same pool, embedder and options "
                "on every rank?)"
            )


def step(ranks: Ranks, work: Callable[[], Any] | None, what: str, every_rank: bool = False) -> Any:
    """Run ``work`` on this rank (if given) and share the outcome: rank 0's result,
    or every rank's (``every_rank``). A failure on any rank raises on every rank:
    the original exception where it happened, a SelbenchError naming it elsewhere.

    Every rank reaches every step even when its own part fails, so no rank is left
    waiting in a collective for one that gave up.
    """
    result: Any = None
    failure: BaseException | None = None
    if work is not None:
        try:
            result = work()
        except Exception as exc:  # reported to the other ranks, then re-raised
            failure = exc
    message = None if failure is None else f"{type(failure).__name__}: {failure}"
    outcomes = ranks.all_gather((result, message))
    if failure is not None:
        raise failure
    for rank, (_, other) in enumerate(outcomes):
        if other is not None:
            raise SelbenchError(f"embedding rank {rank} failed while {what}: {other}")
    return [value for value, _ in outcomes] if every_rank else outcomes[0][0]
