"""Progress reporting: rich bars in the terminal, nothing in tests.

:class:`Progress` is what the harness's long steps (training, evaluation, building the
reference model) report to; :class:`RichProgress` and :class:`NullProgress` implement it.
:class:`Tracker`, its ``track`` alone, is all that the helpers strategies call too
(training a model, loading a pool) ask for: a strategy's ``ctx.progress`` is one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

from rich import progress as rich_progress
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


class Tracker(Protocol):
    """Progress of iterations: what strategies are given (``selbench.strategy.Progress``)."""

    def track(
        self, iterable: Iterable[T], description: str, total: int | None = None
    ) -> Iterator[T]:
        """Yield ``iterable``'s items, advancing a bar called ``description``."""
        ...


class Progress(Tracker, Protocol):
    """A progress display: bars for iterations and counts, notes, a status per bar."""

    def counter(self, description: str) -> Callable[[int, int], None]:
        """A ``callback(done, total)`` that drives one bar."""
        ...

    def note(self, message: str) -> None:
        """Show one line of text."""
        ...

    def set_info(self, description: str, info: str) -> None:
        """Show ``info`` beside the newest bar called ``description``."""
        ...


class RichProgress:
    """Implements :class:`Progress` (and :class:`selbench.strategy.Progress`) with rich
    progress bars."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = rich_progress.Progress(
            TextColumn("[bold blue]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )

    def __enter__(self) -> RichProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def track(
        self, iterable: Iterable[T], description: str, total: int | None = None
    ) -> Iterator[T]:
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        task = self._progress.add_task(description, total=total, info="")
        for item in iterable:
            yield item
            self._progress.advance(task)
        self._progress.update(task, completed=total if total is not None else None)

    def counter(self, description: str) -> Callable[[int, int], None]:
        """A ``callback(done, total)`` that drives one bar, shown from its first call."""
        task = None

        def update(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = self._progress.add_task(description, total=total, info="")
            self._progress.update(task, completed=done, total=total)

        return update

    def note(self, message: str) -> None:
        """Print one line above the bars."""
        self._progress.console.print(message, highlight=False, soft_wrap=True)

    def set_info(self, description: str, info: str) -> None:
        """Show ``info`` beside the newest bar called ``description``: the one being
        driven now. Earlier bars of that name (the proxy's "Training" before the
        subset's, an earlier run's in a sweep) keep their own last value."""
        for task in reversed(self._progress.tasks):
            if task.description == description:
                self._progress.update(task.id, info=info)
                return


class NullProgress:
    """Progress that reports nothing (tests, library use)."""

    def track(
        self, iterable: Iterable[T], description: str, total: int | None = None
    ) -> Iterator[T]:
        yield from iterable

    def counter(self, description: str) -> Callable[[int, int], None]:
        return lambda done, total: None

    def note(self, message: str) -> None:
        return None

    def set_info(self, description: str, info: str) -> None:
        return None
