"""selbench: benchmark data-selection methods for vision-language pre-training."""

from selbench.hookspecs import hookimpl
from selbench.strategy import (
    NoParams,
    Selection,
    SelectionContext,
    Strategy,
    Synthesized,
)

__version__ = "0.1.0"

__all__ = [
    "Embeddings",
    "NoParams",
    "Selection",
    "SelectionContext",
    "Strategy",
    "Synthesized",
    "TargetSet",
    "__version__",
    "hookimpl",
]


def __getattr__(name: str):
    # The context's return types, imported on first use: they pull in torch and open_clip,
    # which `import selbench` (the CLI's startup) does not need.
    if name == "Embeddings":
        from selbench.embedders import Embeddings

        return Embeddings
    if name == "TargetSet":
        from selbench.target import TargetSet

        return TargetSet
    raise AttributeError(f"module 'selbench' has no attribute {name!r}")
