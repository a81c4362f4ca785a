"""Write a SynthWeb dataset: pool (img2dataset layout), eval sets and target split
(CLIP_benchmark webdataset layout), and a manifest.

Planning (scenes, captions, pathologies) is pure and separate from rendering and IO.
Every split draws from its own RNG stream ``np.random.default_rng([seed, split_id])``,
and eval/target images are additionally checked (png sha256) to be byte-distinct from
every pool image and from each other. Output bytes depend only on the config.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from selbench.fileutil import tar_member

from .captions import boilerplate_caption, distinct_captions, make_caption
from .config import CLEAN, PATHOLOGIES, SynthWebConfig
from .reasoning import write_reasoning_set
from .scene import (
    COLOUR_NAMES,
    POSITIONS,
    SHAPES,
    SIZES,
    BlankImage,
    Scene,
    encode_png,
    jitter_scene,
    render_blank,
    render_scene,
    sample_blank,
    sample_scene,
    uniform_concepts,
    zipf_concepts,
)
from .signs import TextSign, draw_sign, sample_sign, sign_rows

FORMAT_VERSION = 1
EVAL_SHARD_SIZE = 1000
GENERATOR = "selbench.synthweb"

SPLIT_IDS: dict[str, int] = {
    "pool": 0,
    "retrieval": 1,
    "shape": 2,
    "colour": 3,
    "target": 4,
    "concepts": 5,
    "pool_captions": 6,
    "pathology_assignment": 7,
    "pathology_details": 8,
    "reasoning-train": 9,
    "reasoning-test": 10,
}
"""Second element of the seed sequence of each independent RNG stream."""

EVAL_SETS: dict[str, str] = {
    "retrieval": "eval/retrieval",
    "shape": "eval/shape",
    "colour": "eval/colour",
}
REASONING_SET = ("reasoning-probe", "eval/reasoning")  # name, folder (NLVR2 layout)
# Bumped whenever the generator writes different bytes for the same config; part of the
# cached dataset's key (selbench.pools.synthweb_dir). 2: the two-image reasoning set; 3: its
# statements worded before their scenes are drawn.
GENERATOR_VERSION = 3
TARGET_DIR = "target"

CLASSIFICATION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": (
        "a {c}.",
        "a photo of a {c}.",
        "a drawing of a {c}.",
        "a {c} shape.",
        "an icon of a {c}.",
        "a picture of a {c}.",
    ),
    "colour": (
        "a {c} object.",
        "a photo of something {c}.",
        "a {c} shape.",
        "something coloured {c}.",
        "a {c} icon.",
        "a picture of a {c} thing.",
    ),
}

STATS_FIXED = {"duration": 0.0, "start_time": 0.0, "end_time": 0.0}

ProgressFn = Callable[[int, int], None]


def split_rng(seed: int, split: str) -> np.random.Generator:
    """Independent RNG stream for ``split``."""
    return np.random.default_rng([seed, SPLIT_IDS[split]])


def sample_key(index: int, shard_size: int) -> str:
    """img2dataset key of sample ``index``: 5-digit shard id + 4-digit index in the shard."""
    shard, offset = divmod(index, shard_size)
    return f"{shard:05d}{offset:04d}"


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def json_bytes(obj: Any) -> bytes:
    """Deterministic JSON encoding (sorted keys)."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------- pool planning


@dataclass(frozen=True)
class PoolSample:
    """A planned pool sample: what to render, its caption and its ground truth."""

    key: str
    pathology: str
    scene: Scene
    caption: str
    clean_caption: str
    blank: BlankImage | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    sign: TextSign | None = None
    image: tuple[str, bytes] | None = None  # (extension, bytes): a planted copy's own

    def render(self, size: int) -> np.ndarray:
        """The sample's image as a uint8 RGB array."""
        if self.blank is not None:
            return render_blank(self.blank, size)
        image = render_scene(self.scene, size)
        return image if self.sign is None else draw_sign(image, self.sign)

    def ground_truth(self) -> dict[str, Any]:
        """The ``synthweb`` ground-truth record of the sample."""
        return {
            "pathology": self.pathology,
            "scene": self.scene.to_dict(),
            "clean_caption": self.clean_caption,
            **self.extra,
        }


def assign_pathologies(rng: np.random.Generator, config: SynthWebConfig) -> list[str]:
    """Per-sample pathology labels with exact counts ``round(rate * n)``; rest "clean".

    Near-duplicates need an earlier clean original: if any precede the first clean
    sample, the earliest of them swaps labels with that clean sample.
    """
    n = config.n_samples
    counts = config.pathology_counts()
    labels = [CLEAN] * n
    order = rng.permutation(n)
    start = 0
    for name in PATHOLOGIES:
        for idx in order[start : start + counts[name]]:
            labels[int(idx)] = name
        start += counts[name]
    if counts["near_duplicate"]:
        first_clean = labels.index(CLEAN)
        early = [i for i in range(first_clean) if labels[i] == "near_duplicate"]
        if early:
            labels[early[0]], labels[first_clean] = CLEAN, "near_duplicate"
    return labels


def corrupt_scene(rng: np.random.Generator, scene: Scene) -> tuple[Scene, str, str]:
    """Change exactly one attribute of one object to a different value.

    Returns the corrupted scene, the attribute name and its new value.
    """
    k = int(rng.integers(len(scene.objects)))
    obj = scene.objects[k]
    others = [o for i, o in enumerate(scene.objects) if i != k]
    pairs = {(o.shape, o.colour) for o in others}
    options: dict[str, list[str]] = {
        "shape": [s for s in SHAPES if s != obj.shape and (s, obj.colour) not in pairs],
        "colour": [
            c
            for c in COLOUR_NAMES
            if c not in (obj.colour, scene.background.colour) and (obj.shape, c) not in pairs
        ],
        "size": [s for s in SIZES if s != obj.size],
        "position": [
            p for p in POSITIONS if p != obj.position and p not in {o.position for o in others}
        ],
    }
    attribute = ("shape", "colour", "size", "position")[int(rng.integers(4))]
    values = options[attribute]
    value = values[int(rng.integers(len(values)))]
    objects = list(scene.objects)
    # attribute is one of the four semantic fields, all str; the typed dict is what
    # dataclasses.replace accepts for a field named at run time.
    change: dict[str, Any] = {attribute: value}
    objects[k] = replace(obj, **change)
    return Scene(background=scene.background, objects=tuple(objects)), attribute, value


def partially_wrong_caption(
    rng: np.random.Generator, scene: Scene, clean_caption: str
) -> tuple[str, str, str]:
    """A caption of ``scene`` with one attribute of one object wrong (and named)."""
    wrong, attribute, value = corrupt_scene(rng, scene)
    force = (attribute,) if attribute in ("size", "position") else ()
    for _ in range(100):
        caption = make_caption(rng, wrong, force)
        if caption != clean_caption:
            return caption, attribute, value
    raise RuntimeError("could not sample a partially wrong caption")


def _pick_donor(
    rng: np.random.Generator, i: int, samples: Sequence[PoolSample], candidates: Sequence[int]
) -> int:
    """A random donor index != i, preferring donors whose (colour, shape) set differs."""
    mine = samples[i].scene.concepts()
    fallback = -1
    for _ in range(32):
        j = candidates[int(rng.integers(len(candidates)))]
        if j == i:
            continue
        fallback = j
        if samples[j].scene.concepts() != mine:
            return j
    if fallback >= 0:
        return fallback
    return next(j for j in candidates if j != i)


def _misalign(rng: np.random.Generator, samples: list[PoolSample], labels: Sequence[str]) -> None:
    """Give every misaligned sample the caption of another (preferably clean) sample."""
    misaligned = [i for i, lab in enumerate(labels) if lab == "misaligned"]
    if not misaligned:
        return
    clean = [i for i, lab in enumerate(labels) if lab == CLEAN]
    aligned = [i for i, lab in enumerate(labels) if lab != "misaligned"]
    candidates = clean if clean else aligned if aligned else list(range(len(samples)))
    for i in misaligned:
        j = _pick_donor(rng, i, samples, candidates)
        donor = samples[j]
        caption = donor.caption if labels[j] != "misaligned" else donor.clean_caption
        samples[i] = replace(samples[i], caption=caption, extra={"caption_from": donor.key})


def _text_in_image(
    rng: np.random.Generator, sample: PoolSample, dist: Any, size: int
) -> PoolSample:
    """The text-in-image pathology: the caption describes one object, printed as its colour
    and shape words on a sign over the sample's own scene, which holds no such object."""
    present = sample.scene.concepts()
    while True:
        written = sample_scene(rng, dist)
        obj = written.objects[0]
        if (obj.colour, obj.shape) not in present:
            break
    caption = make_caption(rng, Scene(background=written.background, objects=(obj,)))
    sign = sample_sign(rng, (obj.colour, obj.shape), size)
    extra = {"rendered_text": sign.text(), "sign_rows": list(sign_rows(sign, size))}
    return replace(sample, caption=caption, sign=sign, extra=extra)


def plan_pool(config: SynthWebConfig) -> list[PoolSample]:
    """Plan every pool sample (scene, caption, pathology, ground truth) without rendering."""
    n, size = config.n_samples, config.image_size
    keys = [sample_key(i, config.shard_size) for i in range(n)]
    dist = zipf_concepts(split_rng(config.seed, "concepts"), config.zipf_exponent)
    rng_scene = split_rng(config.seed, "pool")
    scenes = [sample_scene(rng_scene, dist) for _ in range(n)]
    rng_cap = split_rng(config.seed, "pool_captions")
    captions = [make_caption(rng_cap, s) for s in scenes]
    labels = assign_pathologies(split_rng(config.seed, "pathology_assignment"), config)
    rng = split_rng(config.seed, "pathology_details")

    samples: list[PoolSample] = []
    clean_so_far: list[int] = []
    for i, (key, label, scene, caption) in enumerate(
        zip(keys, labels, scenes, captions, strict=True)
    ):
        sample = PoolSample(key, label, scene, caption, caption)
        if label == CLEAN:
            clean_so_far.append(i)
        elif label == "near_duplicate":
            j = clean_so_far[int(rng.integers(len(clean_so_far)))]
            dup = jitter_scene(rng, scenes[j], size)
            paraphrase = make_caption(rng, dup)
            extra = {"duplicate_of": keys[j]}
            sample = PoolSample(key, label, dup, paraphrase, paraphrase, extra=extra)
        elif label == "partially_wrong":
            wrong, attribute, value = partially_wrong_caption(rng, scene, caption)
            extra = {"wrong_attribute": attribute, "wrong_value": value}
            sample = replace(sample, caption=wrong, extra=extra)
        elif label == "boilerplate":
            sample = replace(sample, caption=boilerplate_caption(rng))
        elif label == "low_information":
            sample = replace(sample, blank=sample_blank(rng))
        elif label == "text_in_image":
            sample = _text_in_image(rng, sample, dist, size)
        samples.append(sample)
    _misalign(rng, samples, labels)
    return samples


# --------------------------------------------------------------------------- tar writing


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """Write ``members`` (name, bytes) in the given order into a deterministic tar."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(tar_member(name, data), io.BytesIO(data))


def write_text(path: Path, text: str) -> None:
    """Write utf-8 text with Unix newlines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


class _Progress:
    """Counts written images and reports them to the user callback."""

    def __init__(self, total: int, callback: ProgressFn | None) -> None:
        self.done = 0
        self.total = total
        self.callback = callback

    def step(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)


# --------------------------------------------------------------------------- pool writing


def _pool_record(sample: PoolSample, png: bytes, digest: str, config: SynthWebConfig) -> dict:
    s = config.image_size
    return {
        "key": sample.key,
        "status": "success",
        "caption": sample.caption,
        "url": f"synthweb://{config.seed}/{sample.key}",
        "width": s,
        "height": s,
        "original_width": s,
        "original_height": s,
        "error_message": None,
        "sha256": digest,
        "synthweb": sample.ground_truth(),
    }


def write_pool(
    pool_dir: Path, samples: Sequence[PoolSample], config: SynthWebConfig, progress: _Progress
) -> set[str]:
    """Write the pool shards and stats; return the sha256 of every pool image."""
    pool_dir.mkdir(parents=True)
    hashes: set[str] = set()

    def members(chunk: Sequence[PoolSample]) -> Iterator[tuple[str, bytes]]:
        for sample in chunk:
            ext, png = sample.image or ("png", encode_png(sample.render(config.image_size)))
            digest = sha256_hex(png)
            hashes.add(digest)
            yield f"{sample.key}.{ext}", png
            yield f"{sample.key}.txt", sample.caption.encode("utf-8")
            yield f"{sample.key}.json", json_bytes(_pool_record(sample, png, digest, config))
            progress.step()

    for shard, start in enumerate(range(0, len(samples), config.shard_size)):
        chunk = samples[start : start + config.shard_size]
        write_tar(pool_dir / f"{shard:05d}.tar", members(chunk))
        n = len(chunk)
        stats = {
            "count": n,
            "successes": n,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            **STATS_FIXED,
            "status_dict": {"success": n},
        }
        stats_text = json.dumps(stats, indent=4, sort_keys=True)
        write_text(pool_dir / f"{shard:05d}_stats.json", stats_text)
    return hashes


# --------------------------------------------------------------------------- eval writing


EvalItem = tuple[str, dict[str, bytes]]  # (key, {extension: bytes})


def render_unique(
    sample_fn: Callable[[], Scene], size: int, seen: set[str], max_tries: int = 1000
) -> tuple[Scene, bytes, str]:
    """Sample and render scenes until the PNG is byte-distinct from ``seen``; record it."""
    for _ in range(max_tries):
        scene = sample_fn()
        png = encode_png(render_scene(scene, size))
        digest = sha256_hex(png)
        if digest not in seen:
            seen.add(digest)
            return scene, png, digest
    raise RuntimeError("could not render an image distinct from earlier splits")


def retrieval_items(
    config: SynthWebConfig, split: str, n: int, seen: set[str]
) -> Iterator[EvalItem]:
    """Clean, balanced multi-caption samples for a retrieval-style split."""
    rng = split_rng(config.seed, split)
    dist = uniform_concepts()
    for i in range(n):
        scene, png, digest = render_unique(lambda: sample_scene(rng, dist), config.image_size, seen)
        captions = distinct_captions(rng, scene, config.captions_per_retrieval_image)
        meta: dict[str, Any] = {"key": sample_key(i, EVAL_SHARD_SIZE), "sha256": digest}
        meta["synthweb"] = {"split": split, "scene": scene.to_dict(), "captions": captions}
        yield (
            meta["key"],
            {
                "png": png,
                "txt": "\n".join(captions).encode("utf-8"),
                "json": json_bytes(meta),
            },
        )


def classification_items(config: SynthWebConfig, split: str, seen: set[str]) -> Iterator[EvalItem]:
    """Single-object samples with balanced labels over shapes or colours."""
    classes = SHAPES if split == "shape" else COLOUR_NAMES
    rng = split_rng(config.seed, split)
    labels = np.arange(config.n_classification) % len(classes)
    rng.shuffle(labels)
    dist = uniform_concepts()
    for i, label in enumerate(labels.tolist()):
        forced = {split: classes[label]}

        def sample(forced: dict[str, str] = forced) -> Scene:
            return sample_scene(rng, dist, n_objects=1, **forced)

        scene, png, digest = render_unique(sample, config.image_size, seen)
        meta: dict[str, Any] = {"key": sample_key(i, EVAL_SHARD_SIZE), "sha256": digest}
        meta["synthweb"] = {
            "split": split,
            "scene": scene.to_dict(),
            "label": label,
            "classname": classes[label],
        }
        yield meta["key"], {"png": png, "cls": str(label).encode("ascii"), "json": json_bytes(meta)}


def write_wds_split(
    split_dir: Path, items: Iterable[EvalItem], n: int, progress: _Progress
) -> None:
    """Write items as CLIP_benchmark webdataset shards ``0.tar, 1.tar, ...`` + nshards.txt."""
    split_dir.mkdir(parents=True)
    iterator = iter(items)
    n_shards = max(1, -(-n // EVAL_SHARD_SIZE))

    def members(count: int) -> Iterator[tuple[str, bytes]]:
        for _ in range(count):
            key, files = next(iterator)
            for ext, data in files.items():
                yield f"{key}.{ext}", data
            progress.step()

    for shard in range(n_shards):
        count = min(EVAL_SHARD_SIZE, n - shard * EVAL_SHARD_SIZE)
        write_tar(split_dir / f"{shard}.tar", members(count))
    write_text(split_dir / "nshards.txt", f"{n_shards}\n")


def write_retrieval_set(
    root: Path, config: SynthWebConfig, split: str, n: int, seen: set[str], progress: _Progress
) -> None:
    """A retrieval set in CLIP_benchmark wds layout (split "test")."""
    write_text(root / "dataset_type.txt", "retrieval\n")
    write_wds_split(root / "test", retrieval_items(config, split, n, seen), n, progress)


def write_classification_set(
    root: Path, config: SynthWebConfig, split: str, seen: set[str], progress: _Progress
) -> None:
    """A zero-shot classification set in CLIP_benchmark wds layout (split "test")."""
    classes = SHAPES if split == "shape" else COLOUR_NAMES
    write_text(root / "dataset_type.txt", "classification\n")
    write_text(root / "classnames.txt", "".join(f"{c}\n" for c in classes))
    templates = "".join(f"{t}\n" for t in CLASSIFICATION_TEMPLATES[split])
    write_text(root / "zeroshot_classification_templates.txt", templates)
    items = classification_items(config, split, seen)
    write_wds_split(root / "test", items, config.n_classification, progress)


# --------------------------------------------------------------------------- top level


def build_manifest(config: SynthWebConfig, samples: Sequence[PoolSample]) -> dict[str, Any]:
    """The manifest.json content."""
    counts = {name: 0 for name in (*PATHOLOGIES, CLEAN)}
    for sample in samples:
        counts[sample.pathology] += 1
    return {
        "name": "synthweb",
        "format_version": FORMAT_VERSION,
        "config": config.model_dump(mode="json"),
        "counts": {"pool": len(samples), "pathologies": counts},
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "eval_sets": dict(EVAL_SETS) | (dict([REASONING_SET]) if config.n_reasoning_train else {}),
        "target": TARGET_DIR,
    }


def write_dataset(root: Path, config: SynthWebConfig, progress: ProgressFn | None = None) -> None:
    """Write every split and the manifest into the (existing, empty) directory ``root``."""
    tracker = _Progress(config.n_images_total(), progress)
    samples = plan_pool(config)
    if config.planted_eval_copies:  # eval sets as unplanted, then the pool with copies
        from .planted import plant_copies, unplanted_hashes

        write_eval_splits(root, config, unplanted_hashes(samples, config.image_size), tracker)
        write_pool(root / "pool", plant_copies(root, samples, config), config, tracker)
    else:
        seen = write_pool(root / "pool", samples, config, tracker)
        write_eval_splits(root, config, seen, tracker)
    manifest = json.dumps(build_manifest(config, samples), indent=2, sort_keys=True) + "\n"
    write_text(root / "manifest.json", manifest)


def write_eval_splits(
    root: Path, config: SynthWebConfig, seen: set[str], tracker: _Progress
) -> None:
    """The evaluation sets and the target split, each image distinct from ``seen``."""
    write_retrieval_set(
        root / EVAL_SETS["retrieval"], config, "retrieval", config.n_retrieval, seen, tracker
    )
    for split in ("shape", "colour"):
        write_classification_set(root / EVAL_SETS[split], config, split, seen, tracker)
    write_retrieval_set(root / TARGET_DIR, config, "target", config.n_target, seen, tracker)
    if config.n_reasoning_train:
        write_reasoning_set(
            root / REASONING_SET[1],
            lambda split: split_rng(config.seed, split),
            {"train": config.n_reasoning_train, "test": config.n_reasoning_test},
            lambda sample_fn: render_unique(sample_fn, config.image_size, seen),
            tracker.step,
        )


def generate_synthweb(
    out_dir: Path, config: SynthWebConfig, progress: ProgressFn | None = None
) -> Path:
    """Generate a SynthWeb dataset into ``out_dir`` atomically and return ``out_dir``.

    The dataset is built in the sibling directory ``.{name}.tmp-{pid}`` and renamed to
    ``out_dir`` at the end; on any exception the temporary directory is removed and
    ``out_dir`` is not created. ``progress(done, total)`` is called after each image is
    written, with ``total`` the number of images of all splits.

    Raises:
        FileExistsError: if ``out_dir`` already exists.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        raise FileExistsError(f"output directory already exists: {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_dataset(tmp, config, progress)
        if out_dir.exists() or out_dir.is_symlink():
            raise FileExistsError(f"output directory appeared while generating: {out_dir}")
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
