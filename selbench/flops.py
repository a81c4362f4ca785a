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
computed it. docs/compute.md describes the rules; wiring the ledger into runs is not done
here.
"""

from __future__ import annotations

import operator
import re
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
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


def _count(fn: Callable[[], Any]) -> FlopCounterMode:
    counter = FlopCounterMode(display=False, custom_mapping=_custom_formulas())
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


def _tower_cost(
    model: Any, tower: str, shape: tuple[int, ...], cache_key: Hashable | None
) -> tuple[int, int]:
    """(fixed, per-example) FLOPs of one tower, from counts at batch 1 and 2, cached."""
    key = (tower, shape)
    cache = _KEYED_CACHE if cache_key is not None else _MODEL_CACHE.setdefault(model, {})
    full_key = (cache_key, *key) if cache_key is not None else key
    if full_key not in cache:
        one = _measure_tower(model, tower, 1, shape)
        two = _measure_tower(model, tower, 2, shape)
        per_example, fixed = two - one, 2 * one - two
        if per_example < 0 or fixed < 0:
            raise ValueError(
                f"the {tower} tower's FLOPs are not affine in the batch size "
                f"({one} at batch 1, {two} at batch 2); count it with forward_flops"
            )
        cache[full_key] = (fixed, per_example)
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
    """A run's compute, as named entries such as ``"selection/embedding:reference"``,
    ``"selection/proxy_training"``, ``"training"``, ``"online/learner_forward"``,
    ``"online/reference_forward"``. A name may be added many times (per step); its
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

    def as_metrics(self, prefix: str = "flops/") -> dict[str, float]:
        """MLflow metrics: ``{prefix}{name}`` (charged, per name) and ``{prefix}total``."""
        metrics = {f"{prefix}{name}": float(n) for name, n in self.by_name().items()}
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
