"""Where selection's row-block work runs: in this process, or as Ray tasks.

An :class:`Executor` maps a function over a list of tasks and returns the results in task
order. The row-wise work of selection (CLIP scores, k-means assignment, SemDeDup's
clusters) is cut into the same row blocks whatever the executor, and every block runs
the same function on the same rows, so the floats, and the selection, do not depend on
where the blocks ran (docs/scale-out.md, "Selecting on Ray").

Arrays reach the tasks as small picklable handles (:meth:`Executor.share`), never by
value per task: a memory-mapped file (the embedding cache's ``np.load(mmap_mode="r")``
arrays) as its path, offset, dtype and shape, which each task maps itself (on a cluster
the cache must be on a filesystem every node mounts at the same path); an array in
memory is put in Ray's object store once.

``ray`` is an optional extra (``pip install 'selbench[ray]'``): only
:class:`RayExecutor` imports it, when it is made.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from selbench.errors import ConfigError, SelbenchError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
# A task whose worker died (a killed process, a lost node) runs again this many times.
RAY_MAX_RETRIES = 3
RAY_EXTRA_HINT = "pip install 'selbench[ray]'"


class SharedArray(Protocol):
    """A handle to an array that tasks can take with them: ``get()`` is the array."""

    def get(self) -> np.ndarray: ...


class Executor(Protocol):
    """Runs ``fn(*task)`` for every task; the results in task order."""

    name: str

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]) -> list[Any]: ...

    def share(self, array: np.ndarray) -> SharedArray: ...


@dataclass(frozen=True)
class InProcess:
    """An array handed to in-process tasks as it is (no copy)."""

    array: np.ndarray

    def get(self) -> np.ndarray:
        return self.array


@dataclass(frozen=True)
class MappedFile:
    """A C-ordered array in a file, by path, byte offset, dtype and shape: each task maps
    it read-only itself, so only the rows it reads come into its memory."""

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    def get(self) -> np.ndarray:
        try:
            return np.memmap(self.path, self.dtype, mode="r", offset=self.offset, shape=self.shape)
        except OSError as exc:
            raise SelbenchError(
                f"a Ray worker cannot open {self.path} ({exc.strerror or exc}): on a cluster "
                "the embedding cache (SELBENCH_HOME) must be on a filesystem every node "
                "mounts at the same path (docs/scale-out.md, 'Selecting on Ray')"
            ) from exc


def _mapping(array: np.ndarray) -> tuple[np.memmap, mmap.mmap, int] | None:
    """The file map under a C-contiguous ``array`` (an ``np.memmap``, or an ndarray over
    one: ``np.asarray`` of it): the memmap, its ``mmap`` buffer and how many bytes into
    that buffer the array's data starts; None for an array that is not such a view."""
    source: np.ndarray | None = array
    while source is not None and not (isinstance(source, np.memmap) and source.filename):
        source = source.base if isinstance(source.base, np.ndarray) else None
    if not isinstance(source, np.memmap) or not array.flags.c_contiguous:
        return None
    buffer = getattr(source, "_mmap", None)
    if not isinstance(buffer, mmap.mmap):
        return None
    mapping = np.frombuffer(buffer, dtype=np.uint8)
    into = array.__array_interface__["data"][0] - mapping.__array_interface__["data"][0]
    if not 0 <= into <= len(mapping) - array.nbytes:
        return None
    return source, buffer, into


def mapped_file(array: np.ndarray) -> MappedFile | None:
    """``array`` as a :class:`MappedFile` when it is a C-contiguous view of a file's memory
    map (an ``np.memmap``, or an ndarray over one: ``np.asarray`` of it), else None."""
    found = _mapping(array)
    if found is None:
        return None
    source, _, into = found
    # np.memmap maps from its offset rounded down to the allocation granularity; the
    # array's data lies that far into the mapping plus its distance from the mapping start.
    start = source.offset - source.offset % mmap.ALLOCATIONGRANULARITY
    return MappedFile(str(Path(str(source.filename))), start + into, array.dtype.str, array.shape)


def release_rows(array: np.ndarray, lo: int, hi: int) -> None:
    """Rows ``lo:hi`` of a C-contiguous view of a file's memory map are read and not needed
    again: drop their whole pages from this process's resident set (``MADV_DONTNEED``;
    the page cache keeps them, and a later read maps them again), so a pass over the
    embedding cache does not leave it all counted in the process's RSS. Nothing for an
    array in memory."""
    found = _mapping(array) if array.ndim >= 1 else None
    if found is None:
        return
    _, buffer, into = found
    row = array.strides[0]
    page = mmap.PAGESIZE
    start = -(-(into + lo * row) // page) * page  # whole pages inside the rows only
    stop = min(into + hi * row, len(buffer)) // page * page
    if 0 <= start < stop:
        buffer.madvise(mmap.MADV_DONTNEED, start, stop - start)


def call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """What a Ray task runs: ``fn(*args)``."""
    return fn(*args)


class LocalExecutor:
    """Every task in this process, in order: what selection always did."""

    name = "local"

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]) -> list[Any]:
        return [fn(*task) for task in tasks]

    def share(self, array: np.ndarray) -> SharedArray:
        return InProcess(array)


@dataclass(frozen=True)
class PutArray:
    """An array in Ray's object store (put once, read zero-copy by every task)."""

    ref: Any

    def get(self) -> np.ndarray:
        import ray

        return np.asarray(ray.get(self.ref))


def import_ray() -> Any:
    """The ``ray`` module, or a ConfigError naming the extra that installs it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            f"--executor ray needs Ray, which is not installed: {RAY_EXTRA_HINT} "
            f"({type(exc).__name__}: {exc})"
        ) from None
    return ray


class RayExecutor:
    """Every task as a Ray task, on the cluster at ``address`` (``ray start --head`` prints
    it; ``auto`` finds the local node's), or on a Ray instance started here when None.

    A task whose worker dies runs again (up to :data:`RAY_MAX_RETRIES` times); a task that
    raises is not retried, and its error is raised here.
    """

    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        self.address = address
        self._ray = import_ray()
        if not self._ray.is_initialized():
            self._ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self._task = self._ray.remote(max_retries=RAY_MAX_RETRIES, num_cpus=1)(call)

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]) -> list[Any]:
        refs = [self._task.remote(fn, tuple(task)) for task in tasks]
        return list(self._ray.get(refs))

    def share(self, array: np.ndarray) -> SharedArray:
        found = mapped_file(array)
        if found is not None:
            return found
        return PutArray(self._ray.put(np.ascontiguousarray(array)))


def make_executor(name: str = "local", address: str | None = None) -> Executor:
    """The executor called ``name`` (:data:`EXECUTORS`); ``address`` is Ray's."""
    if name == "local":
        if address is not None:
            log.info("--ray-address %s is ignored by the local executor", address)
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address)
    raise ConfigError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")


def local_or(executor: Executor | None) -> Executor:
    """``executor``, or a :class:`LocalExecutor` for None."""
    return LocalExecutor() if executor is None else executor
