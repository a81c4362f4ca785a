"""The ``selbench`` command line: ``main`` and the commands that join it.

Each command parses its options and calls one function of the layers below; what it
prints is the only logic it keeps. :mod:`selbench.cli.common` holds what they share.
"""

from selbench.cli import data, methods, report, runs  # noqa: F401  (each module adds its commands)
from selbench.cli.common import main

__all__ = ["main"]
