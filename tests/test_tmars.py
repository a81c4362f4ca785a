"""T-MARS (arXiv 2307.03132): the offline text detector, the masking, and the selection,
on cases worked out by hand."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selbench_plugins.tmars import TextDetector, TMars, mask_text

from selbench.embedders import Embeddings
from selbench.errors import ConfigError
from selbench.strategy import SelectionContext
from selbench.synthweb.signs import TextSign, draw_sign, sign_rows
from selbench.testing import MemoryPool

SIGN = TextSign(lines=("red", "star"), top=0.2, paper=240, ink=10)


def plain(value=(90, 140, 60), size=32):
    return np.full((size, size, 3), value, dtype=np.uint8)


def test_detector_finds_a_printed_sign_and_nothing_on_a_plain_image():
    detector = TextDetector()
    assert detector.boxes(plain()) == []
    image = draw_sign(plain(), SIGN)
    boxes = detector.boxes(image)
    assert boxes
    top, bottom = sign_rows(SIGN, 32)
    ink = np.zeros(image.shape[:2], dtype=bool)
    ink[top:bottom] = image[top:bottom].mean(axis=-1) < 128
    inside = np.zeros(ink.shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        assert top <= y0 < y1 <= bottom  # every box lies on the sign
        inside[y0:y1, x0:x1] = True
    assert (inside & ink).sum() >= 0.7 * ink.sum()  # and the boxes hold most of its ink


def test_mask_fills_each_box_with_the_mean_of_the_pixels_around_it():
    image = np.zeros((6, 6, 3), dtype=np.uint8)
    image[:, :3] = 30
    image[:, 3:] = 90
    image[2:4, 2:4] = 255  # the "text"
    out = mask_text(image, [(2, 2, 4, 4)], ring=1)
    # the ring is rows 1-4, columns 1-4 minus the box: 6 pixels at 30, 6 at 90
    assert out[2:4, 2:4].tolist() == [[[60] * 3] * 2] * 2
    assert (out[:2] == image[:2]).all() and (out[4:] == image[4:]).all()
    # boxes take their colour only from pixels no box covers: here the box on the right
    # sees column 2 only: 30, 30, 255, 255, 30, 30 (the left box is not its surroundings)
    out = mask_text(image, [(0, 0, 2, 6), (3, 0, 6, 6)], ring=1)
    assert out[0, 4].tolist() == [105] * 3
    # a box covering everything takes the image's mean colour
    assert mask_text(image, [(0, 0, 6, 6)]).tolist() == np.full((6, 6, 3), 82).tolist()


class Services:
    """Embeddings by hand: a masked image embeds as ``masked_row``."""

    def __init__(self, pool, image, text, masked_row):
        self.pool, self.image, self.text, self.masked_row = pool, image, text, masked_row
        self.embedded = 0

    def embeddings(self, spec):
        return Embeddings(self.image, self.text, self.pool.uids, spec, "fixed")

    def embed_images(self, spec, images):
        self.embedded += len(images)
        return np.tile(self.masked_row, (len(images), 1))


def test_tmars_drops_pairs_that_match_only_through_their_text(tmp_path: Path):
    e = np.eye(3, dtype=np.float32)
    u = (e[0] + e[1]) / np.sqrt(2)
    # u0 carries a sign and matches its caption perfectly (CLIP read the sign); masked, it
    # embeds as e2 and no longer matches. u1 has no text and matches at cos 0.71.
    images = [Image.fromarray(draw_sign(plain(), SIGN)), Image.fromarray(plain())]
    pool = MemoryPool(["u0", "u1"], ["a red star", "a green field"], images)
    services = Services(pool, np.stack([e[0], u]), np.stack([e[0], e[0]]), e[2])
    ctx = SelectionContext(
        pool=pool, budget_count=1, budget_fraction=0.5, seed=0, device="cpu",
        work_dir=tmp_path, services=services,
    )  # fmt: skip
    picked = TMars().select(ctx)
    assert picked.uids == ["u1"]
    assert picked.scores == pytest.approx({"u0": 0.0, "u1": float(u[0])})
    assert services.embedded == 1  # only the image with text is re-embedded
    assert picked.metrics == {"text_detected_frac": 0.5}


def test_bad_detector_settings_are_refused_naming_the_parameter(tmp_path: Path):
    with pytest.raises(ConfigError, match="min_edge_fill"):
        TextDetector(min_edge_fill=0.0)
    with pytest.raises(ConfigError, match="upsample"):
        TextDetector(upsample=0)
