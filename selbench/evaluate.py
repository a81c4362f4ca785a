"""The evaluation suite: CLIP_benchmark's wds loader and metric functions on each eval set.

Metric names (MLflow-safe): ``{set}/i2t_R1`` (image->text recall@1, CLIP_benchmark's
``text_retrieval_recall@1``), ``{set}/t2i_R1`` (its ``image_retrieval_recall@1``), R5,
R10, ``{set}/acc1`` and ``{set}/mean_per_class_recall`` for zero-shot classification.
Summary metrics: ``mean_R1`` (mean of i2t and t2i R@1 over retrieval sets) and
``zeroshot_acc1`` (mean top-1 over classification sets).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from selbench.configs import EvalSetConfig
from selbench.errors import PoolError
from selbench.progress import NullProgress

RECALL_KS = (1, 5, 10)


def _load(eval_set: EvalSetConfig, preprocess: Any):
    # CLIP_benchmark prints tqdm bars; selbench shows its own rich progress instead.
    os.environ.setdefault("TQDM_DISABLE", "1")
    from clip_benchmark.datasets.builder import build_dataset

    if not (Path(eval_set.path) / "test" / "nshards.txt").is_file():
        raise PoolError(
            f"eval set {eval_set.name!r} at {eval_set.path} is not in CLIP_benchmark wds layout "
            f"(missing test/nshards.txt)"
        )
    task = "zeroshot_retrieval" if eval_set.task == "retrieval" else "zeroshot_classification"
    with warnings.catch_warnings():
        # CLIP_benchmark leaves shardshuffle unset; eval order does not matter here.
        warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle")
        return build_dataset(
            f"wds/{eval_set.name}",
            root=eval_set.path,
            transform=preprocess,
            split="test",
            download=False,
            task=task,
        )


def evaluate_retrieval(
    model: Any,
    eval_set: EvalSetConfig,
    preprocess: Any,
    tokenizer: Any,
    batch_size: int,
    device: str,
) -> dict[str, float]:
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval

    loader = DataLoader(
        _load(eval_set, preprocess), batch_size=batch_size, collate_fn=image_captions_collate_fn
    )
    raw = zeroshot_retrieval.evaluate(
        model, loader, tokenizer, device, amp=False, recall_k_list=list(RECALL_KS)
    )
    metrics = {}
    for k in RECALL_KS:
        metrics[f"{eval_set.name}/i2t_R{k}"] = raw[f"text_retrieval_recall@{k}"]
        metrics[f"{eval_set.name}/t2i_R{k}"] = raw[f"image_retrieval_recall@{k}"]
    return metrics


def evaluate_classification(
    model: Any,
    eval_set: EvalSetConfig,
    preprocess: Any,
    tokenizer: Any,
    batch_size: int,
    device: str,
) -> dict[str, float]:
    from clip_benchmark.metrics import zeroshot_classification

    dataset = _load(eval_set, preprocess)
    if not dataset.classes or not dataset.templates:
        raise PoolError(
            f"eval set {eval_set.name!r} at {eval_set.path} needs classnames.txt and "
            f"zeroshot_classification_templates.txt"
        )
    loader = DataLoader(dataset, batch_size=batch_size)
    classifier = zeroshot_classification.zero_shot_classifier(
        model, tokenizer, dataset.classes, dataset.templates, device, amp=False
    )
    logits, target = zeroshot_classification.run_classification(
        model, classifier, loader, device, amp=False
    )
    # Written here rather than calling CLIP_benchmark's evaluate(): its accuracy() does
    # float() on a one-element array, which numpy >= 2.4 refuses.
    return classification_metrics(logits, target, eval_set.name)


def classification_metrics(
    logits: torch.Tensor, target: torch.Tensor, name: str
) -> dict[str, float]:
    """Top-1 (and top-5 with >= 5 classes) accuracy and mean per-class recall."""
    ranked = logits.argsort(dim=1, descending=True)
    hits = ranked == target.view(-1, 1)
    metrics = {f"{name}/acc1": hits[:, :1].any(dim=1).float().mean().item()}
    if logits.shape[1] >= 5:
        metrics[f"{name}/acc5"] = hits[:, :5].any(dim=1).float().mean().item()
    predicted = ranked[:, 0]
    recalls = [
        (predicted[target == c] == c).float().mean().item() for c in target.unique().tolist()
    ]
    metrics[f"{name}/mean_per_class_recall"] = sum(recalls) / len(recalls)
    return metrics


def evaluate(
    model: Any,
    eval_sets: Sequence[EvalSetConfig],
    preprocess: Any,
    tokenizer: Any,
    batch_size: int = 256,
    device: str = "cpu",
    progress: Any = None,
) -> dict[str, float]:
    """Run every eval set; return per-set metrics plus ``mean_R1`` and ``zeroshot_acc1``."""
    progress = progress or NullProgress()
    model.eval()
    metrics: dict[str, float] = {}
    r1, acc1 = [], []
    with torch.no_grad():
        for eval_set in progress.track(eval_sets, "Evaluating", total=len(eval_sets)):
            if eval_set.task == "retrieval":
                got = evaluate_retrieval(model, eval_set, preprocess, tokenizer, batch_size, device)
                r1 += [got[f"{eval_set.name}/i2t_R1"], got[f"{eval_set.name}/t2i_R1"]]
            else:
                got = evaluate_classification(
                    model, eval_set, preprocess, tokenizer, batch_size, device
                )
                acc1.append(got[f"{eval_set.name}/acc1"])
            metrics.update(got)
    if r1:
        metrics["mean_R1"] = sum(r1) / len(r1)
    if acc1:
        metrics["zeroshot_acc1"] = sum(acc1) / len(acc1)
    return metrics
