from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own data home and run home; nothing touches ~/.cache."""
    home = tmp_path_factory.mktemp("selbench-home")
    monkeypatch.setenv("SELBENCH_HOME", str(home))
    monkeypatch.delenv("SELBENCH_RUN_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def png_bytes(colour=(200, 30, 30), size=16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[tuple[str, bytes | None, str, dict]]) -> Path:
    """Write an img2dataset-style shard: (key, image bytes or None, caption, json meta)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image, caption, meta in samples:
            members = {f"{key}.txt": caption.encode(), f"{key}.json": json.dumps(meta).encode()}
            if image is not None:
                members[f"{key}.png"] = image
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stats = path.with_name(path.stem + "_stats.json")
    stats.write_text(json.dumps({"count": len(samples), "successes": len(samples)}))
    return path


@pytest.fixture
def shard_pool_dir(tmp_path) -> Path:
    """Two shards of 6 samples: one corrupt image, one empty caption, one missing image."""
    root = tmp_path / "pool"
    first = [
        (f"00000{i:04d}", png_bytes((20 * i, 100, 50)), f"a caption {i}", {"key": f"00000{i:04d}"})
        for i in range(3)
    ]
    first[1] = ("000000001", b"\x89PNG not really an image", "broken image", {})
    second = [
        ("000010000", png_bytes(), "", {}),
        ("000010001", None, "no image here", {}),
        (
            "000010002",
            png_bytes((0, 0, 200)),
            "a blue square",
            {"synthweb": {"pathology": "clean"}},
        ),
    ]
    write_shard(root / "00000.tar", first)
    write_shard(root / "00001.tar", second)
    return root
