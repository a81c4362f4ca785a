"""DFN-style filtering (arXiv 2309.17425): the high-quality set, the cached filter, the scores."""

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from selbench_plugins.dfn import Dfn, expand_pairs, filter_key, score_pairs, target_captions

from selbench import testing
from selbench.errors import PluginError
from selbench.strategy import SelectionContext
from selbench.target import TargetSet
from selbench.testing import MemoryPool, check_strategy
from selbench.train import build_model

COLOURS = {
    "red": (220, 20, 20),
    "blue": (20, 20, 220),
    "green": (20, 200, 20),
    "yellow": (230, 220, 0),
}


def solid(rgb, size=32):
    return Image.new("RGB", (size, size), rgb)


def write_wds(root: Path, samples: list[tuple[str, Image.Image, str | None]]) -> Path:
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for key, image, text in samples:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            members = {f"{key}.png": buffer.getvalue()}
            if text is not None:
                members[f"{key}.txt"] = text.encode()
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def test_captions_come_from_the_wds_shards_and_from_sidecar_files(tmp_path):
    wds = write_wds(
        tmp_path / "wds", [("a", solid((1, 2, 3)), "one\ntwo\n"), ("b", solid((4, 5, 6)), "three")]
    )
    assert target_captions(wds, ["0/a", "0/b"]) == [["one", "two"], ["three"]]
    folder = tmp_path / "folder"
    folder.mkdir()
    solid((1, 2, 3)).save(folder / "x.png")
    (folder / "x.txt").write_text("a caption\n")
    assert target_captions(folder, ["x.png"]) == [["a caption"]]


def test_an_image_without_captions_is_named(tmp_path):
    wds = write_wds(
        tmp_path / "wds", [("a", solid((1, 2, 3)), "one"), ("b", solid((4, 5, 6)), None)]
    )
    with pytest.raises(PluginError, match="image 0/b .* has no caption"):
        target_captions(wds, ["0/a", "0/b"])


def test_every_caption_is_a_training_pair():
    images, texts = expand_pairs(["i0", "i1"], [["a", "b"], ["c"]])
    assert images == ["i0", "i0", "i1"] and texts == ["a", "b", "c"]


def test_the_filter_key_follows_content_not_identity():
    images = [solid((1, 2, 3)), solid((4, 5, 6))]
    key = filter_key(images, [["a"], ["b"]], "{}", "scratch", 0)
    assert key == filter_key([im.copy() for im in images], [["a"], ["b"]], "{}", "scratch", 0)
    assert key != filter_key(images, [["a"], ["c"]], "{}", "scratch", 0)
    assert key != filter_key(images, [["a"], ["b"]], "{}", "proxy:abc", 0)
    assert key != filter_key(images, [["a"], ["b"]], "{}", "scratch", 1)


def test_scores_are_the_models_cosines_placed_by_row():
    model, preprocess, tokenizer = build_model("selbench-tiny", 0)
    model.eval()
    images = [solid(c) for c in COLOURS.values()]
    texts = [f"a {name} square" for name in COLOURS]
    pairs = [
        (2, images[2], texts[2]),
        (0, images[0], texts[0]),
        (3, images[3], texts[3]),
        (1, images[1], texts[1]),
    ]
    got = score_pairs(model, preprocess, tokenizer, pairs, "cpu", 4)
    with torch.no_grad():
        f = model.encode_image(torch.stack([preprocess(im) for im in images]))
        g = model.encode_text(tokenizer(texts))
        expected = torch.nn.functional.cosine_similarity(f, g).numpy()
    assert got == pytest.approx(expected, abs=1e-5)
    with pytest.raises(PluginError, match="1 of the pool's 5 pairs could not be scored"):
        score_pairs(model, preprocess, tokenizer, pairs, "cpu", 5)


class HqServices:
    """A context whose target set is a captioned wds directory."""

    def __init__(self, root: Path):
        self.root = root
        self.used = set()

    def target(self):
        from selbench.target import read_images

        self.used.add("target")
        keys, images = zip(*read_images(self.root), strict=True)
        return TargetSet(self.root, list(images), list(keys), [])


RECIPE = """name: dfn-test
model: selbench-tiny
batch_size: 4
epochs: 150
lr: 2.0e-3
weight_decay: 0.1
warmup_fraction: 0.1
grad_clip_norm: 1.0
random_resized_crop_scale: null
"""


@pytest.mark.slow  # trains a filter for 150 steps: seconds alone, minutes on a loaded host
def test_the_filter_trained_on_clean_pairs_keeps_the_aligned_pool_pairs(tmp_path):
    hq = write_wds(tmp_path / "hq", [(n, solid(c), f"a {n} square") for n, c in COLOURS.items()])
    recipe = tmp_path / "dfn-test.yaml"
    recipe.write_text(RECIPE)
    names = list(COLOURS)
    uids, captions, images = [], [], []
    for i, name in enumerate(names):  # aligned pair, then a pair with the next colour's caption
        uids += [f"ok-{name}", f"bad-{name}"]
        captions += [f"a {name} square", f"a {names[(i + 1) % 4]} square"]
        images += [solid(COLOURS[name]), solid(COLOURS[name])]
    pool = MemoryPool(uids, captions, images)

    def run():
        ctx = SelectionContext(
            pool=pool,
            budget_count=4,
            budget_fraction=0.5,
            seed=0,
            device="cpu",
            work_dir=tmp_path,
            services=HqServices(hq),
        )
        return Dfn({"recipe": str(recipe)}).select(ctx)

    first = run()
    assert sorted(first.uids) == sorted(f"ok-{n}" for n in names)
    assert first.metrics["filter_trained"] == 1.0 and first.metrics["hq_images"] == 4
    again = run()  # the filter and its scores come from the cache
    assert again.metrics["filter_trained"] == 0.0
    assert again.uids == first.uids and again.scores == first.scores


def test_conformance_kit(tmp_path, monkeypatch):
    # The kit's memory target has no captions; write it as a captioned wds directory.
    def captioned_target(self):
        self.used.add("target")
        root = tmp_path / f"target-{len(self.pool)}"
        if not root.exists():
            extra = testing.make_memory_pool(12, seed=len(self.pool) + 7)
            samples = list(zip(extra.uids, extra.images, extra.captions, strict=True))
            write_wds(root, samples)
        return HqServices(root).target()

    monkeypatch.setattr(testing.RecordingServices, "target", captioned_target)
    recipe = tmp_path / "dfn-kit.yaml"
    recipe.write_text(RECIPE.replace("epochs: 150", "epochs: 2"))
    check_strategy(Dfn, {"recipe": str(recipe)})
