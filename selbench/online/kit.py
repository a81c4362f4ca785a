"""The online conformance kit: the battery every built-in online strategy passes, against
a tiny deterministic CLIP, as one pytest item per check (the offline kit's pattern,
:mod:`selbench.testing`)::

    from selbench.testing import parametrize_online_with_checks

    @parametrize_online_with_checks([MyOnline(), MyOnline({"ratio": 2})])
    def test_my_online_strategy_conforms(strategy, check):
        check(strategy)

or all at once with ``check_online_strategy(MyOnline)``. A registered name with its
parameters is accepted wherever a strategy is (``"jest(ratio=2)"``). Each check builds
super-batches of ``ratio x keep`` random examples scored by :class:`TinyClip` models (a
learner in training mode and a frozen reference, seeded apart) and runs ``choose`` as the
harness does. The checks (each failure an ``AssertionError`` naming the strategy and the
case):

- ``check_online_params``: ``name``, ``summary`` and ``reference`` are set; ``Params`` has
  an int ``ratio`` that refuses 0 (ge=1); every field has a default and a description, and
  the defaults survive strings (``-p key=value``), the method grammar (``jest(ratio=2)``,
  the label a run writes) and JSON;
- ``check_online_count``: exactly ``keep`` distinct indices in ``[0, N)`` (the harness's
  :func:`~selbench.online.contract.choose_checked`) for each keep, at the strategy's ratio
  and at ratio 1 (``N == keep``);
- ``check_online_deterministic``: the same generator seed gives the same choice;
- ``check_online_seed``: a strategy stochastic with its parameters (``is_stochastic()``)
  chooses differently under some other seed; one that is not never does;
- ``check_online_models_untouched``: ``choose`` leaves the learner and the reference as it
  found them: parameters and buffers bit-identical, every module's ``training`` flag, no
  ``.grad``, gradient mode unchanged;
- ``check_online_reference``: a strategy that does not declare ``needs_reference`` chooses
  with ``reference=None`` and never runs a reference it is given; one that declares it
  chooses with one.

A strategy declares the checks it is expected to fail, with the reason, in
``expected_check_failures`` (or by overriding ``expected_failures()``); they are marked
``xfail(strict=True)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn

from selbench.errors import ConfigError, PluginError
from selbench.online.contract import (
    OnlineStrategy,
    SuperBatch,
    choose_checked,
    parse_online_params,
)
from selbench.run.spec import MethodSpec

#: The inputs :class:`TinyClip` takes: images 3 x 8 x 8, 6 tokens from a vocabulary of 64.
IMAGE_SIZE, CONTEXT_LENGTH, VOCAB_SIZE = 8, 6, 64
#: The seed of a super-batch's reference model is its learner's plus this.
REFERENCE_SEED_OFFSET = 1_000_003


Check = TypeVar("Check", bound=Callable[..., None])


def _single_threaded(check: Check) -> Check:
    """``check`` run with one torch thread (the count restored after): the kit's tensors are
    a few kilobytes, where an intra-op thread pool only adds overhead (milliseconds per
    operation on a busy machine)."""

    @functools.wraps(check)
    def run(*args: Any, **kwargs: Any) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            check(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return cast(Check, run)


def _randn(generator: torch.Generator, *shape: int, scale: float = 1.0) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=generator) * scale)


class TinyClip(nn.Module):
    """A tiny open_clip-style CLIP, deterministic in ``seed`` (the global RNG untouched).

    Images ``(N, 3, 8, 8)`` are flattened through a linear layer, tokens ``(N, 6)`` (long)
    averaged from an embedding through another; both features are L2-normalised. The
    forward returns ``(image_features, text_features, logit_scale)`` as open_clip's tuple,
    with CLIP's initial scale ``exp(log(1 / 0.07))`` (clamped at 100, as open_clip does).
    With 32-dimensional random features the logits spread by about 2.5, so per-example
    losses differ (no ties) while sampling by learnability (``jest``) still depends on
    its draws; 8 dimensions made some of JEST's choices all but deterministic. ``calls``
    counts forward passes.
    """

    def __init__(self, seed: int = 0, width: int = 16, embed_dim: int = 32) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(int(seed))
        pixels = 3 * IMAGE_SIZE * IMAGE_SIZE
        with torch.random.fork_rng(devices=[]):  # their default init draws: undone after
            self.visual = nn.Linear(pixels, embed_dim)
            self.token_embedding = nn.Embedding(VOCAB_SIZE, width)
            self.text_projection = nn.Linear(width, embed_dim)
        self.visual.weight = _randn(generator, embed_dim, pixels, scale=pixels**-0.5)
        self.visual.bias = _randn(generator, embed_dim, scale=0.1)
        self.token_embedding.weight = _randn(generator, VOCAB_SIZE, width)
        self.text_projection.weight = _randn(generator, embed_dim, width, scale=width**-0.5)
        self.text_projection.bias = _randn(generator, embed_dim, scale=0.1)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.context_length, self.vocab_size, self.calls = CONTEXT_LENGTH, VOCAB_SIZE, 0

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[Any, Any, Any]:
        self.calls += 1
        image = self.visual(images.flatten(1))
        text = self.text_projection(self.token_embedding(texts.long()).mean(dim=1))
        normalise = nn.functional.normalize
        scale = self.logit_scale.exp().clamp(max=100)
        return normalise(image, dim=-1), normalise(text, dim=-1), scale


def make_super_batch(
    size: int, keep: int, seed: int = 0, generator_seed: int = 0, reference: bool = True
) -> SuperBatch:
    """A :class:`~selbench.online.contract.SuperBatch` of ``size`` random examples (uids
    ``x0000``, ...), ``keep`` to choose, all seeded by ``seed``: a :class:`TinyClip`
    learner in training mode (its token embedding in eval mode, as a locked tower would
    be, so that a strategy restoring only the top module's mode shows), and with
    ``reference`` a frozen :class:`TinyClip` seeded apart, in eval mode without gradients.
    ``generator_seed`` seeds the batch's generator."""
    data = torch.Generator().manual_seed(int(seed))
    images = torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=data)
    texts = torch.randint(0, VOCAB_SIZE, (size, CONTEXT_LENGTH), generator=data)
    learner = TinyClip(seed).train()
    learner.token_embedding.eval()
    frozen = None
    if reference:
        frozen = TinyClip(seed + REFERENCE_SEED_OFFSET).eval().requires_grad_(False)
    return SuperBatch(
        images=images,
        texts=texts,
        uids=[f"x{i:04d}" for i in range(size)],
        keep=keep,
        learner=learner,
        reference=frozen,
        generator=torch.Generator().manual_seed(int(generator_seed)),
    )


@dataclass(frozen=True)
class OnlineKitOptions:
    """The cases the checks run: the keeps (batch sizes; super-batches hold ``ratio x
    keep``), the generator seeds (the first is the base) and the data and models' seed.
    ``check_online_seed``, ``check_online_models_untouched`` and ``check_online_reference``
    use the largest keep."""

    keeps: tuple[int, ...] = (1, 3, 8)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    data_seed: int = 0


def _as_online(
    given: OnlineStrategy | type[OnlineStrategy] | str, params: Mapping[str, Any] | None = None
) -> OnlineStrategy:
    """An instance: ``given`` itself, a class with ``params`` (default: its defaults), or a
    registered online strategy named with its parameters (``"jest(ratio=2)"``)."""
    if isinstance(given, str):
        from selbench.run.plan import resolve_online

        resolved = resolve_online(given)
        given, params = resolved.info.cls, {**resolved.params.model_dump(), **(params or {})}
    if isinstance(given, type):
        name = getattr(given, "name", given.__name__)
        assert issubclass(given, OnlineStrategy), (
            f"{name} is not a selbench.online.OnlineStrategy subclass"
        )
        try:
            return given(dict(params or {}))
        except (PluginError, ConfigError) as exc:
            problem = f"cannot be built with {dict(params or {})}: {exc}"
            raise AssertionError(f"{name}: {problem}") from None
    assert isinstance(given, OnlineStrategy), f"{given!r} is not a selbench.online.OnlineStrategy"
    return type(given)({**given.params.model_dump(), **params}) if params else given


def _label(strategy: OnlineStrategy) -> str:
    """The case's name: the method's canonical label, ``jest(ratio=2)``."""
    cls = type(strategy)
    defaults = cls.Params().model_dump()
    return MethodSpec.from_params(cls.name, strategy.params.model_dump(), defaults).format()


def _with_ratio(strategy: OnlineStrategy, ratio: int) -> OnlineStrategy:
    if strategy.ratio == ratio:
        return strategy
    return type(strategy)({**strategy.params.model_dump(), "ratio": ratio})


def _batch(
    strategy: OnlineStrategy,
    keep: int,
    options: OnlineKitOptions,
    generator_seed: int,
    reference: bool = True,
) -> tuple[SuperBatch, str]:
    """The super-batch of ``ratio x keep`` examples a case runs on, and its description."""
    size = strategy.ratio * keep
    batch = make_super_batch(size, keep, options.data_seed, generator_seed, reference)
    case = f"{_label(strategy)}, super-batch of {size}, keep {keep}, seed {generator_seed}"
    return batch, case


def _choose(strategy: OnlineStrategy, batch: SuperBatch, case: str, checked: bool) -> list[int]:
    """The choice as a list: through the harness's :func:`choose_checked` (``checked``) or
    as ``choose`` returned it; any error becomes an AssertionError naming the case."""
    name = type(strategy).name
    try:
        if checked:
            return choose_checked(strategy, batch).tolist()
        found = strategy.choose(batch)
    except (PluginError, ConfigError) as exc:
        raise AssertionError(f"{name}: {case}: {exc}") from None
    except Exception as exc:
        problem = f"choose() raised {type(exc).__name__}: {exc}"
        raise AssertionError(f"{name}: {case}: {problem}") from exc
    values = found.detach().cpu().numpy() if isinstance(found, torch.Tensor) else found
    return np.asarray(values).reshape(-1).tolist()


def check_online_params(
    strategy: OnlineStrategy | type[OnlineStrategy] | str,
    options: OnlineKitOptions = OnlineKitOptions(),
) -> None:
    """The class is described; ``ratio`` is an int refusing 0; every parameter has a
    default and a description; the defaults survive strings, the method grammar and JSON."""
    from selbench.testing import _check_param_fields

    cls = strategy if isinstance(strategy, type) else type(_as_online(strategy))
    name = getattr(cls, "name", cls.__name__)
    for attribute in ("name", "summary", "reference"):
        value = getattr(cls, attribute, "")
        assert isinstance(value, str) and value.strip(), (
            f"{name}: `{attribute}` is empty; set it on the class (reference: the paper, with "
            "the equation or algorithm the defaults come from)"
        )
    fields = cls.Params.model_fields
    assert "ratio" in fields, f"{name}: Params has no `ratio`; subclass OnlineParams"
    assert fields["ratio"].annotation is int, (
        f"{name}: Params.ratio is {fields['ratio'].annotation}, not int"
    )
    _check_param_fields(cls, "online method")
    try:
        parse_online_params(cls, {"ratio": 0})
    except ConfigError:
        pass
    else:
        raise AssertionError(f"{name}: Params accepts ratio=0; declare it with ge=1")
    defaults = cls.Params().model_dump()
    written = MethodSpec(name, {k: str(v) for k, v in defaults.items() if v is not None})
    try:
        read = parse_online_params(cls, dict(MethodSpec.parse(written.format()).params))
    except ConfigError as exc:
        raise AssertionError(
            f"{name}: the defaults written as a method, {written.format()}, do not parse: {exc}"
        ) from None
    assert read.model_dump() == defaults, (
        f"{name}: the defaults do not survive the method grammar: {written.format()} -> "
        f"{read.model_dump()}, not {defaults}"
    )


@_single_threaded
def check_online_count(
    strategy: OnlineStrategy | str, options: OnlineKitOptions = OnlineKitOptions()
) -> None:
    """Exactly ``keep`` distinct indices in ``[0, N)`` (the harness's validation), for
    each keep, at the strategy's ratio and at ratio 1 (``N == keep``)."""
    strategy = _as_online(strategy)
    for each in dict.fromkeys((strategy, _with_ratio(strategy, 1))):
        for keep in options.keeps:
            batch, case = _batch(each, keep, options, options.seeds[0])
            _choose(each, batch, case, checked=True)


@_single_threaded
def check_online_deterministic(
    strategy: OnlineStrategy | str, options: OnlineKitOptions = OnlineKitOptions()
) -> None:
    """The same generator seed (same examples, same models) gives the same choice."""
    strategy = _as_online(strategy)
    for keep in options.keeps:
        first, case = _batch(strategy, keep, options, options.seeds[0])
        again, _ = _batch(strategy, keep, options, options.seeds[0])
        chosen = _choose(strategy, first, case, checked=False)
        assert chosen == _choose(strategy, again, case, checked=False), (
            f"{strategy.name}: the same seed gave different choices ({case})"
        )


@_single_threaded
def check_online_seed(
    strategy: OnlineStrategy | str, options: OnlineKitOptions = OnlineKitOptions()
) -> None:
    """Stochastic with these parameters (``is_stochastic()``): some seed changes the choice
    (as a set) of the largest keep; not stochastic: no seed does."""
    strategy = _as_online(strategy)
    keep, name = max(options.keeps), strategy.name
    choices = {}
    for seed in options.seeds:
        batch, case = _batch(strategy, keep, options, seed)
        choices[seed] = sorted(_choose(strategy, batch, case, checked=False))
    base = options.seeds[0]
    changed = [seed for seed, chosen in choices.items() if chosen != choices[base]]
    where = f"{_label(strategy)}, super-batch of {strategy.ratio * keep}, keep {keep}"
    if not strategy.is_stochastic():
        assert not changed, (
            f"{name}: not stochastic with these parameters (is_stochastic()), but seed "
            f"{changed[0]} chose differently from seed {base} ({where}); draw nothing from "
            "the generator, or declare stochastic = True"
        )
    elif len(options.seeds) > 1:
        assert changed, (
            f"{name}: declared stochastic, but seeds {list(options.seeds)} all chose the "
            f"same ({where}); draw from batch.generator, or declare stochastic = False"
        )


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": {k: m.training for k, m in model.named_modules()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
    }


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def _changes(model: nn.Module, before: dict[str, Any]) -> list[str]:
    """What differs in ``model`` from its snapshot ``before``, one line per kind."""
    now = _snapshot(model)
    old, new = before["tensors"], now["tensors"]
    found = {
        "replaced": sorted(set(old) ^ set(new)),
        "changed": [
            k
            for k in old
            if k in new and not (old[k].dtype == new[k].dtype and old[k].equal(new[k]))
        ],
        "not back in their mode": [
            f"{k or '<root>'} (was {'training' if was else 'eval'})"
            for k, was in before["training"].items()
            if now["training"].get(k, was) != was
        ],
        ".grad set on": [k for k, p in model.named_parameters() if p.grad is not None],
        "requires_grad changed": [
            k for k, flag in now["requires_grad"].items() if before["requires_grad"].get(k) != flag
        ],
    }
    return [f"{kind}: {', '.join(keys)}" for kind, keys in found.items() if keys]


@_single_threaded
def check_online_models_untouched(
    strategy: OnlineStrategy | str, options: OnlineKitOptions = OnlineKitOptions()
) -> None:
    """After ``choose``: the learner's and the reference's parameters and buffers are
    bit-identical, every module in the mode it was in, no parameter has a ``.grad`` and
    gradient mode is what it was. (Score through ``batch.learner_logits()`` and friends:
    they run the models in eval mode without gradients and restore each module's mode.)"""
    strategy = _as_online(strategy)
    batch, case = _batch(strategy, max(options.keeps), options, options.seeds[0])
    models = {"learner": batch.learner, "reference": batch.reference}
    before = {role: _snapshot(model) for role, model in models.items() if model is not None}
    grad_mode = torch.is_grad_enabled()
    try:
        _choose(strategy, batch, case, checked=False)
    finally:
        changed_mode = torch.is_grad_enabled() != grad_mode
        torch.set_grad_enabled(grad_mode)
    assert not changed_mode, f"{strategy.name}: choose() changed torch's gradient mode ({case})"
    for role, snapshot in before.items():
        problems = _changes(models[role], snapshot)
        assert not problems, (
            f"{strategy.name}: choose() changed the {role} model ({case}): {'; '.join(problems)}"
        )


@_single_threaded
def check_online_reference(
    strategy: OnlineStrategy | str, options: OnlineKitOptions = OnlineKitOptions()
) -> None:
    """``needs_reference`` tells the truth: without it, ``choose`` works with
    ``reference=None`` and never runs a reference model it is given; with it, ``choose``
    works on a super-batch with one."""
    strategy = _as_online(strategy)
    keep, name = max(options.keeps), strategy.name
    if strategy.needs_reference:
        batch, case = _batch(strategy, keep, options, options.seeds[0])
        _choose(strategy, batch, case + ", with a reference model", checked=False)
        return
    batch, case = _batch(strategy, keep, options, options.seeds[0], reference=False)
    try:
        _choose(strategy, batch, case, checked=False)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc} -- {name} does not declare needs_reference, so the harness gives it no "
            "reference model (reference=None); declare needs_reference = True if it scores "
            "with one"
        ) from None
    batch, case = _batch(strategy, keep, options, options.seeds[0])
    _choose(strategy, batch, case, checked=False)
    assert batch.reference is not None
    ran = batch.reference.calls + batch.forward_passes.get("reference", 0)
    assert not ran, (
        f"{name}: does not declare needs_reference, but ran the reference model it was given "
        f"({case}); declare needs_reference = True"
    )


ONLINE_CHECKS: tuple[Callable[..., None], ...] = (
    check_online_params,
    check_online_count,
    check_online_deterministic,
    check_online_seed,
    check_online_models_untouched,
    check_online_reference,
)


def parametrize_online_with_checks(
    strategies: Sequence[OnlineStrategy | type[OnlineStrategy] | str],
    expected_failures: Mapping[str, str] | None = None,
    options: OnlineKitOptions = OnlineKitOptions(),
) -> Any:
    """A ``pytest.mark.parametrize`` decorator: one test item per (strategy, check), ids
    like ``jest(ratio=2)-check_online_count``. ``strategies`` are instances, classes
    (default parameters) or registered names with parameters (``"jest(ratio=2)"``). A
    check named in the class's ``expected_check_failures`` (or in ``expected_failures``)
    is marked ``xfail(strict=True)``. The test calls ``check(strategy)``::

        @parametrize_online_with_checks([MyOnline(), MyOnline({"ratio": 2})])
        def test_conforms(strategy, check):
            check(strategy)
    """
    import pytest

    from selbench.testing import _bound_checks, _cases

    cases = []
    for given in strategies:
        strategy = _as_online(given)
        checks = _bound_checks(strategy, ONLINE_CHECKS, options, expected_failures)
        cases += _cases(strategy, _label(strategy), checks)
    return pytest.mark.parametrize("strategy, check", cases)


def check_online_strategy(
    strategy_or_cls: OnlineStrategy | type[OnlineStrategy] | str,
    params: Mapping[str, Any] | None = None,
    expected_failures: Mapping[str, str] | None = None,
    options: OnlineKitOptions = OnlineKitOptions(),
) -> None:
    """Run every online check in one call; each failure is an AssertionError naming the
    strategy and the case. A check the strategy expects to fail must fail."""
    from selbench.testing import _bound_checks, _run_checks

    strategy = _as_online(strategy_or_cls, params)
    checks = _bound_checks(strategy, ONLINE_CHECKS, options, expected_failures)
    _run_checks(strategy, _label(strategy), checks)


__all__ = [
    "ONLINE_CHECKS",
    "OnlineKitOptions",
    "TinyClip",
    "check_online_count",
    "check_online_deterministic",
    "check_online_models_untouched",
    "check_online_params",
    "check_online_reference",
    "check_online_seed",
    "check_online_strategy",
    "make_super_batch",
    "parametrize_online_with_checks",
]
