"""What a leaderboard groups runs by, and how its pages name metrics and settings."""

from __future__ import annotations

import pandas as pd

GROUP_KEYS = ("pool", "pool_fingerprint", "scale", "protocol", "method_label", "budget")
SETTING_KEYS = ("pool", "pool_fingerprint", "scale", "protocol")
DEFAULT_METRICS = ("mean_R1", "zeroshot_acc1")
COST_METRICS = ("selection_seconds", "training_seconds")
# A run's selection + training + online-scoring FLOPs; older runs did not log it, so a
# page shows its column only when some run did (a cost column: mean over seeds, no CI).
TOTAL_FLOPS = "flops/total"
DEFAULT_BASELINE = "random"
# How the page names the metrics it knows; any other metric keeps its MLflow name.
METRIC_NAMES = {
    "mean_R1": "R@1",
    "zeroshot_acc1": "zero-shot top-1",
    "datacomp/imagenet": "ImageNet",
    "datacomp/imagenet_dist_shifts": "ImageNet dist. shifts",
    "datacomp/vtab": "VTAB",
    "datacomp/retrieval": "retrieval",
    "datacomp/average": "average (38)",
    "reasoning-probe/acc": "reasoning probe",
    "nlvr2-probe/acc": "NLVR2 probe",
    "captioning/bleu4": "BLEU@4",
    "captioning/cider": "CIDEr",
    "mscoco-captioning/bleu4": "COCO BLEU@4",
    "mscoco-captioning/cider": "COCO CIDEr",
    TOTAL_FLOPS: "total FLOPs",
}


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def setting_text(row: pd.Series, markdown: bool = False) -> str:
    """``pool synthweb (fingerprint 1a2b...), scale tiny, protocol fixed-compute``; with
    ``markdown``, every value a `code` span."""
    tick = "`" if markdown else ""
    return (
        f"pool {tick}{row['pool']}{tick} (fingerprint {tick}{str(row['pool_fingerprint'])[:12]}"
        f"{tick}), scale {tick}{row['scale']}{tick}, protocol {tick}{row['protocol']}{tick}"
    )
