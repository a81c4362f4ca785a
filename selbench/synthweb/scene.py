"""Scene vocabulary, scene sampling and rendering for SynthWeb.

A :class:`Scene` holds a background and 1-3 objects. Each part carries its semantic
attributes (shape, colour name, size, position name, texture), which are the ground
truth recorded on disk, and continuous render parameters (centre, radius, jittered RGB,
pattern phase, noise seed), which make every render distinct. Sampling is a pure function
of a numpy ``Generator``; rendering is a pure function of the scene and the image size.

Rendering composites antialiased object masks (drawn at 4x with PIL, box-downsampled)
over a background texture computed with numpy at the final resolution.
"""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "star",
    "cross",
    "ring",
    "crescent",
    "heart",
    "arrow",
)
"""Canonical shape names; the index is the label of the ``shape`` classification set."""

COLOURS: dict[str, RGB] = {
    "red": (220, 30, 35),
    "green": (30, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (245, 225, 30),
    "orange": (250, 135, 20),
    "purple": (135, 45, 185),
    "pink": (250, 135, 200),
    "cyan": (30, 215, 225),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "brown": (125, 75, 35),
    "gray": (128, 128, 128),
}
"""Canonical colour names and base RGB; the order gives the ``colour`` set's labels."""

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

SIZES: tuple[str, ...] = ("small", "large")
SIZE_FRACTION: dict[str, float] = {"small": 0.30, "large": 0.55}
"""Object diameter as a fraction of the image side."""

POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
POSITION_GRID: dict[str, tuple[int, int]] = {name: divmod(i, 3) for i, name in enumerate(POSITIONS)}
"""Position name -> (row, column) on a 3x3 grid; row 0 is the top, column 0 the left."""

TEXTURES: tuple[str, ...] = ("plain", "stripes", "checkerboard", "noise", "gradient")

OBJECT_COUNT_PROBS: tuple[float, float, float] = (0.6, 0.3, 0.1)
"""Probability of 1, 2 and 3 objects in pool, retrieval and target scenes."""

MIN_CONTRAST = 120.0
"""Minimum Euclidean RGB distance between an object's colour and its background colour."""

MARGIN = 0.06  # gap between an edge-placed object and the image border (fraction of side)
POSITION_JITTER = 0.02  # uniform jitter of object centres (fraction of side)
SIZE_JITTER = 0.05  # relative jitter of object diameters
COLOUR_JITTER = 10  # max per-channel jitter of object and background RGB
SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    """One object: semantic attributes plus render parameters (fractions of the side)."""

    shape: str
    colour: str
    size: str
    position: str
    cx: float
    cy: float
    radius: float
    rgb: RGB

    def semantic(self) -> dict[str, str]:
        """Ground-truth attributes of the object."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
        }


@dataclass(frozen=True)
class Background:
    """Background texture: semantic texture/colour plus pattern parameters."""

    texture: str
    colour: str
    rgb: RGB
    angle: float  # degrees, direction of stripes / gradient
    period: float  # pattern period as a fraction of the side
    phase: float  # pattern phase in [0, 1)
    noise_seed: int

    def semantic(self) -> dict[str, str]:
        """Ground-truth attributes of the background."""
        return {"texture": self.texture, "colour": self.colour}


@dataclass(frozen=True)
class Scene:
    """A background with 1-3 objects."""

    background: Background
    objects: tuple[SceneObject, ...]

    def to_dict(self) -> dict[str, Any]:
        """Ground-truth scene description as stored under ``synthweb.scene``."""
        return {
            "background": self.background.semantic(),
            "objects": [o.semantic() for o in self.objects],
        }

    def concepts(self) -> frozenset[tuple[str, str]]:
        """Set of (colour, shape) pairs in the scene."""
        return frozenset((o.colour, o.shape) for o in self.objects)


@dataclass(frozen=True)
class BlankImage:
    """A nearly blank image: flat colour, faint noise, maybe a tiny low-contrast blob."""

    rgb: RGB
    noise_seed: int
    blob: tuple[float, float, float, float] | None  # (cx, cy, radius, delta) or None


@dataclass(frozen=True)
class ConceptDistribution:
    """Sampling probabilities of shapes and colours (aligned with SHAPES / COLOUR_NAMES)."""

    shape_p: tuple[float, ...]
    colour_p: tuple[float, ...]


# --------------------------------------------------------------------------- concepts


def zipf_probabilities(order: np.ndarray, exponent: float) -> np.ndarray:
    """Zipf-like probabilities: the concept at rank i of ``order`` gets p ∝ 1/(i+1)^exponent."""
    weights = 1.0 / np.arange(1, len(order) + 1, dtype=np.float64) ** exponent
    probs = np.empty(len(order), dtype=np.float64)
    probs[np.asarray(order)] = weights / weights.sum()
    return probs


def uniform_concepts() -> ConceptDistribution:
    """Balanced shape and colour frequencies (eval and target sets)."""
    return ConceptDistribution(
        shape_p=tuple([1.0 / len(SHAPES)] * len(SHAPES)),
        colour_p=tuple([1.0 / len(COLOUR_NAMES)] * len(COLOUR_NAMES)),
    )


def zipf_concepts(rng: np.random.Generator, exponent: float) -> ConceptDistribution:
    """Long-tailed shape and colour frequencies over a random (seeded) concept order."""
    shape_p = zipf_probabilities(rng.permutation(len(SHAPES)), exponent)
    colour_p = zipf_probabilities(rng.permutation(len(COLOUR_NAMES)), exponent)
    return ConceptDistribution(tuple(shape_p.tolist()), tuple(colour_p.tolist()))


def colour_distance(a: RGB, b: RGB) -> float:
    """Euclidean distance between two RGB triples."""
    return math.dist(a, b)


@cache
def contrasting_backgrounds(object_colours: frozenset[str]) -> tuple[str, ...]:
    """Background colours that contrast with every colour in ``object_colours``."""
    return tuple(
        bg
        for bg in COLOUR_NAMES
        if all(colour_distance(COLOURS[bg], COLOURS[c]) >= MIN_CONTRAST for c in object_colours)
    )


def _positions_compatible(a: str, b: str) -> bool:
    """Two positions can hold objects without overlap: opposite on at least one axis."""
    (ra, ca), (rb, cb) = POSITION_GRID[a], POSITION_GRID[b]
    return {ra, rb} == {0, 2} or {ca, cb} == {0, 2}


@cache
def multi_object_layouts(k: int) -> tuple[tuple[str, ...], ...]:
    """All sets of ``k`` distinct positions whose objects cannot overlap."""
    candidates = [p for p in POSITIONS if p != "center"]
    return tuple(
        combo
        for combo in itertools.combinations(candidates, k)
        if all(_positions_compatible(a, b) for a, b in itertools.combinations(combo, 2))
    )


# --------------------------------------------------------------------------- sampling


def _jitter_rgb(rng: np.random.Generator, rgb: RGB, amount: int) -> RGB:
    delta = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + delta, 0, 255))  # type: ignore[return-value]


def object_centre(position: str, radius: float) -> tuple[float, float]:
    """Nominal centre (x, y) of an object of ``radius`` at a named position."""
    row, col = POSITION_GRID[position]
    coords = (MARGIN + radius, 0.5, 1.0 - MARGIN - radius)
    return coords[col], coords[row]


def make_object(
    rng: np.random.Generator, shape: str, colour: str, size: str, position: str
) -> SceneObject:
    """An object with jittered size, centre and colour around its semantic attributes."""
    diameter = SIZE_FRACTION[size] * (1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    radius = diameter / 2.0
    x, y = object_centre(position, radius)
    jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    return SceneObject(
        shape=shape,
        colour=colour,
        size=size,
        position=position,
        cx=float(x + jx),
        cy=float(y + jy),
        radius=float(radius),
        rgb=_jitter_rgb(rng, COLOURS[colour], COLOUR_JITTER),
    )


def make_background(rng: np.random.Generator, texture: str, colour: str) -> Background:
    """A background with random pattern parameters."""
    return Background(
        texture=texture,
        colour=colour,
        rgb=_jitter_rgb(rng, COLOURS[colour], COLOUR_JITTER),
        angle=float(rng.choice([0.0, 45.0, 90.0, 135.0])),
        period=float(rng.uniform(0.16, 0.32)),
        phase=float(rng.uniform(0.0, 1.0)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _sample_layout(rng: np.random.Generator, k: int) -> tuple[list[str], list[str]]:
    """Positions and sizes of ``k`` objects (at most one large object when k > 1)."""
    if k == 1:
        return [POSITIONS[int(rng.integers(len(POSITIONS)))]], [SIZES[int(rng.integers(2))]]
    layouts = multi_object_layouts(k)
    layout = layouts[int(rng.integers(len(layouts)))]
    positions = [layout[i] for i in rng.permutation(k)]
    large = int(rng.integers(k + 1))  # k means "no large object"
    sizes = ["large" if i == large else "small" for i in range(k)]
    return positions, sizes


def _sample_concepts(
    rng: np.random.Generator,
    dist: ConceptDistribution,
    k: int,
    shape: str | None,
    colour: str | None,
) -> tuple[list[tuple[str, str]], str]:
    """``k`` distinct (shape, colour) pairs and a contrasting background colour."""
    for _ in range(1000):
        pairs: list[tuple[str, str]] = []
        while len(pairs) < k:
            s = shape or SHAPES[int(rng.choice(len(SHAPES), p=dist.shape_p))]
            c = colour or COLOUR_NAMES[int(rng.choice(len(COLOUR_NAMES), p=dist.colour_p))]
            if (s, c) not in pairs:
                pairs.append((s, c))
        allowed = contrasting_backgrounds(frozenset(c for _, c in pairs))
        if allowed:
            return pairs, allowed[int(rng.integers(len(allowed)))]
    raise RuntimeError("could not sample a scene with a contrasting background")


def sample_scene(
    rng: np.random.Generator,
    dist: ConceptDistribution,
    n_objects: int | None = None,
    shape: str | None = None,
    colour: str | None = None,
) -> Scene:
    """Sample a scene; ``shape``/``colour`` force the attributes of a single-object scene."""
    if n_objects is None:
        n_objects = int(rng.choice(3, p=OBJECT_COUNT_PROBS)) + 1
    if (shape or colour) and n_objects != 1:
        raise ValueError("forcing a shape or colour requires n_objects=1")
    positions, sizes = _sample_layout(rng, n_objects)
    pairs, bg_colour = _sample_concepts(rng, dist, n_objects, shape, colour)
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    background = make_background(rng, texture, bg_colour)
    objects = tuple(
        make_object(rng, s, c, size, pos)
        for (s, c), size, pos in zip(pairs, sizes, positions, strict=True)
    )
    return Scene(background=background, objects=objects)


def jitter_scene(rng: np.random.Generator, scene: Scene, image_size: int) -> Scene:
    """A near-duplicate: shift by 1-2 pixels, jitter colours slightly, maybe re-phase the
    background pattern. The semantic content is unchanged."""
    while True:
        dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
        if dx or dy:
            break
    sx, sy = dx / image_size, dy / image_size
    objects = tuple(
        replace(o, cx=o.cx + sx, cy=o.cy + sy, rgb=_jitter_rgb(rng, o.rgb, 6))
        for o in scene.objects
    )
    bg = scene.background
    phase = bg.phase
    if rng.random() < 0.5:
        phase = float((phase + rng.uniform(0.2, 0.8)) % 1.0)
    background = replace(bg, rgb=_jitter_rgb(rng, bg.rgb, 6), phase=phase)
    return Scene(background=background, objects=objects)


def sample_blank(rng: np.random.Generator) -> BlankImage:
    """A low-information image: random flat colour, faint noise, maybe a faint tiny blob."""
    rgb = tuple(int(v) for v in rng.integers(20, 236, size=3))
    blob = None
    if rng.random() < 0.5:
        cx, cy = (float(v) for v in rng.uniform(0.2, 0.8, size=2))
        blob = (cx, cy, float(rng.uniform(0.03, 0.07)), float(rng.choice([-1.0, 1.0]) * 10.0))
    return BlankImage(rgb=rgb, noise_seed=int(rng.integers(0, 2**31 - 1)), blob=blob)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- rendering


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) as fractions of the side, shape (size, size)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(c, c, indexing="ij")
    xx.flags.writeable = False
    yy.flags.writeable = False
    return xx, yy


def _alternate_shade(rgb: np.ndarray) -> np.ndarray:
    """A second shade of the background colour for patterns: darker if light, else lighter."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if luminance > 110:
        return rgb * 0.72
    return rgb + (255.0 - rgb) * 0.25


def render_background(bg: Background, size: int) -> np.ndarray:
    """Background as a float32 array (size, size, 3) with values in [0, 255]."""
    xx, yy = _pixel_grid(size)
    base = np.asarray(bg.rgb, dtype=np.float32)
    alt = _alternate_shade(base)
    theta = math.radians(bg.angle)
    if bg.texture == "plain":
        weight = np.zeros((size, size), dtype=np.float32)
    elif bg.texture == "stripes":
        t = (xx * math.cos(theta) + yy * math.sin(theta)) / bg.period + bg.phase
        weight = (np.mod(t, 1.0) < 0.5).astype(np.float32)
    elif bg.texture == "checkerboard":
        cell = bg.period / 1.5
        weight = ((np.floor(xx / cell + bg.phase) + np.floor(yy / cell + bg.phase)) % 2).astype(
            np.float32
        )
    elif bg.texture == "gradient":
        t = xx * math.cos(theta) + yy * math.sin(theta)
        weight = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif bg.texture == "noise":
        noise = np.random.default_rng(bg.noise_seed).normal(0.0, 16.0, size=(size, size, 1))
        return np.clip(base + noise.astype(np.float32), 0.0, 255.0)
    else:
        raise ValueError(f"unknown texture {bg.texture!r}")
    w = weight[..., None]
    return base * (1.0 - w) + alt * w


def _regular_polygon(n: int, r_outer: float, r_inner: float | None, start: float) -> list:
    points = []
    steps = n * 2 if r_inner is not None else n
    for i in range(steps):
        r = r_outer if (r_inner is None or i % 2 == 0) else r_inner
        a = start + 2 * math.pi * i / steps
        points.append((r * math.cos(a), r * math.sin(a)))
    return points


def _heart() -> list:
    ts = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(ts) ** 3
    y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    x, y = x / 16.5, (y + 2.5) / 15.0
    return list(zip(x.tolist(), y.tolist(), strict=True))


_W = 0.33  # half-width of the cross arms
UNIT_POLYGONS: dict[str, list] = {
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "triangle": [(0.0, -1.0), (1.0, 0.78), (-1.0, 0.78)],
    "diamond": [(0.0, -1.0), (0.78, 0.0), (0.0, 1.0), (-0.78, 0.0)],
    "star": _regular_polygon(5, 1.05, 0.45, -math.pi / 2),
    "cross": [
        (-_W, -1),
        (_W, -1),
        (_W, -_W),
        (1, -_W),
        (1, _W),
        (_W, _W),
        (_W, 1),
        (-_W, 1),
        (-_W, _W),
        (-1, _W),
        (-1, -_W),
        (-_W, -_W),
    ],  # fmt: skip
    "heart": _heart(),
    "arrow": [(-1, -0.3), (0.1, -0.3), (0.1, -0.85), (1, 0), (0.1, 0.85), (0.1, 0.3), (-1, 0.3)],
}
"""Shapes drawn as polygons, in units of the object radius, y pointing down."""


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    """Draw ``shape`` (fill 255) centred at pixel (cx, cy) with radius r pixels."""

    def disc(x: float, y: float, rad: float, fill: int) -> None:
        draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=fill)

    if shape == "circle":
        disc(cx, cy, r, 255)
    elif shape == "ring":
        disc(cx, cy, r, 255)
        disc(cx, cy, r * 0.52, 0)
    elif shape == "crescent":
        disc(cx, cy, r, 255)
        disc(cx + 0.5 * r, cy - 0.2 * r, 0.82 * r, 0)
    else:
        draw.polygon([(cx + r * x, cy + r * y) for x, y in UNIT_POLYGONS[shape]], fill=255)


def object_mask(obj: SceneObject, size: int) -> np.ndarray:
    """Antialiased coverage of ``obj`` as float32 (size, size) in [0, 1]."""
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(mask), obj.shape, obj.cx * big, obj.cy * big, obj.radius * big)
    small = mask.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render_scene(scene: Scene, size: int) -> np.ndarray:
    """Render ``scene`` as a uint8 RGB array of shape (size, size, 3)."""
    image = render_background(scene.background, size)
    for obj in scene.objects:
        alpha = object_mask(obj, size)[..., None]
        image = image * (1.0 - alpha) + np.asarray(obj.rgb, dtype=np.float32) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_blank(blank: BlankImage, size: int) -> np.ndarray:
    """Render a low-information image as a uint8 RGB array of shape (size, size, 3)."""
    rng = np.random.default_rng(blank.noise_seed)
    image = np.asarray(blank.rgb, dtype=np.float32) + rng.normal(0.0, 1.5, size=(size, size, 1))
    if blank.blob is not None:
        bx, by, br, delta = blank.blob
        xx, yy = _pixel_grid(size)
        inside = ((xx - bx) ** 2 + (yy - by) ** 2 <= br**2).astype(np.float32)
        image = image + delta * inside[..., None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """Encode a uint8 RGB array as PNG bytes with fixed options (no metadata, deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
