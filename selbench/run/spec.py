"""What a run is: the request, the method's spec and label, and the keys that name a run.

Everything that needs a run's identity imports this module, not the orchestrator: the CLI
and sweeps parse ``--method``/``--methods`` with :class:`MethodSpec`, runs log the label
it formats, the leaderboard reads that label back with the same :meth:`MethodSpec.parse`,
and the conformance kit names its cases with it. It is the one codec for
``NAME(KEY=VALUE,...)`` and for pipelines of them (:func:`parse_method`):

    expression := chain
    chain      := union ( ">>" union )*          B chooses among what A kept
    union      := both ( "|" both )*
    both       := term ( "&" term )*             "&" binds tighter than "|", "|" than ">>"
    term       := "(" expression ")" | fuse | NAME [ "(" KEY=VALUE, ... ")" ]
    fuse       := "fuse(" expression ( "," expression )* ( "," KEY=VALUE )* ")"

(``docs/pipelines.md`` says what each operator selects.)
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from selbench.errors import ConfigError
from selbench.tracking import DEFAULT_EXPERIMENT

# How a run executes, not what it measures: a resumed run may change these (train on
# another node, with more GPUs) without becoming a different benchmark cell.
EXECUTION_SETTINGS = ("device", "nproc_per_node", "launcher", "executor", "ray_address")


@dataclass
class RunRequest:
    """What the user asked for (``selbench run`` options)."""

    method: str
    budget: float
    seed: int = 0
    pool: str = "synthweb"
    scale: str = "tiny"
    protocol: str = "fixed-compute"
    params: dict[str, Any] = field(default_factory=dict)
    experiment: str = DEFAULT_EXPERIMENT
    device: str | None = None
    target: str | None = None  # target data for target-aware methods; default: the pool's
    engine: str | None = None  # training engine; default: the scale's
    nproc_per_node: int = 1  # training processes (open_clip engine, under torchrun)
    launcher: str = "torchrun"  # open_clip engine: torchrun on this node, or srun (SLURM)
    eval_suite: str | None = None  # configs/evals/NAME or a YAML; default: the pool's sets
    online: str | None = None  # an online strategy, NAME(K=V) (docs/online.md); None: offline
    online_reference: str | None = None  # its reference model's embedder spec; None: `reference`
    train_samples: float = 1.0  # x the protocol's samples seen (a sweep's training lengths)
    # remove the pool's near-duplicates of evaluation images first; None: the pool's default
    # (selbench.pools.decontaminates_by_default), resolved when the run is prepared
    decontaminate: bool | None = None
    strict: bool = False  # refuse a pool with a corrupt shard instead of leaving it out
    # where selection's row blocks run: local (this process) or ray (selbench.executors),
    # on the Ray cluster at ray_address (None: a Ray instance started for the run)
    executor: str = "local"
    ray_address: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRequest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class MethodSpecError(ConfigError):
    """A method expression that does not parse; the message points at the position."""

    def __init__(self, text: str, position: int, problem: str) -> None:
        self.text, self.position, self.problem = text, position, problem
        pointer = " " * (position + 2) + "^"
        super().__init__(f"method {text!r}: {problem} at position {position}\n  {text}\n{pointer}")


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/\-]*")
_KEY = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=")
_CLOSE = {"(": ")", "[": "]", "{": "}"}


@dataclass(frozen=True)
class MethodSpec:
    """A strategy and the parameters given to it, ``NAME(KEY=VALUE,...)``.

    Values stay strings, exactly as written: the strategy's ``Params`` parse them, as they
    parse ``selbench run -p KEY=VALUE``. :meth:`format` writes the canonical label (keys
    sorted, no spaces around separators), so two specs that differ only in spacing or order
    have one label.
    """

    name: str
    params: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        """``"tldr(refine=false, clusters=1)"`` -> ``MethodSpec("tldr", {"refine": "false",
        "clusters": "1"})``. A comma separates parameters only outside brackets and quotes
        and when a ``KEY=`` follows it; otherwise it belongs to the value (labels written by
        older versions hold such values). Errors name the position."""
        parser = _Parser(text)
        spec = parser.method()
        parser.end()
        return spec

    @classmethod
    def from_params(
        cls, name: str, params: Mapping[str, Any], defaults: Mapping[str, Any]
    ) -> MethodSpec:
        """The spec a run's label shows: ``name`` and the parameters that differ from the
        strategy's defaults, each value as ``str()`` writes it."""
        changed = {k: str(v) for k, v in params.items() if defaults.get(k) != v}
        return cls(name, changed)

    def format(self) -> str:
        """The canonical label, ``name`` or ``name(k=v,k2=v2)`` with keys sorted."""
        if not self.params:
            return self.name
        return (
            f"{self.name}(" + ",".join(f"{k}={self.params[k]}" for k in sorted(self.params)) + ")"
        )

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class Chain:
    """``A >> B >> ...``: each step chooses among what the step before it kept."""

    steps: tuple[Expression, ...]

    def format(self) -> str:
        return " >> ".join(_operand(step, self) for step in self.steps)

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class Combine:
    """``A & B & ...`` (``op="&"``) or ``A | B | ...`` (``op="|"``) of scoring steps."""

    op: str
    operands: tuple[Expression, ...]

    def format(self) -> str:
        return f" {self.op} ".join(_operand(term, self) for term in self.operands)

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class Fuse:
    """``fuse(A, B, ..., KEY=VALUE)``: one score from several scoring steps' scores."""

    operands: tuple[Expression, ...]
    options: Mapping[str, str] = field(default_factory=dict)

    def format(self) -> str:
        parts = [term.format() for term in self.operands]
        parts += [f"{k}={self.options[k]}" for k in sorted(self.options)]
        return "fuse(" + ", ".join(parts) + ")"

    def __str__(self) -> str:
        return self.format()


#: A method expression: one strategy, or a pipeline of them.
Expression = MethodSpec | Chain | Combine | Fuse
_PRECEDENCE = {Chain: 0, Combine: 1}  # "|" is 1, "&" 2 (below); terms bind tightest


def _level(node: Expression) -> int:
    if isinstance(node, Combine):
        return 2 if node.op == "&" else 1
    return _PRECEDENCE.get(type(node), 3)


def _operand(node: Expression, parent: Chain | Combine) -> str:
    """``node`` as written inside ``parent``: in parentheses where it binds no tighter."""
    text = node.format()
    return f"({text})" if _level(node) <= _level(parent) else text


def is_pipeline(node: Expression) -> bool:
    """Whether an expression is more than one strategy with its parameters."""
    return not isinstance(node, MethodSpec)


def parse_method(text: str) -> Expression:
    """One method expression: a :class:`MethodSpec`, or a pipeline (:class:`Chain`,
    :class:`Combine`, :class:`Fuse`). Errors point at the position in ``text``.

    ``parse_method(e).format()`` is the canonical spelling (spacing and parameter order
    normalised), and parsing it again gives an equal expression."""
    parser = _Parser(text)
    node = parser.expression()
    parser.end()
    return node


class _Parser:
    """A small recursive-descent reader over one method expression.

    Written by hand: the grammar is a few rules, and its errors must point at a position
    in the user's text, which no lighter tool here gives."""

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def fail(self, problem: str, position: int | None = None) -> MethodSpecError:
        return MethodSpecError(self.text, self.pos if position is None else position, problem)

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def end(self) -> None:
        self.skip_space()
        if self.pos != len(self.text):
            raise self.fail(f"unexpected {self.text[self.pos]!r}")

    def peek(self, token: str) -> bool:
        self.skip_space()
        return self.text.startswith(token, self.pos)

    def expression(self) -> Expression:
        steps = [self.union()]
        while self.peek(">>"):
            self.pos += 2
            steps.append(self.union())
        if len(steps) == 1:
            return steps[0]
        # A chain is associative: a parenthesised chain inside a chain is the same steps.
        flat = [s for step in steps for s in (step.steps if isinstance(step, Chain) else [step])]
        return Chain(tuple(flat))

    def union(self) -> Expression:
        return self._combined("|", self.both)

    def both(self) -> Expression:
        return self._combined("&", self.term)

    def _combined(self, op: str, operand: Callable[[], Expression]) -> Expression:
        terms = [operand()]
        while self.peek(op) and not self.peek(op * 2):
            self.pos += 1
            terms.append(operand())
        return terms[0] if len(terms) == 1 else Combine(op, tuple(terms))

    def term(self) -> Expression:
        if self.peek("("):
            opened = self.pos
            self.pos += 1
            node = self.expression()
            if not self.peek(")"):
                raise self.fail(
                    "expected ')'" if self.pos < len(self.text) else "unclosed '('",
                    None if self.pos < len(self.text) else opened,
                )
            self.pos += 1
            return node
        if re.match(r"fuse\s*\(", self.text[self.pos :]):
            return self.fuse()
        return self.method()

    def fuse(self) -> Fuse:
        opened = self.text.index("(", self.pos)
        self.pos = opened + 1
        operands: list[Expression] = []
        options: dict[str, str] = {}
        while True:
            self.skip_space()
            key = _KEY.match(self.text, self.pos)
            if key is not None:
                if key.group(1) in options:
                    raise self.fail(f"option {key.group(1)!r} given twice")
                self.pos = key.end()
                options[key.group(1)] = self.value(opened)
            elif options:
                raise self.fail("expected KEY=VALUE: fuse's steps come before its options")
            else:
                operands.append(self.expression())
            self.skip_space()
            if self.pos >= len(self.text):
                raise self.fail("unclosed '('", opened)
            if self.text[self.pos] == ")":
                self.pos += 1
                break
            if self.text[self.pos] != ",":
                raise self.fail("expected ',' or ')'")
            self.pos += 1
        if len(operands) < 2:
            raise self.fail("fuse(...) needs at least two steps", opened)
        return Fuse(tuple(operands), options)

    def method(self) -> MethodSpec:
        self.skip_space()
        match = _NAME.match(self.text, self.pos)
        if match is None:
            raise self.fail("expected a method name")
        self.pos = match.end()
        name = match.group()
        self.skip_space()
        if self.pos >= len(self.text) or self.text[self.pos] != "(":
            return MethodSpec(name)
        opened = self.pos
        self.pos += 1
        params: dict[str, str] = {}
        self.skip_space()
        if self.pos < len(self.text) and self.text[self.pos] == ")":
            self.pos += 1
            return MethodSpec(name, params)
        while True:
            key = _KEY.match(self.text, self.pos)
            if key is None:
                raise self.fail("expected KEY=VALUE")
            if key.group(1) in params:
                raise self.fail(f"parameter {key.group(1)!r} given twice")
            self.pos = key.end()
            params[key.group(1)] = self.value(opened)
            if self.text[self.pos] == ")":
                self.pos += 1
                return MethodSpec(name, params)
            self.pos += 1  # the comma before the next KEY=

    def value(self, opened: int) -> str:
        """Characters up to the ``)`` that closes the parameters, or a ``,`` before the next
        ``KEY=``; brackets and quotes inside a value nest."""
        start, stack, quote = self.pos, [], None
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if quote:
                quote = None if char == quote else quote
            elif char in "'\"":
                quote = char
            elif char in _CLOSE:
                stack.append(_CLOSE[char])
            elif stack and char == stack[-1]:
                stack.pop()
            elif not stack and char == ")":
                return self.text[start : self.pos].strip()
            elif not stack and char == "," and _KEY.match(self.text, self.pos + 1):
                return self.text[start : self.pos].strip()
            self.pos += 1
        raise self.fail("unclosed '('", opened)


def split_methods(value: str) -> list[str]:
    """``"random,tldr(refine=false,clusters=1)"`` -> ``["random", "tldr(refine=false,
    clusters=1)"]``: a list of method expressions; commas inside brackets belong to them."""
    items, opened, start = [], [], 0
    for position, char in enumerate(value):
        if char in "([{":
            opened.append(position)
        elif char in ")]}":
            if not opened:
                raise MethodSpecError(value, position, "unbalanced ')'")
            opened.pop()
        elif char == "," and not opened:
            items.append(value[start:position].strip())
            start = position + 1
    if opened:
        raise MethodSpecError(value, opened[-1], "unclosed '('")
    items.append(value[start:].strip())
    return [item for item in items if item]


#: The prefix of an online step, the last of a chain: ``clip_score >> online:jest``.
ONLINE_PREFIX = "online:"


def _specs(node: Expression) -> Iterator[MethodSpec]:
    if isinstance(node, MethodSpec):
        yield node
    elif isinstance(node, Chain):
        for step in node.steps:
            yield from _specs(step)
    else:
        for operand in node.operands:
            yield from _specs(operand)


def split_online(text: str) -> tuple[str, str | None]:
    """``"clip_score >> online:jest(ratio=2)"`` -> ``("clip_score", "jest(ratio=2)")``: the
    offline expression and the online step, which must be the last step of a chain with an
    offline selection before it; a method without one -> ``(text, None)``."""
    node = parse_method(text)
    online = [spec for spec in _specs(node) if spec.name.startswith(ONLINE_PREFIX)]
    if not online:
        return text, None
    last = node.steps[-1] if isinstance(node, Chain) else None
    if len(online) > 1 or last is not online[0] or not isinstance(node, Chain):
        where = "alone" if isinstance(node, MethodSpec) else "there"
        raise ConfigError(
            f"method {text!r}: an online step ({online[0].format()}) chooses each training "
            f"batch, so it can only be the last step of a chain, after the offline selection "
            f"it draws from (e.g. `random >> {online[0].format()}` with --budget 1 for the "
            f"whole pool); it cannot stand {where}"
        )
    rest = node.steps[:-1]
    offline = rest[0] if len(rest) == 1 else Chain(rest)
    step = online[0]
    return offline.format(), MethodSpec(step.name.removeprefix(ONLINE_PREFIX), step.params).format()


_TRAIN_MARK = re.compile(r"^(?P<base>.*) \[train (?P<times>[0-9.eE+-]+)x\]$")


def parse_train_samples(text: str | float) -> float:
    """A training length as a multiple of the protocol's samples seen: ``"2x"``, ``"0.5x"``,
    ``"1"`` or a number; ConfigError unless it is a finite number > 0."""
    value = str(text).strip()
    try:
        times = float(value.removesuffix("x").removesuffix("X"))
    except ValueError:
        times = float("nan")
    if not (times > 0 and times != float("inf")):
        raise ConfigError(
            f"training length {text!r} is not a positive multiple of the protocol's samples "
            "seen; write e.g. 0.5x, 1x or 2x"
        )
    return times


def train_label(label: str, train_samples: float) -> str:
    """A run's label with its training length: ``label`` at 1x, ``label [train 2x]`` else."""
    if float(train_samples) == 1.0:
        return label
    return f"{label} [train {float(train_samples):g}x]"


def split_train_label(label: str) -> tuple[str, float]:
    """:func:`train_label` undone: ``"random [train 2x]"`` -> ``("random", 2.0)``."""
    found = _TRAIN_MARK.match(label)
    if found is None:
        return label, 1.0
    return found.group("base"), float(found.group("times"))


def online_label(offline: str, online: str | None) -> str:
    """The label of an offline selection followed by an online step (None: offline only)."""
    if online is None:
        return offline
    return f"{offline} >> {ONLINE_PREFIX}{online}"  # ">>" binds loosest: no parentheses


class _Dumpable(Protocol):
    def model_dump(self, *, mode: str = ...) -> dict[str, Any]: ...


def cell_key(request: RunRequest, params: _Dumpable, online_params: _Dumpable | None = None) -> str:
    """sha256 of the resolved configuration of a run: method, every parameter (defaults
    filled in), budget, seed, pool, scale, protocol, target, and where set the online
    strategy (every parameter of it), the training length and pool-eval decontamination.
    Runs with the same key are the same benchmark cell; ``selbench sweep`` skips a cell
    that already has one."""
    resolved: dict[str, Any] = {
        "method": request.method,
        "params": params.model_dump(mode="json"),
        "budget": float(request.budget),
        "seed": int(request.seed),
        "pool": request.pool,
        "scale": request.scale,
        "protocol": request.protocol,
        "target": request.target,
    }
    if request.engine is not None:  # only when overridden, so older cells keep their key
        resolved["engine"] = request.engine
    if request.eval_suite is not None:
        resolved["eval"] = request.eval_suite
    # Only when set, so that every earlier cell keeps its key.
    if request.online is not None:
        resolved["online"] = request.online
        resolved["online_params"] = online_params.model_dump(mode="json") if online_params else {}
        resolved["online_reference"] = request.online_reference
    if float(request.train_samples) != 1.0:
        resolved["train_samples"] = float(request.train_samples)
    if request.decontaminate:  # only when on, so that every earlier cell keeps its key
        resolved["decontaminate"] = True
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:24]


def selection_hash(uids: Sequence[str]) -> str:
    """sha256 of the sorted selected uids: equal for equal subsets, whatever their order.

    Uids that are an Arrow gather (a selection of pool positions, ``to_arrow()``) or an
    Arrow column (``.arrow``) are sorted and joined by Arrow, a block at a time, with no
    Python string per uid: the same digest, as Arrow sorts strings by their UTF-8 bytes
    and that order is Python's order of code points."""
    to_arrow = getattr(uids, "to_arrow", None)
    arrow = to_arrow() if callable(to_arrow) else getattr(uids, "arrow", None)
    if arrow is None:
        return hashlib.sha256("\n".join(sorted(uids)).encode()).hexdigest()
    import pyarrow as pa

    digest = _sorted_digest(arrow)
    pa.default_memory_pool().release_unused()  # mimalloc would keep the blocks' pages
    return digest


# uids sorted and joined at a time by selection_hash's Arrow path.
HASH_BLOCK = 1 << 18


def _sorted_digest(arrow: Any) -> str:
    """:func:`selection_hash` of Arrow strings: a block of the sorted order at a time,
    gathered chunk by chunk (``take_rows``): no sorted copy of every uid, no copy of a
    chunked column, no Python string of a block."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from selbench.columns import take_rows

    order = pc.sort_indices(arrow)
    digest, block = hashlib.sha256(), HASH_BLOCK
    for first in range(0, len(order), block):
        part = take_rows(arrow, order.slice(first, block).to_numpy())
        if isinstance(part, pa.ChunkedArray):
            part = part.combine_chunks()
        lists = pa.ListArray.from_arrays([0, len(part)], part)
        joined = pc.binary_join(lists, pa.scalar("\n", part.type))
        digest.update(b"\n" if first else b"")
        digest.update(joined[0].as_buffer())
    return digest.hexdigest()


def usage_key(spec: str) -> str:
    """The MLflow key of an embedder spec, one per spec: ``proxy`` -> ``proxy``,
    ``proxy:scorer`` -> ``proxy_scorer``; a spec with a path or other characters MLflow
    keys cannot hold -> its name and a hash of the whole spec (``open_clip_1a2b3c4d``)."""
    name, _, args = spec.partition(":")
    if not args:
        return name
    if re.fullmatch(r"[A-Za-z0-9_-]{1,40}", args):
        return f"{name}_{args}"
    return f"{name}_{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def default_device() -> str:
    import torch  # imported here: identity needs no torch until a device is asked for

    return "cuda" if torch.cuda.is_available() else "cpu"


def set_seeds(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
