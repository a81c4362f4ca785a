"""SynthWeb's concept vocabulary as a metadata list (MetaCLIP-style curation).

SynthWeb's concepts are the (colour, shape) pairs of a scene's objects
(:meth:`~selbench.synthweb.scene.Scene.concepts`); shapes and colours are the attributes
drawn from the pool's long tail (``zipf_exponent``, ``docs/synthweb.md``). Sizes,
positions and background textures are drawn uniformly, so they are attributes, not
concepts, and are left out.
"""

from __future__ import annotations

from .captions import COLOUR_SYNONYMS, SHAPE_SYNONYMS
from .scene import COLOUR_NAMES, SHAPES


def _unique(words: list[str]) -> list[str]:
    return list(dict.fromkeys(words))


def concept_entries() -> list[str]:
    """SynthWeb's concept vocabulary as metadata entries, in a fixed order.

    Every surface form the caption grammar uses for a shape (``circle``, ``disc``, ...,
    ``SHAPE_SYNONYMS``), then every colour word (``COLOUR_NAMES`` and spelling variants,
    ``grey``), then every ``"colour shape"`` phrase of the two: the (colour, shape)
    concepts as captions write them, the counterpart of MetaCLIP's Wikipedia bigrams
    next to its unigrams (Xu et al., ICLR 2024, Sec. 3.1). 44 words and 403 phrases.
    """
    shapes = _unique([word for shape in SHAPES for word in SHAPE_SYNONYMS[shape]])
    colours = _unique([w for c in COLOUR_NAMES for w in COLOUR_SYNONYMS.get(c, (c,))])
    phrases = [f"{colour} {shape}" for colour in colours for shape in shapes]
    return shapes + colours + phrases
