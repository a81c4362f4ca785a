"""Evaluation images planted in the pool: the contamination a web pool has.

Web pools hold copies of evaluation images (COCO's images are in LAION), re-encoded,
resized and recoloured by the sites that reposted them. With
``planted_eval_copies: N`` SynthWeb reproduces that: N pool samples become perturbed
copies of evaluation images (drawn from the retrieval and classification sets), so the
pool-eval decontamination of a run (:mod:`selbench.decontaminate`) is measured against a
known answer. Each copy:

* is resized to a side of 28-64 pixels (bicubic; the renders are 32);
* has each colour channel shifted by -4..4 levels (of 255);
* is re-encoded as a JPEG of quality 85-95 (``.jpg`` in the shard), as web copies are.

No crop: on a 32-pixel render a crop of one pixel is a 3% translation, as large as the
jitter between two independent renders of one scene, and no detector measured here told
such copies from the pool's own look-alikes (docs/decontamination.md has the numbers).

A copy replaces a clean pool sample that no other sample points at (no near-duplicate
re-renders it, no misaligned sample took its caption), and is captioned like a clean
sample of the evaluation image's scene (a retrieval image: one of its reference captions),
so the pair is a plausible web pair. Its ground truth (``synthweb`` in the sample's json)
is the evaluation image's scene, ``pathology: clean``, and ``planted_eval_copy``: the set,
the evaluation image's key and the perturbation applied.

The evaluation sets are those of the same config with ``planted_eval_copies: 0``
(they are drawn before the copies are planted), and the other pool samples are unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .captions import make_caption
from .config import CLEAN, SynthWebConfig
from .scene import Background, Scene, SceneObject, encode_png

#: The sets copies are drawn from (their folders under the dataset root).
PLANTED_FROM = {"retrieval": "eval/retrieval", "shape": "eval/shape", "colour": "eval/colour"}
#: The second element of the planting's own RNG stream (selbench.synthweb.generate.SPLIT_IDS
#: stops at 10).
PLANTED_SPLIT_ID = 11
SIDE_RANGE = (28, 64)  # side of the copy after resizing, inclusive
MAX_SHIFT = 4  # per-channel colour shift, levels of 255
QUALITY_RANGE = (85, 95)  # JPEG quality, inclusive
GROUND_TRUTH_FIELD = "planted_eval_copy"


def eval_images(root: Path) -> list[tuple[str, str, bytes, dict[str, Any]]]:
    """``(set, key, png bytes, synthweb meta)`` of every image the copies are drawn from,
    in set then shard order."""
    found = []
    for name, folder in PLANTED_FROM.items():
        for shard in sorted((root / folder / "test").glob("*.tar"), key=lambda p: int(p.stem)):
            members: dict[str, dict[str, bytes]] = {}
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    key, _, ext = member.name.partition(".")
                    handle = tar.extractfile(member)
                    if handle is not None:
                        members.setdefault(key, {})[ext] = handle.read()
            for key, parts in members.items():
                meta = json.loads(parts["json"])["synthweb"]
                found.append((name, key, parts["png"], meta))
    return found


def perturb(png: bytes, rng: np.random.Generator) -> tuple[bytes, dict[str, Any]]:
    """A web copy of an image: resized, colour-shifted, re-encoded as JPEG. Returns the
    JPEG bytes and what was done."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    side = int(rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1))
    image = image.resize((side, side), Image.Resampling.BICUBIC)
    shift = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=3)
    pixels = np.clip(np.asarray(image, dtype=np.int16) + shift, 0, 255).astype(np.uint8)
    quality = int(rng.integers(QUALITY_RANGE[0], QUALITY_RANGE[1] + 1))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    done = {
        "side": side,
        "shift": [int(v) for v in shift],
        "jpeg_quality": quality,
    }
    return buffer.getvalue(), done


def _scene(meta: dict[str, Any]) -> Scene:
    """A scene with the semantic attributes of a ground-truth record (render parameters
    zero): what the caption grammar reads."""
    bg = meta["background"]
    background = Background(bg["texture"], bg["colour"], (0, 0, 0), 0.0, 0.0, 0.0, 0)
    objects = tuple(
        SceneObject(o["shape"], o["colour"], o["size"], o["position"], 0.0, 0.0, 0.0, (0, 0, 0))
        for o in meta["objects"]
    )
    return Scene(background=background, objects=objects)


def unplanted_hashes(samples: Sequence[Any], size: int) -> set[str]:
    """The png sha256 of every pool image as the unplanted pool has them (what
    :func:`selbench.synthweb.generate.write_pool` returns for it)."""
    return {hashlib.sha256(encode_png(s.render(size))).hexdigest() for s in samples}


def free_clean_slots(samples: Sequence[Any]) -> list[int]:
    """Positions of clean pool samples no other sample points at (as a near-duplicate's
    original or a misaligned sample's caption donor)."""
    pointed: set[str] = set()
    for sample in samples:
        pointed.update(
            sample.extra[k] for k in ("duplicate_of", "caption_from") if k in sample.extra
        )
    return [i for i, s in enumerate(samples) if s.pathology == CLEAN and s.key not in pointed]


def plant_copies(root: Path, samples: list[Any], config: SynthWebConfig) -> list[Any]:
    """``samples`` with ``config.planted_eval_copies`` of them replaced by perturbed copies
    of evaluation images read from ``root`` (written already). Each copy carries its
    encoded image in ``image``."""
    count = config.planted_eval_copies
    rng = np.random.default_rng([config.seed, PLANTED_SPLIT_ID])
    sources = eval_images(root)
    slots = free_clean_slots(samples)
    if count > min(len(sources), len(slots)):
        raise ValueError(
            f"planted_eval_copies={count} needs as many evaluation images ({len(sources)}) "
            f"and free clean pool samples ({len(slots)}); lower it"
        )
    chosen = rng.choice(len(sources), size=count, replace=False)
    where = np.sort(rng.choice(len(slots), size=count, replace=False))
    planted = list(samples)
    for source, slot in zip(chosen.tolist(), where.tolist(), strict=True):
        name, key, png, meta = sources[source]
        jpeg, done = perturb(png, rng)
        scene = _scene(meta["scene"])
        captions = meta.get("captions")
        caption = captions[int(rng.integers(len(captions)))] if captions else None
        caption = caption or make_caption(rng, scene)
        index = slots[slot]
        record = {"set": name, "key": key, **done}
        planted[index] = replace(
            samples[index],
            scene=scene,
            caption=caption,
            clean_caption=caption,
            extra={GROUND_TRUTH_FIELD: record},
            image=("jpg", jpeg),
        )
    return planted


def planted_uids(truth: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """The planted copies among a pool's ground truth: ``{uid: planted record}``."""
    return {
        uid: record[GROUND_TRUTH_FIELD]
        for uid, record in truth.items()
        if GROUND_TRUTH_FIELD in record
    }
