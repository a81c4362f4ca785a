"""The evaluation suite: CLIP_benchmark's wds loader and metric functions on each eval set.

Metric names (MLflow-safe): ``{set}/i2t_R1`` (image->text recall@1, CLIP_benchmark's
``text_retrieval_recall@1``), ``{set}/t2i_R1`` (its ``image_retrieval_recall@1``), R5,
R10, ``{set}/mean_R1`` (their mean, DataComp's ``mean_recall@1``), ``{set}/acc1`` and
``{set}/mean_per_class_recall`` for zero-shot classification, ``{set}/bleu4`` and
``{set}/cider`` for captioning (:mod:`selbench.captioning`; models that cannot generate
skip it, and the run log says so), and ``{set}/main``, the
set's headline number where its config names one (``main_metric``).
Summary metrics: ``mean_R1`` (mean of i2t and t2i R@1 over retrieval sets),
``zeroshot_acc1`` (mean top-1 over classification sets), and for DataComp's tasks the
``datacomp/*`` aggregates of :func:`datacomp_aggregate`.

Named suites live in ``configs/evals/*.yaml`` (:func:`resolve_eval_suite`); every set is
read from CLIP_benchmark's ``wds`` layout exactly as its exporter
(``clip_benchmark.webdataset_builder``) writes it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from selbench.configs import EvalSetConfig, EvalSuiteConfig, find_config, load_yaml_model
from selbench.errors import PoolError
from selbench.progress import NullProgress, Progress

RECALL_KS = (1, 5, 10)


def expected_layout(eval_set: EvalSetConfig) -> str:
    """The files CLIP_benchmark's exporter writes for a set of this task."""
    root = eval_set.path
    if eval_set.task == "reasoning":
        return (
            f"NLVR2's layout: {root}/train.json, {root}/test1.json or dev.json, "
            f"images under {root}/images/<split>/"
        )
    shards = f"{root}/test/nshards.txt and {root}/test/0.tar .. (nshards-1).tar"
    if eval_set.task in ("retrieval", "captioning"):
        return f"{shards}, {root}/dataset_type.txt reading 'retrieval'"
    return f"{shards}, {root}/classnames.txt, {root}/zeroshot_classification_templates.txt"


def check_eval_set(eval_set: EvalSetConfig) -> None:
    """Raise PoolError naming the set and the layout it expected unless ``eval_set`` is in
    CLIP_benchmark's wds layout (``clip_benchmark.webdataset_builder``'s output)."""
    root = Path(eval_set.path)
    problem = None
    nshards_file = root / "test" / "nshards.txt"
    if eval_set.task == "reasoning":
        from selbench.probe import check_nlvr2

        problem = check_nlvr2(root)
    elif not root.is_dir():
        problem = f"{root} does not exist"
    elif not nshards_file.is_file():
        problem = f"{nshards_file} is missing"
    else:
        try:
            nshards = int(nshards_file.read_text().strip())
        except ValueError:
            nshards = 0
        missing = [f"{i}.tar" for i in range(nshards) if not (root / "test" / f"{i}.tar").is_file()]
        type_file = root / "dataset_type.txt"
        kind = type_file.read_text().strip().lower() if type_file.is_file() else "classification"
        if nshards < 1:
            problem = f"{nshards_file} does not hold a shard count"
        elif missing:
            problem = f"shards {', '.join(missing[:3])} are missing from {root / 'test'}"
        elif eval_set.task in ("retrieval", "captioning") and kind != "retrieval":
            problem = f"{type_file} does not say 'retrieval' (the set reads as {kind!r})"
        elif eval_set.task == "classification" and kind == "retrieval":
            problem = f"{type_file} says 'retrieval' but the set is configured as classification"
        elif eval_set.task == "classification":
            for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
                if not (root / name).is_file():
                    problem = f"{root / name} is missing"
                    break
    if problem:
        raise PoolError(
            f"eval set {eval_set.name!r}: {problem}; expected "
            + ("" if eval_set.task == "reasoning" else "CLIP_benchmark's wds layout ")
            + f"({expected_layout(eval_set)})"
        )


def resolve_eval_suite(name: str, check: bool = True) -> list[EvalSetConfig]:
    """The sets of the suite ``name`` (``configs/evals/NAME.yaml`` or a path to such a
    YAML). With ``check``, every set must already be on disk in CLIP_benchmark's wds
    layout, so a missing set fails before any training, naming the set."""
    suite = load_yaml_model(find_config("evals", name), EvalSuiteConfig)
    if check:
        for eval_set in suite.sets:
            check_eval_set(eval_set)
    return list(suite.sets)


def _load(eval_set: EvalSetConfig, preprocess: Any):
    # CLIP_benchmark prints tqdm bars; selbench shows its own rich progress instead.
    os.environ.setdefault("TQDM_DISABLE", "1")
    from clip_benchmark.datasets.builder import build_dataset

    check_eval_set(eval_set)
    task = {"retrieval": "zeroshot_retrieval", "captioning": "captioning"}.get(
        eval_set.task, "zeroshot_classification"
    )
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
    metrics[f"{eval_set.name}/mean_R1"] = (
        metrics[f"{eval_set.name}/i2t_R1"] + metrics[f"{eval_set.name}/t2i_R1"]
    ) / 2
    return metrics


def evaluate_captioning(
    model: Any,
    eval_set: EvalSetConfig,
    preprocess: Any,
    batch_size: int,
    device: str,
) -> dict[str, float]:
    """BLEU@4 and CIDEr of the model's captions (:mod:`selbench.captioning`), read as
    CLIP_benchmark's captioning task reads a set: images with their reference captions."""
    from clip_benchmark.datasets.builder import image_captions_collate_fn

    from selbench.captioning import evaluate_captioning as score

    loader = DataLoader(
        _load(eval_set, preprocess), batch_size=batch_size, collate_fn=image_captions_collate_fn
    )
    return score(model, loader, eval_set.name, device)


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
    metrics = classification_metrics(logits, target, eval_set.name)
    if eval_set.main_metric == "f1_macro":
        metrics[f"{eval_set.name}/f1_macro"] = f1_macro(logits.argmax(dim=1), target)
    return metrics


def f1_macro(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Macro-averaged F1 over the classes present in ``target``, as WILDS scores iWildCam
    (DataComp's ``F1-macro_all``: ``sklearn.metrics.f1_score(average="macro")`` with
    ``labels`` = the true labels' unique values)."""
    from sklearn.metrics import f1_score

    labels = target.unique().tolist()
    return float(
        f1_score(target.numpy(), predicted.numpy(), labels=labels, average="macro", zero_division=0)
    )


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


#: DataComp's 38 tasks by selbench set name (configs/evals/datacomp-38.yaml), grouped as
#: DataComp's aggregate_scores.py groups them (by display name there).
DATACOMP_IMAGENET = "imagenet1k"
DATACOMP_GROUPS: dict[str, tuple[str, ...]] = {
    "imagenet_dist_shifts": (
        "imagenet_sketch",
        "imagenetv2",
        "imagenet-a",
        "imagenet-o",
        "imagenet-r",
        "objectnet",
    ),
    "vtab": (
        "vtab-caltech101",
        "vtab-cifar100",
        "vtab-clevr_count_all",
        "vtab-clevr_closest_object_distance",
        "vtab-dtd",
        "vtab-eurosat",
        "vtab-kitti_closest_vehicle_distance",
        "vtab-flowers",
        "vtab-pets",
        "vtab-pcam",
        "vtab-resisc45",
        "vtab-svhn",
        "sun397",
    ),
    "retrieval": ("flickr30k", "mscoco", "winogavil"),
}
DATACOMP_OTHERS = (
    "cifar10",
    "country211",
    "fgvc_aircraft",
    "food101",
    "gtsrb",
    "mnist",
    "voc2007",
    "renderedsst2",
    "cars",
    "stl10",
    "wilds-iwildcam",
    "wilds-camelyon17",
    "wilds-fmow",
    "fairness-dollar_street",
    "fairness-geode",
)
DATACOMP_38 = (
    DATACOMP_IMAGENET,
    *(name for group in DATACOMP_GROUPS.values() for name in group),
    *DATACOMP_OTHERS,
)


def datacomp_aggregate(main: Mapping[str, float]) -> dict[str, float]:
    """DataComp's summary of its 38 tasks (``aggregate_scores.py`` in its repository; the
    columns of Table 3 of the DataComp paper): ImageNet, the mean over the six ImageNet
    distribution shifts, the mean over the 13 VTAB tasks, the retrieval mean (Flickr,
    MSCOCO, WinoGAViL) and the average over all 38, each from the tasks' main metrics.

    ``main`` maps set names (:data:`DATACOMP_38`) to main-metric values. A summary is
    returned only when every task it averages is present, so a partial run never shows
    a mean over a different task list under DataComp's name.
    """
    summary: dict[str, float] = {}
    if DATACOMP_IMAGENET in main:
        summary["imagenet"] = float(main[DATACOMP_IMAGENET])
    for group, names in DATACOMP_GROUPS.items():
        if all(name in main for name in names):
            summary[group] = math.fsum(main[name] for name in names) / len(names)
    if all(name in main for name in DATACOMP_38):
        summary["average"] = math.fsum(main[name] for name in DATACOMP_38) / len(DATACOMP_38)
    return summary


def evaluate(
    model: Any,
    eval_sets: Sequence[EvalSetConfig],
    preprocess: Any,
    tokenizer: Any,
    batch_size: int = 256,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, float]:
    """Run every eval set; return per-set metrics, ``{set}/main`` where the set names a
    main metric, ``mean_R1``, ``zeroshot_acc1`` and the ``datacomp/*`` summaries."""
    progress = progress or NullProgress()
    model.eval()
    metrics: dict[str, float] = {}
    r1, acc1 = [], []
    main: dict[str, float] = {}
    with torch.no_grad():
        for eval_set in progress.track(eval_sets, "Evaluating", total=len(eval_sets)):
            if eval_set.task == "retrieval":
                got = evaluate_retrieval(model, eval_set, preprocess, tokenizer, batch_size, device)
                r1 += [got[f"{eval_set.name}/i2t_R1"], got[f"{eval_set.name}/t2i_R1"]]
            elif eval_set.task == "captioning":
                from selbench.captioning import can_caption

                if not can_caption(model):
                    progress.note(
                        f"Captioning set {eval_set.name!r} skipped: {type(model).__name__} "
                        f"cannot generate captions (a CoCa scale such as tiny-coca can)"
                    )
                    continue
                got = evaluate_captioning(model, eval_set, preprocess, batch_size, device)
            elif eval_set.task == "reasoning":
                from selbench.probe import evaluate_reasoning

                got = evaluate_reasoning(
                    model, eval_set.name, Path(eval_set.path), preprocess, tokenizer,
                    batch_size, device,
                )  # fmt: skip
            else:
                got = evaluate_classification(
                    model, eval_set, preprocess, tokenizer, batch_size, device
                )
                acc1.append(got[f"{eval_set.name}/acc1"])
            metrics.update(got)
            if eval_set.main_metric is not None:
                key = f"{eval_set.name}/{eval_set.main_metric}"
                if key not in got:
                    raise PoolError(
                        f"eval set {eval_set.name!r}: main metric {eval_set.main_metric!r} "
                        f"does not apply to a {eval_set.task} set"
                    )
                main[eval_set.name] = metrics[f"{eval_set.name}/main"] = got[key]
    if r1:
        metrics["mean_R1"] = sum(r1) / len(r1)
    if acc1:
        metrics["zeroshot_acc1"] = sum(acc1) / len(acc1)
    for key, value in datacomp_aggregate(main).items():
        metrics[f"datacomp/{key}"] = value
    return metrics
