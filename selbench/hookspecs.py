"""Hook specifications: one per extension point.

A plugin is a module exposed under the ``selbench`` entry-point group that implements
some of these hooks with ``@selbench.hookimpl``.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("selbench")
hookimpl = pluggy.HookimplMarker("selbench")


@hookspec
def register_strategies(register: Callable[[type], None]) -> None:
    """Call ``register(StrategyClass)`` for every selection strategy this plugin provides."""


@hookspec
def register_embedders(register: Callable[[type], None]) -> None:
    """Call ``register(EmbedderClass)`` for every embedder this plugin provides."""


@hookspec
def register_online_strategies(register: Callable[[type], None]) -> None:
    """Call ``register(OnlineStrategyClass)`` for every online strategy this plugin provides:
    a :class:`selbench.online.OnlineStrategy` subclass, which chooses each training batch
    from a larger super-batch while the model trains (``docs/online.md``)."""
