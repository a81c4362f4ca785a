"""Configuration of a SynthWeb dataset (pool, eval sets and target split)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

PATHOLOGIES: tuple[str, ...] = (
    "misaligned",
    "partially_wrong",
    "near_duplicate",
    "boilerplate",
    "low_information",
    "text_in_image",
)
"""Web-data pathologies injected into the pool, in the order their counts are assigned.
``text_in_image`` comes last and is off by default, so turning it on leaves the other
pathologies' assignment as it was."""

CLEAN = "clean"
"""Ground-truth label of a pool sample with no injected pathology."""

MAX_SHARD_SIZE = 10_000
"""img2dataset keys reserve four digits for the index inside a shard."""


def rate_field(name: str) -> str:
    """Name of the config field holding the rate of pathology ``name``."""
    return f"rate_{name}"


def pathology_count(rate: float, n_samples: int) -> int:
    """Exact number of pool samples given a pathology: ``round(rate * n_samples)``."""
    return int(round(rate * n_samples))


class SynthWebConfig(BaseModel):
    """Everything that determines a SynthWeb dataset; same config => byte-identical output."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(
        0, ge=0, description="Master seed; every split derives its own RNG stream from it."
    )
    n_samples: int = Field(16000, ge=1, description="Number of image-text pairs in the pool.")
    image_size: int = Field(32, ge=16, description="Side of the square images, in pixels.")
    shard_size: int = Field(
        1000,
        ge=1,
        le=MAX_SHARD_SIZE,
        description="Pool samples per tar shard (img2dataset layout).",
    )
    zipf_exponent: float = Field(
        1.0,
        ge=0.0,
        description=(
            "Exponent a of the long tail of shape and colour frequencies in the pool: "
            "p_i proportional to 1/(i+1)^a over a seed-permuted concept order. "
            "0 gives uniform frequencies. Eval and target sets are always balanced."
        ),
    )
    rate_misaligned: float = Field(
        0.20,
        ge=0.0,
        le=1.0,
        description="Fraction of pool samples whose caption is taken from another sample.",
    )
    rate_partially_wrong: float = Field(
        0.10,
        ge=0.0,
        le=1.0,
        description="Fraction of pool samples whose caption gets one object attribute wrong.",
    )
    rate_near_duplicate: float = Field(
        0.10,
        ge=0.0,
        le=1.0,
        description="Fraction of pool samples that re-render an earlier clean sample with jitter.",
    )
    rate_boilerplate: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Fraction of pool samples captioned with web boilerplate ('click to enlarge').",
    )
    rate_low_information: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Fraction of pool samples whose image is nearly blank (caption kept).",
    )
    rate_text_in_image: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of pool samples whose image carries a sign printing the caption's "
        "colour and shape words over a scene the caption does not describe (T-MARS's "
        "text-only images). Off by default; configs/pools/synthweb-text.yaml turns it on.",
    )
    n_retrieval: int = Field(1000, ge=1, description="Images in the eval retrieval set.")
    captions_per_retrieval_image: int = Field(
        2,
        ge=1,
        le=20,
        description="Distinct clean captions per retrieval (and target) image.",
    )
    n_classification: int = Field(
        1000, ge=1, description="Images in each zero-shot classification set (shape, colour)."
    )
    n_target: int = Field(
        1000, ge=1, description="Images in the target split (clean, balanced, retrieval layout)."
    )
    n_reasoning_train: int = Field(
        2000,
        ge=0,
        description="Statements in the two-image reasoning set's train split (NLVR2 layout; "
        "the nlvr2-probe's head trains on it). 0 with n_reasoning_test 0: no reasoning set.",
    )
    n_reasoning_test: int = Field(
        1000, ge=0, description="Statements in the reasoning set's test split (test1)."
    )

    planted_eval_copies: int = Field(
        0,
        ge=0,
        description="Pool samples replaced by perturbed copies of evaluation images (cropped, "
        "resized, colour-shifted, re-encoded as JPEG; selbench/synthweb/planted.py), the "
        "contamination a web pool has; runs on such a pool decontaminate by default "
        "(docs/decontamination.md). 0: none, and the dataset is byte-identical to before.",
    )

    @model_validator(mode="after")
    def _check_reasoning(self) -> SynthWebConfig:
        if (self.n_reasoning_train == 0) != (self.n_reasoning_test == 0):
            raise ValueError(
                "n_reasoning_train and n_reasoning_test must both be 0 (no reasoning set) or "
                f"both positive, got {self.n_reasoning_train} and {self.n_reasoning_test}"
            )
        return self

    @model_validator(mode="after")
    def _check_rates(self) -> SynthWebConfig:
        names = [rate_field(p) for p in PATHOLOGIES]
        rates = [getattr(self, n) for n in names]
        total = sum(rates)
        if total > 1.0 + 1e-9:
            terms = " + ".join(f"{n}={r:g}" for n, r in zip(names, rates, strict=True))
            raise ValueError(f"pathology rates must sum to at most 1, got {terms} = {total:g}")
        counts = self.pathology_counts()
        n_clean = counts[CLEAN]
        if n_clean < 0:
            raise ValueError(
                f"pathology counts round(rate * n_samples) exceed n_samples={self.n_samples}: "
                + ", ".join(f"{rate_field(p)} -> {counts[p]}" for p in PATHOLOGIES)
            )
        if counts["near_duplicate"] > 0 and n_clean == 0:
            raise ValueError(
                "rate_near_duplicate > 0 needs at least one clean pool sample to duplicate; "
                "lower the other rates or rate_near_duplicate"
            )
        if counts["misaligned"] > 0 and self.n_samples < 2:
            raise ValueError("rate_misaligned > 0 needs n_samples >= 2")
        return self

    @model_validator(mode="after")
    def _check_planted(self) -> SynthWebConfig:
        sources = self.n_retrieval + 2 * self.n_classification
        clean = self.pathology_counts()[CLEAN]
        if self.planted_eval_copies > min(sources, clean):
            raise ValueError(
                f"planted_eval_copies={self.planted_eval_copies} needs as many evaluation "
                f"images to copy (n_retrieval + 2 * n_classification = {sources}) and clean "
                f"pool samples to replace ({clean}); lower it"
            )
        return self

    def pathology_counts(self) -> dict[str, int]:
        """Exact per-pathology pool counts plus the number of clean samples under ``"clean"``."""
        counts = {
            p: pathology_count(getattr(self, rate_field(p)), self.n_samples) for p in PATHOLOGIES
        }
        counts[CLEAN] = self.n_samples - sum(counts.values())
        return counts

    def n_images_total(self) -> int:
        """Number of images written in all splits (pool, retrieval, 2 classification, target,
        and two per reasoning statement)."""
        reasoning = 2 * (self.n_reasoning_train + self.n_reasoning_test)
        return (
            self.n_samples + self.n_retrieval + 2 * self.n_classification + self.n_target
            + reasoning
        )  # fmt: skip
