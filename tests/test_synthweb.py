"""Tests of the SynthWeb generator: layout, ground truth, determinism, atomicity."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from selbench.synthweb import PATHOLOGIES, SynthWebConfig, generate_synthweb, is_boilerplate
from selbench.synthweb import generate as generate_module
from selbench.synthweb.captions import (
    COLOUR_SYNONYMS,
    POSITION_PHRASES,
    SHAPE_SYNONYMS,
    SIZE_SYNONYMS,
    make_caption,
)
from selbench.synthweb.scene import (
    COLOUR_NAMES,
    COLOURS,
    SHAPES,
    colour_distance,
    sample_scene,
    uniform_concepts,
    zipf_probabilities,
)

SMALL = dict(
    n_samples=200, n_retrieval=50, n_classification=40, n_target=30, shard_size=64,
    n_reasoning_train=24, n_reasoning_test=12,
)  # fmt: skip
POOL_JSON_FIELDS = {
    "key",
    "status",
    "caption",
    "url",
    "width",
    "height",
    "original_width",
    "original_height",
    "error_message",
    "sha256",
    "synthweb",
}


def small_config(**overrides) -> SynthWebConfig:
    return SynthWebConfig(**{**SMALL, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_synthweb(tmp_path_factory.mktemp("sw") / "synthweb", small_config())


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def group_samples(members: list[tuple[str, bytes]]) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for name, data in members:
        key, ext = name.split(".", 1)
        samples.setdefault(key, {})[ext] = data
    return samples


def pool_samples(root: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted((root / "pool").glob("*.tar")):
        out.update(group_samples(read_tar(shard)))
    return out


def pool_records(root: Path) -> dict[str, dict]:
    return {k: json.loads(v["json"]) for k, v in pool_samples(root).items()}


def split_samples(split_dir: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted((split_dir / "test").glob("*.tar")):
        out.update(group_samples(read_tar(shard)))
    return out


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def names_any(caption: str, words) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", caption) for w in words)


def names_object(caption: str, obj: dict) -> bool:
    colours = COLOUR_SYNONYMS.get(obj["colour"], (obj["colour"],))
    return names_any(caption, colours) and names_any(caption, SHAPE_SYNONYMS[obj["shape"]])


# --------------------------------------------------------------------------- determinism


def test_same_seed_is_byte_identical(dataset: Path, tmp_path: Path) -> None:
    again = generate_synthweb(tmp_path / "again", small_config())
    assert file_hashes(dataset) == file_hashes(again)


def test_different_seed_changes_pool(dataset: Path, tmp_path: Path) -> None:
    other = generate_synthweb(tmp_path / "other", small_config(seed=1))
    a, b = file_hashes(dataset), file_hashes(other)
    assert a["pool/00000.tar"] != b["pool/00000.tar"]
    assert a["eval/retrieval/test/0.tar"] != b["eval/retrieval/test/0.tar"]


# --------------------------------------------------------------------------- layout


def test_top_level_layout_and_manifest(dataset: Path) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["name"] == "synthweb"
    assert manifest["format_version"] == 1
    assert manifest["generator"] == "selbench.synthweb"
    assert manifest["config"] == small_config().model_dump(mode="json")
    assert manifest["eval_sets"] == {
        "retrieval": "eval/retrieval",
        "shape": "eval/shape",
        "colour": "eval/colour",
        "reasoning-probe": "eval/reasoning",
    }
    assert manifest["target"] == "target"
    assert manifest["counts"]["pool"] == 200
    for rel in [*manifest["eval_sets"].values(), manifest["target"]]:
        if rel == "eval/reasoning":  # NLVR2's layout, tests/test_probe.py
            assert (dataset / rel / "train.json").is_file()
            continue
        assert (dataset / rel / "test" / "nshards.txt").is_file()
    assert not list(dataset.parent.glob(".*tmp-*"))


def test_pool_follows_img2dataset_layout(dataset: Path) -> None:
    pool = dataset / "pool"
    n_shards = -(-200 // 64)
    expected = {f"{i:05d}.tar" for i in range(n_shards)}
    expected |= {f"{i:05d}_stats.json" for i in range(n_shards)}
    assert {p.name for p in pool.iterdir()} == expected
    for shard in range(n_shards):
        members = read_tar(pool / f"{shard:05d}.tar")
        samples = group_samples(members)
        n = min(64, 200 - shard * 64)
        assert list(samples) == [f"{shard:05d}{i:04d}" for i in range(n)]
        stats = json.loads((pool / f"{shard:05d}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == n
        assert stats["status_dict"] == {"success": n}
        assert stats["failed_to_download"] == stats["failed_to_resize"] == 0
        for key, files in samples.items():
            assert set(files) == {"png", "txt", "json"}
            meta = json.loads(files["json"])
            assert POOL_JSON_FIELDS <= set(meta)
            assert meta["key"] == key
            assert meta["status"] == "success"
            assert meta["error_message"] is None
            assert meta["url"] == f"synthweb://0/{key}"
            assert meta["width"] == meta["height"] == meta["original_width"] == 32
            assert meta["sha256"] == hashlib.sha256(files["png"]).hexdigest()
            caption = files["txt"].decode("utf-8")
            assert caption == meta["caption"] and not caption.endswith("\n")
            image = Image.open(io.BytesIO(files["png"]))
            assert image.size == (32, 32) and image.mode == "RGB"


def test_tar_members_have_fixed_metadata(dataset: Path) -> None:
    for shard in [dataset / "pool" / "00000.tar", dataset / "eval" / "shape" / "test" / "0.tar"]:
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


# --------------------------------------------------------------------------- ground truth


def test_pathology_counts_match_rates_and_manifest(dataset: Path) -> None:
    config = small_config()
    counts = Counter(r["synthweb"]["pathology"] for r in pool_records(dataset).values())
    manifest = json.loads((dataset / "manifest.json").read_text())
    for name in PATHOLOGIES:
        assert counts[name] == round(getattr(config, f"rate_{name}") * config.n_samples)
    assert dict(counts) == {k: v for k, v in manifest["counts"]["pathologies"].items() if v}
    assert sum(manifest["counts"]["pathologies"].values()) == config.n_samples


def test_clean_captions_name_every_object(dataset: Path) -> None:
    for record in pool_records(dataset).values():
        truth = record["synthweb"]
        assert {"pathology", "scene", "clean_caption"} <= set(truth)
        assert 1 <= len(truth["scene"]["objects"]) <= 3
        for obj in truth["scene"]["objects"]:
            assert names_object(truth["clean_caption"], obj), (truth["clean_caption"], obj)
            assert obj["colour"] != truth["scene"]["background"]["colour"]
        if truth["pathology"] == "clean":
            assert record["caption"] == truth["clean_caption"]


def test_misaligned_caption_comes_from_named_sample(dataset: Path) -> None:
    records = pool_records(dataset)
    misaligned = [r for r in records.values() if r["synthweb"]["pathology"] == "misaligned"]
    assert misaligned
    for record in misaligned:
        donor = records[record["synthweb"]["caption_from"]]
        assert donor["key"] != record["key"]
        assert record["caption"] == donor["caption"]


def test_near_duplicates_point_to_earlier_clean_originals(dataset: Path) -> None:
    records = pool_records(dataset)
    dups = [r for r in records.values() if r["synthweb"]["pathology"] == "near_duplicate"]
    assert dups
    for record in dups:
        original = records[record["synthweb"]["duplicate_of"]]
        assert original["synthweb"]["pathology"] == "clean"
        assert original["key"] < record["key"]
        assert original["synthweb"]["scene"] == record["synthweb"]["scene"]
        assert original["sha256"] != record["sha256"]
        assert record["caption"] == record["synthweb"]["clean_caption"]


def test_partially_wrong_captions_name_the_wrong_value(dataset: Path) -> None:
    phrases = {
        "shape": SHAPE_SYNONYMS,
        "colour": {c: COLOUR_SYNONYMS.get(c, (c,)) for c in COLOUR_NAMES},
        "size": SIZE_SYNONYMS,
        "position": POSITION_PHRASES,
    }
    records = pool_records(dataset).values()
    wrong = [r for r in records if r["synthweb"]["pathology"] == "partially_wrong"]
    assert wrong
    for record in wrong:
        truth = record["synthweb"]
        assert record["caption"] != truth["clean_caption"]
        attribute, value = truth["wrong_attribute"], truth["wrong_value"]
        assert attribute in phrases
        assert names_any(record["caption"], phrases[attribute][value]), record["caption"]
        if len(truth["scene"]["objects"]) == 1:
            assert truth["scene"]["objects"][0][attribute] != value


def test_boilerplate_and_low_information(dataset: Path) -> None:
    samples = pool_samples(dataset)
    stds = {}
    for key, files in samples.items():
        meta = json.loads(files["json"])
        pathology = meta["synthweb"]["pathology"]
        pixels = np.asarray(Image.open(io.BytesIO(files["png"])), dtype=np.float32)
        stds[key] = float(pixels.std(axis=(0, 1)).max())
        if pathology == "boilerplate":
            assert is_boilerplate(meta["caption"]), meta["caption"]
            assert set(meta["synthweb"]) == {"pathology", "scene", "clean_caption"}
        else:
            assert not is_boilerplate(meta["caption"])
        if pathology == "low_information":
            assert stds[key] < 6.0
            assert meta["caption"] == meta["synthweb"]["clean_caption"]
        elif pathology == "clean":
            assert stds[key] > 10.0


def test_text_in_image_captions_match_only_the_printed_words() -> None:
    config = small_config(rate_text_in_image=0.2)
    samples = generate_module.plan_pool(config)
    text = [s for s in samples if s.pathology == "text_in_image"]
    assert len(text) == 40
    for sample in text:
        colour, shape = sample.extra["rendered_text"].split(" ")
        assert sample.sign is not None and sample.sign.lines == (colour, shape)
        assert names_object(sample.caption, {"colour": colour, "shape": shape})
        assert (colour, shape) not in sample.scene.concepts()  # the scene holds no such object
        assert sample.clean_caption != sample.caption
        top, bottom = sample.extra["sign_rows"]
        image = sample.render(config.image_size)
        scene_only = replace(sample, sign=None).render(config.image_size)
        assert (image[top:bottom] != scene_only[top:bottom]).any()
        untouched = np.r_[0:top, bottom : config.image_size]
        assert (image[untouched] == scene_only[untouched]).all()


def test_turning_text_in_image_on_leaves_the_other_pathologies_where_they_were() -> None:
    before = generate_module.plan_pool(small_config())
    after = generate_module.plan_pool(small_config(rate_text_in_image=0.1))
    moved = [(a.pathology, b.pathology) for a, b in zip(before, after, strict=True)
             if a.pathology != b.pathology]  # fmt: skip
    assert len(moved) == 20 and all(new == "text_in_image" for _, new in moved)
    assert {old for old, _ in moved} == {"clean"}


# --------------------------------------------------------------------------- eval sets


def test_clip_benchmark_loads_classification_sets(dataset: Path) -> None:
    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    for name, classes in (("shape", SHAPES), ("colour", COLOUR_NAMES)):
        ds = builder.build_dataset(
            f"wds/{name}",
            root=str(dataset / "eval" / name),
            transform=None,
            split="test",
            download=False,
            task="zeroshot_classification",
        )
        assert list(ds.classes) == list(classes)
        assert len(ds.templates) >= 4 and all("{c}" in t for t in ds.templates)
        labels = []
        for image, label in ds:
            assert isinstance(image, Image.Image) and image.size == (32, 32)
            labels.append(int(label))
        assert len(labels) == 40
        assert set(labels) <= set(range(len(ds.classes)))
        counts = Counter(labels)
        assert max(counts.values()) - min(counts.values()) <= 1
        assert len(counts) == len(classes)


def test_clip_benchmark_loads_retrieval_sets(dataset: Path) -> None:
    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    for rel, n in (("eval/retrieval", 50), ("target", 30)):
        ds = builder.build_dataset(
            "wds/retrieval",
            root=str(dataset / rel),
            transform=None,
            split="test",
            download=False,
            task="zeroshot_retrieval",
        )
        items = list(ds)
        assert len(items) == n
        for image, captions in items:
            assert isinstance(image, Image.Image)
            assert len(captions) == 2 and len(set(captions)) == 2


def test_eval_sample_metadata(dataset: Path) -> None:
    for key, files in split_samples(dataset / "eval" / "shape").items():
        meta = json.loads(files["json"])
        assert meta["key"] == key
        objects = meta["synthweb"]["scene"]["objects"]
        assert len(objects) == 1
        assert int(files["cls"]) == SHAPES.index(objects[0]["shape"])
    for files in split_samples(dataset / "eval" / "retrieval").values():
        scene = json.loads(files["json"])["synthweb"]["scene"]
        for caption in files["txt"].decode().split("\n"):
            assert all(names_object(caption, o) for o in scene["objects"]), caption


def test_eval_and_target_images_are_disjoint_from_pool(dataset: Path) -> None:
    pool = {hashlib.sha256(f["png"]).hexdigest() for f in pool_samples(dataset).values()}
    seen = set(pool)
    for rel in ("eval/retrieval", "eval/shape", "eval/colour", "target"):
        hashes = [
            hashlib.sha256(f["png"]).hexdigest() for f in split_samples(dataset / rel).values()
        ]
        assert not seen & set(hashes)
        assert len(set(hashes)) == len(hashes)
        seen |= set(hashes)


# --------------------------------------------------------------------------- config


def test_rates_above_one_are_rejected_naming_fields() -> None:
    with pytest.raises(ValidationError) as info:
        SynthWebConfig(rate_misaligned=0.6, rate_partially_wrong=0.5)
    message = str(info.value)
    assert "rate_misaligned" in message and "rate_partially_wrong" in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate_boilerplate": 1.5},
        {"rate_misaligned": -0.1},
        {"n_samples": 0},
        {"image_size": 8},
        {"not_a_field": 1},
    ],
)
def test_invalid_configs(kwargs) -> None:
    with pytest.raises(ValidationError):
        SynthWebConfig(**kwargs)


def test_every_field_is_described() -> None:
    for name, info in SynthWebConfig.model_fields.items():
        assert info.description, name


# --------------------------------------------------------------------------- atomicity


def test_existing_output_dir_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(FileExistsError):
        generate_synthweb(out, small_config())


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    calls = {"n": 0}
    original = generate_module.encode_png

    def flaky(image):
        calls["n"] += 1
        if calls["n"] > 250:  # after the pool, inside the eval sets
            raise RuntimeError("boom")
        return original(image)

    monkeypatch.setattr(generate_module, "encode_png", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        generate_synthweb(tmp_path / "out", small_config())
    assert list(tmp_path.iterdir()) == []


def test_progress_reports_every_image(tmp_path: Path) -> None:
    config = small_config(n_samples=20, n_retrieval=3, n_classification=4, n_target=2)
    seen: list[tuple[int, int]] = []
    generate_synthweb(tmp_path / "p", config, progress=lambda d, t: seen.append((d, t)))
    total = 20 + 3 + 2 * 4 + 2 + 2 * (24 + 12)  # two images per reasoning statement
    assert seen == [(i, total) for i in range(1, total + 1)]


# --------------------------------------------------------------------------- pure parts


def test_zipf_probabilities_follow_the_permuted_order() -> None:
    order = np.array([2, 0, 1])
    p = zipf_probabilities(order, 1.0)
    assert np.isclose(p.sum(), 1.0)
    assert p[2] > p[0] > p[1]
    assert np.allclose(zipf_probabilities(order, 0.0), 1 / 3)


def test_pool_concepts_are_long_tailed(dataset: Path) -> None:
    shapes = Counter(
        o["shape"]
        for r in pool_records(dataset).values()
        for o in r["synthweb"]["scene"]["objects"]
    )
    ranked = sorted(shapes.values(), reverse=True)
    assert ranked[0] > 4 * ranked[-1]


def test_grammar_always_names_colour_and_shape() -> None:
    rng = np.random.default_rng(0)
    dist = uniform_concepts()
    lengths = set()
    for _ in range(300):
        scene = sample_scene(rng, dist)
        caption = make_caption(rng, scene)
        lengths.add(len(caption.split()))
        for obj in scene.to_dict()["objects"]:
            assert names_object(caption, obj), caption
        for obj in scene.objects:
            assert colour_distance(COLOURS[obj.colour], COLOURS[scene.background.colour]) > 100
    assert len(lengths) > 8
