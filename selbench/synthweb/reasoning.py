"""SynthWeb's two-image reasoning set, written in NLVR2's own layout.

NLVR2 (Suhr et al., ACL 2019) pairs two images with a statement that is true or false of
the pair ("the left image contains twice the number of dogs as the right image"). The seed
paper (TL;DR, Table 3) reports it for models pretrained on each subset. This module
writes the SynthWeb analogue: two clean scenes and a statement about them whose truth
follows from the scenes' ground truth, in the statement families

* ``count``: which image has more objects, or that both have as many;
* ``total``: how many objects the two images show together;
* ``colour`` / ``shape``: that the left image, the right image, both or neither show an
  object of a colour (a shape);
* ``object``: that one image shows a given colour-and-shape object;
* ``relation``: that in one image an object is left of / right of / above / below another.

Families and labels are balanced per split (:func:`balanced_plan`). Each example draws its
family and label, then the claim's wording, and only then pairs of scenes until the claim
has that truth value on one (:func:`draw_example`): the sentence alone does not tell the
label, so only the images can. The layout is
NLVR2's, so one loader (:mod:`selbench.probe`) reads both: ``train.json`` and ``test1.json``
(one JSON object per line: ``identifier``, ``sentence``, ``label`` "True"/"False",
``left_url``, ``right_url``, ``directory`` for train) and the images under
``images/<split>/[<directory>/]<split>-<set>-<pair>-img0.png`` / ``-img1.png``. Each line
also carries ``synthweb`` ground truth (family, both scenes), which NLVR2's readers ignore.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from selbench.synthweb.captions import _pick, relation, with_article
from selbench.synthweb.scene import (
    COLOUR_NAMES,
    SHAPES,
    Scene,
    uniform_concepts,
)

FAMILIES: tuple[str, ...] = ("count", "total", "colour", "shape", "object", "relation")
SIDES = ("the left image", "the right image")
SPLITS = {"train": "train", "test": "test1"}  # SynthWeb split -> NLVR2 file name
RELATIONS = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}

Statement = tuple[str, bool]
# A claim is drawn before the scenes; its judge reads a pair of scenes and returns the
# sentence and its truth there, or None where the claim cannot be made of that pair.
Judge = Callable[[np.random.Generator, Scene, Scene], "Statement | None"]


def _count(rng: np.random.Generator) -> Judge:
    kind = int(rng.integers(3))

    def judge(rng: np.random.Generator, left: Scene, right: Scene) -> Statement:
        n_left, n_right = len(left.objects), len(right.objects)
        if kind == 0:
            return "the left image shows more objects than the right image", n_left > n_right
        if kind == 1:
            return "the right image shows more objects than the left image", n_right > n_left
        return "both images show the same number of objects", n_left == n_right

    return judge


def _total(rng: np.random.Generator) -> Judge:
    claimed = int(rng.integers(2, 7))  # two scenes of 1-3 objects: 2 to 6 in all

    def judge(rng: np.random.Generator, left: Scene, right: Scene) -> Statement:
        total = len(left.objects) + len(right.objects)
        return f"there are {claimed} objects in the two images together", claimed == total

    return judge


def _has(scene: Scene, attribute: str, value: str) -> bool:
    return any(getattr(o, attribute) == value for o in scene.objects)


def _attribute(attribute: str, vocabulary: tuple[str, ...]) -> Callable[..., Judge]:
    def claim(rng: np.random.Generator) -> Judge:
        value, kind = _pick(rng, vocabulary), int(rng.integers(4))
        thing = with_article(f"{value} object" if attribute == "colour" else value)

        def judge(rng: np.random.Generator, left: Scene, right: Scene) -> Statement:
            in_left, in_right = _has(left, attribute, value), _has(right, attribute, value)
            if kind < 2:
                return f"{SIDES[kind]} shows {thing}", (in_left, in_right)[kind]
            if kind == 2:
                return f"both images show {thing}", in_left and in_right
            return f"neither image shows {thing}", not (in_left or in_right)

        return judge

    return claim


def _object(rng: np.random.Generator) -> Judge:
    side, colour, shape = int(rng.integers(2)), _pick(rng, COLOUR_NAMES), _pick(rng, SHAPES)

    def judge(rng: np.random.Generator, left: Scene, right: Scene) -> Statement:
        scene = (left, right)[side]
        truth = any(o.colour == colour and o.shape == shape for o in scene.objects)
        return f"{SIDES[side]} shows {with_article(f'{colour} {shape}')}", truth

    return judge


def _relation(rng: np.random.Generator) -> Judge:
    side, said = int(rng.integers(2)), _pick(rng, tuple(RELATIONS))

    def judge(rng: np.random.Generator, left: Scene, right: Scene) -> Statement | None:
        scene = (left, right)[side]
        if len(scene.objects) < 2:
            return None
        i, j = rng.choice(len(scene.objects), size=2, replace=False)
        a, b = scene.objects[int(i)], scene.objects[int(j)]
        sentence = (
            f"in {SIDES[side]}, {with_article(f'{a.colour} {a.shape}')} is {said} "
            f"{with_article(f'{b.colour} {b.shape}')}"
        )
        return sentence, said in relation(a, b)

    return judge


CLAIMS: dict[str, Callable[[np.random.Generator], Judge]] = {
    "count": _count,
    "total": _total,
    "colour": _attribute("colour", COLOUR_NAMES),
    "shape": _attribute("shape", SHAPES),
    "object": _object,
    "relation": _relation,
}


def draw_example(
    rng: np.random.Generator,
    family: str,
    label: bool,
    new_scene: Callable[[], Scene],
    max_tries: int = 100_000,
) -> tuple[Scene, Scene, str]:
    """Two scenes and a ``family`` statement about them that is ``label``; returns (left,
    right, sentence).

    The claim (its wording: which side, which colour, shape, count or relation) is drawn
    first, and only then pairs of scenes until the claim has the wanted truth value on
    one. So the wording is independent of the label: a reader of the sentence alone,
    without the images, is at chance (a claim that is rarely true, such as "both images
    show a red object", just takes more scene pairs; sampling a scene costs microseconds).
    """
    judge = CLAIMS[family](rng)
    for _ in range(max_tries):
        left, right = new_scene(), new_scene()
        made = judge(rng, left, right)
        if made is not None and made[1] == label:
            return left, right, made[0]
    raise RuntimeError(f"no {label} {family} pair in {max_tries} tries")  # pragma: no cover


def balanced_plan(rng: np.random.Generator, n: int) -> list[tuple[str, bool]]:
    """``n`` (family, label) pairs: families and, within each family, labels as balanced
    as ``n`` allows (counts differ by at most one), in a seeded random order. So neither
    the family nor the label tells the other, and chance is 50%."""
    cycle = [(family, label) for label in (True, False) for family in FAMILIES]
    plan = [cycle[i % len(cycle)] for i in range(n)]
    order = rng.permutation(n)
    return [plan[i] for i in order]


def _always(scene: Scene) -> Callable[[], Scene]:
    """A ``sample_fn`` for ``render`` that gives the scene already drawn."""
    return lambda: scene


def write_reasoning_set(
    root: Path,
    seed_rng: Callable[[str], np.random.Generator],
    sizes: dict[str, int],
    render: Callable[[Callable[[], Scene]], tuple[Scene, bytes, str]],
    step: Callable[[], None],
) -> None:
    """Write the set under ``root`` in NLVR2's layout (module docstring).

    ``seed_rng(split)`` gives each split its RNG stream, ``sizes`` the number of statements
    per SynthWeb split (``train``, ``test``), ``render(sample_fn)`` samples and renders a
    scene distinct from every image written before (so no pool or eval image recurs) and
    ``step()`` advances the progress count once per image.
    """
    from selbench.synthweb.scene import sample_scene

    (root / "dataset_type.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_type.txt").write_text("reasoning\n")
    dist = uniform_concepts()
    for split, n in sizes.items():
        name = SPLITS[split]
        rng = seed_rng(f"reasoning-{split}")
        lines = []
        for index, (family, label) in enumerate(balanced_plan(rng, n)):

            def new_scene(rng: np.random.Generator = rng) -> Scene:
                return sample_scene(rng, dist)

            left, right, sentence = draw_example(rng, family, label, new_scene)
            # Rendered only once chosen; ``render`` keeps every image distinct from all
            # written before (pool and eval sets included).
            pngs = [render(_always(scene))[1] for scene in (left, right)]
            prefix = f"{name}-{index}-0"
            directory = str(index // 1000) if name == "train" else None
            folder = root / "images" / name / (directory or "")
            folder.mkdir(parents=True, exist_ok=True)
            for side, png in enumerate(pngs):
                (folder / f"{prefix}-img{side}.png").write_bytes(png)
                step()
            record = {
                "identifier": f"{prefix}-0",
                "sentence": sentence,
                "label": "True" if label else "False",
                "left_url": f"synthweb://reasoning/{prefix}-img0.png",
                "right_url": f"synthweb://reasoning/{prefix}-img1.png",
                "synthweb": {
                    "family": family,
                    "left": left.to_dict(),
                    "right": right.to_dict(),
                },
            }
            if directory is not None:
                record["directory"] = directory
            lines.append(json.dumps(record, sort_keys=True))
        (root / f"{name}.json").write_text("\n".join(lines) + "\n")
