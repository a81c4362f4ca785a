"""DataComp's precomputed CLIP features read into the embedding cache (``datacomp``
embedder): rows land in pool order, errors name the file or uid at fault."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_real_pools import datacomp_uid, write_datacomp_shard

from selbench.cache import EmbeddingCache
from selbench.embedders import EmbeddingService
from selbench.errors import ConfigError, PoolError
from selbench.paths import selbench_home
from selbench.pools import ShardPool
from selbench.registry import get_registry

DIM = 6


def features(i: int, kind: str, model: str) -> np.ndarray:
    """A distinct, reproducible feature row per (sample, modality, model)."""
    seed = i * 10 + {"img": 1, "txt": 2}[kind] + {"l14": 0, "b32": 5}[model]
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float16)


def write_metadata(root, parts: list[list[int]], drop_npz: bool = False) -> None:
    """DataComp metadata pairs NAME.parquet + NAME.npz, rows aligned, in an order that is
    not the pool's, with uids that are not in the pool too."""
    root.mkdir(parents=True, exist_ok=True)
    for n, ids in enumerate(parts):
        name = f"{n:032x}"
        uids = [datacomp_uid(i) for i in ids]
        scores = [float(features(i, "img", "l14") @ features(i, "txt", "l14")) for i in ids]
        pd.DataFrame(
            {
                "uid": uids,
                "text": [f"caption {i}" for i in ids],
                "clip_l14_similarity_score": scores,
            }
        ).to_parquet(root / f"{name}.parquet")
        if drop_npz:
            continue
        np.savez(
            root / f"{name}.npz",
            **{
                f"{model}_{kind}": np.stack([features(i, kind, model) for i in ids])
                for model in ("l14", "b32")
                for kind in ("img", "txt")
            },
        )


@pytest.fixture
def pool(tmp_path) -> ShardPool:
    root = tmp_path / "commonpool"
    write_datacomp_shard(root, 0, [0, 1, 2, 3, 4])
    write_datacomp_shard(root, 1, [5, 6, 7, 8])
    return ShardPool(root)


def embed(pool, spec, tmp_path, chunk_size=4):
    service = EmbeddingService(
        pool.strategy_view(), "cpu", get_registry().make_embedder,
        cache=EmbeddingCache(tmp_path / "cache"), chunk_size=chunk_size,
    )  # fmt: skip
    return service, service.embeddings(spec)


@pytest.mark.parametrize("model", ["l14", "b32"])
def test_features_reach_the_cache_in_pool_order(pool, tmp_path, model):
    meta = tmp_path / "metadata"
    write_metadata(meta, [[8, 3, 42, 0, 5], [7, 1, 99], [6, 2, 4]])  # shuffled, with extras
    service, found = embed(pool, f"datacomp:{model}:{meta}", tmp_path)
    order = [next(i for i in range(9) if datacomp_uid(i) == uid) for uid in pool.uids]
    for kind, got in (("img", found.image), ("txt", found.text)):
        want = np.stack([features(i, kind, model) for i in order]).astype(np.float32)
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-3)
    assert found.embedder_id.startswith(f"datacomp:{model}:w")
    # The cosine of the features is DataComp's precomputed CLIP score (L/14 here).
    if model == "l14":
        tables = [pd.read_parquet(p) for p in sorted(meta.glob("*.parquet"))]
        scores = pd.concat(tables).set_index("uid")["clip_l14_similarity_score"]
        norms = [
            np.linalg.norm(features(i, "img", model).astype(np.float32))
            * np.linalg.norm(features(i, "txt", model).astype(np.float32))
            for i in order
        ]
        cosine = np.einsum("ij,ij->i", found.image.astype(np.float32), found.text)
        np.testing.assert_allclose(
            cosine, scores.loc[list(pool.uids)].to_numpy() / np.array(norms), atol=5e-3
        )
    # A second service finds the entry in the cache: nothing is read again.
    again = EmbeddingService(
        pool.strategy_view(), "cpu", get_registry().make_embedder,
        cache=EmbeddingCache(tmp_path / "cache"),
    )  # fmt: skip
    again.embeddings(f"datacomp:{model}:{meta}")
    assert again.usage[f"datacomp:{model}:{meta}"]["hit"] is True
    assert not list(selbench_home().rglob(".datacomp-import-*"))  # scratch removed


def test_a_pool_uid_missing_from_the_metadata_is_named(pool, tmp_path):
    meta = tmp_path / "metadata"
    write_metadata(meta, [[0, 1, 2, 3, 4], [5, 6, 7]])  # sample 8 is absent
    with pytest.raises(PoolError, match=f"1 pool uid.*{datacomp_uid(8)}"):
        embed(pool, f"datacomp:l14:{meta}", tmp_path)
    # no entry: nothing but lock files and empty partial folders in the cache
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix != ".lock"]


def test_bad_specs_and_folders_are_named(pool, tmp_path):
    meta = tmp_path / "metadata"
    write_metadata(meta, [list(range(9))], drop_npz=True)
    make = get_registry().make_embedder
    with pytest.raises(ConfigError, match="b32 or l14|l14 or b32"):
        make(f"datacomp:h14:{meta}")
    with pytest.raises(ConfigError, match="does not exist"):
        make(f"datacomp:l14:{tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="--download_npz"):
        embed(pool, f"datacomp:l14:{meta}", tmp_path)
    write_metadata(meta, [list(range(9))])
    service, _ = embed(pool, f"datacomp:l14:{meta}", tmp_path)
    with pytest.raises(ConfigError, match="cannot embed other images"):
        service.embed_images(f"datacomp:l14:{meta}", [])
