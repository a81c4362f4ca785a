"""The strategy contract: what a selection plugin receives and what it must return.

A strategy is a class with a ``name``, a pydantic ``Params`` model whose defaults follow
its paper, and a ``select(ctx) -> Selection`` method. The harness, not the plugin,
enforces the budget (:func:`validate_selection`).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from selbench.errors import ConfigError, PluginError, UndeclaredNeedError
from selbench.executors import Executor, LocalExecutor
from selbench.positions import (  # noqa: F401  (re-exported)
    PoolScores,
    PoolUids,
    pool_of,
    validate_mask,
    validate_scores,
    validated_positions,
)
from selbench.progress import NullProgress

if TYPE_CHECKING:  # heavy (torch, open_clip); only the annotations need them
    from selbench.embedders import Embedder, Embeddings
    from selbench.target import TargetSet

T = TypeVar("T")

# What a strategy may declare in ``needs``, and the context methods each one unlocks.
NEEDS: dict[str, tuple[str, ...]] = {
    "embeddings": ("embeddings", "embed_images"),
    "proxy": ("proxy",),
    "target": ("target",),
    # Oracles only: the pool's recorded pathology labels (SynthWeb). A method that reads
    # them is an upper bound for comparison, not a selection method one could deploy.
    "ground_truth": ("ground_truth",),
    # The pool's pixels, read from ctx.pool (iter_images, iter_image_bytes,
    # toolbox.pool_image_tensor) or by a model trained on them: no context method, but a
    # pool without images (DataComp metadata alone, docs/real-data.md) refuses the
    # strategy before selection, naming it.
    "pool_images": (),
}


class NoParams(BaseModel):
    """Parameters of a strategy that takes none."""

    model_config = ConfigDict(extra="forbid")


class Strategy:
    """Base class for selection strategies.

    Subclasses set ``name`` (the ``--method`` value), ``summary`` (one line),
    ``reference`` (the paper, with the equation or table its defaults come from),
    ``stochastic`` (whether the seed changes the selection under the default parameters;
    override :meth:`is_stochastic` when a parameter changes that), ``needs`` (what the
    strategy uses from the context beyond the pool: a subset of :data:`NEEDS`, enforced
    at run time) and ``Params`` (a pydantic model with ``extra="forbid"``; every field
    has a default and a description naming its source). ``expected_check_failures`` maps
    a conformance check's name (:mod:`selbench.testing`) to the reason this strategy is
    expected to fail it. They implement :meth:`select`.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    stochastic: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset()
    Params: ClassVar[type[BaseModel]] = NoParams
    expected_check_failures: ClassVar[dict[str, str]] = {}

    def __init__(self, params: BaseModel | Mapping[str, Any] | None = None) -> None:
        if isinstance(params, BaseModel):
            self.params = params
        else:
            self.params = parse_params(type(self), dict(params or {}))

    def is_stochastic(self) -> bool:
        """Whether the seed changes the selection with these parameters (default: the
        class's ``stochastic``)."""
        return bool(self.stochastic)

    def expected_failures(self) -> dict[str, str]:
        """Conformance checks expected to fail with these parameters, with the reason
        (default: the class's ``expected_check_failures``)."""
        return dict(self.expected_check_failures)

    def select(self, ctx: SelectionContext) -> Selection:  # pragma: no cover - interface
        raise NotImplementedError(f"strategy {self.name!r} does not implement select()")

    def score(self, ctx: SelectionContext) -> np.ndarray:  # pragma: no cover - interface
        """Optional: one finite score per sample of ``ctx.pool``, in its order; higher means
        keep. A strategy that implements it is a *scorer* (:meth:`is_scorer`): pipelines
        can intersect, unite and fuse it with other scorers (``docs/pipelines.md``). It
        must not depend on ``ctx.budget_count``; the scores of the strategy's own rule
        (the ones its ``select`` ranks or thresholds), not a proxy for them."""
        raise NotImplementedError(f"strategy {self.name!r} does not score samples")

    def passes(self, ctx: SelectionContext) -> np.ndarray:  # pragma: no cover - interface
        """Optional: a boolean per sample of ``ctx.pool`` (its order), the samples the
        strategy's own rule keeps without a budget (DataComp's basic filtering keeps what
        passes its rules). A pipeline step that is not last and gives no ``keep=`` keeps
        these (:meth:`has_rule`)."""
        raise NotImplementedError(f"strategy {self.name!r} has no rule of its own")

    @classmethod
    def is_scorer(cls) -> bool:
        """Whether the strategy implements :meth:`score`."""
        return cls.score is not Strategy.score

    @classmethod
    def has_rule(cls) -> bool:
        """Whether the strategy implements :meth:`passes`."""
        return cls.passes is not Strategy.passes


def check_needs(strategy_cls: type, plugin: str) -> frozenset[str]:
    """``strategy_cls.needs`` as a frozenset of known needs; else PluginError naming both."""
    needs: Any = getattr(strategy_cls, "needs", frozenset())
    name = getattr(strategy_cls, "name", strategy_cls)
    if isinstance(needs, str) or not isinstance(needs, (set, frozenset, list, tuple)):
        raise PluginError(
            f"strategy {name!r} (plugin {plugin!r}) "
            f"declares needs={needs!r}; use a frozenset such as frozenset({{'embeddings'}})"
        )
    unknown = sorted(str(n) for n in set(needs) - set(NEEDS))
    if unknown:
        raise PluginError(
            f"strategy {name!r} (plugin {plugin!r}) declares unknown needs "
            f"{unknown}; known needs: {', '.join(sorted(NEEDS))}"
        )
    return frozenset(needs)


def parse_params(strategy_cls: Any, values: Mapping[str, Any], kind: str = "method") -> BaseModel:
    """Validate ``values`` against the strategy's ``Params``; errors name the strategy and
    key. ``strategy_cls``: any class with ``name`` and ``Params`` (a :class:`Strategy`, an
    online strategy); ``kind`` names it in the message."""
    try:
        return strategy_cls.Params(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<params>'}: {err['msg']}"
            for err in exc.errors()
        )
        known = ", ".join(strategy_cls.Params.model_fields) or "none"
        raise ConfigError(
            f"invalid parameters for {kind} {getattr(strategy_cls, 'name', strategy_cls)!r}: "
            f"{problems} (known parameters: {known})"
        ) from None


class Progress(Protocol):
    """Progress reporting handed to strategies (rich bars in the CLI, silent in tests)."""

    def track(
        self, iterable: Iterable[T], description: str, total: int | None = None
    ) -> Iterator[T]: ...


class PoolView(Protocol):
    """What a strategy sees of the pool: uids, captions, images. Never the ground truth."""

    @property
    def uids(self) -> Sequence[str]: ...

    @property
    def captions(self) -> Sequence[str]: ...

    @property
    def fingerprint(self) -> str: ...

    def __len__(self) -> int: ...

    def iter_images(
        self, uids: Iterable[str] | None = None, start: int = 0
    ) -> Iterator[tuple[str, Any]]: ...


class SelectionServices(Protocol):
    """What the harness offers a strategy through its context: the pool's embeddings,
    embeddings of other images, the prepared proxy model, the target data. Embedder specs
    are as on the command line (``proxy``, ``reference``, ``open_clip:ARCH:PATH``).

    :class:`selbench.embedders.EmbeddingService` implements it for runs; the stand-ins in
    :mod:`selbench.testing` implement what the conformance kit needs.
    """

    def embeddings(self, spec: str = "proxy") -> Embeddings: ...

    def embed_images(self, spec: str, images: Sequence[Any]) -> np.ndarray: ...

    def embedder(self, spec: str = "proxy") -> Embedder: ...

    def target(self) -> TargetSet: ...


@dataclass
class SelectionContext:
    """Everything a strategy may use to choose a subset.

    ``budget_count`` is the exact number of uids to return. ``rng`` is seeded from
    ``seed``; use it (or ``seed``) for every random choice so selections reproduce.
    ``work_dir`` is private scratch space for this run. ``strategy`` and ``needs`` are
    set by the harness: a context method whose need (:data:`NEEDS`) is not in ``needs``
    raises :class:`~selbench.errors.UndeclaredNeedError`; ``needs=None`` checks nothing
    (a context built by hand in a test).
    """

    pool: PoolView
    budget_count: int
    budget_fraction: float
    seed: int
    device: str
    work_dir: Path
    progress: Progress = field(default_factory=NullProgress)
    services: SelectionServices | None = None  # strategies use the methods below
    strategy: str = ""
    needs: frozenset[str] | None = None
    image_size: int | None = None
    # The harness sets this to the pool's ground truth loader when the pool records one
    # (SynthWeb); only strategies that declare "ground_truth" may call it.
    truth: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None
    # Where row-block work runs (``--executor``): pass it as ``executor=`` to the toolbox
    # functions that take one. An execution setting: it never changes the selection.
    executor: Executor = field(default_factory=LocalExecutor)
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def _check_need(self, method: str) -> None:
        if self.needs is not None:
            need = next(n for n, methods in NEEDS.items() if method in methods)
            if need not in self.needs:
                raise UndeclaredNeedError(
                    f"strategy {self.strategy or '<unnamed>'!r} called ctx.{method}() without "
                    f"declaring {need!r} in `needs` (declared: {sorted(self.needs)}); add "
                    f"needs = frozenset({{{need!r}, ...}}) to the strategy class"
                )

    def _service(self, method: str) -> SelectionServices:
        self._check_need(method)
        if self.services is None:
            raise RuntimeError(
                "this SelectionContext has no embedding service; pass "
                "services=EmbeddingService(...), or in tests build the context with "
                "selbench.testing.context_with_embeddings()"
            )
        return self.services

    def embeddings(self, embedder: str = "proxy") -> Embeddings:
        """The pool's cached image and text embeddings (``.image``, ``.text``: float16,
        L2-normalised, rows in ``pool.uids`` order), computed on first request.
        Declare ``"embeddings"`` in ``needs``."""
        return self._service("embeddings").embeddings(embedder)

    def target(self) -> TargetSet:
        """The run's target data (``.images``: PIL images, ``.path``), already checked to
        share no image with the evaluation sets. Declare ``"target"`` in ``needs``."""
        return self._service("target").target()

    def embed_images(self, images: Sequence[Any], embedder: str = "proxy") -> np.ndarray:
        """L2-normalised float32 embeddings of extra images (e.g. the target's) by
        ``embedder``, rows in the images' order. Declare ``"embeddings"`` in ``needs``."""
        return self._service("embed_images").embed_images(embedder, images)

    def proxy(self, embedder: str = "proxy") -> Embedder:
        """The prepared proxy model (``.model``, ``.preprocess``, ``.tokenizer``,
        ``.encode``, ``.weights_digest``). Declare ``"proxy"`` in ``needs``."""
        return self._service("proxy").embedder(embedder)

    def ground_truth(self) -> Mapping[str, Mapping[str, Any]]:
        """The pool's recorded ground truth per uid (SynthWeb: ``pathology`` and the
        scene), for oracles that bound what a selection could reach. Declare
        ``"ground_truth"`` in ``needs``; a pool that records none raises ConfigError."""
        self._check_need("ground_truth")
        if self.truth is None:
            raise ConfigError(
                f"strategy {self.strategy or '<unnamed>'!r} reads the pool's ground truth, "
                f"and pool {getattr(self.pool, 'name', '?')!r} records none: only SynthWeb "
                "pools do (docs/synthweb.md)"
            )
        return self.truth()


SYNTHETIC_PREFIX = "synth:"


@dataclass
class Synthesized:
    """Image-text pairs a strategy made instead of choosing pool samples (dataset
    distillation): the selection contract for methods whose output is new data.

    ``images``: an array (or a sequence of arrays) of shape ``(N, H, W, 3)``, either
    ``uint8`` or floating point in ``[0, 1]``, with ``H == W == ctx.image_size``.
    ``captions``: ``N`` non-empty strings, the training caption of each image.
    ``sources``: optional, per pair, the pool uid the pair started from (initialisation)
    or ``None``; recorded in ``selection.parquet`` for provenance, never trained on.

    The harness checks the count (exactly ``ctx.budget_count``), the size, finite
    pixels in range and the captions; gives each pair the uid
    ``synth:<content digest>:<000001..>`` (same pixels and captions, same uids); stores
    them as 8-bit PNGs in the run's subset shards and trains on them like any subset.
    """

    images: Any
    captions: Sequence[str]
    sources: Sequence[str | None] | None = None


def synthetic_digest(pixels: np.ndarray, captions: Sequence[str]) -> str:
    """First 12 hex digits of sha256 over the uint8 pixels, their shape and the captions."""
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    digest.update("\n".join(captions).encode())
    return digest.hexdigest()[:12]


def synthetic_uids(pixels: np.ndarray, captions: Sequence[str]) -> list[str]:
    """``synth:<digest>:000001``, ... : the uids of synthesized pairs, one per image."""
    digest = synthetic_digest(pixels, captions)
    return [f"{SYNTHETIC_PREFIX}{digest}:{i + 1:06d}" for i in range(len(captions))]


def is_synthetic_uid(uid: str) -> bool:
    """Whether ``uid`` names a synthesized pair rather than a pool sample."""
    return str(uid).startswith(SYNTHETIC_PREFIX)


@dataclass
class Selection:
    """What a strategy returns.

    ``uids``: the chosen samples, unique, exactly ``ctx.budget_count`` of them.
    ``synthesized``: instead of ``uids`` (leave those empty), pairs the strategy made
    (:class:`Synthesized`); the harness fills ``uids`` with their synthetic uids and
    ``pixels`` with their ``uint8`` images, and ``captions`` and ``scores`` must be empty.
    ``captions``: optional caption rewrites (uid -> training text) for selected uids.
    ``scores``: optional per-sample scores (uid -> float), logged with the selection.
    ``metrics``: optional numbers about the selection (stage seconds, cluster counts, ...),
    logged to MLflow as ``strategy/<name>``.
    ``series``: optional curves (name -> ``[(step, value), ...]``, e.g. a proxy's loss),
    logged as ``strategy/<name>`` at each step.
    ``artifacts``: optional files the strategy wrote (plots, examples), logged under
    ``strategy/`` in the run's artifacts.
    ``positions`` and ``score_array``: the array form, made by :meth:`from_positions`
    (:mod:`selbench.positions`): rows of ``ctx.pool`` and one score per pool sample in
    pool order, no Python object per sample; ``uids`` and ``scores`` then read them lazily.
    """

    uids: Sequence[str]
    captions: dict[str, str] | None = None
    scores: Mapping[str, float] | None = None
    metrics: dict[str, float] | None = None
    series: dict[str, list[tuple[int, float]]] | None = None
    artifacts: list[Path] | None = None
    synthesized: Synthesized | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)  # set by the harness
    # Pipelines only: uid -> the step that removed it ("2: clip_score"), for every pool
    # sample not selected; recorded in selection.parquet.
    dropped: dict[str, str] | None = field(default=None, repr=False)
    positions: np.ndarray | None = field(default=None, repr=False)
    score_array: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_positions(
        cls, ctx: SelectionContext, positions: Any, scores: Any = None, **report: Any
    ) -> Selection:
        """The selection of rows ``positions`` of ``ctx.pool`` (integers, in selection
        order), with ``scores`` (optional: one number per sample of ``ctx.pool``, in its
        order) and the other fields (``metrics``, ``captions``, ...) as keywords."""
        rows = np.asarray(positions)
        values = None if scores is None else np.asarray(scores)
        return cls(
            uids=PoolUids(ctx.pool, rows),
            scores=None if values is None else PoolScores(ctx.pool, values),
            positions=rows,
            score_array=values,
            **report,
        )


def check_budget(budget: float) -> float:
    """Return ``budget`` as a float if it is a fraction in (0, 1]; else raise ConfigError."""
    if not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise ConfigError(f"budget must be a fraction in (0, 1], got {budget!r}")
    return float(budget)


def budget_count(budget: float, pool_size: int) -> int:
    """``round(budget * pool_size)``, the exact number of samples a strategy must return."""
    check_budget(budget)
    count = int(round(float(budget) * pool_size))
    if count < 1:
        raise ConfigError(
            f"budget {budget} of a pool of {pool_size} samples selects nothing; use a larger budget"
        )
    return count


def validate_selection(
    selection: object,
    known_uids: Iterable[str],
    expected_count: int,
    plugin: str,
    image_size: int | None = None,
    pool: PoolView | None = None,
) -> Selection:
    """Check a strategy's output against the contract; raise :class:`PluginError` naming the plugin.

    Rejects: a non-``Selection`` return value, non-string uids, duplicates, uids not in the
    pool, a count other than ``expected_count``, caption rewrites or scores for uids that
    are not selected / not in the pool. A selection of :class:`Synthesized` pairs is
    checked by :func:`validate_synthesized` instead (``image_size``: the run's); one of
    positions (:meth:`Selection.from_positions`) by :func:`~selbench.positions.check_positions`
    against ``pool`` (the context's, when the selection does not name its own).
    """
    if not isinstance(selection, Selection):
        raise PluginError(
            f"strategy {plugin!r} returned {type(selection).__name__}, expected selbench.Selection"
        )
    if selection.synthesized is not None:
        return validate_synthesized(selection, expected_count, plugin, image_size)
    if selection.positions is not None:  # the array form: checked with numpy, no set
        _check_report(selection, plugin)
        return validated_positions(selection, pool_of(selection.uids, pool), expected_count, plugin)
    uids = list(selection.uids)
    _refuse(plugin, [u for u in uids if not isinstance(u, str)], "returned {n} non-string uids")
    duplicates = sorted(u for u, n in Counter(uids).items() if n > 1)
    seen = set(uids)
    _refuse(plugin, duplicates, "returned {n} duplicate uids", 3)
    known = known_uids if isinstance(known_uids, (set, frozenset)) else set(known_uids)
    unknown = [u for u in uids if u not in known]
    _refuse(plugin, unknown, "returned {n} uids that are not in the pool", 3)
    if len(uids) != expected_count:
        raise PluginError(
            f"strategy {plugin!r} returned {len(uids)} uids, the budget is exactly {expected_count}"
        )
    captions = selection.captions or {}
    _refuse(
        plugin, [u for u in captions if u not in seen], "rewrote captions of {n} unselected uids", 3
    )
    empty = [u for u, c in captions.items() if not isinstance(c, str) or not c]
    _refuse(plugin, empty, "returned {n} empty caption rewrites", 3)
    stray = [u for u in selection.scores or {} if u not in known]
    _refuse(plugin, stray, "returned scores for {n} uids not in the pool", 3)
    _check_report(selection, plugin)
    dropped = selection.dropped
    if dropped is not None:
        _refuse(plugin, [u for u in dropped if u in seen], "marked {n} selected uids as dropped", 3)
        _refuse(
            plugin, [u for u in dropped if u not in known], "dropped {n} uids not in the pool", 3
        )
    return Selection(
        uids=uids,
        captions=selection.captions,
        scores=selection.scores,
        metrics=selection.metrics,
        series=selection.series,
        artifacts=selection.artifacts,
        dropped=dropped,
    )


def validate_synthesized(
    selection: Selection, expected_count: int, plugin: str, image_size: int | None
) -> Selection:
    """Check synthesized pairs (:class:`Synthesized`); PluginError naming the plugin.

    Rejects: pool uids, caption rewrites or scores beside them; a count other than
    ``expected_count``; images that are not ``(N, image_size, image_size, 3)``; float
    pixels that are not finite or outside ``[0, 1]``; integer pixels that are not
    ``uint8``; captions that are not non-empty strings. Returns the selection with the
    synthetic ``uids`` and the ``uint8`` ``pixels`` filled in.
    """
    synth = selection.synthesized
    if not isinstance(synth, Synthesized):
        raise PluginError(
            f"strategy {plugin!r} returned synthesized={type(synth).__name__}, "
            "expected selbench.Synthesized"
        )
    if list(selection.uids) or selection.captions or selection.scores:
        raise PluginError(
            f"strategy {plugin!r} returned synthesized pairs together with pool uids, "
            "caption rewrites or scores; a selection is one or the other"
        )
    try:
        images = np.asarray(synth.images)
    except (TypeError, ValueError) as exc:
        raise PluginError(
            f"strategy {plugin!r} returned synthesized images that are not one array: {exc}"
        ) from None
    captions = list(synth.captions)
    if len(images) != expected_count or len(captions) != expected_count:
        raise PluginError(
            f"strategy {plugin!r} synthesized {len(images)} images and {len(captions)} "
            f"captions, the budget is exactly {expected_count}"
        )
    side = image_size if image_size is not None else (images.shape[1] if images.ndim > 1 else 0)
    if images.ndim != 4 or images.shape[1:] != (side, side, 3):
        raise PluginError(
            f"strategy {plugin!r} synthesized images of shape {images.shape}, expected "
            f"({expected_count}, {side}, {side}, 3) (N x H x W x RGB at the run's image size)"
        )
    if images.dtype == np.uint8:
        pixels = images
    elif np.issubdtype(images.dtype, np.floating):
        bad = ~np.isfinite(images)
        _refuse(
            plugin,
            np.flatnonzero(bad.any(axis=(1, 2, 3))).tolist(),
            "synthesized {n} images with non-finite pixels (NaN or inf), e.g. image",
            3,
        )
        outside = (images < 0) | (images > 1)
        _refuse(
            plugin,
            np.flatnonzero(outside.any(axis=(1, 2, 3))).tolist(),
            "synthesized {n} float images with pixels outside [0, 1], e.g. image",
            3,
        )
        pixels = np.round(images.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise PluginError(
            f"strategy {plugin!r} synthesized images of dtype {images.dtype}; use uint8 "
            "or floating point in [0, 1]"
        )
    empty = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
    _refuse(plugin, empty, "synthesized {n} empty or non-string captions, e.g. pair", 3)
    sources = list(synth.sources) if synth.sources is not None else [None] * expected_count
    if len(sources) != expected_count:
        raise PluginError(
            f"strategy {plugin!r} gave {len(sources)} sources for {expected_count} pairs"
        )
    _check_report(selection, plugin)
    return Selection(
        uids=synthetic_uids(pixels, captions),
        metrics=selection.metrics,
        series=selection.series,
        artifacts=selection.artifacts,
        synthesized=Synthesized(images=pixels, captions=captions, sources=sources),
        pixels=np.ascontiguousarray(pixels),
    )


def _refuse(plugin: str, found: list, problem: str, examples: int = 0) -> None:
    """PluginError ``strategy 'x' <problem with {n}>, e.g. <examples>`` if ``found``."""
    if found:
        shown = found[:examples] if examples else found[0]
        raise PluginError(f"strategy {plugin!r} {problem.format(n=len(found))}, e.g. {shown!r}")


def _check_report(selection: Selection, plugin: str) -> None:
    """Metrics and series must be finite numbers under simple names; artifacts, files."""
    name_ok = re.compile(r"^[A-Za-z0-9_.\-/ ]+$").match
    values: list[tuple[str, object]] = list((selection.metrics or {}).items())
    for key, curve in (selection.series or {}).items():
        values.extend((key, v) for _, v in curve)
    for key, value in values:
        if not isinstance(key, str) or not name_ok(key):
            raise PluginError(f"strategy {plugin!r} reported a metric with a bad name: {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise PluginError(
                f"strategy {plugin!r} reported metric {key!r} = {value!r}, not a number"
            )
        if not np.isfinite(float(value)):
            raise PluginError(f"strategy {plugin!r} reported metric {key!r} = {value}")
    for path in selection.artifacts or []:
        if not Path(path).is_file():
            raise PluginError(f"strategy {plugin!r} reported artifact {path} that is not a file")
