"""What the SynthWeb diagnostics in this folder share: a pool with ground truth, embedded
through the cache."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from selbench.embedders import EmbeddingService
from selbench.pools import resolve_pool
from selbench.progress import RichProgress
from selbench.registry import get_registry


def embed_with_ground_truth(
    parser: argparse.ArgumentParser, pool_spec: str, specs: Sequence[str], device: str
) -> tuple[Any, dict, dict]:
    """(the pool's strategy view, its SynthWeb ground truth by uid, ``{spec: Embeddings}``),
    embedding through the cache (a hit when the entry is there). A pool without ground
    truth is a usage error of the script."""
    pool = resolve_pool(pool_spec).pool
    if not pool.has_ground_truth():
        parser.error(f"pool {pool_spec!r} has no SynthWeb ground truth to check against")
    view = pool.strategy_view()
    with RichProgress() as progress:
        service = EmbeddingService(view, device, get_registry().make_embedder, progress)
        found = {spec: service.embeddings(spec) for spec in specs}
    return view, pool.ground_truth(), found
