"""Helpers that test modules import: a tiny SynthWeb pool and a one-epoch scale, shards
written by hand, the suite's reference recipe, the MLflow runs of an experiment.

Fixtures live in conftest.py (which uses these); no test module imports conftest.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

#: The suite's reference recipe: configs/scales/reference.yaml shrunk to seconds.
TEST_REFERENCE_RECIPE = Path(__file__).parent / "fixtures" / "reference" / "reference-tiny.yaml"

TINY_POOL = dict(
    seed=0,
    n_samples=320,
    shard_size=100,
    n_retrieval=60,
    n_classification=50,
    n_target=20,
    n_reasoning_train=60,
    n_reasoning_test=30,
)

TINY_SCALE = """\
name: test-tiny
model: selbench-tiny
batch_size: 64
epochs: 1
lr: 1.0e-3
weight_decay: 0.1
warmup_fraction: 0.1
eval_batch_size: 100
"""


def make_tiny_pool(root: Path) -> Path:
    from selbench.synthweb import SynthWebConfig, generate_synthweb

    out = root / "synthweb-tiny"
    generate_synthweb(out, SynthWebConfig(**TINY_POOL))
    return out


def make_tiny_scale(root: Path) -> Path:
    path = root / "test-tiny.yaml"
    path.write_text(TINY_SCALE)
    return path


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


def logged_runs(experiment: str, home: Path | None = None) -> list:
    """The MLflow runs (``mlflow.entities.Run``) of ``experiment``: in the store selbench
    uses now (after ``tracking.setup``, which also creates the experiment), or, given the
    ``SELBENCH_HOME`` of other processes, in that home's default store."""
    import mlflow

    from selbench import tracking

    if home is None:
        tracking.setup(experiment)
    else:
        mlflow.set_tracking_uri(f"sqlite:///{home / 'runs' / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def log_frame_runs(experiment: str, runs) -> None:
    """Log each row of ``runs`` (a ``search_runs``-shaped frame: ``params.*`` and
    ``metrics.*`` columns) as a finished MLflow run of ``experiment``: a leaderboard's input
    without training anything."""
    import mlflow

    from selbench import tracking

    experiment_id = tracking.setup(experiment)
    for _, run in runs.iterrows():
        with mlflow.start_run(experiment_id=experiment_id):
            mlflow.log_params(
                {k.removeprefix("params."): v for k, v in run.items() if k.startswith("params.")}
            )
            mlflow.log_metrics(
                {k.removeprefix("metrics."): v for k, v in run.items() if k.startswith("metrics.")}
            )
