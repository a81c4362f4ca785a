"""How far can retrieval on a SynthWeb eval set go knowing only some attributes?

Reads the ground-truth scenes of the retrieval set and, for a choice of object attributes
(colour only, shape only, colour and shape, every attribute), groups the images whose
objects carry the same attribute values. A model that reads exactly those attributes
perfectly cannot rank an image above the others of its group, so if every caption named
exactly those attributes its text->image R@1 could be at most the mean over images of
1 / (size of the image's group). The numbers bound what learning colour alone, or colour
and shape, can give on the set; real captions sometimes name more (size, position,
background), so they are a guide, not a proof.

    python benchmarks/synthweb_retrieval_ceiling.py                # the default pool
    python benchmarks/synthweb_retrieval_ceiling.py --pool DIR     # a SynthWeb directory
"""

from __future__ import annotations

import argparse
import json
import tarfile
from collections import Counter
from pathlib import Path

from selbench.pools import resolve_pool

SIGNATURES = {
    "colour": ("colour",),
    "shape": ("shape",),
    "colour + size + position": ("colour", "size", "position"),
    "colour + shape": ("colour", "shape"),
    "colour + shape + size + position": ("colour", "shape", "size", "position"),
}


def retrieval_scenes(eval_dir: Path) -> list[dict]:
    """Ground-truth scenes of a SynthWeb retrieval set, in shard order."""
    scenes = []
    for shard in sorted((eval_dir / "test").glob("*.tar"), key=lambda p: int(p.stem)):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    record = json.load(tar.extractfile(member))
                    scenes.append(record["synthweb"]["scene"])
    return scenes


def ceiling(scenes: list[dict], attributes: tuple[str, ...]) -> float:
    """Mean over images of 1 / (images sharing the objects' ``attributes``)."""

    def signature(scene: dict) -> tuple:
        return tuple(sorted(tuple(o[a] for a in attributes) for o in scene["objects"]))

    groups = Counter(signature(s) for s in scenes)
    return sum(1 / groups[signature(s)] for s in scenes) / len(scenes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="synthweb", help="a SynthWeb pool spec or directory")
    args = parser.parse_args()
    resolved = resolve_pool(args.pool)
    retrieval = [s for s in resolved.eval_sets if s.task == "retrieval"]
    if resolved.kind != "synthweb" or not retrieval:
        parser.error(f"pool {args.pool!r} is not SynthWeb with a retrieval set")
    scenes = retrieval_scenes(Path(retrieval[0].path))
    print(f"retrieval set {retrieval[0].path}: {len(scenes)} images")
    for name, attributes in SIGNATURES.items():
        print(f"  text->image R@1 ceiling knowing {name:34s} {ceiling(scenes, attributes):.3f}")


if __name__ == "__main__":
    main()
