"""SynthWeb: a procedurally rendered image-text pool with recorded web-data pathologies.

Public API::

    from selbench.synthweb import SynthWebConfig, generate_synthweb, PATHOLOGIES

See ``docs/synthweb.md`` for the concept vocabulary, pathologies and on-disk layout.
"""

from .captions import BOILERPLATE_FORMS, is_boilerplate
from .config import PATHOLOGIES, SynthWebConfig
from .generate import generate_synthweb
from .scene import COLOUR_NAMES, COLOURS, POSITIONS, SHAPES, SIZES, TEXTURES

__all__ = [
    "BOILERPLATE_FORMS",
    "COLOURS",
    "COLOUR_NAMES",
    "PATHOLOGIES",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SynthWebConfig",
    "TEXTURES",
    "generate_synthweb",
    "is_boilerplate",
]
