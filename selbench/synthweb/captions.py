"""Caption grammar for SynthWeb: alt-text-like captions with paraphrases.

A caption is produced by one of several templates (bare, descriptive, photographic, stock,
existential, list, relational) filled with synonyms. Size, position and background are
optional details included at random, so captions vary in length. Every caption of a clean
sample names the colour and shape of every object, so image-text pairs are learnable.

``force`` asks for extra attributes ("size", "position") to be named for every object;
the partially-wrong pathology uses it so that the corrupted attribute appears in the text.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

import numpy as np

from .scene import POSITION_GRID, Scene, SceneObject

SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape", "dot"),
    "square": ("square", "box", "square shape"),
    "triangle": ("triangle", "triangle shape", "triangular shape"),
    "diamond": ("diamond", "rhombus", "diamond shape"),
    "star": ("star", "star shape", "five-pointed star"),
    "cross": ("cross", "plus sign", "plus shape"),
    "ring": ("ring", "hollow circle", "donut shape"),
    "crescent": ("crescent", "crescent moon", "moon shape"),
    "heart": ("heart", "heart shape", "love heart"),
    "arrow": ("arrow", "arrow sign", "right arrow"),
}
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {"gray": ("gray", "grey")}
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left", "in the upper left corner"),
    "top": ("at the top", "near the top", "at the top of the image"),
    "top right": ("in the top right corner", "at the top right", "in the upper right corner"),
    "left": ("on the left", "on the left side", "at the left"),
    "center": ("in the center", "in the middle", "in the centre"),
    "right": ("on the right", "on the right side", "at the right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left corner"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
    "bottom right": (
        "in the bottom right corner",
        "at the bottom right",
        "in the lower right corner",
    ),
}
TEXTURE_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "solid", ""),
    "stripes": ("striped", "stripy"),
    "checkerboard": ("checkered", "checkerboard", "chequered"),
    "noise": ("noisy", "grainy", "speckled"),
    "gradient": ("gradient", "shaded"),
}
PHOTO_PREFIXES = (
    "photo of",
    "a photo of",
    "a photograph of",
    "close-up photo of",
    "picture of",
    "an image of",
)
STOCK_FORMS = (
    "{x} icon, vector illustration",
    "{x} icon isolated on {bgc} background",
    "{x} clipart",
    "{x} symbol, flat design",
    "{x} sticker, high resolution",
    "{x} logo template",
)
EXIST_FORMS = ("there is {x}", "{x}", "this image shows {x}", "{x} in this picture")

BOILERPLATE_FORMS: tuple[str, ...] = (
    "image",
    "click to enlarge",
    "stock photo",
    "untitled",
    "IMG_{d4}.JPG",
    "DSC_{d4}.jpg",
    "view larger image",
    "product photo",
    "thumbnail",
    "no description available",
    "picture",
    "download",
    "photo {n} of {m}",
    "image may contain: text",
    "placeholder image",
    "screenshot",
)
"""Web boilerplate captions; ``{d4}`` is four random digits, ``{n} of {m}`` a gallery index."""

_BOILERPLATE_RE = re.compile(
    "^(?:"
    + "|".join(
        re.escape(f)
        .replace(r"\{d4\}", r"\d{4}")
        .replace(r"\{n\}", r"\d+")
        .replace(r"\{m\}", r"\d+")
        for f in BOILERPLATE_FORMS
    )
    + ")$"
)

CAPTION_ATTRIBUTES = ("size", "position")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _canonical_or_synonym(rng: np.random.Generator, options: Sequence[str], p: float) -> str:
    """The first (canonical) option with probability ``p``, else a uniform pick."""
    return options[0] if rng.random() < p else _pick(rng, options)


def with_article(phrase: str) -> str:
    """Prefix "a" or "an" depending on the first letter of ``phrase``."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def colour_word(rng: np.random.Generator, colour: str) -> str:
    """A colour's canonical name, or an accepted spelling variant (gray/grey)."""
    return _pick(rng, COLOUR_SYNONYMS.get(colour, (colour,)))


def shape_word(rng: np.random.Generator, shape: str) -> str:
    """A shape's canonical name most of the time, else a synonym."""
    return _canonical_or_synonym(rng, SHAPE_SYNONYMS[shape], 0.55)


def bare_phrase(rng: np.random.Generator, obj: SceneObject, size: bool = False) -> str:
    """ "[size] colour shape" without an article."""
    words = [_pick(rng, SIZE_SYNONYMS[obj.size])] if size else []
    words += [colour_word(rng, obj.colour), shape_word(rng, obj.shape)]
    return " ".join(words)


def object_phrase(
    rng: np.random.Generator,
    obj: SceneObject,
    force: Collection[str],
    p_detail: float,
    position: bool = True,
) -> str:
    """ "a [size] colour shape [position]"; details appear if forced or with prob ``p_detail``."""
    size = "size" in force or rng.random() < p_detail
    pos = "position" in force or (position and rng.random() < p_detail)
    phrase = with_article(bare_phrase(rng, obj, size=size))
    if pos:
        phrase += " " + _pick(rng, POSITION_PHRASES[obj.position])
    return phrase


def join_list(items: Sequence[str]) -> str:
    """ "x", "x and y", "x, y and z"."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def background_phrase(rng: np.random.Generator, scene: Scene) -> str:
    """ "on a striped blue background" and variants."""
    bg = scene.background
    adjective = _pick(rng, TEXTURE_ADJECTIVES[bg.texture])
    words = " ".join(w for w in (adjective, colour_word(rng, bg.colour)) if w)
    lead = _pick(rng, ("on", "against"))
    return f"{lead} {with_article(words)} background"


def _maybe_background(rng: np.random.Generator, scene: Scene, p: float) -> str:
    return " " + background_phrase(rng, scene) if rng.random() < p else ""


def _shuffled(rng: np.random.Generator, scene: Scene) -> list[SceneObject]:
    return [scene.objects[i] for i in rng.permutation(len(scene.objects))]


# --------------------------------------------------------------------------- templates


def t_bare(rng: np.random.Generator, scene: Scene, force: Collection[str]) -> str:
    """ "red circle", "red circle and blue square"."""
    return join_list([bare_phrase(rng, o) for o in _shuffled(rng, scene)])


def t_descriptive(rng: np.random.Generator, scene: Scene, force: Collection[str]) -> str:
    """ "a small red circle in the top left corner on a striped blue background"."""
    phrases = [object_phrase(rng, o, force, 0.6) for o in _shuffled(rng, scene)]
    return join_list(phrases) + _maybe_background(rng, scene, 0.6)


def t_photo(rng: np.random.Generator, scene: Scene, force: Collection[str]) -> str:
    """ "photo of a large green star"."""
    phrases = [object_phrase(rng, o, force, 0.3) for o in _shuffled(rng, scene)]
    return f"{_pick(rng, PHOTO_PREFIXES)} {join_list(phrases)}" + _maybe_background(rng, scene, 0.3)


def t_stock(rng: np.random.Generator, scene: Scene, force: Collection[str]) -> str:
    """ "red circle icon, vector illustration"."""
    x = join_list([bare_phrase(rng, o) for o in _shuffled(rng, scene)])
    form = _pick(rng, STOCK_FORMS)
    return form.format(x=x, bgc=colour_word(rng, scene.background.colour))


def t_exist(rng: np.random.Generator, scene: Scene, force: Collection[str]) -> str:
    """ "there is a red circle in the middle"."""
    phrases = [object_phrase(rng, o, force, 0.4) for o in _shuffled(rng, scene)]
    x = join_list(phrases) + _maybe_background(rng, scene, 0.4)
    return _pick(rng, EXIST_FORMS).format(x=x)


def t_list(rng: np.random.Generator, scene: Scene, force: Collection[str]) -> str:
    """ "a red circle, a green star and a blue cross" (terse list, details rare)."""
    phrases = [object_phrase(rng, o, force, 0.15) for o in _shuffled(rng, scene)]
    return join_list(phrases)


def relation(a: SceneObject, b: SceneObject) -> list[str]:
    """Spatial relations that hold from ``a`` to ``b`` ("to the left of", "above", ...)."""
    (ra, ca), (rb, cb) = POSITION_GRID[a.position], POSITION_GRID[b.position]
    out = []
    if ca < cb:
        out.append("to the left of")
    if ca > cb:
        out.append("to the right of")
    if ra < rb:
        out.append("above")
    if ra > rb:
        out.append("below")
    return out


def t_relational(rng: np.random.Generator, scene: Scene, force: Collection[str]) -> str:
    """ "a blue square to the left of a yellow triangle" (multi-object scenes only)."""
    objs = _shuffled(rng, scene)
    a, b, rest = objs[0], objs[1], objs[2:]
    rels = relation(a, b)
    text = (
        f"{object_phrase(rng, a, force, 0.3, position=False)} {_pick(rng, rels)} "
        f"{object_phrase(rng, b, force, 0.3, position=False)}"
    )
    for o in rest:
        text += f", and {object_phrase(rng, o, force, 0.5)}"
    return text + _maybe_background(rng, scene, 0.3)


TEMPLATES = {
    "bare": t_bare,
    "descriptive": t_descriptive,
    "photo": t_photo,
    "stock": t_stock,
    "exist": t_exist,
    "list": t_list,
    "relational": t_relational,
}
DETAIL_TEMPLATES = ("descriptive", "photo", "exist", "list")
"""Templates that can name every forced attribute (size, absolute position) of every object."""


def templates_for(scene: Scene, force: Collection[str]) -> tuple[str, ...]:
    """Template names usable for ``scene`` given the forced attributes."""
    if force:
        return DETAIL_TEMPLATES
    names = ["bare", "descriptive", "photo", "stock", "exist", "list"]
    if len(scene.objects) > 1:
        names.append("relational")
    return tuple(names)


def make_caption(rng: np.random.Generator, scene: Scene, force: Collection[str] = ()) -> str:
    """Sample a caption for ``scene`` from the grammar."""
    unknown = set(force) - set(CAPTION_ATTRIBUTES)
    if unknown:
        raise ValueError(f"cannot force attributes {sorted(unknown)}")
    name = _pick(rng, templates_for(scene, force))
    return TEMPLATES[name](rng, scene, force)


def distinct_captions(
    rng: np.random.Generator, scene: Scene, n: int, max_tries: int = 1000
) -> list[str]:
    """``n`` distinct captions of ``scene``, in the order they were first sampled."""
    out: list[str] = []
    for _ in range(max_tries):
        caption = make_caption(rng, scene)
        if caption not in out:
            out.append(caption)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not sample {n} distinct captions in {max_tries} tries")


def boilerplate_caption(rng: np.random.Generator) -> str:
    """A random web-boilerplate caption, with random digits where the form has them."""
    form = _pick(rng, BOILERPLATE_FORMS)
    m = int(rng.integers(2, 30))
    return form.format(d4=f"{int(rng.integers(0, 10_000)):04d}", n=int(rng.integers(1, m + 1)), m=m)


def is_boilerplate(caption: str) -> bool:
    """Whether ``caption`` is one of the boilerplate forms (digits filled in)."""
    return _BOILERPLATE_RE.match(caption) is not None
