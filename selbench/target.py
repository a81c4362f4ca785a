"""Target data for target-aware strategies (NDS, kNN-target) and the leakage check.

A target set is a CLIP_benchmark ``wds`` directory (``test/*.tar``, any task) or a folder
of images. Before a strategy sees it, the harness refuses a target that shares an image
with any evaluation set: selecting pool data near the *test* images would measure
leakage, not selection. Images are compared by a hash of their decoded RGB pixels, so a
re-encoded copy is caught too.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from selbench.configs import EvalSetConfig
from selbench.decoding import decode_image_bytes
from selbench.errors import ConfigError, PoolError
from selbench.fileutil import read_member


@dataclass
class TargetSet:
    """Decoded target images, where they came from and the result of the leakage check."""

    path: Path
    images: list[Image.Image]
    keys: list[str]
    checked_against: list[str]  # eval set names the overlap check covered


def pixel_hash(image: Image.Image) -> str:
    """sha256 of the RGB pixels and size (encoding-independent)."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.size}".encode())
    digest.update(np.asarray(rgb).tobytes())
    return digest.hexdigest()


def _wds_images(root: Path) -> Iterator[tuple[str, Image.Image]]:
    # Here, not at the top: selbench.pools needs pyarrow, and the toolbox imports this module.
    from selbench.pools.shards import IMAGE_EXTENSIONS

    shards = sorted((root / "test").glob("*.tar"))
    if not shards:
        raise PoolError(f"{root} has no test/*.tar shards (CLIP_benchmark wds layout)")
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    key, _, ext = Path(member.name).name.partition(".")
                    if member.isreg() and ext.lower() in IMAGE_EXTENSIONS:
                        data = read_member(tar, member)
                        yield f"{shard.stem}/{key}", decode_image_bytes(data)
        except (tarfile.TarError, OSError) as exc:
            raise PoolError(f"shard {shard} is corrupt or unreadable: {exc}") from exc


def _folder_images(root: Path) -> Iterator[tuple[str, Image.Image]]:
    from selbench.pools.shards import IMAGE_EXTENSIONS

    files = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise ConfigError(f"target folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    for path in files:
        try:
            yield str(path.relative_to(root)), decode_image_bytes(path.read_bytes())
        except Exception as exc:
            raise ConfigError(f"target image {path} cannot be read: {exc}") from None


def read_images(root: Path) -> Iterator[tuple[str, Image.Image]]:
    """Images of a wds directory or an image folder, in a fixed order."""
    if not root.is_dir():
        raise ConfigError(f"target {root} does not exist or is not a directory")
    if (root / "test").is_dir():
        return _wds_images(root)
    return _folder_images(root)


def eval_set_images(eval_set: EvalSetConfig) -> Iterator[tuple[str, Image.Image]]:
    """An eval set's images; for a reasoning set (NLVR2's layout), those of the split the
    probe is scored on (its train split only fits the probe's head)."""
    root = Path(eval_set.path)
    if eval_set.task != "reasoning":
        yield from read_images(root)
        return
    from selbench.probe import scored_split

    split = scored_split(root)
    for folder in (root / "images" / split, root / split):
        if folder.is_dir():
            for key, image in _folder_images(folder):
                yield f"{split}/{key}", image


def load_target(root: Path | str, eval_sets: Sequence[EvalSetConfig]) -> TargetSet:
    """Load a target set and refuse it if it shares any image with an eval set."""
    root = Path(root).expanduser()
    keys: list[str] = []
    images: list[Image.Image] = []
    hashes: dict[str, str] = {}  # pixel hash -> the first target key with it
    for key, image in read_images(root):
        keys.append(key)
        images.append(image)
        hashes.setdefault(pixel_hash(image), key)
    for eval_set in eval_sets:
        for key, image in eval_set_images(eval_set):
            clash = hashes.get(pixel_hash(image))
            if clash is not None:
                raise ConfigError(
                    f"target {root} overlaps eval set {eval_set.name!r}: target image {clash} "
                    f"equals its image {key}; a target must not contain evaluation images"
                )
    return TargetSet(root, images, keys, [e.name for e in eval_sets])
