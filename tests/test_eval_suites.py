"""Evaluation suites: sets written by CLIP_benchmark's own exporter, named suites, DataComp's
38-task aggregation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from selbench.configs import EvalSetConfig
from selbench.errors import ConfigError, PoolError
from selbench.evaluate import (
    DATACOMP_38,
    DATACOMP_GROUPS,
    check_eval_set,
    datacomp_aggregate,
    evaluate,
    resolve_eval_suite,
)

# clip_benchmark's exporter always starts 8 DataLoader workers; torch warns about that here.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


class TinyClassification(torch.utils.data.Dataset):
    """(PNG bytes, label) pairs, with the classes and templates the exporter saves."""

    classes = list(COLOURS)
    templates = ["a photo of something {c}.", "a {c} picture."]

    def __init__(self) -> None:
        from clip_benchmark.webdataset_builder import PIL_to_bytes

        self.to_bytes = PIL_to_bytes("png")

    def __len__(self) -> int:
        return 12  # CLIP_benchmark's recall@10 needs at least 10 images

    def __getitem__(self, i):
        label = i % 3
        return self.to_bytes(Image.new("RGB", (32, 32), list(COLOURS.values())[label])), label


class TinyRetrieval(TinyClassification):
    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        name = self.classes[label]
        return image, [f"a {name} square", f"something {name}"]


@pytest.fixture(scope="module")
def exported_sets(tmp_path_factory) -> Path:
    """Two sets written by clip_benchmark.webdataset_builder, as its CLI writes them."""
    from clip_benchmark.webdataset_builder import convert_dataset, convert_retrieval_dataset

    root = tmp_path_factory.mktemp("evalsets")
    convert_dataset(
        TinyClassification(), "test", str(root / "wds_colours"), image_format="png", max_count=4
    )
    convert_retrieval_dataset(
        TinyRetrieval(), "test", str(root / "wds_squares"), image_format="png", max_count=4
    )
    return root


def write_suite(path: Path, root: Path) -> Path:
    path.write_text(
        "name: tiny-suite\n"
        "sets:\n"
        f"  - {{name: squares, task: retrieval, main_metric: mean_R1, path: {root}/wds_squares}}\n"
        f"  - {{name: colours, task: classification, path: {root}/wds_colours}}\n"
    )
    return path


def test_exporter_output_is_read_and_evaluated(exported_sets, tmp_path):
    from selbench.train import build_model

    assert (exported_sets / "wds_colours" / "test" / "nshards.txt").read_text().strip() == "3"
    sets = resolve_eval_suite(str(write_suite(tmp_path / "suite.yaml", exported_sets)))
    assert [s.name for s in sets] == ["squares", "colours"]
    model, preprocess, tokenizer = build_model("selbench-tiny", seed=0)
    metrics = evaluate(model, sets, preprocess, tokenizer, batch_size=4)
    for key in ("squares/i2t_R1", "squares/t2i_R10", "colours/acc1", "mean_R1", "zeroshot_acc1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["squares/main"] == metrics["squares/mean_R1"]
    assert metrics["squares/mean_R1"] == pytest.approx(
        (metrics["squares/i2t_R1"] + metrics["squares/t2i_R1"]) / 2
    )
    for way in ("i2t", "t2i"):
        r1, r5, r10 = (metrics[f"squares/{way}_R{k}"] for k in (1, 5, 10))
        assert r1 <= r5 <= r10
    assert "colours/main" not in metrics  # no main_metric configured
    assert not any(key.startswith("datacomp/") for key in metrics)


@pytest.mark.parametrize(
    "remove, message",
    [
        ("", r"wds_squares does not exist"),
        ("test/nshards.txt", r"test/nshards.txt is missing"),
        ("test/1.tar", r"shards 1.tar are missing"),
        ("dataset_type.txt", r"does not say 'retrieval'"),
    ],
)
def test_missing_set_names_the_set_and_the_layout(exported_sets, tmp_path, remove, message):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(exported_sets, root)
    target = root / "wds_squares" / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(PoolError) as caught:
        resolve_eval_suite(str(write_suite(tmp_path / "suite.yaml", root)))
    text = str(caught.value)
    assert text.startswith("eval set 'squares': ")
    assert re.search(message, text), text
    assert "expected CLIP_benchmark's wds layout" in text and "test/0.tar" in text


def test_classification_set_without_classnames_is_refused(exported_sets, tmp_path):
    import shutil

    shutil.copytree(exported_sets / "wds_colours", tmp_path / "c")
    (tmp_path / "c" / "classnames.txt").unlink()
    with pytest.raises(PoolError, match=r"eval set 'colours': .*classnames.txt is missing"):
        check_eval_set(
            EvalSetConfig(name="colours", task="classification", path=str(tmp_path / "c"))
        )


def test_bundled_suites_resolve_and_unknown_suite_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("SELBENCH_EVAL_ROOT", str(tmp_path))
    seed = resolve_eval_suite("seed", check=False)
    assert {(s.name, s.task) for s in seed} == {
        ("mscoco", "retrieval"),
        ("flickr30k", "retrieval"),
        ("imagenet1k", "classification"),
        ("nlvr2-probe", "reasoning"),
        ("mscoco-captioning", "captioning"),
    }
    assert seed[0].path.startswith(str(tmp_path))
    datacomp = resolve_eval_suite("datacomp-38", check=False)
    assert {s.name for s in datacomp} <= set(DATACOMP_38) and len(datacomp) == 34
    assert all(s.main_metric for s in datacomp)
    with pytest.raises(PoolError, match="eval set 'mscoco'"):
        resolve_eval_suite("seed")  # nothing under SELBENCH_EVAL_ROOT
    with pytest.raises(ConfigError, match="unknown eval 'nope'"):
        resolve_eval_suite("nope")


def test_datacomp_aggregate_follows_datacomps_groups():
    assert len(DATACOMP_38) == len(set(DATACOMP_38)) == 38
    scores = {name: (i + 1) / 100 for i, name in enumerate(DATACOMP_38)}
    summary = datacomp_aggregate(scores)
    assert summary["imagenet"] == scores["imagenet1k"]
    shifts = ["imagenet_sketch", "imagenetv2", "imagenet-a", "imagenet-o", "imagenet-r"]
    assert summary["imagenet_dist_shifts"] == pytest.approx(
        sum(scores[n] for n in [*shifts, "objectnet"]) / 6
    )
    assert len(DATACOMP_GROUPS["vtab"]) == 13 and "sun397" in DATACOMP_GROUPS["vtab"]
    assert summary["vtab"] == pytest.approx(sum(scores[n] for n in DATACOMP_GROUPS["vtab"]) / 13)
    assert summary["retrieval"] == pytest.approx(
        (scores["flickr30k"] + scores["mscoco"] + scores["winogavil"]) / 3
    )
    assert summary["average"] == pytest.approx(sum(range(1, 39)) / 100 / 38)


def test_datacomp_aggregate_never_averages_an_incomplete_group():
    scores = {name: 0.5 for name in DATACOMP_38 if name != "winogavil"}
    summary = datacomp_aggregate(scores)
    assert set(summary) == {"imagenet", "imagenet_dist_shifts", "vtab"}
    assert all(math.isclose(v, 0.5) for v in summary.values())
