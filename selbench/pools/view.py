"""The read-only view of a pool that strategies get (:class:`PoolForStrategies`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from selbench.pools.metadata import MetadataPool
    from selbench.pools.shards import ShardPool


class PoolForStrategies:
    """The read-only view of a pool handed to strategies: no ground truth."""

    def __init__(self, pool: ShardPool | MetadataPool) -> None:
        self._pool = pool

    @property
    def uids(self) -> Sequence[str]:
        return self._pool.uids

    @property
    def captions(self) -> Sequence[str]:
        return self._pool.captions

    @property
    def fingerprint(self) -> str:
        return self._pool.fingerprint

    @property
    def name(self) -> str:
        return self._pool.name

    @property
    def kind(self) -> str:
        """``synthweb`` for a generated SynthWeb pool, ``datacomp-metadata`` for DataComp's
        metadata without images, ``shards`` for any other."""
        return self._pool.kind

    @property
    def reference(self) -> str | None:
        """The embedder spec the pool config names as its reference model, if any."""
        return self._pool.reference

    @property
    def features_models(self) -> dict[str, str]:
        """Per DataComp feature set (``l14``, ``b32``), the embedder spec of the model that
        computed the pool's shipped features (``features_model``); empty on other pools."""
        return dict(getattr(self._pool, "features_models", {}))

    @property
    def metadata(self) -> str | None:
        """The metadata entries file (one per line) the pool config names, if any."""
        return self._pool.metadata

    def __len__(self) -> int:
        return len(self._pool)

    def iter_images(
        self, uids: Iterable[str] | None = None, start: int = 0
    ) -> Iterator[tuple[str, Image.Image]]:
        return self._pool.iter_images(uids, start)

    def iter_image_bytes(
        self, uids: Iterable[str] | None = None, start: int = 0
    ) -> Iterator[tuple[str, bytes, str]]:
        return self._pool.iter_image_bytes(uids, start)

    def locate(self, uid: str) -> str:
        return self._pool.locate(uid)
