"""T-MARS (Maini, Goyal, Lipton, Kolter, Raghunathan, "T-MARS: Improving Visual
Representations by Circumventing Text Feature Learning", ICLR 2024, arXiv 2307.03132).

CLIP learns to read, so CLIP-score filtering keeps pairs whose caption matches only the
text printed in the image. T-MARS detects the text regions, masks each one by filling it
with the average colour of the pixels around it (the paper's masking, Sec. 4), and scores
the *masked* image against the caption with the same CLIP; pairs that matched only
through their text lose their score and are filtered out, pairs whose visual content also
matches keep it. As in the paper, the filter keeps the best-scoring share of the pool by
the masked score; here the share is the harness's budget (DataComp's percentile form).

Text detector. The paper uses FAST (Chen et al., 2021), a learned detector whose weights
would have to be downloaded. Offline, selbench uses a documented stand-in built on a
well-kept library: a morphological text-line localiser on OpenCV (:class:`TextDetector`:
edge density, horizontal closing, box geometry), the learning-free kind of detector that
preceded learned ones. Its recall and false positives on SynthWeb's text-in-image
pathology are measured by ``benchmarks/tmars_detector.py`` and reported in
``docs/strategies/tmars.md``. Pass boxes from any other detector to :func:`mask_text`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from selbench.toolbox import (
    ConfigError,
    Selection,
    SelectionContext,
    Strategy,
    hookimpl,
    top_k,
)


class TextDetector:
    """Text lines found by their edge density: a morphological text localiser on OpenCV.

    Steps: grey image, enlarged ``upsample`` times (small images); morphological gradient
    (3x3 ellipse) and Otsu's threshold give the edges; long horizontal edges (borders
    of signs and banners, at least half the side long) are removed; a horizontal closing
    (side/16 wide) joins neighbouring characters into lines; a line's bounding box is text
    when it is character-high (``line_height`` of the side), at least ``min_aspect`` times
    as wide as high, and at least ``min_edge_fill`` of it is edge. Sizes are fractions of
    the side, so one setting serves 32 px and 224 px images.
    """

    def __init__(
        self,
        upsample: int = 4,
        min_edge_fill: float = 0.4,
        min_aspect: float = 1.5,
        line_height: tuple[float, float] = (0.08, 0.6),
    ) -> None:
        if upsample < 1:
            raise ConfigError(f"tmars: upsample must be >= 1, got {upsample}")
        if not 0.0 < min_edge_fill <= 1.0:
            raise ConfigError(f"tmars: min_edge_fill must be in (0, 1], got {min_edge_fill}")
        self.upsample, self.min_edge_fill, self.min_aspect = upsample, min_edge_fill, min_aspect
        self.line_height = line_height

    def boxes(self, image: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Text-line boxes ``(x0, y0, x1, y1)`` (pixels of ``image``, end exclusive)."""
        import cv2  # opencv-python-headless: needs no downloaded weights

        grey = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
        up = self.upsample
        if up > 1:
            grey = cv2.resize(grey, None, fx=up, fy=up, interpolation=cv2.INTER_CUBIC)
        side = max(grey.shape)
        kernel = cv2.getStructuringElement
        gradient = cv2.morphologyEx(grey, cv2.MORPH_GRADIENT, kernel(cv2.MORPH_ELLIPSE, (3, 3)))
        _, edges = cv2.threshold(gradient, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        rules = cv2.morphologyEx(edges, cv2.MORPH_OPEN, kernel(cv2.MORPH_RECT, (side // 2, 1)))
        rules = cv2.dilate(rules, kernel(cv2.MORPH_RECT, (1, 3)))
        edges = cv2.bitwise_and(edges, cv2.bitwise_not(rules))
        joined = cv2.morphologyEx(
            edges, cv2.MORPH_CLOSE, kernel(cv2.MORPH_RECT, (max(3, side // 16), 1))
        )
        contours, _ = cv2.findContours(joined, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        low, high = self.line_height
        out = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            if not (low * side <= h <= high * side and w >= self.min_aspect * h):
                continue
            if cv2.countNonZero(edges[y : y + h, x : x + w]) < self.min_edge_fill * w * h:
                continue
            out.append((x // up, y // up, -(-(x + w) // up), -(-(y + h) // up)))
        return sorted(out)


def mask_text(image: np.ndarray, boxes: list[tuple[int, int, int, int]], ring: int = 2):
    """``image`` with every box filled by the mean colour of the ``ring`` pixels around it
    (T-MARS's in-painting, Sec. 4); boxes are filled in the order given, each from the
    pixels around it that no box covers."""
    out = np.asarray(image, dtype=np.float32).copy()
    h, w = out.shape[:2]
    covered = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        covered[y0:y1, x0:x1] = True
    for x0, y0, x1, y1 in boxes:
        ya, yb = max(0, y0 - ring), min(h, y1 + ring)
        xa, xb = max(0, x0 - ring), min(w, x1 + ring)
        around = ~covered[ya:yb, xa:xb]
        if around.any():
            colour = out[ya:yb, xa:xb][around].mean(axis=0)
        else:  # the box's surroundings are all text: use the image's mean colour
            colour = out[~covered].mean(axis=0) if (~covered).any() else out.mean(axis=(0, 1))
        out[y0:y1, x0:x1] = colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class TMarsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedder: str = Field(
        default="reference",
        description="embedder spec that scores the masked images; the paper used OpenAI "
        "CLIP ViT-L/14 (open_clip:ViT-L-14:/path/to/weights.pt); on SynthWeb the default "
        "is its reference CLIP, as for clip_score",
    )
    min_edge_fill: float = Field(
        default=0.4,
        description="share of a line box that must be edge for it to count as text "
        "(stand-in detector; the paper's FAST detector is learned)",
    )
    upsample: int = Field(
        default=4, description="enlarge images by this factor before detecting (small images)"
    )
    batch_size: int = Field(default=512, description="masked images embedded per batch")


class TMars(Strategy):
    """Mask text regions, re-score the masked images against their captions, keep the best."""

    name = "tmars"
    summary = "T-MARS: mask text in the images, keep the pairs whose masked image still matches"
    reference = "Maini et al., T-MARS (ICLR 2024, arXiv 2307.03132), Sec. 4"
    stochastic = False
    needs = frozenset({"embeddings", "pool_images"})  # masks text in the pool's images
    Params = TMarsParams

    def score(self, ctx: SelectionContext) -> np.ndarray:
        """The T-MARS score of every pair (Maini et al. 2024, Sec. 4): the CLIP score of the
        *text-masked* image against its caption, ``s_i = <f_img(mask(x_i)), f_txt(t_i)>``
        with L2-normalised embeddings, where ``mask`` fills every detected text box with
        the mean colour around it (:func:`mask_text`); an image with no text detected keeps
        its cached embedding, i.e. its plain CLIP score. Higher means keep; :meth:`select`
        keeps exactly the top ``budget``."""
        return self._masked_scores(ctx)[0]

    def _masked_scores(self, ctx: SelectionContext) -> tuple[np.ndarray, int]:
        """:meth:`score` and the number of images in which text was detected."""
        p = self.params
        detector = TextDetector(upsample=p.upsample, min_edge_fill=p.min_edge_fill)
        found = ctx.embeddings(p.embedder)
        image = np.asarray(found.image, dtype=np.float32)
        text = np.asarray(found.text, dtype=np.float32)
        uids = list(ctx.pool.uids)
        position = {u: i for i, u in enumerate(uids)}
        masked_rows: list[int] = []
        masked_images: list[Image.Image] = []
        rows = image.copy()  # unmasked images keep their cached embedding

        def flush() -> None:
            if masked_images:
                embedded = ctx.embed_images(masked_images, p.embedder)
                rows[masked_rows] = embedded
                masked_rows.clear()
                masked_images.clear()

        pixels = ctx.progress.track(ctx.pool.iter_images(), "T-MARS: masking text", total=len(uids))
        detected = 0
        for uid, picture in pixels:
            array = np.asarray(picture.convert("RGB"))
            boxes = detector.boxes(array)
            if boxes:
                detected += 1
                masked_rows.append(position[uid])
                masked_images.append(Image.fromarray(mask_text(array, boxes)))
                if len(masked_images) >= p.batch_size:
                    flush()
        flush()
        rows /= np.linalg.norm(rows, axis=1, keepdims=True).clip(1e-12)
        # Not in place: np.asarray may have returned the cached embeddings themselves.
        text = text / np.linalg.norm(text, axis=1, keepdims=True).clip(1e-12)
        scores = np.einsum("ij,ij->i", rows, text)
        return scores, detected

    def select(self, ctx: SelectionContext) -> Selection:
        scores, detected = self._masked_scores(ctx)
        uids = list(ctx.pool.uids)
        chosen = top_k(scores, ctx.budget_count)
        return Selection(
            uids=[uids[i] for i in chosen],
            scores={u: float(s) for u, s in zip(uids, scores, strict=True)},
            metrics={"text_detected_frac": detected / max(1, len(uids))},
        )


@hookimpl
def register_strategies(register):
    register(TMars)
