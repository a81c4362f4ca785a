"""Shared builders for end-to-end tests: a tiny SynthWeb pool and a one-epoch scale."""

from __future__ import annotations

from pathlib import Path

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
