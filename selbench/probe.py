"""``nlvr2-probe``: two-image visual reasoning, measured with a probe on frozen features.

The seed paper (TL;DR, Table 3) reports NLVR2 (Suhr et al., ACL 2019): a statement is true
or false of a pair of images. It fine-tunes its whole pretrained model (BLIP, whose
text encoder cross-attends to both images) on NLVR2's 86k training statements. selbench
trains contrastive dual encoders, which have no fusion layers to fine-tune, and a full
fine-tuning per run would cost more than the pretraining it measures. The closest honest
equivalent is a **probe**, in the sense of linear-probe evaluation (Radford et al., CLIP,
Sec. 3.2): freeze the trained model, embed both images and the statement, and train a
small head on NLVR2's train split to predict the label; report its accuracy on the test
split. It measures what the frozen representations make decidable, not what a fine-tuned
model reaches, and the two are not comparable: the paper's NLVR2 numbers (about 75-83%)
are fine-tuning numbers.

The head (:class:`ProbeHead`) sees, for image features ``u`` (left), ``v`` (right) and
statement features ``t`` (all L2-normalised), ``[u, v, t, u*t, v*t, |u-v|]`` and is a
two-layer MLP (hidden width 256, ReLU). It is trained with AdamW (lr 1e-3, weight decay
1e-4, batch 256, 30 epochs) under a fixed seed, so the same model gives the same number.
As a control, the same head is trained on the statement alone (image features zeroed):
``text_only_acc`` is how far the sentences alone go, so ``acc - text_only_acc`` is what
the images add.

Data: NLVR2's own layout (:func:`load_nlvr2`): ``train.json`` and ``test1.json`` (or
``dev.json``) with one JSON object per line (``identifier``, ``sentence``, ``label``
"True"/"False", ``directory`` for train), images under ``images/<split>/[<directory>/]``
or ``<split>/[<directory>/]`` named ``<identifier without its last part>-img0.png`` and
``-img1.png``. SynthWeb's reasoning set (:mod:`selbench.synthweb.reasoning`) is written in
the same layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from selbench.embedders import image_batches
from selbench.errors import PoolError

TRAIN_SPLIT = "train"
TEST_SPLITS = ("test1", "dev")  # the first present is the probe's test split
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

HIDDEN = 256
EPOCHS = 30
BATCH = 256
LR = 1e-3
WEIGHT_DECAY = 1e-4
SEED = 0


@dataclass
class ReasoningSplit:
    """One NLVR2 split: image paths, statements and labels, plus what was skipped."""

    left: list[Path] = field(default_factory=list)
    right: list[Path] = field(default_factory=list)
    sentences: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def scored_split(root: Path) -> str:
    """The split the probe is scored on: ``test1`` if present, else ``dev``."""
    for name in TEST_SPLITS:
        if (Path(root) / f"{name}.json").is_file():
            return name
    raise PoolError(
        f"NLVR2 set {root}: neither {' nor '.join(f'{n}.json' for n in TEST_SPLITS)} exists "
        "(expected NLVR2's layout: train.json, test1.json or dev.json, images/<split>/)"
    )


def check_nlvr2(root: Path) -> str | None:
    """What is wrong with ``root`` as an NLVR2-layout set, or None."""
    root = Path(root)
    if not root.is_dir():
        return f"{root} does not exist"
    if not (root / f"{TRAIN_SPLIT}.json").is_file():
        return f"{root / 'train.json'} is missing (the probe's head trains on it)"
    if not any((root / f"{n}.json").is_file() for n in TEST_SPLITS):
        return f"{root} has neither test1.json nor dev.json"
    return None


def _image(folders: list[Path], name: str) -> Path | None:
    for folder in folders:
        for suffix in IMAGE_SUFFIXES:
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


def load_nlvr2(root: Path, split: str) -> ReasoningSplit:
    """Read ``root/<split>.json`` and find each statement's two images. A statement whose
    image is missing is skipped and counted (NLVR2's public release lacks some images); a
    line that is not NLVR2 JSON is an error naming the file and the line."""
    root = Path(root)
    path = root / f"{split}.json"
    out = ReasoningSplit()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            identifier, sentence = str(record["identifier"]), str(record["sentence"])
            label = {"true": 1, "false": 0}[str(record["label"]).lower()]
        except (ValueError, KeyError, TypeError) as exc:
            raise PoolError(
                f"{path}, line {number}: not an NLVR2 statement (needs identifier, sentence "
                f"and label True/False): {exc!r}"
            ) from None
        prefix = identifier.rsplit("-", 1)[0]
        directory = str(record.get("directory", ""))
        folders = [root / base / split / directory for base in ("images", "")]
        left, right = (_image(folders, f"{prefix}-img{side}") for side in (0, 1))
        if left is None or right is None:
            out.skipped["missing_image"] = out.skipped.get("missing_image", 0) + 1
            continue
        out.left.append(left)
        out.right.append(right)
        out.sentences.append(sentence)
        out.labels.append(label)
    if not out.labels:
        raise PoolError(f"{path}: no statement with both images found under {root}")
    return out


class ProbeHead(torch.nn.Module):
    """Two-layer MLP over ``[u, v, t, u*t, v*t, |u-v|]`` (module docstring)."""

    def __init__(self, dim: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6 * dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2)
        )

    @staticmethod
    def inputs(u: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([u, v, t, u * t, v * t, (u - v).abs()], dim=1)

    def forward(self, u: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(self.inputs(u, v, t))


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _rgb_images(paths: list[Path]):
    for path in paths:
        with Image.open(path) as image:
            yield image.convert("RGB")


def embed_split(
    model: Any, data: ReasoningSplit, preprocess: Any, tokenizer: Any, batch: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised features of the left images, the right images and the statements."""
    out = []
    with torch.no_grad():
        for paths in (data.left, data.right):
            rows = [
                model.encode_image(pixels.to(device)).cpu()
                for pixels in image_batches(_rgb_images(paths), preprocess, batch)
            ]
            out.append(_normalised(torch.cat(rows)))
        rows = []
        for start in range(0, len(data.sentences), batch):
            tokens = tokenizer(data.sentences[start : start + batch]).to(device)
            rows.append(model.encode_text(tokens).cpu())
        out.append(_normalised(torch.cat(rows)))
    return out[0], out[1], out[2]


def train_head(
    u: torch.Tensor, v: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, seed: int = SEED
) -> ProbeHead:
    """Fit a :class:`ProbeHead` with the fixed recipe of the module docstring."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ProbeHead(u.shape[1])
    optimiser = torch.optim.AdamW(head.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    loss_fn = torch.nn.CrossEntropyLoss()
    head.train()
    # A head this small is four times cheaper on one thread than on two (measured: 0.85 vs
    # 3.7 CPU seconds for 2,000 statements); the caller's setting is restored.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():  # evaluate() calls the probe under no_grad
            _fit(head, optimiser, loss_fn, u, v, t, labels, generator)
    finally:
        torch.set_num_threads(threads)
    head.eval()
    return head


def _fit(head, optimiser, loss_fn, u, v, t, labels, generator) -> None:
    for _ in range(EPOCHS):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), BATCH):
            rows = order[start : start + BATCH]
            optimiser.zero_grad()
            loss_fn(head(u[rows], v[rows], t[rows]), labels[rows]).backward()
            optimiser.step()


def _accuracy(head: ProbeHead, u, v, t, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(u, v, t).argmax(dim=1) == labels).float().mean())


def evaluate_reasoning(
    model: Any,
    name: str,
    root: Path,
    preprocess: Any,
    tokenizer: Any,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, float]:
    """Train the probe on ``root``'s train split with ``model`` frozen; return
    ``{name}/acc`` (test accuracy), ``{name}/text_only_acc`` (the control),
    ``{name}/train_acc`` and the split sizes and skips."""
    train = load_nlvr2(root, TRAIN_SPLIT)
    test = load_nlvr2(root, scored_split(root))
    model.eval()
    features = {
        split: embed_split(model, data, preprocess, tokenizer, batch_size, device)
        for split, data in (("train", train), ("test", test))
    }
    labels = {split: torch.tensor(d.labels) for split, d in (("train", train), ("test", test))}
    head = train_head(*features["train"], labels["train"])
    metrics = {
        f"{name}/acc": _accuracy(head, *features["test"], labels["test"]),
        f"{name}/train_acc": _accuracy(head, *features["train"], labels["train"]),
    }
    # The control: the same head on the statement alone (both images zeroed).
    blind = {
        split: (torch.zeros_like(u), torch.zeros_like(v), t)
        for split, (u, v, t) in features.items()
    }
    text_only = train_head(*blind["train"], labels["train"])
    metrics[f"{name}/text_only_acc"] = _accuracy(text_only, *blind["test"], labels["test"])
    metrics[f"{name}/n_train"] = float(len(train))
    metrics[f"{name}/n_test"] = float(len(test))
    skipped = sum(train.skipped.values()) + sum(test.skipped.values())
    metrics[f"{name}/skipped"] = float(skipped)
    return metrics
