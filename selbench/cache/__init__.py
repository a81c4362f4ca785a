"""Embedding cache: one embedding pass per (pool fingerprint, embedder id), shared by all runs.

Layout under the cache root (``$SELBENCH_HOME/embeddings`` by default)::

    <entry_id>/                 a complete entry: image.npy, text.npy, manifest.json
    <entry_id>.partial/         an interrupted computation: partial.json, chunk-000000.npz, ...
    <entry_id>.lock             the entry's file lock (kept; an empty file)
    .tmp-<entry_id>-<token>/    an entry being assembled (renamed to <entry_id>/ when complete)
    .sha256-memo.json           memoised sha256 digests of .npy files, keyed by path+size+mtime

Files only ever appear under their final names when complete (write to a temp name, then
``os.replace``/``os.rename``), so a process killed at any point leaves complete chunks, a
complete entry, or nothing. A computation resumes from the first missing chunk. Every load
validates the entry (manifest, shapes, dtype, sha256) and removes a damaged one, which is
then recomputed: a bad entry is never used silently. See ``docs/cache.md``.

Modules: :mod:`~selbench.cache.layout` (names, the entry spec, file helpers),
:mod:`~selbench.cache.chunks` (computing chunks), :mod:`~selbench.cache.entries`
(validating and assembling entries), :mod:`~selbench.cache.ranks` (processes sharing a
computation; a single process is a world of one) and :mod:`~selbench.cache.store`
(:class:`EmbeddingCache`).
"""

from selbench.cache.chunks import normalise_rows
from selbench.cache.layout import (
    ARRAY_NAMES,
    CACHE_FORMAT,
    DTYPE,
    LOCK_SUFFIX,
    MANIFEST,
    MEMO_NAME,
    PARTIAL_INFO,
    PARTIAL_SUFFIX,
    TMP_PREFIX,
    CacheEntry,
    CacheResult,
    EntrySpec,
    Produce,
    chunk_name,
    chunk_rows,
    embedder_hash,
    n_chunks,
)
from selbench.cache.ranks import Ranks, one_rank, rank_chunks
from selbench.cache.store import EmbeddingCache

__all__ = [
    "ARRAY_NAMES",
    "CACHE_FORMAT",
    "DTYPE",
    "LOCK_SUFFIX",
    "MANIFEST",
    "MEMO_NAME",
    "PARTIAL_INFO",
    "PARTIAL_SUFFIX",
    "TMP_PREFIX",
    "CacheEntry",
    "CacheResult",
    "EmbeddingCache",
    "EntrySpec",
    "Produce",
    "Ranks",
    "chunk_name",
    "chunk_rows",
    "embedder_hash",
    "n_chunks",
    "normalise_rows",
    "one_rank",
    "rank_chunks",
]
