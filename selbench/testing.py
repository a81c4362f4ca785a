"""The conformance kit: the battery every built-in strategy passes, against in-memory
pools, as one pytest item per check (scikit-learn's ``parametrize_with_checks``)::

    from selbench.testing import parametrize_with_checks

    @parametrize_with_checks([MyStrategy(), MyStrategy({"k": 3})])
    def test_my_strategy_conforms(strategy, check):
        check(strategy)

or all at once with ``check_strategy(MyStrategy)``. A method expression is accepted
wherever a strategy is: ``check_strategy("semdedup(keep=0.8) >> clip_score",
budgets=(0.1, 0.25))`` checks a pipeline of installed strategies (``docs/pipelines.md``;
a chain that keeps less than the whole pool before its last step cannot fill budget 1.0,
so give it budgets below what its steps keep). The checks (each failure is an
``AssertionError`` naming the strategy and the case):

- ``check_params``: every ``Params`` field has a default and a description, and the
  defaults survive the trip through strings (CLI ``-p key=value``, MLflow params) and JSON;
- ``check_needs``: ``needs`` holds only known needs, and ``select`` calls no context
  service (``ctx.embeddings()``, ``ctx.embed_images()``, ``ctx.proxy()``, ``ctx.target()``)
  it did not declare;
- ``check_budget``: ``round(budget x N)`` unique uids, all from the pool, for several budgets
  and pool sizes (the harness's own :func:`~selbench.strategy.validate_selection`); for a
  strategy that returns :class:`~selbench.strategy.Synthesized` pairs, ``round(budget x N)``
  pairs of the pool's image size with finite pixels and non-empty captions instead;
- ``check_deterministic``: the same seed gives the same selection (for synthesized pairs:
  the same pixels and captions, which their content-derived uids compare);
- ``check_seed``: a strategy stochastic with its parameters
  (:meth:`~selbench.strategy.Strategy.is_stochastic`) selects differently under another
  seed; one that is not never does.
- ``check_scores``: a scorer (:meth:`~selbench.strategy.Strategy.is_scorer`) gives one
  finite number per sample of the pool from ``score()``, the same ones for the same seed
  whatever the budget (:func:`~selbench.strategy.validate_scores`); a strategy with a rule
  (:meth:`~selbench.strategy.Strategy.has_rule`) gives one boolean per sample from
  ``passes()``. A strategy that is neither passes it trivially.

A strategy declares the checks it is expected to fail, with the reason, in
``expected_check_failures = {"check_seed": "why"}`` (or, when that depends on the
parameters, by overriding :meth:`~selbench.strategy.Strategy.expected_failures`); they are
marked ``xfail(strict=True)``.

Online strategies have a kit of their own, :mod:`selbench.online.kit`, whose public names
(``parametrize_online_with_checks``, ``check_online_strategy``, ...) are exported here too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from selbench.embedders import Embedder, Embeddings
from selbench.errors import PluginError, UndeclaredNeedError
from selbench.online.kit import *  # noqa: F403 (the online kit, exported here too)
from selbench.run.spec import MethodSpec
from selbench.strategy import (
    NEEDS,
    SelectionContext,
    Strategy,
    budget_count,
    parse_params,
    validate_mask,
    validate_scores,
    validate_selection,
)

if TYPE_CHECKING:
    from selbench.target import TargetSet

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
    _proxy: Embedder | None = None

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

    def target(self) -> TargetSet:
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

    def ground_truth(self) -> dict[str, dict[str, str]]:
        """SynthWeb-like labels: about 60% of the pool ``clean``, the rest ``misaligned``
        (seeded by the pool, so the same pool has the same labels)."""
        self.used.add("ground_truth")
        rng = np.random.default_rng(int(self.pool.fingerprint[:8], 16))
        noisy = rng.random(len(self.pool)) < 0.4
        return {
            uid: {"pathology": "misaligned" if bad else "clean"}
            for uid, bad in zip(self.pool.uids, noisy, strict=True)
        }

    def embedder(self, spec: str = "proxy") -> Embedder:
        self.used.add("proxy")
        if self._proxy is None:
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

    def embedder(self, spec: str = "proxy") -> Embedder:
        raise AssertionError("the strategy asked for a proxy model; this context has none")

    def embed_images(self, spec: str, images: Sequence[Any]) -> np.ndarray:
        raise AssertionError("the strategy asked to embed other images; this context cannot")

    def target(self) -> TargetSet:
        raise AssertionError("the strategy asked for target data; this context has none")


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


def _context(
    strategy: Strategy, pool: MemoryPool, budget: float, seed: int, work: str
) -> tuple[SelectionContext, RecordingServices]:
    """The context the kit runs ``strategy`` in: the harness's need checks, recording
    services, ``round(budget x N)`` to select."""
    services = RecordingServices(pool)
    ctx = SelectionContext(
        pool=pool,
        budget_count=budget_count(budget, len(pool)),
        budget_fraction=budget,
        seed=seed,
        device="cpu",
        work_dir=Path(work),
        services=services,
        strategy=type(strategy).name,
        needs=frozenset(type(strategy).needs),
        image_size=pool.images[0].size[0] if pool.images else None,
        truth=services.ground_truth,
    )
    return ctx, services


def _run(
    strategy: Strategy, pool: MemoryPool, budget: float, seed: int
) -> tuple[list[str], set[str]]:
    name = type(strategy).name
    with tempfile.TemporaryDirectory() as work:
        ctx, services = _context(strategy, pool, budget, seed, work)
        try:
            selection = type(strategy)(strategy.params).select(ctx)
        except UndeclaredNeedError as exc:
            raise AssertionError(
                f"{name}: uses a service without declaring it in `needs`: {exc}"
            ) from None
        try:  # inside the work dir: reported artifacts must still exist
            checked = validate_selection(
                selection, set(pool.uids), ctx.budget_count, name, ctx.image_size, pool=ctx.pool
            )
        except PluginError as exc:
            raise AssertionError(
                f"{name}: budget {budget}, pool of {len(pool)}, seed {seed}: {exc}"
            ) from None
    return list(checked.uids), services.used


def _score_run(
    strategy: Strategy, pool: MemoryPool, budget: float, seed: int, method: str = "score"
) -> np.ndarray:
    """``score()`` (or ``passes()``) of a fresh instance of ``strategy``, checked by the
    harness's :func:`~selbench.strategy.validate_scores` (:func:`validate_mask`)."""
    name = type(strategy).name
    with tempfile.TemporaryDirectory() as work:
        ctx, _ = _context(strategy, pool, budget, seed, work)
        try:
            values = getattr(type(strategy)(strategy.params), method)(ctx)
        except UndeclaredNeedError as exc:
            raise AssertionError(
                f"{name}: {method}() uses a service without declaring it in `needs`: {exc}"
            ) from None
    validate = validate_scores if method == "score" else validate_mask
    try:
        return validate(values, len(pool), name)
    except PluginError as exc:
        raise AssertionError(
            f"{name}: {method}(), budget {budget}, pool of {len(pool)}, seed {seed}: {exc}"
        ) from None


@dataclass(frozen=True)
class KitOptions:
    """The cases the checks run: pool sizes, budgets and seeds (the first is the base)."""

    pool_sizes: tuple[int, ...] = (40, 157)
    budgets: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    seeds: tuple[int, ...] = (0, 1)


# First runs (pool size, budget, seed) of a configuration, shared by the checks that
# compare against them: one pytest item per check must not re-run every selection.
_first_runs: dict[tuple, tuple[list[str], set[str]]] = {}


def _first_run(strategy: Strategy, size: int, budget: float, seed: int) -> list[str]:
    key = (
        type(strategy),
        json.dumps(strategy.params.model_dump(), sort_keys=True, default=str),
        size,
        budget,
        seed,
    )
    if key not in _first_runs:
        _first_runs[key] = _run(strategy, make_memory_pool(size, seed=size), budget, seed)
    return _first_runs[key][0]


def _as_instance(strategy: Strategy | type[Strategy] | str, params: dict | None = None) -> Strategy:
    if isinstance(strategy, str):  # a method expression: a strategy or a pipeline
        from selbench.run.plan import resolve_method

        method = resolve_method(strategy, params)
        return method.info.cls(method.params)
    if isinstance(strategy, type):
        assert issubclass(strategy, Strategy), f"{strategy!r} is not a selbench.Strategy subclass"
        return strategy(params or {})
    assert isinstance(strategy, Strategy), f"{strategy!r} is not a selbench.Strategy"
    return strategy


def check_params(strategy: Strategy | type[Strategy], options: KitOptions = KitOptions()) -> None:
    """Every parameter has a default and a description; defaults round-trip via str and JSON.
    For a pipeline: every step's strategy."""
    from selbench.run.pipeline import PipelineStrategy, leaves

    if isinstance(strategy, PipelineStrategy):
        for step in leaves(strategy.plan):
            check_params(step.info.cls, options)
        return
    _check_param_fields(strategy if isinstance(strategy, type) else type(strategy))


def _check_param_fields(strategy_cls: Any, kind: str = "method") -> None:
    """``check_params`` of one class with ``name`` and ``Params`` (a strategy, an online
    strategy: ``kind`` names it in parsing errors)."""
    name = strategy_cls.name
    fields = strategy_cls.Params.model_fields
    for key, info in fields.items():
        assert not info.is_required(), f"{name}: parameter {key!r} has no default"
        assert info.description, f"{name}: parameter {key!r} has no description (cite its source)"
    defaults = strategy_cls.Params().model_dump()
    as_strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in defaults.items()}
    from_strings = parse_params(strategy_cls, as_strings, kind).model_dump()
    assert from_strings == defaults, (
        f"{name}: parameters do not survive a trip through strings (CLI/MLflow): "
        f"{defaults} -> {from_strings}"
    )
    from_json = parse_params(strategy_cls, json.loads(json.dumps(defaults)), kind).model_dump()
    assert from_json == defaults, f"{name}: parameters do not survive JSON: {from_json}"


def check_needs(strategy: Strategy, options: KitOptions = KitOptions()) -> None:
    """``needs`` holds only known needs, and the strategy uses nothing it did not declare
    (the context refuses an undeclared service, as the harness's does)."""
    strategy_cls = type(strategy)
    unknown = set(strategy_cls.needs) - set(NEEDS)
    assert not unknown, f"{strategy_cls.name}: unknown needs {sorted(unknown)}; known: {NEEDS}"
    size = options.pool_sizes[0]
    _run(strategy, make_memory_pool(size, seed=size), options.budgets[0], options.seeds[0])


def check_budget(strategy: Strategy, options: KitOptions = KitOptions()) -> None:
    """Exactly ``round(budget x N)`` unique pool uids for every pool size and budget (the
    harness's own :func:`~selbench.strategy.validate_selection`)."""
    for size in options.pool_sizes:
        for budget in options.budgets:
            _first_run(strategy, size, budget, options.seeds[0])


def check_deterministic(strategy: Strategy, options: KitOptions = KitOptions()) -> None:
    """The same seed gives the same selection."""
    name = type(strategy).name
    for size in options.pool_sizes:
        pool = make_memory_pool(size, seed=size)
        for budget in options.budgets:
            first = _first_run(strategy, size, budget, options.seeds[0])
            again, _ = _run(strategy, pool, budget, options.seeds[0])
            assert first == again, (
                f"{name}: the same seed gave different selections (budget {budget}, pool {size})"
            )


def check_seed(strategy: Strategy, options: KitOptions = KitOptions()) -> None:
    """A strategy that is stochastic with these parameters (:meth:`Strategy.is_stochastic`)
    selects differently under some other seed; one that is not never does."""
    name = type(strategy).name
    stochastic = strategy.is_stochastic()
    differs = False
    for size in options.pool_sizes:
        for budget in options.budgets:
            first = _first_run(strategy, size, budget, options.seeds[0])
            for other_seed in options.seeds[1:]:
                if _first_run(strategy, size, budget, other_seed) != first:
                    differs = True
                    assert stochastic, (
                        f"{name}: not declared stochastic, but seed {other_seed} changed the "
                        f"selection (budget {budget}, pool {size})"
                    )
    if stochastic and len(options.seeds) > 1:
        assert differs, f"{name}: declared stochastic, but no seed changed the selection"


def check_scores(strategy: Strategy, options: KitOptions = KitOptions()) -> None:
    """A scorer's ``score()`` (:meth:`Strategy.is_scorer`) is one finite number per sample,
    deterministic for a seed and blind to the budget; a rule's ``passes()``
    (:meth:`Strategy.has_rule`) is one boolean per sample. Nothing to check otherwise.

    The scores at the smallest and the largest budget (same pool, same seed) must be
    equal; only when they differ is the smallest budget scored again, to tell a score
    that is not deterministic from one that reads ``ctx.budget_count``. Scorers that
    train models score twice, not three times."""
    strategy_cls = type(strategy)
    name = strategy_cls.name
    size, seed = options.pool_sizes[0], options.seeds[0]
    pool = make_memory_pool(size, seed=size)
    low, high = min(options.budgets), max(options.budgets)
    if strategy_cls.is_scorer():
        first = _score_run(strategy, pool, low, seed)
        other = _score_run(strategy, pool, high, seed)  # low == high: a plain second run
        if not np.array_equal(first, other):
            again = first if high == low else _score_run(strategy, pool, low, seed)
            assert high != low and np.array_equal(first, again), (
                f"{name}: score() is not deterministic: the same seed {seed} gave "
                f"different scores (pool {size}, budget {low})"
            )
            raise AssertionError(
                f"{name}: score() depends on the budget: budgets {low} and {high} gave "
                f"different scores (pool {size}, seed {seed}); a score must not read "
                "ctx.budget_count"
            )
    if strategy_cls.has_rule():
        _score_run(strategy, pool, low, seed, method="passes")


CHECKS: tuple[Callable[..., None], ...] = (
    check_params,
    check_needs,
    check_budget,
    check_deterministic,
    check_seed,
    check_scores,
)


def _checks(
    strategy: Strategy, options: KitOptions, expected_failures: Mapping[str, str] | None
) -> Iterator[tuple[Callable[[Strategy], None], str | None]]:
    return _bound_checks(strategy, CHECKS, options, expected_failures)


def _bound_checks(
    strategy: Any, checks: Sequence[Callable[..., None]], options: Any, extra: Any
) -> Iterator[tuple[Callable[[Any], None], str | None]]:
    """Each of ``checks`` with ``options`` bound, and the reason ``strategy`` is expected
    to fail it (its ``expected_failures()`` and ``extra``) or None."""
    expected = {**strategy.expected_failures(), **(extra or {})}
    unknown = set(expected) - {c.__name__ for c in checks}
    assert not unknown, (
        f"{type(strategy).name}: expected failures of unknown checks {sorted(unknown)}; "
        f"checks: {[c.__name__ for c in checks]}"
    )
    for check in checks:
        bound = functools.partial(check, options=options)
        functools.update_wrapper(bound, check)
        yield bound, expected.get(check.__name__)


def _label(strategy: Strategy) -> str:
    """The case's name: the method's label (a pipeline's canonical expression)."""
    expression = getattr(strategy, "expression", None)
    if isinstance(expression, str) and expression:
        return expression
    defaults = {k: f.default for k, f in type(strategy).Params.model_fields.items()}
    return MethodSpec.from_params(
        type(strategy).name, strategy.params.model_dump(), defaults
    ).format()


def parametrize_with_checks(
    strategies: Sequence[Strategy | type[Strategy] | str],
    pool_sizes: Sequence[int] = KitOptions.pool_sizes,
    budgets: Sequence[float] = KitOptions.budgets,
    seeds: Sequence[int] = KitOptions.seeds,
    expected_failures: Mapping[str, str] | None = None,
) -> Any:
    """A ``pytest.mark.parametrize`` decorator: one test item per (strategy, check), with
    ids like ``clip_score-check_budget``, as scikit-learn's ``parametrize_with_checks``.

    ``strategies`` are instances (their ``params`` are used), classes (default
    parameters) or method expressions (``"clip_score(embedder=proxy)"``, a pipeline). A
    check named in the strategy's ``expected_check_failures`` (or in
    ``expected_failures``) is marked ``xfail(strict=True)`` with that reason: it must
    fail, so a stale expectation shows up. The test receives ``(strategy, check)`` and
    calls ``check(strategy)``::

        @parametrize_with_checks([MyStrategy(), MyStrategy({"k": 3})])
        def test_conforms(strategy, check):
            check(strategy)
    """
    import pytest

    options = KitOptions(tuple(pool_sizes), tuple(budgets), tuple(seeds))
    cases = []
    for given in strategies:
        strategy = _as_instance(given)
        cases += _cases(strategy, _label(strategy), _checks(strategy, options, expected_failures))
    return pytest.mark.parametrize("strategy, check", cases)


def _cases(strategy: Any, label: str, checks: Iterable[tuple[Callable, str | None]]) -> list:
    """One ``pytest.param(strategy, check)`` per check, id ``label-check``; a check with a
    reason is a strict expected failure."""
    import pytest

    return [
        pytest.param(
            strategy,
            check,
            id=f"{label}-{check.__name__}",
            marks=[pytest.mark.xfail(strict=True, reason=reason)] if reason else [],
        )
        for check, reason in checks
    ]


def check_strategy(
    strategy_cls: Strategy | type[Strategy] | str,
    params: dict | None = None,
    pool_sizes: Sequence[int] = KitOptions.pool_sizes,
    budgets: Sequence[float] = KitOptions.budgets,
    seeds: Sequence[int] = KitOptions.seeds,
    expected_failures: Mapping[str, str] | None = None,
) -> None:
    """Run every check (module docstring) in one call; each failure is an AssertionError
    naming the strategy and the case. A check the strategy expects to fail
    (``expected_check_failures``, ``expected_failures``) must fail. ``strategy_cls`` may
    be a method expression (a pipeline)."""
    name = getattr(strategy_cls, "name", type(strategy_cls).__name__)
    assert isinstance(strategy_cls, (Strategy, str)) or (
        isinstance(strategy_cls, type) and issubclass(strategy_cls, Strategy)
    ), f"{name} is not a selbench.Strategy subclass"
    strategy = _as_instance(strategy_cls, params)
    options = KitOptions(tuple(pool_sizes), tuple(budgets), tuple(seeds))
    _run_checks(strategy, name, _checks(strategy, options, expected_failures))


def _run_checks(strategy: Any, name: str, checks: Iterable[tuple[Callable, str | None]]) -> None:
    """Run each check on ``strategy``; one with a reason must fail (and then passes)."""
    for check, reason in checks:
        if reason is None:
            check(strategy)
            continue
        try:
            check(strategy)
        except AssertionError:
            continue
        raise AssertionError(f"{name}: {check.__name__} was expected to fail ({reason}) but passed")
