"""The embedding cache: load an entry, or compute it once under the entry's lock."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import filelock

from selbench.cache import chunks
from selbench.cache.chunks import DimChanged, ProduceError, present_chunks
from selbench.cache.entries import (
    assemble,
    complete_summary,
    discard,
    partial_summary,
    validate,
)
from selbench.cache.layout import (
    LOCK_SUFFIX,
    PARTIAL_INFO,
    PARTIAL_SUFFIX,
    SAFE_NAME,
    CacheEntry,
    CacheResult,
    EntrySpec,
    Produce,
    ProgressCallback,
    check_meta,
    chunk_name,
    entry_dir,
    is_int,
    make_entry_id,
    partial_dir,
    read_json,
    remove,
    stale_assemblies,
)
from selbench.cache.ranks import Ranks, check_agreement, one_rank, rank_chunks, step
from selbench.errors import ConfigError, SelbenchError
from selbench.paths import selbench_home

log = logging.getLogger("selbench.cache")


class EmbeddingCache:
    """Image and text embeddings of a pool, computed once per (pool, embedder) and reused."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else selbench_home() / "embeddings"

    # -- naming ----------------------------------------------------------------------
    def entry_id(self, pool_fingerprint: str, embedder_id: str) -> str:
        """``f"{pool_fingerprint}-{short hash of embedder_id}"``: stable and filesystem-safe."""
        return make_entry_id(pool_fingerprint, embedder_id)

    def _lock(self, entry_id: str, timeout: float = -1) -> filelock.FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(self.root / f"{entry_id}{LOCK_SUFFIX}"), timeout=timeout)

    def _known_id(self, entry_id: str) -> str:
        """``entry_id`` if it names an entry (complete or partial); else ConfigError."""
        if (
            isinstance(entry_id, str)
            and SAFE_NAME.match(entry_id)
            and not entry_id.endswith((PARTIAL_SUFFIX, LOCK_SUFFIX))
            and (
                entry_dir(self.root, entry_id).is_dir() or partial_dir(self.root, entry_id).is_dir()
            )
        ):
            return entry_id
        raise ConfigError(f"no cache entry {entry_id!r}; `selbench cache ls` lists them")

    # -- loading ---------------------------------------------------------------------
    def load(self, pool_fingerprint: str, embedder_id: str) -> CacheEntry | None:
        """The complete, validated entry, or None.

        A damaged or foreign entry is logged (``logging.warning`` naming the problem),
        removed and None returned; if another process holds the entry's lock (it is
        computing it), the damaged entry is left for that process to replace.
        """
        entry_id = self.entry_id(pool_fingerprint, embedder_id)
        entry, problem = validate(self.root, entry_id, pool_fingerprint, embedder_id)
        if problem is None:
            return entry
        try:
            with self._lock(entry_id, timeout=0):
                entry, problem = validate(self.root, entry_id, pool_fingerprint, embedder_id)
                if problem is None:
                    return entry
                discard(self.root, entry_id, problem)
        except filelock.Timeout:
            log.warning(
                "embedding cache entry %s is damaged (%s); another process is computing it",
                entry_id,
                problem,
            )
        return None

    # -- computing -------------------------------------------------------------------
    def get_or_compute(
        self,
        pool_fingerprint: str,
        embedder_id: str,
        n_samples: int,
        produce: Produce,
        chunk_size: int = 4096,
        meta: dict | None = None,
        progress: ProgressCallback | None = None,
        ranks: Ranks | None = None,
    ) -> CacheResult:
        """Load the entry for (pool, embedder), computing (or resuming) it if needed.

        ``produce(start)`` must yield consecutive ``(image_batch, text_batch)`` float arrays
        (any float dtype, any batch sizes) for samples ``start, start + 1, ...`` up to
        ``n_samples`` in pool order. Batches are re-chunked into ``chunk_size`` rows,
        L2-normalised row by row (float32 math) and stored as float16; every completed chunk
        is on disk, so an interrupted computation resumes from the first missing chunk.
        ``meta`` adds fields to the manifest; ``progress(done, n_samples)`` is called as
        chunks complete. The entry's file lock is held throughout, so concurrent callers
        compute an entry once: the others wait and then load it.

        Raises SelbenchError if ``produce`` yields malformed batches, too few or too many
        rows, or non-finite values (its partial data is then discarded).

        With ``ranks`` (one call per rank, all with the same arguments), the ranks share the
        work: rank 0 takes the entry's lock and checks for a hit, each rank computes the
        missing chunks of its share (:func:`rank_chunks`), and once every rank reports its
        share done, rank 0 assembles the entry and the others load it. ``progress`` then
        counts this rank's share, and ``resumed_from`` is the ranks' total. Without
        ``ranks``, this process is a world of one rank and takes the same steps.
        """
        started = time.perf_counter()
        spec = EntrySpec.build(pool_fingerprint, embedder_id, n_samples, chunk_size)
        extra = check_meta(meta)
        ranks = ranks if ranks is not None else one_rank()
        check_agreement(ranks, spec)
        entry, hit, resumed_from = self._get_or_compute(spec, produce, extra, progress, ranks)
        return CacheResult(entry, hit, time.perf_counter() - started, resumed_from)

    def _get_or_compute(
        self,
        spec: EntrySpec,
        produce: Produce,
        extra: dict,
        progress: ProgressCallback | None,
        ranks: Ranks,
    ) -> tuple[CacheEntry, bool, int]:
        """The steps of :meth:`get_or_compute`: (entry, hit, samples resumed).

        Rank 0 holds the entry's lock from the hit check to the assembly, so a process
        outside the group waits as it would for a single computer.
        """
        kept: list[CacheEntry] = []  # rank 0's entry: the one it found or assembled

        def check() -> str:
            entry = self._check(spec)
            if entry is None:
                return "compute"
            kept.append(entry)
            return "hit"

        lock = self._lock(spec.entry_id)
        with lock if ranks.leader else contextlib.nullcontext():
            if step(ranks, check if ranks.leader else None, "checking the entry") == "hit":
                return self._rank_entry(spec, kept), True, 0
            shares = step(
                ranks,
                lambda: self._compute_share(spec, produce, progress, ranks),
                "computing its share of the chunks",
                every_rank=True,
            )
            dim = next(d for _, d in shares if d is not None)

            def assemble_entry() -> None:
                kept.append(assemble(self.root, spec, dim, extra))

            step(ranks, assemble_entry if ranks.leader else None, "assembling the entry")
            entry = self._rank_entry(spec, kept)
        return entry, False, sum(resumed for resumed, _ in shares)

    def _check(self, spec: EntrySpec) -> CacheEntry | None:
        """The valid entry, or None after clearing what a computation must not find: the
        temp folders of killed assemblies, a damaged entry, partial data of another request.
        """
        for stale in stale_assemblies(self.root, spec.entry_id):
            remove(stale)
        entry, problem = validate(
            self.root, spec.entry_id, spec.pool_fingerprint, spec.embedder_id, spec.n_samples
        )
        if problem is not None:
            discard(self.root, spec.entry_id, problem)
        elif entry is not None:
            remove(partial_dir(self.root, spec.entry_id))
            return entry
        self._drop_foreign_partial(spec)
        return None

    def _rank_entry(self, spec: EntrySpec, kept: list[CacheEntry]) -> CacheEntry:
        """This rank's view of the entry rank 0 found or assembled: rank 0 has it already,
        the others validate it from the shared filesystem."""
        if kept:
            return kept[-1]
        entry, problem = validate(
            self.root, spec.entry_id, spec.pool_fingerprint, spec.embedder_id, spec.n_samples
        )
        if entry is None:
            raise SelbenchError(
                f"cache entry {spec.entry_id} was reported complete by rank 0 but is "
                f"{problem or 'missing'} here (is {self.root} on a filesystem every rank shares?)"
            )
        return entry

    def _drop_foreign_partial(self, spec: EntrySpec) -> None:
        """Remove partial data that is not this request's (``partial.json`` differs)."""
        partial = partial_dir(self.root, spec.entry_id)
        if not partial.is_dir():
            return
        info = read_json(partial / PARTIAL_INFO)
        if (
            info is None
            or any(info.get(k) != v for k, v in spec.as_dict().items())
            or not is_int(info.get("dim"))
        ):
            log.warning(
                "discarding partial embeddings in %s: written for another request (%s)",
                partial,
                info,
            )
            remove(partial)

    def _compute_share(
        self,
        spec: EntrySpec,
        produce: Produce,
        progress: ProgressCallback | None,
        ranks: Ranks,
    ) -> tuple[int, int | None]:
        """Write the missing chunks of this rank's share; return (samples resumed, dim).

        Rank 0's check left only this request's partial data. A rank alone owns the whole
        partial folder: it clears out what no kept chunk needs, restarts from zero when the
        embedder's dim changed, and drops everything when ``produce`` misbehaves. Ranks that
        share the folder touch only their own chunks.
        """
        partial = partial_dir(self.root, spec.entry_id)
        share = rank_chunks(ranks.rank, ranks.world_size, spec.n_chunks)
        info = read_json(partial / PARTIAL_INFO) or {}
        dim = info.get("dim") if is_int(info.get("dim")) else None
        present = present_chunks(partial, spec, dim, share) if dim else set()
        if ranks.alone:
            if not present:
                remove(partial)  # also drops stray files of an attempt that wrote no chunk
                dim = None
            for path in partial.iterdir() if partial.is_dir() else ():
                if path.name.startswith(".") and path.is_file():
                    path.unlink(missing_ok=True)  # temp files of a killed writer
        try:
            return self._fill_share(spec, partial, produce, share, present, dim, progress, ranks)
        except ProduceError:
            if ranks.alone:
                remove(partial)
            else:
                for index in share:  # this rank's chunks came from a misbehaving embedder
                    (partial / chunk_name(index)).unlink(missing_ok=True)
            raise

    def _fill_share(
        self,
        spec: EntrySpec,
        partial: Path,
        produce: Produce,
        share: range,
        present: set[int],
        dim: int | None,
        progress: ProgressCallback | None,
        ranks: Ranks,
    ) -> tuple[int, int | None]:
        try:
            return chunks.fill(spec, partial, produce, share, present, dim, progress)
        except DimChanged as exc:
            if not ranks.alone:
                raise SelbenchError(
                    f"embedder {spec.embedder_id!r}: {exc} in {partial}; the embedder changed "
                    f"under the same id. Remove the partial data (`selbench cache rm "
                    f"{spec.entry_id}`) and embed again"
                ) from None
            log.warning("discarding partial embeddings in %s: %s; restarting from 0", partial, exc)
            remove(partial)
            return chunks.fill(spec, partial, produce, share, set(), None, progress)

    # -- listing and removing --------------------------------------------------------
    def ls(self) -> list[dict]:
        """All entries, sorted by id.

        Complete entries: their manifest plus ``entry_id``, ``status: "complete"``, ``path``
        (str) and ``size_mb``. Interrupted computations: ``{"entry_id", "status": "partial",
        "done", "n_samples", "embedder_id", "pool_fingerprint", "path", "size_mb"}``.
        An entry directory without a readable manifest is listed with ``status: "damaged"``.
        Nothing is validated beyond reading manifests (cheap).
        """
        if not self.root.is_dir():
            return []
        rows = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            if path.name.endswith(PARTIAL_SUFFIX):
                rows.append(partial_summary(path))
            else:
                rows.append(complete_summary(path))
        return rows

    def info(self, entry_id: str) -> dict:
        """Manifest and sizes of one entry (as in :meth:`ls`), with per-file sizes in bytes.

        If an interrupted computation exists too, it is under ``"partial"``. Raises
        ConfigError for an unknown id.
        """
        entry_id = self._known_id(entry_id)
        complete, partial = entry_dir(self.root, entry_id), partial_dir(self.root, entry_id)
        if not complete.is_dir():
            return partial_summary(partial)
        info = complete_summary(complete)
        info["files"] = {p.name: p.stat().st_size for p in sorted(complete.iterdir())}
        if partial.is_dir():
            info["partial"] = partial_summary(partial)
        return info

    def rm(self, entry_id: str) -> None:
        """Remove an entry's complete and partial data. Raises ConfigError for an unknown id,
        SelbenchError if another process is computing it right now."""
        entry_id = self._known_id(entry_id)
        try:
            with self._lock(entry_id, timeout=0):
                remove(entry_dir(self.root, entry_id))
                remove(partial_dir(self.root, entry_id))
                for stale in stale_assemblies(self.root, entry_id):
                    remove(stale)
        except filelock.Timeout:
            raise SelbenchError(
                f"cache entry {entry_id!r} is being computed by another process; try again later"
            ) from None
