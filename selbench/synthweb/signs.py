"""Text rendered into SynthWeb images: the text-in-image pathology.

Much of LAION-style web data is images whose caption is written *in* the image (a
poster, a slide, a product label) while the visual content is something else; CLIP
learns to read, so CLIP-score filtering keeps such pairs (Maini et al., "T-MARS:
Improving Visual Representations by Circumventing Text Feature Learning", ICLR 2024,
Sec. 3: about 40% of LAION's images carry text that overlaps the caption, about 20%
carry text and nothing else the caption names). SynthWeb's analog: a light sign with the
caption's colour and shape words printed on it in dark ink, over a scene the caption does
not describe.

Text is drawn with Pillow's bundled scalable font (``ImageFont.load_default(size)``, no
file to download) at :data:`SUPERSAMPLE` times the image side and box-downsampled, like
the scene's objects, so every word renders to the same pixel pattern wherever it is
printed: a tiny CLIP can learn to "read" it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SUPERSAMPLE = 4
FONT_FRACTION = 0.22
"""Font size as a fraction of the image side (at 32 px: 7 px letters, and the longest
vocabulary word, "triangle", fits the width)."""
PAD_FRACTION = 0.04
"""Margin of the sign above and below its text, as a fraction of the side."""


@dataclass(frozen=True)
class TextSign:
    """A full-width light sign with dark text lines, centred, drawn over an image."""

    lines: tuple[str, ...]
    top: float  # top edge of the sign, fraction of the side
    paper: int  # grey level of the sign
    ink: int  # grey level of the text

    def text(self) -> str:
        """The rendered words, one space between lines."""
        return " ".join(self.lines)


@lru_cache(maxsize=8)
def _font(side: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # A FreeTypeFont wherever Pillow has FreeType; its bitmap font otherwise.
    return ImageFont.load_default(size=max(1, round(FONT_FRACTION * side)))


def _line_height(side: int) -> int:
    # Every line gets the height of the tallest glyph run, so a sign's height depends
    # only on its number of lines.
    box = _font(side).getbbox("bdfhklgjpqy")
    return int(box[3])  # whole pixels already: Pillow's stubs say float


def sign_height(n_lines: int, size: int) -> float:
    """Height of a sign of ``n_lines`` lines as a fraction of the image side ``size``."""
    side = size * SUPERSAMPLE
    pad = round(PAD_FRACTION * side)
    return (n_lines * _line_height(side) + 2 * pad) / side


def sample_sign(rng: np.random.Generator, lines: tuple[str, ...], size: int) -> TextSign:
    """A sign printing ``lines`` at a random height, with a light paper and dark ink."""
    top = float(rng.uniform(0.0, max(0.0, 1.0 - sign_height(len(lines), size))))
    return TextSign(
        lines=tuple(lines),
        top=top,
        paper=int(rng.integers(220, 256)),
        ink=int(rng.integers(0, 45)),
    )


def sign_rows(sign: TextSign, size: int) -> tuple[int, int]:
    """First and one-past-last pixel row the sign covers in a ``size`` image."""
    top = sign.top * size
    return int(np.floor(top)), min(
        size, int(np.ceil(top + sign_height(len(sign.lines), size) * size))
    )


def draw_sign(image: np.ndarray, sign: TextSign) -> np.ndarray:
    """``image`` (uint8 RGB, square) with ``sign`` drawn over it."""
    size = image.shape[0]
    side = size * SUPERSAMPLE
    font = _font(side)
    pad = round(PAD_FRACTION * side)
    line_h = _line_height(side)
    top = round(sign.top * side)
    height = len(sign.lines) * line_h + 2 * pad
    big = Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    paper = (sign.paper,) * 3
    draw.rectangle([0, top, side - 1, min(side - 1, top + height - 1)], fill=paper)
    y = top + pad
    for line in sign.lines:
        left, _, right, _ = draw.textbbox((0, 0), line, font=font)
        draw.text(((side - (right - left)) // 2 - left, y), line, font=font, fill=(sign.ink,) * 3)
        y += line_h
    return np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.uint8).copy()
