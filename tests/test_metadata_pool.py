"""DataComp's metadata alone as a pool (``kind: datacomp-metadata``): selection from its
uids, captions and shipped features, no images; the uid file for DataComp's resharder;
refusals that name the strategy, the pool and the fix (docs/real-data.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from e2e_helpers import logged_runs, png_bytes, write_shard
from test_real_pools import datacomp_uid

from selbench.errors import PoolError
from selbench.pools import MetadataPool, resolve_pool
from selbench.pools.metadata import ArrowStrings

DIM = 16
PARTS = (140, 100)  # rows of the two parquet/npz pairs


def write_metadata_folder(root: Path, parts=PARTS, seed: int = 0) -> list[str]:
    """A DataComp-layout metadata folder: ``NAME.parquet`` (uid, url, text, similarity
    scores) + ``NAME.npz`` (``b32_*``, ``l14_*``: random unit-norm fp16 rows), rows
    aligned. Returns the uids in file order."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    uids, first = [], 0
    for n, rows in enumerate(parts):
        ids = range(first, first + rows)
        first += rows
        part = [datacomp_uid(i) for i in ids]
        features = {}
        for model in ("b32", "l14"):
            for kind in ("img", "txt"):
                x = rng.standard_normal((rows, DIM)).astype(np.float32)
                features[f"{model}_{kind}"] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(
                    np.float16
                )
        scores = {
            f"clip_{m}_similarity_score": (
                features[f"{m}_img"].astype(np.float32) * features[f"{m}_txt"].astype(np.float32)
            ).sum(1)
            for m in ("b32", "l14")
        }
        frame = pd.DataFrame(
            {
                "uid": part,
                "url": [f"http://example.com/{i}.jpg" for i in ids],
                "text": [f"caption {i}" for i in ids],
                **scores,
            }
        )
        name = f"{n:032x}"  # DataComp names each pair by a content hash
        frame.to_parquet(root / f"{name}.parquet")
        np.savez(root / f"{name}.npz", **features)
        uids += part
    return uids


def write_pool_yaml(tmp_path: Path, metadata: Path, shards: Path | None = None) -> Path:
    path = tmp_path / "commonpool-metadata.yaml"
    lines = [
        "name: commonpool-metadata",
        "kind: datacomp-metadata",
        f"path: {metadata}",
        # Not read by a selection; a run that trains checks them when it evaluates.
        "eval: [{name: unread, task: retrieval, path: /nonexistent/eval}]",
    ]
    if shards is not None:
        lines.append(f"shards: {shards}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def metadata(tmp_path) -> tuple[Path, list[str]]:
    root = tmp_path / "metadata"
    return root, write_metadata_folder(root)


def invoke(*argv: str):
    from click.testing import CliRunner

    from selbench.cli import main

    return CliRunner().invoke(main, list(argv))


def select(pool_yaml: Path, scale: Path, method: str, *extra: str, budget: str = "0.25"):
    result = invoke(
        "run", "--pool", str(pool_yaml), "--method", method, "--budget", budget,
        "--scale", str(scale), "--experiment", "meta", "--stage", "select", *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


def last_run(method: str):
    runs = [r for r in logged_runs("meta") if r.data.params.get("method") == method]
    return max(runs, key=lambda r: r.info.start_time)


def test_the_pool_holds_uids_and_captions_as_arrow_arrays(metadata, tmp_path):
    root, uids = metadata
    pool = resolve_pool(str(write_pool_yaml(tmp_path, root))).pool
    assert isinstance(pool, MetadataPool) and pool.kind == "datacomp-metadata"
    assert len(pool) == sum(PARTS)
    assert isinstance(pool.uids, ArrowStrings) and isinstance(pool.captions, ArrowStrings)
    assert list(pool.uids) == uids and pool.uids[-1] == uids[-1] and pool.uids[3] == uids[3]
    assert list(pool.uids[5:9]) == uids[5:9] and list(pool.uids[::50]) == uids[::50]
    assert pool.captions[0] == "caption 0"
    assert pool.reference == f"datacomp:l14:{root}"  # the pool-level default
    with pytest.raises(PoolError, match="without images"):
        next(pool.strategy_view().iter_images())
    with pytest.raises(PoolError, match="--format datacomp"):
        _ = pool.index  # no shards: nothing to materialize from
    # The features land in pool order by one block copy per file (no uid lookup).
    from selbench.datacomp_metadata import MetadataDir

    image, text = (np.zeros((len(uids), DIM), np.float16) for _ in range(2))
    assert MetadataDir(root)._fill_in_order(pool.uids, "l14", image, text)
    for got, kind in ((image, "img"), (text, "txt")):
        want = []
        for parquet in sorted(root.glob("*.parquet")):
            with np.load(parquet.with_suffix(".npz")) as arrays:
                want.append(arrays[f"l14_{kind}"])
        assert (got == np.concatenate(want)).all()
    # The fingerprint follows the rows: same files, same print; another uid, another.

    assert MetadataPool(root).fingerprint == pool.fingerprint
    other = tmp_path / "other"
    write_metadata_folder(other, parts=(140, 99))
    assert MetadataPool(other).fingerprint != pool.fingerprint


@pytest.mark.parametrize("partition_rows", [1 << 19, 16])
def test_a_uid_repeated_across_files_is_refused_naming_it(tmp_path, monkeypatch, partition_rows):
    """Also when the check runs in partitions (16 rows each: 15 of them here)."""
    import selbench.pools.arrow as arrow

    monkeypatch.setattr(arrow, "UNIQUE_PARTITION_ROWS", partition_rows)
    root = tmp_path / "metadata"
    uids = write_metadata_folder(root)
    first, second = sorted(root.glob("*.parquet"))
    frame = pd.read_parquet(second)
    frame.loc[57, "uid"] = uids[3]  # the first file's fourth uid, again in the second
    frame.to_parquet(second)
    pool = resolve_pool(str(write_pool_yaml(tmp_path, root))).pool
    with pytest.raises(PoolError, match=f"uid '{uids[3]}' appears more than once"):
        _ = pool.uids


def test_clip_score_selects_with_datacomps_features_and_exports_the_uid_file(
    metadata, tmp_path, tiny_scale, monkeypatch
):
    from selbench.export import read_datacomp_npy

    root, uids = metadata
    pool_yaml = write_pool_yaml(tmp_path, root)
    select(pool_yaml, tiny_scale, "clip_score")
    run = last_run("clip_score")
    assert run.info.status == "SCHEDULED"
    assert run.data.params["pool_size"] == str(len(uids))
    assert run.data.params["decontaminate"] == "False"  # no images to compare
    # The pool's `reference` is DataComp's L/14 features: the selection is their top 25%.
    l14 = {}
    for parquet in sorted(root.glob("*.parquet")):
        with np.load(parquet.with_suffix(".npz")) as arrays:
            score = (arrays["l14_img"].astype(np.float32) * arrays["l14_txt"]).sum(1)
        l14.update(zip(pd.read_parquet(parquet)["uid"], score, strict=True))
    count = round(0.25 * len(uids))
    best = sorted(uids, key=lambda u: -l14[u])[:count]
    monkeypatch.chdir(tmp_path)
    result = invoke("export", run.info.run_id, "--format", "datacomp", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    exported = read_datacomp_npy(tmp_path / f"{run.info.run_id}.npy")
    assert len(exported) == count and set(exported) == set(best)


def test_a_strategy_that_reads_pixels_is_refused_naming_itself(metadata, tmp_path, tiny_scale):
    root, _ = metadata
    pool_yaml = write_pool_yaml(tmp_path, root)
    for method, named in (("tmars", "'tmars'"), ("clip_score(keep=0.5) >> el2n", "'el2n'")):
        result = invoke(
            "run", "--pool", str(pool_yaml), "--method", method, "--budget", "0.25",
            "--scale", str(tiny_scale), "--stage", "select",
        )  # fmt: skip
        assert result.exit_code != 0
        said = " ".join(result.output.split())
        assert f"strategy {named}" in said and "reads the pool's images" in said, said
        assert "'commonpool-metadata' is DataComp metadata without images" in said
        assert "declares 'pool_images' in its needs" in said and "kind: shards" in said
        runnable = said.split("needs no pool images: ")[1]
        assert "clip_score" in runnable and "semdedup" in runnable and "tldr" not in runnable


def test_random_and_semdedup_select_from_the_metadata(metadata, tmp_path, tiny_scale):
    root, uids = metadata
    pool_yaml = write_pool_yaml(tmp_path, root)
    select(pool_yaml, tiny_scale, "random")
    select(pool_yaml, tiny_scale, "semdedup", "-p", f"embedder=datacomp:b32:{root}")
    for method in ("random", "semdedup"):
        run = last_run(method)
        assert run.info.status == "SCHEDULED", method
        assert run.data.params["budget_count"] == str(round(0.25 * len(uids)))
        assert run.data.metrics["subset_size"] == round(0.25 * len(uids))


def test_training_without_shards_is_refused_naming_the_fix(metadata, tmp_path, tiny_scale):
    root, uids = metadata
    pool_yaml = write_pool_yaml(tmp_path, root)
    result = invoke(
        "run", "--pool", str(pool_yaml), "--method", "random", "--budget", "0.25",
        "--scale", str(tiny_scale),
    )  # fmt: skip
    assert result.exit_code != 0
    said = " ".join(result.output.split())
    assert "DataComp metadata without images, so a run on it cannot train" in said
    assert "--stage select" in said and "--format datacomp" in said and "'shards:'" in said
    # Refused before anything was recorded.
    assert not [r for r in logged_runs("default") if r.data.params.get("method") == "random"]


def test_with_shards_the_selection_materializes_from_them(metadata, tmp_path, tiny_scale):
    """The metadata pool's ``shards:`` (fewer samples than the metadata, as a download
    leaves) are read only at materialize."""
    from selbench.materialize import load_subset
    from selbench.rundir import RunDir

    root, uids = metadata
    shards = tmp_path / "shards"
    for shard, ids in enumerate((range(0, 120), range(120, sum(PARTS)))):
        samples = [
            (f"{shard:08d}{n:04d}", png_bytes((i % 256, 30, 60)), f"caption {i}",
             {"uid": datacomp_uid(i), "caption": f"caption {i}"})
            for n, i in enumerate(ids)
        ]  # fmt: skip
        write_shard(shards / f"{shard:08d}.tar", samples)
    pool_yaml = write_pool_yaml(tmp_path, root, shards)
    # With shards a strategy that reads pixels is still refused: shards are read only to
    # materialize (their samples are a subset of the metadata's rows).
    result = invoke(
        "run", "--pool", str(pool_yaml), "--method", "tmars", "--budget", "0.1",
        "--scale", str(tiny_scale), "--stage", "select",
    )  # fmt: skip
    assert result.exit_code != 0 and "reads the pool's images" in result.output
    select(pool_yaml, tiny_scale, "random", budget="0.1")
    run = last_run("random")
    result = invoke("run", "--resume", run.info.run_id, "--stage", "materialize")
    assert result.exit_code == 0, result.output
    subset = load_subset(RunDir.for_run(run.info.run_id).subset_dir)
    assert subset is not None and subset.n_samples == round(0.1 * len(uids))
    assert {uid for uid, *_ in subset.iter_samples()} <= set(uids)
