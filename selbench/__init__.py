"""selbench: benchmark data-selection methods for vision-language pre-training."""

from selbench.hookspecs import hookimpl
from selbench.strategy import (
    NoParams,
    Selection,
    SelectionContext,
    Strategy,
)

__version__ = "0.1.0"

__all__ = ["NoParams", "Selection", "SelectionContext", "Strategy", "__version__", "hookimpl"]
