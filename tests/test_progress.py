import re

import torch
from rich.console import Console

from selbench.configs import ScaleConfig
from selbench.progress import RichProgress
from selbench.train import TrainingData, build_model, train_clip

SCALE = ScaleConfig(
    name="t",
    model="selbench-tiny",
    batch_size=4,
    epochs=1,
    lr=1e-3,
    weight_decay=0.1,
    warmup_fraction=0.1,
)


def _bars(console: Console, description: str) -> list[str]:
    return [line for line in console.export_text().splitlines() if line.startswith(description)]


def test_a_bar_keeps_its_own_info_when_a_later_bar_has_the_same_name():
    console = Console(record=True, width=120)
    with RichProgress(console) as progress:
        for _ in progress.track(range(2), "Training"):
            progress.set_info("Training", "first")
        for _ in progress.track(range(2), "Training"):
            progress.set_info("Training", "second")
    first, second = _bars(console, "Training")[-2:]
    assert "first" in first and "second" not in first
    assert "second" in second


def _data(seed: int) -> TrainingData:
    generator = torch.Generator().manual_seed(seed)
    _, _, tokenizer = build_model("selbench-tiny", seed=0)
    captions = [f"a {c} shape" for c in ("red", "green", "blue", "white", "black", "grey")]
    return TrainingData(torch.randn(6, 3, 32, 32, generator=generator), tokenizer(captions))


def test_the_subset_training_bar_shows_its_own_loss_not_the_proxys():
    # A run trains a proxy first, then the subset; both bars are called "Training".
    console = Console(record=True, width=120)
    with RichProgress(console) as progress:
        proxy = train_clip(
            build_model("selbench-tiny", 0)[0], _data(1), SCALE, 8, 0, "cpu", progress
        )
        subset = train_clip(
            build_model("selbench-tiny", 5)[0], _data(2), SCALE, 24, 5, "cpu", progress
        )
    proxy_loss, subset_loss = f"{proxy.final_loss:.3f}", f"{subset.final_loss:.3f}"
    assert proxy_loss != subset_loss  # otherwise the test could not tell the bars apart
    shown = [re.search(r"loss (\d+\.\d+)", line)[1] for line in _bars(console, "Training")[-2:]]
    assert shown == [proxy_loss, subset_loss]
