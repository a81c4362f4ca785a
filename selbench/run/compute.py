"""What a run computed, in FLOPs (``docs/compute.md``): the select stage's embedding
passes, the train stage's training, the sum the evaluate stage records as ``flops/total``,
and the reference model an online strategy scores with, loaded (and charged when built)."""

from __future__ import annotations

from typing import Any

import torch

from selbench.embedders import EmbeddingService
from selbench.errors import ConfigError
from selbench.progress import Progress
from selbench.registry import get_registry
from selbench.run.spec import usage_key
from selbench.train import TrainResult, build_model


def selection_compute(services: EmbeddingService, n: int) -> dict[str, float]:
    """``flops/selection/embedding/<embedder>`` per embedding pass the strategy used
    (``docs/compute.md``): image and text forward FLOPs per pair, counted on the embedder's
    model, times the pool's pairs; 0 for a pass the cache served (it is counted in the run
    that computed it) and for features shipped with the pool (no model ran)."""
    from selbench.flops import embedding_pass_flops

    found = {}
    for spec, usage in services.usage.items():
        name = f"flops/selection/embedding/{usage_key(spec)}"
        model = services.embedder(spec).model
        if usage["hit"] or model is None:
            found[name] = 0.0
            continue
        key = ("embedder", usage["embedder_id"])
        found[name] = float(embedding_pass_flops(model, None, None, n, cache_key=key))
    return found


def training_compute(architecture: str, trained: TrainResult) -> dict[str, float]:
    """``flops/training`` (``docs/compute.md``): :func:`selbench.flops.model_training_flops`
    of the scale's model over the samples seen and steps trained (the towers' forward
    FLOPs per example, counted by torch's ``FlopCounterMode`` on the architecture's own
    shapes, times 3, plus the contrastive loss's logits per step). The model is built on
    the CPU for its shapes only, outside the run's RNG."""
    from selbench.flops import model_training_flops

    with torch.random.fork_rng(devices=[]):
        model, _, _ = build_model(architecture, 0, "cpu")
    total = model_training_flops(model, trained.samples_seen, trained.steps, trained.batch_size)
    return {"flops/training": float(total)}


def total_compute(stages: dict[str, Any]) -> dict[str, float]:
    """``flops/total``: every FLOP count the run's select and train stages recorded
    (selection, training, online scoring; docs/compute.md), summed; nothing for a run
    whose stages recorded none (runs from before FLOPs were counted)."""
    counts = [
        float(value)
        for name in ("select", "train")
        for key, value in stages.get(name, {}).get("metrics", {}).items()
        if key.startswith("flops/") and key != "flops/total"
    ]
    return {"flops/total": sum(counts)} if counts else {}


def load_reference(
    spec: str, pool: Any, device: str, progress: Progress, learner: Any, learner_name: str
) -> tuple[Any, dict[str, float]]:
    """The frozen reference model an online strategy scores with: embedder ``spec``
    (``--online-reference``, default ``reference``: SynthWeb's reference CLIP, or the
    model the pool YAML names) prepared through the registry, checked against the
    learner's input shapes. Returns it and ``flops/online/reference_build/...``: what
    building it cost when this run built it (nothing when a cache served it)."""
    from selbench import flops
    from selbench.online.harness import check_reference

    embedder = get_registry().make_embedder(spec)
    with flops.recording() as ledger:
        embedder.prepare(pool, device, progress)
    reference = embedder.model
    if reference is None:
        raise ConfigError(
            f"online reference {spec!r} has no model to score with (features shipped with "
            "the pool); name a model embedder with --online-reference"
        )
    check_reference(learner, reference, learner_name, spec)
    progress.note(f"Online reference: {spec} ({embedder.details.get('resolved_to', spec)})")
    return reference, ledger.as_metrics("flops/online/reference_build/")
