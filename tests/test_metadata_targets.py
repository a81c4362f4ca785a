"""Target-aware strategies on DataComp's metadata alone (``kind: datacomp-metadata``): the
pool YAML's ``features_model`` names the model that computed the shipped features, which
embeds the target's images into their space; the pool's rows still come from the npz
files, so its cache entry and clip_score's selection do not change (docs/real-data.md)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from e2e_helpers import write_shard
from PIL import Image
from test_metadata_pool import invoke, last_run, select, write_metadata_folder
from test_real_pools import datacomp_uid

from selbench.embedders import EmbeddingService
from selbench.errors import ConfigError
from selbench.pools import resolve_pool
from selbench.registry import get_registry
from selbench.train import build_model

PARTS = (70, 50)  # rows of the two parquet/npz pairs
ARCH = "selbench-tiny"  # stands in for OpenAI's ViT-L/14: random weights, saved locally


def _png(rng: np.random.Generator, size: int = 32) -> bytes:
    """A noisy image around a random colour: distinct embeddings even from a random model."""
    base = rng.integers(0, 256, 3)
    pixels = np.clip(base + rng.integers(-60, 61, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_folder(root: Path, rng: np.random.Generator, count: int) -> Path:
    root.mkdir(parents=True)
    for i in range(count):
        (root / f"{i:03d}.png").write_bytes(_png(rng))
    return root


def _yaml(path: Path, lines: list[str], eval_dir: Path) -> Path:
    lines = [*lines, f"eval: [{{name: probe, task: retrieval, path: {eval_dir}}}]"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A shards pool and its metadata twin, whose npz ``l14_*`` features are the shards
    pool's embedding-cache rows by a tiny open_clip model saved to a local file; a target
    folder and an eval folder of other images; the pool YAMLs."""
    root = tmp_path_factory.mktemp("metadata-targets")
    rng = np.random.default_rng(7)
    model, _, _ = build_model(ARCH, seed=11)
    weights = root / "openai-stand-in.pt"
    torch.save(model.state_dict(), weights)
    spec = f"open_clip:{ARCH}:{weights}"
    first = 0
    for shard, rows in enumerate(PARTS):  # shard order = the metadata's file order
        samples = [
            (f"{shard:08d}{i:04d}", _png(rng), f"caption {i}",
             {"uid": datacomp_uid(i), "caption": f"caption {i}"})
            for i in range(first, first + rows)
        ]  # fmt: skip
        write_shard(root / "shards" / f"{shard:08d}.tar", samples)
        first += rows
    target = _image_folder(root / "target", rng, 6)
    eval_dir = _image_folder(root / "eval", rng, 2)
    twin = _yaml(
        root / "twin.yaml",
        ["name: commonpool-twin", "kind: shards", f"path: {root / 'shards'}"],
        eval_dir,
    )
    metadata = root / "metadata"
    uids = write_metadata_folder(metadata, parts=PARTS)
    with pytest.MonkeyPatch.context() as patch:  # the cache of this fixture's own
        patch.setenv("SELBENCH_HOME", str(root / "home"))
        pool = resolve_pool(str(twin)).pool
        assert list(pool.uids) == uids
        service = EmbeddingService(pool.strategy_view(), "cpu", get_registry().make_embedder)
        found = service.embeddings(spec)
        image, text = np.array(found.image), np.array(found.text)
    first = 0
    for parquet, rows in zip(sorted(metadata.glob("*.parquet")), PARTS, strict=True):
        npz = parquet.with_suffix(".npz")
        with np.load(npz) as arrays:
            features = dict(arrays)
        features["l14_img"], features["l14_txt"] = (
            image[first : first + rows],
            text[first : first + rows],
        )
        np.savez(npz, **features)
        first += rows
    head = ["name: commonpool-metadata", "kind: datacomp-metadata", f"path: {metadata}"]
    return {
        "spec": spec,
        "uids": uids,
        "target": target,
        "metadata": metadata,
        "twin": twin,
        "plain": _yaml(root / "plain.yaml", head, eval_dir),
        "with_model": _yaml(root / "with-model.yaml", [*head, f"features_model: {spec}"], eval_dir),
    }


@pytest.fixture
def on(world, tiny_scale):
    """The world, with the tiny training scale a run is given (only its selection runs)."""
    return {**world, "scale": tiny_scale}


def _select(on, pool_yaml: Path, method: str, *params: str, target=True, clean=True):
    """Select on ``pool_yaml`` (with the target unless told); ``clean=False`` skips the
    shards pool's default decontamination, which would train a proxy to compare images."""
    extra = [arg for p in params for arg in ("-p", p)] + (
        ["--target", str(on["target"])] if target else []
    )
    extra += [] if clean else ["--no-decontaminate"]
    select(pool_yaml, on["scale"], method, *extra)
    return last_run(method)


@pytest.mark.parametrize(
    ("method", "twin_params"), [("knn_target", ()), ("normsim", ("temperature=0.01",))]
)
def test_target_aware_strategies_select_on_metadata_as_on_the_shards_twin(on, method, twin_params):
    """The metadata pool (``reference``: DataComp's L/14 features; the target through
    ``features_model``) selects what the shards pool embedded by that model selects.
    normsim's prefilter takes the features' temperature on the metadata pool (OpenAI's
    0.01, not the model's), so the twin is given that one."""
    ran = _select(on, on["with_model"], method)
    twin = _select(on, on["twin"], method, f"embedder={on['spec']}", *twin_params, clean=False)
    count = round(0.25 * len(on["uids"]))
    for run in (ran, twin):
        assert run.info.status == "SCHEDULED", method
        assert run.data.metrics["subset_size"] == count
    assert ran.data.params["selection_sha256"] == twin.data.params["selection_sha256"]
    assert ran.data.params["embeddings.reference.resolved_to"].startswith("datacomp:l14:")
    assert ran.data.params["target.model.reference"].startswith(on["spec"])
    assert ran.data.params["target.size"] == "6"
    if method == "normsim":
        assert ran.data.metrics["strategy/temperature"] == pytest.approx(0.01)


def test_image_based_and_vas_run_on_metadata_with_the_features_model(on):
    count = round(0.25 * len(on["uids"]))
    for method in ("image_based", "vas"):
        run = _select(on, on["with_model"], method)
        assert run.info.status == "SCHEDULED", method
        assert run.data.metrics["subset_size"] == count, method


def test_without_features_model_a_target_aware_strategy_is_refused_naming_the_key(on):
    for method, named in (("normsim", "'normsim'"), ("clip_score(keep=0.5) >> knn_target", "")):
        result = invoke(
            "run", "--pool", str(on["plain"]), "--method", method, "--budget", "0.25",
            "--scale", str(on["scale"]), "--stage", "select", "--target", str(on["target"]),
        )  # fmt: skip
        assert result.exit_code != 0
        said = " ".join(result.output.split())
        assert f"strategy {named or repr('knn_target')}" in said, said
        assert "pool 'commonpool-metadata'" in said and "features_model: open_clip:" in said
    # Reached without the run's check (a strategy's own call), the embedder says the same.
    pool = resolve_pool(str(on["plain"])).pool
    service = EmbeddingService(pool.strategy_view(), "cpu", get_registry().make_embedder)
    with pytest.raises(ConfigError, match="commonpool-metadata.*features_model: open_clip:"):
        service.embed_images(f"datacomp:l14:{on['metadata']}", [Image.new("RGB", (32, 32))])


def test_a_features_model_of_another_width_is_refused(on, tmp_path):
    """Features of 16 dimensions (test_metadata_pool's random ones) cannot come from a
    model that embeds in 128: the pool names the wrong checkpoint, and is told so."""
    from test_metadata_pool import DIM

    metadata = tmp_path / "metadata"
    write_metadata_folder(metadata)
    pool_yaml = _yaml(
        tmp_path / "wrong.yaml",
        ["name: wrong", "kind: datacomp-metadata", f"path: {metadata}",
         f"features_model: {{l14: {on['spec']}}}"],
        tmp_path,
    )  # fmt: skip
    pool = resolve_pool(str(pool_yaml)).pool
    assert pool.features_models == {"l14": on["spec"]}
    service = EmbeddingService(pool.strategy_view(), "cpu", get_registry().make_embedder)
    with pytest.raises(ConfigError, match=f"embeds images in 128 dimensions.*have {DIM}"):
        service.embed_images("reference", [Image.new("RGB", (32, 32))])


def test_features_model_leaves_the_pool_cache_entry_and_clip_score_alone(on):
    plain = _select(on, on["plain"], "clip_score", target=False)
    with_model = _select(on, on["with_model"], "clip_score", target=False)
    for key in ("selection_sha256", "embeddings.reference.entry_id"):
        assert plain.data.params[key] == with_model.data.params[key], key
    assert "embeddings.reference.embedder_id" in with_model.data.params
    assert not [k for k in with_model.data.params if k.startswith("target.model")]


def test_features_model_belongs_to_a_metadata_pool(on, tmp_path):
    pool_yaml = _yaml(
        tmp_path / "shards.yaml",
        ["name: s", "kind: shards", "path: /data/shards", f"features_model: {on['spec']}"],
        tmp_path,
    )
    with pytest.raises(ConfigError, match="'features_model'.*kind: shards pool"):
        resolve_pool(str(pool_yaml))
    from selbench.pools import MetadataPool

    with pytest.raises(ConfigError, match="maps a feature set .*got 'h14'"):
        MetadataPool(on["metadata"], "m", features_model={"h14": on["spec"]})
    with pytest.raises(ConfigError, match="'reference' names no model"):
        MetadataPool(on["metadata"], "m", features_model="reference")
