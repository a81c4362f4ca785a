"""The nlvr2-probe: SynthWeb's two-image reasoning set (ground truth checked against the
recorded scenes), NLVR2's layout read as NLVR2 ships it, and a probe that learns from the
images when the features carry the answer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selbench.configs import EvalSetConfig
from selbench.errors import PoolError
from selbench.evaluate import check_eval_set, evaluate
from selbench.pools import resolve_pool
from selbench.probe import evaluate_reasoning, load_nlvr2
from selbench.synthweb import SynthWebConfig, generate_synthweb
from selbench.synthweb.captions import relation
from selbench.synthweb.reasoning import FAMILIES


@pytest.fixture(scope="module")
def synthweb_with_reasoning(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sw") / "synthweb"
    config = SynthWebConfig(
        n_samples=60, n_retrieval=10, n_classification=12, n_target=10,
        n_reasoning_train=240, n_reasoning_test=60,
    )  # fmt: skip
    generate_synthweb(root, config)
    return root


def truth(sentence: str, left: dict, right: dict) -> bool:
    """The statement's truth value recomputed from the recorded scenes, written apart from
    the generator: parse the sentence and count."""
    scenes = {"the left image": left["objects"], "the right image": right["objects"]}
    both = left["objects"] + right["objects"]
    if sentence.startswith("there are "):
        return int(sentence.split()[2]) == len(both)
    if "more objects than" in sentence:
        first, second = sentence.split(" shows more objects than ")
        return len(scenes[first]) > len(scenes[second])
    if sentence == "both images show the same number of objects":
        return len(left["objects"]) == len(right["objects"])
    if sentence.startswith("in "):
        side, rest = sentence[3:].split(", ", 1)
        objects = scenes[side]
        for said in ("to the left of", "to the right of", "above", "below"):
            if f" is {said} " in rest:
                a_text, b_text = rest.split(f" is {said} ")
                break

        def find(text: str) -> dict:
            colour, shape = text.split(" ", 1)[1].split(" ", 1)
            return next(o for o in objects if (o["colour"], o["shape"]) == (colour, shape))

        from selbench.synthweb.scene import SceneObject

        def as_object(o: dict) -> SceneObject:
            fields = SceneObject.__dataclass_fields__
            return SceneObject(**{k: o.get(k, 0) for k in fields})

        return said in relation(as_object(find(a_text)), as_object(find(b_text)))

    def matches(o: dict, thing: str) -> bool:
        words = thing.split()
        if words[-1] == "object":
            return o["colour"] == words[0]
        if len(words) == 2:
            return (o["colour"], o["shape"]) == (words[0], words[1])
        return o["shape"] == words[0]

    for lead in ("both images show ", "neither image shows "):
        if sentence.startswith(lead):
            thing = sentence[len(lead) :].split(" ", 1)[1]
            has = [any(matches(o, thing) for o in objs) for objs in scenes.values()]
            return all(has) if lead.startswith("both") else not any(has)
    side, thing = sentence.split(" shows ")
    return any(matches(o, thing.split(" ", 1)[1]) for o in scenes[side])


def test_reasoning_set_is_balanced_and_true_to_its_scenes(synthweb_with_reasoning):
    root = synthweb_with_reasoning / "eval" / "reasoning"
    for split, n in (("train", 240), ("test1", 60)):
        lines = [json.loads(x) for x in (root / f"{split}.json").read_text().splitlines()]
        assert len(lines) == n
        pairs = Counter((x["synthweb"]["family"], x["label"]) for x in lines)
        assert set(pairs) == {(f, lab) for f in FAMILIES for lab in ("True", "False")}
        assert max(pairs.values()) - min(pairs.values()) <= 1  # families x labels balanced
        for x in lines:
            gt = x["synthweb"]
            assert truth(x["sentence"], gt["left"], gt["right"]) == (x["label"] == "True"), x
    data = load_nlvr2(root, "train")
    assert len(data) == 240 and not data.skipped
    assert all(p.is_file() for p in data.left + data.right)
    # No image of the reasoning set repeats a pool or eval image (or another one).
    digests = {hash(p.read_bytes()) for p in (root / "images").rglob("*.png")}  # 600 images
    assert len(digests) == 600
    pool = resolve_pool(str(synthweb_with_reasoning))
    sets = {s.name: s.task for s in pool.eval_sets}
    assert sets["reasoning-probe"] == "reasoning"


def test_no_reasoning_set_when_its_sizes_are_zero(tmp_path):
    with pytest.raises(ValueError, match="both be 0"):
        SynthWebConfig(n_reasoning_train=0, n_reasoning_test=10)
    config = SynthWebConfig(
        n_samples=20, n_retrieval=4, n_classification=12, n_target=4,
        n_reasoning_train=0, n_reasoning_test=0,
    )  # fmt: skip
    generate_synthweb(tmp_path / "sw", config)
    assert not (tmp_path / "sw" / "eval" / "reasoning").exists()
    assert "reasoning-probe" not in {s.name for s in resolve_pool(str(tmp_path / "sw")).eval_sets}


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}


def write_nlvr2_fixture(root: Path, n_train: int = 240, n_test: int = 90) -> None:
    """A set in NLVR2's released layout: train.json with a ``directory`` per line and its
    images in ``images/train/<directory>/``, dev.json with its images in ``dev/`` (no
    ``images/`` folder), NLVR2's extra fields, and one statement whose image is missing.
    The statement is true when the left image has the named colour."""
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    for split, n in (("train", n_train), ("dev", n_test)):
        lines = []
        for i in range(n):
            left, right = rng.choice(names, size=2)
            said = left if i % 2 == 0 else rng.choice([c for c in names if c != left])
            prefix = f"{split}-{i}-1"
            directory = str(i % 3) if split == "train" else ""
            folder = root / ("images" if split == "train" else "") / split / directory
            folder.mkdir(parents=True, exist_ok=True)
            for side, colour in ((0, left), (1, right)):
                if split == "dev" and i == 0 and side == 1:
                    continue  # a missing image, as in NLVR2's public release
                Image.new("RGB", (8, 8), COLOURS[colour]).save(folder / f"{prefix}-img{side}.png")
            record = {
                "identifier": f"{prefix}-0",
                "sentence": f"the left image is {said}",
                "label": "True" if said == left else "False",
                "left_url": "https://example.invalid/a.jpg",
                "right_url": "https://example.invalid/b.jpg",
                "writer": "w1",
                "synset": "n0000",
                "query": "q",
                "extra_validations": {},
            }
            if split == "train":
                record["directory"] = directory
            lines.append(json.dumps(record))
        (root / f"{split}.json").write_text("\n".join(lines) + "\n")


class ColourModel(torch.nn.Module):
    """Features that carry the answer: an image's mean colour, one-hot over COLOURS, and a
    statement's colour word, one-hot too (plus noise so nothing is degenerate)."""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = pixels.float().mean(dim=(2, 3))  # (N, 3)
        base = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0
        nearest = torch.cdist(mean, base).argmin(dim=1)
        return torch.nn.functional.one_hot(nearest, 3).float() + 0.01

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(tokens[:, 0], 3).float() + 0.01


def colour_preprocess(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def colour_tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[list(COLOURS).index(t.split()[-1])] for t in texts])


def test_nlvr2_layout_reads_as_released_and_the_probe_learns_from_the_images(tmp_path):
    root = tmp_path / "nlvr2"
    write_nlvr2_fixture(root)
    train, dev = load_nlvr2(root, "train"), load_nlvr2(root, "dev")
    assert len(train) == 240 and len(dev) == 89 and dev.skipped == {"missing_image": 1}
    assert train.left[4].parent.name == "1"  # directory 4 % 3
    got = evaluate_reasoning(
        ColourModel(), "nlvr2-probe", root, colour_preprocess, colour_tokenizer
    )
    assert got["nlvr2-probe/n_train"] == 240 and got["nlvr2-probe/n_test"] == 89
    assert got["nlvr2-probe/skipped"] == 1
    assert got["nlvr2-probe/acc"] >= 0.9  # the left image's colour decides the label
    assert got["nlvr2-probe/text_only_acc"] <= 0.7  # the sentence alone does not
    again = evaluate_reasoning(
        ColourModel(), "nlvr2-probe", root, colour_preprocess, colour_tokenizer
    )
    assert again == got  # fixed seed: the same model gives the same numbers


def test_bad_nlvr2_input_is_named(tmp_path):
    root = tmp_path / "nlvr2"
    write_nlvr2_fixture(root, n_train=12, n_test=6)
    with (root / "train.json").open("a") as f:
        f.write('{"identifier": "train-99-0-0", "sentence": "x", "label": "maybe"}\n')
    with pytest.raises(PoolError, match=r"train.json, line 13: not an NLVR2 statement"):
        load_nlvr2(root, "train")
    (root / "dev.json").unlink()
    eval_set = EvalSetConfig(name="nlvr2-probe", task="reasoning", path=str(root))
    with pytest.raises(PoolError, match="'nlvr2-probe'.*neither test1.json nor dev.json"):
        check_eval_set(eval_set)
    missing = EvalSetConfig(name="nlvr2-probe", task="reasoning", path=str(tmp_path / "no"))
    with pytest.raises(PoolError, match="does not exist.*NLVR2's layout"):
        check_eval_set(missing)


def test_evaluate_runs_the_probe_beside_the_other_sets(synthweb_with_reasoning):
    from selbench.train import build_model

    model, preprocess, tokenizer = build_model("selbench-tiny", seed=0)
    sets = [s for s in resolve_pool(str(synthweb_with_reasoning)).eval_sets]
    metrics = evaluate(model, sets, preprocess, tokenizer)
    assert {"reasoning-probe/acc", "reasoning-probe/text_only_acc", "mean_R1"} <= set(metrics)
    assert 0.0 <= metrics["reasoning-probe/acc"] <= 1.0
    assert metrics["reasoning-probe/n_test"] == 60
    # the probe's accuracy does not leak into the zero-shot or retrieval summaries
    assert metrics["zeroshot_acc1"] == pytest.approx(
        (metrics["shape/acc1"] + metrics["colour/acc1"]) / 2
    )
