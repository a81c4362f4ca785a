"""benchmarks/select_scale.py at a toy size: the DataComp-layout data it writes is a pool
selbench reads, and one select run on it is timed and measured into the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "select_scale.py"


def _module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import select_scale
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return select_scale


def test_generated_metadata_is_datacomp_shaped_and_deterministic(tmp_path):
    scale = _module()
    for name in ("a", "b"):
        scale.generate(tmp_path / name, 3000, 2000, seed=3, clusters=20)
    parquets = sorted((tmp_path / "a").glob("*.parquet"))
    assert len(parquets) == 2 and all(p.with_suffix(".npz").is_file() for p in parquets)
    table = pq.read_table(parquets[0])
    assert table.column_names == ["uid", "url", "text"] and table.num_rows == 2000
    uids = table.column("uid").to_pylist()
    assert all(len(u) == 32 and int(u, 16) >= 0 for u in uids) and len(set(uids)) == 2000
    with np.load(parquets[0].with_suffix(".npz")) as arrays:
        image, text = arrays["b32_img"], arrays["b32_txt"]
        assert image.shape == (2000, scale.DIM) and image.dtype == np.float16
        norms = np.linalg.norm(image.astype(np.float32), axis=1)
        assert np.allclose(norms, 1.0, atol=1e-2)
        score = (image.astype(np.float32) * text.astype(np.float32)).sum(1)
        assert 0.2 < score.min() < score.max() < 1.0  # spread CLIP scores
    same = sorted((tmp_path / "b").glob("*.npz"))[1]
    with np.load(parquets[1].with_suffix(".npz")) as a, np.load(same) as b:
        assert np.array_equal(a["b32_img"], b["b32_img"])


def test_quick_mode_measures_a_select_run(tmp_path):
    out = tmp_path / "out" / "scale.json"
    command = [
        *(sys.executable, str(SCRIPT), "--rows", "5000", "--methods", "clip_score"),
        *("--executors", "local", "--shard-rows", "3000", "--work", str(tmp_path / "work")),
        *("--out", str(out), "--cleanup"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| 5,000 | clip_score | local |" in done.stdout and "disk used" in done.stdout
    found = json.loads(out.read_text())
    (record,) = found["records"]
    assert record["rc"] == 0 and record["seconds"] > 0 and record["rows_per_s"] > 0
    assert 0 < record["anon_mib"] <= record["tree_mib"] and record["driver_mib"] > 0
    assert found["sizes"][0]["embed_s"] > 0
    assert out.with_suffix(".md").read_text().startswith("| rows | method |")
    assert not (tmp_path / "work").exists()  # --cleanup


def test_cleanup_drops_a_measured_size_and_keeps_the_others(tmp_path):
    """--cleanup frees one size's disk before the next (8M rows: 32 GB of data and cache):
    its metadata, its cache entry and its pool index go; another size's stay."""
    scale = _module()
    entries = {1000: "aaaaaaaaaaaaaaaa-111111111111", 2000: "bbbbbbbbbbbbbbbb-222222222222"}
    home = tmp_path / "home"
    for rows, entry in entries.items():
        folder = tmp_path / f"rows-{rows}"
        (folder / "metadata").mkdir(parents=True)
        (folder / "embed.log").write_text(f"computed: entry {entry} ({rows} x 512, 1.0 s)\n")
        (home / "embeddings" / entry).mkdir(parents=True)
        (home / "embeddings" / f"{entry}.lock").touch()
        (home / "pool-index" / f"metadata-{entry[:16]}").mkdir(parents=True)
    scale.drop_size(tmp_path, 1000)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.parent != home)
    assert not any("aaaa" in name or "rows-1000/" in name for name in left)
    assert "rows-2000/metadata" in left and "home/embeddings/bbbbbbbbbbbbbbbb-222222222222" in left
    assert "home/pool-index/metadata-bbbbbbbbbbbbbbbb" in left
    assert not (tmp_path / "rows-1000").exists()
