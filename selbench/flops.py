"""FLOP counting for compute accounting (issue 31): how much a run computed, and where.

Every count here is measured from the model's own shapes with torch's own counter,
``torch.utils.flop_counter.FlopCounterMode`` (the method named in :data:`METHOD`). It
counts matrix multiplications (``mm``, ``addmm``, ``bmm``, ``baddbmm``), convolutions and
fused attention kernels, each multiply-add as 2 FLOPs; bias additions, elementwise ops,
activations, norms, softmax, embedding lookups and reductions count 0. Two gaps of torch's
counter are closed here so that a CLIP's attention is counted in full on every device:

- the CPU attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu`` and its
  backward) has no formula in torch; it gets the one torch uses for its GPU kernels
  (:func:`torch.utils.flop_counter.sdpa_flop_count`);
- ``nn.MultiheadAttention`` in eval mode without autograd takes a fused "fast path"
  (``torch._native_multi_head_attention``) that the counter counts as 0, projections
  included; counting switches that fast path off (``torch.backends.mha``) for its
  duration, so attention runs as the projections and the attention kernel it is made of.

:class:`ComputeLedger` collects a run's counts by name and charges a cached computation
(an embedding pass another run computed) 0 FLOPs, so it is counted once, in the run that
computed it. :func:`recording` opens one for a block; the code that trains or scores a
model inside it adds to it with :func:`charge`, :func:`charge_training` or
:func:`counted`, and does nothing while none is open. docs/compute.md has the rules.
"""

from __future__ import annotations

import operator
import re
import sys
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

#: How every count of this module is made.
METHOD = (
    "torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add; matmul, conv, attention)"
)

#: The rule :func:`training_flops` applies.
TRAINING_RULE = (
    "training = (1 + backward_factor) x forward, backward_factor 2 by default: backward ~ 2x "
    "forward (Kaplan et al. 2020, 'Scaling laws for neural language models', Sec. 2.1: C ~ 6ND)"
)

#: The towers of a CLIP that :func:`clip_forward_flops` counts.
TOWERS: tuple[str, ...] = ("image", "text")

#: Said of a cached ledger entry.
CACHED_NOTE = "computed by another run"

_ENTRY_NAME = re.compile(r"[A-Za-z0-9_.:\- ]+(/[A-Za-z0-9_.:\- ]+)*")


def _cpu_sdpa_flop(
    query_shape: Any,
    key_shape: Any,
    value_shape: Any,
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def _cpu_sdpa_backward_flop(
    grad_out_shape: Any,
    query_shape: Any,
    key_shape: Any,
    value_shape: Any,
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    return int(sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape))


def _custom_formulas() -> dict[Any, Any]:
    """Formulas for the CPU attention kernels, which torch's counter lacks (torch 2.x)."""
    formulas: dict[Any, Any] = {}
    for op_name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flop),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward_flop),
    ):
        try:
            formulas[getattr(torch.ops.aten, op_name)] = formula
        except (AttributeError, RuntimeError):  # a torch without that kernel
            continue
    return formulas


@contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Run ``nn.MultiheadAttention`` as projections + attention kernel, which the counter
    sees, instead of the fused fast path, which it counts as 0 (restored afterwards)."""
    mha = torch.backends.mha
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


class _NoModuleTracker:
    """Stands in for ``FlopCounterMode``'s module tracker, which only splits counts by
    module: its hooks on every module's output fail on a module that returns a parameter
    under ``torch.no_grad`` (a codebook) and pile up over a double backward."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _NoModuleTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _counter() -> FlopCounterMode:
    """torch's counter with selbench's formulas, counting totals only (``"Global"``)."""
    counter = FlopCounterMode(display=False, custom_mapping=_custom_formulas())
    counter.mod_tracker = _NoModuleTracker()
    return counter


def _count(fn: Callable[[], Any]) -> FlopCounterMode:
    counter = _counter()
    with _mha_fastpath_disabled(), counter:
        fn()
    return counter


def forward_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn``, measured under ``torch.utils.flop_counter.FlopCounterMode``
    (display off): matmul, conv and attention FLOPs, 2 per multiply-add; elementwise ops,
    norms and softmax count 0. Everything ``fn`` runs is counted, a backward pass included
    if it calls one; it runs as given (no ``torch.no_grad`` is added)."""
    return int(_count(fn).get_total_flops())


def flops_by_op(fn: Callable[[], Any]) -> dict[str, int]:
    """The same count as :func:`forward_flops`, split by aten op (``"aten.addmm"``: ...)."""
    counts = _count(fn).get_flop_counts().get("Global", {})
    return {str(op): int(n) for op, n in counts.items() if n}


# -- CLIP ------------------------------------------------------------------------------

#: Per model (weakly held, so a dropped model frees its entry and a new model at the same
#: address starts empty) or per caller-given architecture key: (tower, input shape) ->
#: (fixed, per-example) FLOPs.
_MODEL_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], tuple[int, int]]] = (
    weakref.WeakKeyDictionary()
)
_KEYED_CACHE: dict[tuple[Any, ...], tuple[int, int]] = {}


def clear_cache() -> None:
    """Forget every cached CLIP count (after changing a model's architecture in place)."""
    _MODEL_CACHE.clear()
    _KEYED_CACHE.clear()


def _image_hw(model: Any, image_size: int | Sequence[int] | None) -> tuple[int, int]:
    if image_size is None:
        image_size = getattr(getattr(model, "visual", None), "image_size", None)
        if image_size is None:
            raise ValueError("the model does not say its image size; pass image_size")
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = (int(s) for s in image_size)
    return (height, width)


def _context_length(model: Any, context_length: int | None) -> int:
    if context_length is None:
        context_length = getattr(model, "context_length", None)
        if context_length is None:
            raise ValueError("the model does not say its context length; pass context_length")
    return int(context_length)


def _check_towers(towers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(towers, str):
        towers = (towers,)
    unknown = [t for t in towers if t not in TOWERS]
    if unknown:
        raise ValueError(f"unknown tower(s) {unknown}; expected some of {TOWERS}")
    return tuple(dict.fromkeys(towers))


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Eval mode for the count (no dropout, no patch dropout); each module's mode restored."""
    modes = [(m, m.training) for m in model.modules()] if hasattr(model, "modules") else []
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _dummy_input(model: Any, tower: str, batch: int, shape: tuple[int, ...]) -> torch.Tensor:
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = param.device if param is not None else torch.device("cpu")
    if tower == "image":
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        return torch.zeros((batch, 3, *shape), dtype=dtype, device=device)
    return torch.zeros((batch, *shape), dtype=torch.long, device=device)


def _measure_tower(model: Any, tower: str, batch: int, shape: tuple[int, ...]) -> int:
    encode = model.encode_image if tower == "image" else model.encode_text
    inputs = _dummy_input(model, tower, batch, shape)
    with torch.no_grad(), _eval_mode(model):
        return forward_flops(lambda: encode(inputs))


def _affine(measure: Callable[[int], int], what: str) -> tuple[int, int]:
    """(fixed, per-example) FLOPs from ``measure(batch)`` at batch 1 and 2."""
    one, two = measure(1), measure(2)
    per_example, fixed = two - one, 2 * one - two
    if per_example < 0 or fixed < 0:
        raise ValueError(
            f"{what}'s FLOPs are not affine in the batch size "
            f"({one} at batch 1, {two} at batch 2); count it with forward_flops"
        )
    return fixed, per_example


def _tower_cost(
    model: Any, tower: str, shape: tuple[int, ...], cache_key: Hashable | None
) -> tuple[int, int]:
    """(fixed, per-example) FLOPs of one tower, from counts at batch 1 and 2, cached."""
    key = (tower, shape)
    cache = _KEYED_CACHE if cache_key is not None else _MODEL_CACHE.setdefault(model, {})
    full_key = (cache_key, *key) if cache_key is not None else key
    if full_key not in cache:
        cache[full_key] = _affine(
            lambda b: _measure_tower(model, tower, b, shape), f"the {tower} tower"
        )
    return cache[full_key]


def clip_forward_flops(
    model: Any,
    image_size: int | Sequence[int] | None,
    context_length: int | None,
    batch: int = 1,
    towers: Sequence[str] = TOWERS,
    cache_key: Hashable | None = None,
) -> dict[str, int]:
    """Forward FLOPs of an open_clip CLIP's towers for ``batch`` examples, by tower.

    Measured with ``FlopCounterMode`` by running ``model.encode_image`` on zero images
    ``(b, 3, H, W)`` and ``model.encode_text`` on zero tokens ``(b, context_length)``, on the
    model's device and dtype, under ``torch.no_grad()`` in eval mode (modes restored), at
    b = 1 and b = 2: per example = count(2) - count(1), fixed = 2 count(1) - count(2) (0 for
    a CLIP, whose towers treat examples independently), and the result is fixed + batch x
    per example, so a pass over millions of examples costs two small forwards. ``None``
    sizes are read from the model (``model.visual.image_size``, ``model.context_length``).

    Counts are cached per model object (weakly) and input shape, or, with ``cache_key``
    (e.g. the open_clip model name), per that key and shape, shared by every instance of
    the architecture; after calling once, a call per step is a dictionary lookup.
    """
    batch = operator.index(batch)
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    counts: dict[str, int] = {}
    for tower in _check_towers(towers):
        if tower == "image":
            shape: tuple[int, ...] = _image_hw(model, image_size)
        else:
            shape = (_context_length(model, context_length),)
        fixed, per_example = _tower_cost(model, tower, shape, cache_key)
        counts[tower] = fixed + batch * per_example if batch else 0
    return counts


def embedding_pass_flops(
    model: Any,
    image_size: int | Sequence[int] | None,
    context_length: int | None,
    n_examples: int,
    cache_key: Hashable | None = None,
) -> int:
    """FLOPs of an embedding pass: the image and the text tower's forward on n examples."""
    counts = clip_forward_flops(
        model, image_size, context_length, batch=n_examples, cache_key=cache_key
    )
    return sum(counts.values())


def clip_loss_flops(batch: int, embed_dim: int, matmuls: int = 2) -> int:
    """Forward FLOPs of a CLIP contrastive loss on one batch: its logits matmuls,
    (batch, d) @ (d, batch), 2 * batch^2 * d each. open_clip's ``ClipLoss`` on one process
    computes two (``logits_per_image`` and ``logits_per_text``); its softmax and
    cross-entropy count 0, as everywhere here. Quadratic in the batch, so not part of a
    per-example count: add it per step."""
    return matmuls * 2 * batch * batch * embed_dim


def training_flops(forward_per_example: int, examples: int, backward_factor: float = 2.0) -> int:
    """FLOPs of training on ``examples`` examples, forward + backward, by the rule that the
    backward pass costs ``backward_factor`` x the forward (2: Kaplan et al. 2020, "Scaling
    laws for neural language models", Sec. 2.1, C ~ 6ND = 3 x the forward's 2ND), so
    training = (1 + backward_factor) x forward. Exact integer arithmetic; rounded."""
    if forward_per_example < 0 or examples < 0 or backward_factor < 0:
        raise ValueError("forward_per_example, examples and backward_factor must be >= 0")
    forward = operator.index(forward_per_example) * operator.index(examples)
    return round(forward * (1 + Fraction(backward_factor)))


# -- the ledger ------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerEntry:
    """One counted computation. ``flops`` is what this run is charged: 0 for a cached
    entry, whose cost to the run that computed it, when known, is ``reused_flops``."""

    name: str
    flops: int
    cached: bool = False
    reused_flops: int = 0
    note: str = ""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _ENTRY_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"ledger entry name {name!r}: use letters, digits, '_', '-', '.', ':', ' ' in "
            "'/'-separated parts (an MLflow metric name)"
        )
    if name == "total":
        raise ValueError("'total' is the ledger's own metric; name the entry otherwise")
    return name


def _check_flops(flops: int) -> int:
    if isinstance(flops, bool):
        raise TypeError("flops must be an integer, not a bool")
    flops = operator.index(flops)
    if flops < 0:
        raise ValueError(f"flops must be >= 0, got {flops}")
    return flops


@dataclass
class ComputeLedger:
    """A run's compute, as named entries such as ``"embedding/reference"``,
    ``"training/proxy"``, ``"scoring/el2n"``. A name may be added many times (per step); its
    entries add up. A cached computation is recorded, flagged and charged 0, so it is
    counted once, in the run that computed it."""

    entries: list[LedgerEntry] = field(default_factory=list)
    method: str = METHOD

    def add(
        self, name: str, flops: int, cached: bool = False, note: str | None = None
    ) -> LedgerEntry:
        """Record ``flops`` under ``name``; with ``cached``, record them as reused
        (``reused_flops``, 0 charged) with the note "computed by another run"."""
        name, flops = _check_name(name), _check_flops(flops)
        if cached:
            entry = LedgerEntry(name, 0, True, flops, note or CACHED_NOTE)
        else:
            entry = LedgerEntry(name, flops, False, 0, note or "")
        self.entries.append(entry)
        return entry

    def by_name(self) -> dict[str, int]:
        """Charged FLOPs per name, in the order names were first added."""
        sums: dict[str, int] = {}
        for entry in self.entries:
            sums[entry.name] = sums.get(entry.name, 0) + entry.flops
        return sums

    def cached_names(self) -> list[str]:
        """Names with at least one cached entry."""
        return list(dict.fromkeys(e.name for e in self.entries if e.cached))

    def total(self) -> int:
        """FLOPs charged to this run (cached entries add 0)."""
        return sum(entry.flops for entry in self.entries)

    def as_metrics(self, prefix: str = "flops/", total: bool = False) -> dict[str, float]:
        """MLflow metrics: ``{prefix}{name}``, charged, per name; ``{prefix}total`` too
        only when asked, since a run's ``flops/total`` sums every ``flops/`` metric it
        logged (``selbench.run.compute.total_compute``) and would count a subtotal twice."""
        metrics = {f"{prefix}{name}": float(n) for name, n in self.by_name().items()}
        if total:
            metrics[f"{prefix}total"] = float(self.total())
        return metrics

    def to_dict(self) -> dict[str, Any]:
        """The JSON artifact: method, training rule, total, per-name sums and every entry."""
        return {
            "method": self.method,
            "training_rule": TRAINING_RULE,
            "total": self.total(),
            "by_name": self.by_name(),
            "entries": [asdict(entry) for entry in self.entries],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComputeLedger:
        """The ledger :meth:`to_dict` wrote."""
        entries = [LedgerEntry(**entry) for entry in data.get("entries", [])]
        return cls(entries=entries, method=str(data.get("method", METHOD)))


# -- the open ledger: code that trains or scores a model charges it; the select stage
# opens it around the strategy. Nothing is counted, nor measured, while none is open. ---

_OPEN: ContextVar[ComputeLedger | None] = ContextVar("selbench_open_ledger", default=None)
_COUNTING: ContextVar[bool] = ContextVar("selbench_counted_block", default=False)


@contextmanager
def recording() -> Iterator[ComputeLedger]:
    """Open a fresh :class:`ComputeLedger` that :func:`charge` adds to while the block
    runs, and yield it. Blocks nest: the innermost open ledger receives the charges, and
    the enclosing one gets nothing of them (add them to it yourself if it should). The
    ledger is a context variable: it follows the block's thread (and asyncio task), and a
    thread started inside the block does not see it unless it runs in a copy of the
    context (``contextvars.copy_context().run``)."""
    ledger = ComputeLedger()
    token = _OPEN.set(ledger)
    try:
        yield ledger
    finally:
        _OPEN.reset(token)


def charging() -> bool:
    """Whether a charge made here is recorded: a ledger is open and no :func:`counted`
    block encloses this code. Test it before measuring something only to charge it."""
    return _OPEN.get() is not None and not _COUNTING.get()


def charge(name: str, flops: int, *, cached: bool = False) -> None:
    """Add ``flops`` under ``name`` to the open ledger (:meth:`ComputeLedger.add`;
    ``cached``: reused, charged 0); nothing, not even a check, when none is open. Inside
    a :func:`counted` block only a cached charge is recorded: the block's counter
    already sees the work any other charge there would describe."""
    ledger = _OPEN.get()
    if ledger is not None and (cached or not _COUNTING.get()):
        ledger.add(name, flops, cached=cached)


@contextmanager
def counted(name: str) -> Iterator[None]:
    """Charge ``name`` with the FLOPs the block runs, counted as it runs (as
    :func:`forward_flops` counts), when a ledger is open; with none, the block runs as it
    is. A counted block inside another is not counted again: the enclosing counter sees
    its work. Nothing is charged when the block raises. For passes whose shapes vary
    (generation) or that are more than a model's forward."""
    if not charging():
        yield
        return
    counter = _counter()
    token = _COUNTING.set(True)
    try:
        with _mha_fastpath_disabled(), counter:
            yield
    finally:
        _COUNTING.reset(token)
    charge(name, int(counter.get_total_flops()))


def _is_coca(model: Any) -> bool:
    # open_clip is not imported for this: a model built by open_clip has imported it.
    open_clip = sys.modules.get("open_clip")
    return open_clip is not None and isinstance(model, open_clip.CoCa)


def embed_dim(model: Any) -> int:
    """The width of a CLIP's joint embedding (its image tower's output)."""
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if dim is None:
        image = _dummy_input(model, "image", 1, _image_hw(model, None))
        with torch.no_grad(), _eval_mode(model):
            dim = model.encode_image(image).shape[-1]
    return int(dim)


def _measure_call(model: Any, call: Callable[[], Any]) -> int:
    with torch.no_grad(), _eval_mode(model):
        return forward_flops(call)


def _coca_cost(model: Any) -> tuple[int, int]:
    """(fixed, per-example) forward FLOPs of a CoCa's whole forward, cached per model."""
    hw, length = _image_hw(model, None), _context_length(model, None)
    cache = _MODEL_CACHE.setdefault(model, {})
    key = ("coca", hw, length)

    def measure(batch: int) -> int:
        images = _dummy_input(model, "image", batch, hw)
        tokens = _dummy_input(model, "text", batch, (length,))
        return _measure_call(model, lambda: model(images, tokens))

    if key not in cache:
        cache[key] = _affine(measure, "the CoCa")
    return cache[key]


def model_training_flops(
    model: Any,
    samples_seen: int,
    steps: int,
    batch_size: int,
    *,
    example: Callable[[int], Any] | None = None,
) -> int:
    """Training FLOPs of ``model`` over ``samples_seen`` examples in ``steps`` steps of
    ``batch_size``, by :data:`TRAINING_RULE` (3 x forward), measured on the model:

    - an open_clip CLIP: its towers' forward per example (:func:`clip_forward_flops`) x
      samples, plus the contrastive loss's logits (:func:`clip_loss_flops` at
      ``batch_size`` and the model's embedding width) per step, the rule of
      ``selbench.run.compute.training_compute``;
    - an open_clip ``CoCa``: its whole forward, ``model(images, tokens)``, with the
      multimodal decoder and its vocabulary projection at every text position, per
      example (counted at batch 1 and 2 on zero inputs, cached per model), plus the same
      loss term. ``selbench.captioning.coca_losses`` projects only the positions that are
      not padding, so this is the upper bound for captions that fill the context;
    - any model, with ``example``: ``example(b)`` runs the model's training forward on
      ``b`` examples; it is counted at b = 1 and 2 (``torch.no_grad``, eval mode, modes
      restored), the fixed part charged per step and the per-example part per sample.
      There is no per-step loss term beyond what ``example`` runs.

    Any other model without ``example`` is a TypeError."""
    if example is not None:
        fixed, per_example = _affine(
            lambda b: _measure_call(model, lambda: example(b)), f"{type(model).__name__}"
        )
        return training_flops(per_example, samples_seen) + training_flops(fixed, steps)
    if _is_coca(model):
        fixed, per_example = _coca_cost(model)
        forward = training_flops(per_example, samples_seen) + training_flops(fixed, steps)
    elif hasattr(model, "encode_image") and hasattr(model, "encode_text"):
        towers = clip_forward_flops(model, None, None)
        forward = training_flops(sum(towers.values()), samples_seen)
    else:
        raise TypeError(
            f"model_training_flops: a {type(model).__name__} is neither an open_clip CLIP "
            "nor a CoCa; pass example=lambda b: <its training forward on b examples>"
        )
    loss = clip_loss_flops(batch_size, embed_dim(model))
    return forward + training_flops(loss, steps)


def training_name(description: str) -> str:
    """The ledger name :func:`charge_training` uses: ``training/`` and the part of
    ``description`` before its first ``:``, lowercased, letters and digits kept, runs of
    spaces, ``-`` and ``_`` made one ``_`` ("Proxy: training" -> ``training/proxy``,
    "TL;DR: training captioner" -> ``training/tldr``, "Distill: expert 2" ->
    ``training/distill``); ``training/model`` when nothing is left."""
    head = description.split(":", 1)[0].lower()
    slug = re.sub(r"[ _-]+", "_", re.sub(r"[^a-z0-9 _-]", "", head)).strip("_")
    return f"training/{slug or 'model'}"


def charge_training(
    model: Any,
    description: str,
    samples_seen: int,
    steps: int,
    batch_size: int,
    *,
    example: Callable[[int], Any] | None = None,
) -> None:
    """Charge the open ledger ``training_name(description)`` with
    :func:`model_training_flops`. Costs nothing, not even the count, when no ledger is
    open, and charges nothing inside a :func:`counted` block (whose counter already saw
    the training run)."""
    if not charging():
        return
    flops = model_training_flops(model, samples_seen, steps, batch_size, example=example)
    charge(training_name(description), flops)
