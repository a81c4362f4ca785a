"""Pool views for pipeline steps: the survivors of a step, without copying the pool.

A step of a pipeline (``docs/pipelines.md``) sees :class:`SubsetView`, a
:class:`~selbench.strategy.PoolView` of the samples the step before it kept, in pool order.
Its services (:class:`ViewServices`) serve the rows of those samples from the embeddings
the run already has: the cache entry of the whole pool, so a chain embeds the pool once
whatever its length. Proxies, embedders and the target set are the run's own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from selbench.embedders import Embedder, Embeddings
from selbench.pools.arrow import ArrowStrings
from selbench.strategy import PoolView, SelectionServices
from selbench.target import TargetSet


class SubsetView:
    """The samples at ``rows`` (ascending positions) of ``base``, as a pool view.

    ``uids``, ``captions`` and images follow pool order; ``fingerprint`` names the base pool
    and the survivors, so a strategy that caches by fingerprint never mixes two views."""

    def __init__(self, base: PoolView, rows: np.ndarray) -> None:
        self.base = base
        self.rows = np.asarray(rows, dtype=np.int64)
        if len(self.rows) and np.any(np.diff(self.rows) <= 0):
            raise ValueError("a pool view's rows must be ascending and distinct")
        self._uids = _pick(base.uids, self.rows)
        self._captions = _pick(base.captions, self.rows)
        self.whole = len(self.rows) == len(base)
        if self.whole:  # the pool itself: caches keyed by its fingerprint still serve it
            self._fingerprint = base.fingerprint
        else:
            digest = hashlib.sha256(base.fingerprint.encode())
            digest.update("\n".join(self._uids).encode())
            self._fingerprint = digest.hexdigest()[:16]

    @property
    def uids(self) -> Sequence[str]:
        return self._uids

    @property
    def captions(self) -> Sequence[str]:
        return self._captions

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def __len__(self) -> int:
        return len(self._uids)

    def __getattr__(self, name: str) -> Any:
        # name, kind, reference, locate, ...: what the base pool says of itself. Only
        # reached for attributes this class does not define.
        if name.startswith("_") or name in ("base", "rows", "whole"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def _wanted(self, uids: Iterable[str] | None, start: int) -> list[str]:
        if uids is None:
            return list(self._uids[start:])
        allowed = set(self._uids)
        return [u for u in uids if u in allowed]

    def iter_images(
        self, uids: Iterable[str] | None = None, start: int = 0
    ) -> Iterator[tuple[str, Any]]:
        """``(uid, image)`` of the view's samples (or of ``uids`` among them) in pool order."""
        return self.base.iter_images(self._wanted(uids, start))

    def iter_image_bytes(
        self, uids: Iterable[str] | None = None, start: int = 0
    ) -> Iterator[tuple[str, bytes, str]]:
        """``(uid, bytes, extension)`` of the view's samples, as :meth:`iter_images`."""
        base: Any = self.base
        return base.iter_image_bytes(self._wanted(uids, start))

    def subset(self, positions: np.ndarray) -> SubsetView:
        """The view of this view's samples at ``positions`` (ascending)."""
        return SubsetView(self.base, self.rows[np.asarray(positions, dtype=np.int64)])


def _pick(values: Sequence[str], rows: np.ndarray) -> list[str]:
    """``[values[i] for i in rows]``; an Arrow-backed pool column in one gather."""
    if isinstance(values, ArrowStrings):
        return values.take(rows)
    return [values[i] for i in rows]


def whole_view(pool: PoolView) -> SubsetView:
    """Every sample of ``pool``, as a view (the first step's input)."""
    return SubsetView(pool, np.arange(len(pool)))


@dataclass
class ViewServices(SelectionServices):
    """The run's services, with the pool's embeddings cut to a view's rows."""

    services: SelectionServices
    view: SubsetView
    _cut: dict[str, Embeddings] = field(default_factory=dict)

    def embeddings(self, spec: str = "proxy") -> Embeddings:
        if spec not in self._cut:
            whole = self.services.embeddings(spec)  # the cache entry of the whole pool
            if self.view.whole:
                self._cut[spec] = whole
                return whole
            rows = self.view.rows
            self._cut[spec] = Embeddings(
                image=whole.image[rows],
                text=whole.text[rows],
                uids=self.view.uids,
                embedder_id=whole.embedder_id,
                entry_id=whole.entry_id,
            )
        return self._cut[spec]

    def embed_images(self, spec: str, images: Sequence[Any]) -> np.ndarray:
        return self.services.embed_images(spec, images)

    def embedder(self, spec: str = "proxy") -> Embedder:
        return self.services.embedder(spec)

    def target(self) -> TargetSet:
        return self.services.target()
