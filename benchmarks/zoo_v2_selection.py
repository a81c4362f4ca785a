"""What the DataComp-era filters keep of SynthWeb's pathologies, next to clip_score (no training).

Runs each strategy's selection on a SynthWeb pool at one budget, with the same context a
``selbench run`` builds (cached embeddings, the pool's target split), and prints the share
of every pathology each selection keeps, from the pool's ground truth. Selections of
these strategies do not depend on the seed, so one pass stands for every seed.

    python benchmarks/zoo_v2_selection.py --budget 0.25 \
        --methods clip_score,negcliploss,normsim,normsim+norm=2,vas,vas_d
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

from selbench.diagnostics import pathology_fractions
from selbench.embedders import EmbeddingService
from selbench.pools import resolve_pool
from selbench.registry import get_registry
from selbench.strategy import SelectionContext, budget_count
from selbench.target import load_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="synthweb")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument(
        "--methods",
        default="clip_score,negcliploss,normsim,normsim+norm=2,vas,vas_d",
        help="comma-separated; METHOD+key=value+key=value sets parameters",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    resolved = resolve_pool(args.pool)
    pool = resolved.pool
    if not pool.has_ground_truth():
        parser.error(f"pool {args.pool!r} has no SynthWeb ground truth to check against")
    truth = pool.ground_truth()
    view = pool.strategy_view()
    registry = get_registry()
    loader = partial(load_target, resolved.target, resolved.eval_sets) if resolved.target else None
    services = EmbeddingService(view, args.device, registry.make_embedder, load_target=loader)
    count = budget_count(args.budget, len(view))
    labels = sorted({gt["pathology"] for gt in truth.values()})
    print(f"| method | {' | '.join(labels)} kept | seconds |")
    print("|---|" + "---|" * (len(labels) + 1))
    for spec in args.methods.split(","):
        name, *pairs = spec.split("+")
        params = dict(pair.split("=", 1) for pair in pairs)
        with tempfile.TemporaryDirectory() as work:
            ctx = SelectionContext(view, count, args.budget, 0, args.device, Path(work))
            ctx.services = services
            started = time.perf_counter()
            selection = registry.get(name).cls(params).select(ctx)
            seconds = time.perf_counter() - started
        kept = pathology_fractions(truth, selection.uids)
        cells = " | ".join(f"{100 * kept[f'diag/kept/{label}']:.1f}%" for label in labels)
        print(f"| `{spec}` | {cells} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
