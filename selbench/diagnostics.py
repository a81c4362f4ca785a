"""Selection diagnostics from SynthWeb's ground truth (the harness's eyes, never a strategy's)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping


def pathology_fractions(
    ground_truth: Mapping[str, Mapping], selected: Iterable[str]
) -> dict[str, float]:
    """Share of each pathology in the pool and in the selection, and the share of it kept.

    Returns metric names ``diag/pool_frac/<p>``, ``diag/selected_frac/<p>`` and
    ``diag/kept/<p>`` (selected count of ``p`` / pool count of ``p``), with ``p`` running
    over every pathology label in the ground truth, ``clean`` included.
    """
    selected = [u for u in selected if u in ground_truth]
    pool_counts = Counter(gt["pathology"] for gt in ground_truth.values())
    selected_counts = Counter(ground_truth[u]["pathology"] for u in selected)
    n_pool, n_selected = len(ground_truth), max(len(selected), 1)
    metrics: dict[str, float] = {}
    for label in sorted(pool_counts):
        metrics[f"diag/pool_frac/{label}"] = pool_counts[label] / n_pool
        metrics[f"diag/selected_frac/{label}"] = selected_counts[label] / n_selected
        metrics[f"diag/kept/{label}"] = selected_counts[label] / pool_counts[label]
    return metrics


def concept_coverage(ground_truth: Mapping[str, Mapping], selected: Iterable[str]) -> float:
    """Share of the pool's (colour, shape) concepts that appear in at least one selected image."""

    def concepts(uids: Iterable[str]) -> set[tuple[str, str]]:
        found = set()
        for uid in uids:
            for obj in ground_truth[uid].get("scene", {}).get("objects", []):
                found.add((obj.get("colour"), obj.get("shape")))
        return found

    in_pool = concepts(ground_truth)
    if not in_pool:
        return float("nan")
    return len(concepts(u for u in selected if u in ground_truth) & in_pool) / len(in_pool)
