"""The built-in online strategies (``uniform``, ``hard-learner``, ``easy-reference``,
``learnability``, ``jest``; :mod:`selbench.online.builtins`), registered through the same
entry-point route and hook as any third-party online strategy."""

from __future__ import annotations

from collections.abc import Callable

from selbench import hookimpl
from selbench.online import BUILTIN_ONLINE


@hookimpl
def register_online_strategies(register: Callable[[type], None]) -> None:
    for cls in BUILTIN_ONLINE.values():
        register(cls)
