"""The conformance kit: ``check_strategy(MyStrategy)`` runs the battery every built-in
strategy passes, against an in-memory pool, in a few seconds.

    from selbench.testing import check_strategy

    def test_my_strategy_conforms():
        check_strategy(MyStrategy)

Checks (each failure is an ``AssertionError`` naming the strategy and the case):

1. exact budget: ``round(budget x N)`` unique uids, all from the pool, for several budgets
   and pool sizes (the harness's own :func:`~selbench.strategy.validate_selection`);
2. determinism: the same seed gives the same selection;
3. seed sensitivity: a strategy declared ``stochastic`` selects differently under
   different seeds (one that is not declared stochastic must not);
4. declared needs: a strategy that calls ``ctx.embeddings()`` / ``ctx.proxy()`` /
   ``ctx.target()`` declares ``"embeddings"`` / ``"proxy"`` / ``"target"`` in ``needs``;
5. parameters: every ``Params`` field has a default and a description, and the defaults
   survive the trip through strings (CLI ``-p key=value``, MLflow params) and JSON.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selbench.embedders import Embeddings
from selbench.errors import PluginError
from selbench.strategy import (
    SelectionContext,
    Strategy,
    budget_count,
    parse_params,
    validate_selection,
)

WORDS = ("red", "blue", "green", "circle", "square", "star", "small", "large", "photo", "icon")


@dataclass
class MemoryPool:
    """A pool held in memory: what strategies see through ``ctx.pool``."""

    uids: list[str]
    captions: list[str]
    images: list[Image.Image] = field(default_factory=list)  # empty: a pool without pixels
    name: str = "memory"

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.uids + self.captions).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.uids)

    def iter_images(
        self, uids: Iterable[str] | None = None, start: int = 0
    ) -> Iterator[tuple[str, Image.Image]]:
        if not self.images:
            raise AssertionError("this memory pool holds no images")
        wanted = None if uids is None else set(uids)
        for uid, image in list(zip(self.uids, self.images, strict=True))[start:]:
            if wanted is None or uid in wanted:
                yield uid, image


def make_memory_pool(size: int, seed: int = 0, image_size: int = 32) -> MemoryPool:
    """``size`` random image-caption pairs with uids ``s00000``, ``s00001``, ..."""
    rng = np.random.default_rng(seed)
    uids = [f"s{i:05d}" for i in range(size)]
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 8)))) for _ in range(size)]
    images = [
        Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8))
        for _ in range(size)
    ]
    return MemoryPool(uids, captions, images)


@dataclass
class RecordingServices:
    """Stands in for the harness's EmbeddingService and records what the strategy asked for.

    Embeddings are random unit vectors (seeded by the pool), text correlated with image so
    that image-text agreement varies across pairs; ``embedder()`` returns a randomly
    initialised tiny open_clip model wrapped as a proxy.
    """

    pool: MemoryPool
    dim: int = 16
    used: set[str] = field(default_factory=set)
    _proxy: Any = None

    def embeddings(self, spec: str = "proxy") -> Embeddings:
        self.used.add("embeddings")
        seed = int(self.pool.fingerprint[:8], 16)
        rng = np.random.default_rng(seed)
        image = rng.standard_normal((len(self.pool), self.dim)).astype(np.float32)
        noise = rng.standard_normal((len(self.pool), self.dim)).astype(np.float32)
        text = image + noise * rng.uniform(0.1, 3.0, size=(len(self.pool), 1)).astype(np.float32)
        image /= np.linalg.norm(image, axis=1, keepdims=True)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        return Embeddings(
            image.astype(np.float16),
            text.astype(np.float16),
            self.pool.uids,
            f"fake:{spec}",
            f"{self.pool.fingerprint}-fake",
        )

    def target(self) -> Any:
        self.used.add("target")
        from selbench.target import TargetSet

        extra = make_memory_pool(12, seed=len(self.pool) + 7)
        return TargetSet(Path("memory-target"), extra.images, extra.uids, [])

    def embed_images(self, spec: str, images: Sequence[Image.Image]) -> np.ndarray:
        # Deterministic per image content, in the same space as embeddings().
        rows = []
        for image in images:
            seed = int(hashlib.sha256(image.tobytes()).hexdigest()[:8], 16)
            rows.append(np.random.default_rng(seed).standard_normal(self.dim))
        out = np.asarray(rows, dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def embedder(self, spec: str = "proxy") -> Any:
        self.used.add("proxy")
        if self._proxy is None:
            from selbench.embedders import Embedder
            from selbench.train import build_model

            proxy = Embedder("selbench-tiny")  # .architecture: the tiny open_clip model
            proxy.model, proxy.preprocess, proxy.tokenizer = build_model("selbench-tiny", 0)
            proxy.weights_digest = "0" * 16
            self._proxy = proxy
        return self._proxy


@dataclass
class FixedEmbeddings:
    """Services that serve embeddings the test chose (rows in pool order)."""

    pool: MemoryPool
    image: np.ndarray
    text: np.ndarray

    def embeddings(self, spec: str = "proxy") -> Embeddings:
        return Embeddings(self.image, self.text, self.pool.uids, f"fixed:{spec}", "fixed")

    def embedder(self, spec: str = "proxy") -> Any:
        raise AssertionError("the strategy asked for a proxy model; this context has none")


def context_with_embeddings(
    image: np.ndarray,
    budget_count: int,
    work_dir: Path,
    text: np.ndarray | None = None,
    seed: int = 0,
) -> SelectionContext:
    """A context over a pool of ``len(image)`` samples (uids ``u0000``, ...) whose
    ``ctx.embeddings()`` returns exactly ``image`` and ``text`` (default: ``image``)."""
    uids = [f"u{i:04d}" for i in range(len(image))]
    pool = MemoryPool(uids, [f"caption {i}" for i in range(len(image))])
    return SelectionContext(
        pool=pool,
        budget_count=budget_count,
        budget_fraction=budget_count / len(image),
        seed=seed,
        device="cpu",
        work_dir=work_dir,
        services=FixedEmbeddings(pool, image, image if text is None else text),
    )


def _run(
    strategy_cls: type[Strategy], params: dict, pool: MemoryPool, budget: float, seed: int
) -> tuple[list[str], set[str]]:
    count = budget_count(budget, len(pool))
    services = RecordingServices(pool)
    with tempfile.TemporaryDirectory() as work:
        ctx = SelectionContext(
            pool=pool,
            budget_count=count,
            budget_fraction=budget,
            seed=seed,
            device="cpu",
            work_dir=Path(work),
            services=services,
        )
        selection = strategy_cls(params).select(ctx)
        try:  # inside the work dir: reported artifacts must still exist
            checked = validate_selection(selection, set(pool.uids), count, strategy_cls.name)
        except PluginError as exc:
            raise AssertionError(
                f"{strategy_cls.name}: budget {budget}, pool of {len(pool)}, seed {seed}: {exc}"
            ) from None
    return checked.uids, services.used


def check_params(strategy_cls: type[Strategy]) -> None:
    """Every parameter has a default and a description; defaults round-trip via str and JSON."""
    name = strategy_cls.name
    fields = strategy_cls.Params.model_fields
    for key, info in fields.items():
        assert not info.is_required(), f"{name}: parameter {key!r} has no default"
        assert info.description, f"{name}: parameter {key!r} has no description (cite its source)"
    defaults = strategy_cls.Params().model_dump()
    as_strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in defaults.items()}
    from_strings = parse_params(strategy_cls, as_strings).model_dump()
    assert from_strings == defaults, (
        f"{name}: parameters do not survive a trip through strings (CLI/MLflow): "
        f"{defaults} -> {from_strings}"
    )
    from_json = parse_params(strategy_cls, json.loads(json.dumps(defaults))).model_dump()
    assert from_json == defaults, f"{name}: parameters do not survive JSON: {from_json}"


def check_strategy(
    strategy_cls: type[Strategy],
    params: dict | None = None,
    pool_sizes: Sequence[int] = (40, 157),
    budgets: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
    seeds: Sequence[int] = (0, 1),
) -> None:
    """Run the conformance battery (module docstring) against ``strategy_cls``."""
    params = dict(params or {})
    name = getattr(strategy_cls, "name", strategy_cls.__name__)
    assert isinstance(strategy_cls, type) and issubclass(strategy_cls, Strategy), (
        f"{name} is not a selbench.Strategy subclass"
    )
    check_params(strategy_cls)
    declared = set(strategy_cls.needs)
    differs = False
    for size in pool_sizes:
        pool = make_memory_pool(size, seed=size)
        for budget in budgets:
            first, used = _run(strategy_cls, params, pool, budget, seeds[0])
            undeclared = used - declared
            assert not undeclared, (
                f"{name}: uses {sorted(undeclared)} without declaring it in `needs` "
                f"(declared: {sorted(declared)})"
            )
            again, _ = _run(strategy_cls, params, pool, budget, seeds[0])
            assert first == again, (
                f"{name}: the same seed gave different selections (budget {budget}, pool {size})"
            )
            for other_seed in seeds[1:]:
                other, _ = _run(strategy_cls, params, pool, budget, other_seed)
                if other != first:
                    differs = True
                    assert strategy_cls.stochastic, (
                        f"{name}: not declared stochastic, but seed {other_seed} changed the "
                        f"selection (budget {budget}, pool {size})"
                    )
    if strategy_cls.stochastic and len(seeds) > 1:
        assert differs, f"{name}: declared stochastic, but no seed changed the selection"
