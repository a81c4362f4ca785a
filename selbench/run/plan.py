"""A method expression resolved against the registry: one strategy, or a pipeline plan.

:func:`resolve_method` is what ``selbench run``, ``selbench sweep`` and the conformance kit
call with the text of ``--method``. A single strategy resolves as it always has (its name,
its parameters with defaults filled in, the label of the parameters that differ from
them). A pipeline (``docs/pipelines.md``) resolves into a tree of :class:`Step` and
:class:`Node`: every strategy looked up and its parameters validated, recipes expanded,
``keep=`` checked, operators checked against what their operands can do, all before any
work. Its canonical label is the expression with each step's default parameters left out,
so a sweep finds a pipeline's earlier runs however it was spelt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from selbench.configs import config_dir
from selbench.errors import ConfigError
from selbench.registry import StrategyInfo, get_registry
from selbench.run.spec import (
    Chain,
    Combine,
    Expression,
    Fuse,
    MethodSpec,
    is_pipeline,
    parse_method,
)
from selbench.strategy import Strategy, parse_params

#: ``--method recipe:NAME`` names ``configs/recipes/NAME.yaml``.
RECIPE_PREFIX = "recipe:"
#: The options of ``fuse(...)`` and their defaults.
FUSE_HOW = ("rank", "zscore", "fit")


@dataclass(frozen=True)
class Step:
    """One strategy in a pipeline, with its validated parameters and ``keep=``."""

    info: StrategyInfo
    params: BaseModel
    keep: float | None

    @property
    def name(self) -> str:
        return self.info.name

    def spec(self) -> MethodSpec:
        defaults = self.info.cls.Params().model_dump()
        spec = MethodSpec.from_params(self.name, self.params.model_dump(), defaults)
        if self.keep is None:
            return spec
        return MethodSpec(spec.name, {**spec.params, "keep": f"{self.keep:g}"})

    def strategy(self) -> Strategy:
        return self.info.cls(self.params)


@dataclass(frozen=True)
class Node:
    """An operator over steps: ``>>`` (``op="chain"``), ``&``, ``|`` or ``fuse``."""

    op: str
    children: tuple[Step | Node, ...]
    how: str = "rank"  # fuse only
    weights: tuple[float, ...] | None = None  # fuse only
    keep: float | None = None  # fuse only

    def expression(self) -> Expression:
        parts = tuple(_expression(child) for child in self.children)
        if self.op == "chain":
            return Chain(parts)
        if self.op in ("&", "|"):
            return Combine(self.op, parts)
        options: dict[str, str] = {}
        if self.how != "rank":
            options["how"] = self.how
        if self.weights is not None:
            options["weights"] = "[" + ",".join(f"{w:g}" for w in self.weights) + "]"
        if self.keep is not None:
            options["keep"] = f"{self.keep:g}"
        return Fuse(parts, options)


def _expression(item: Step | Node) -> Expression:
    return item.spec() if isinstance(item, Step) else item.expression()


def steps_of(item: Step | Node, path: str = "") -> Iterator[tuple[str, Step]]:
    """Every strategy of a plan with its path (``1``, ``2.1``, ...), in expression order."""
    if isinstance(item, Step):
        yield path or "1", item
        return
    for number, child in enumerate(item.children, 1):
        yield from steps_of(child, f"{path}.{number}" if path else str(number))


class PipelineParams(BaseModel):
    """A pipeline's identity: its canonical expression and every step's full parameters."""

    model_config = ConfigDict(extra="forbid")

    expression: str = Field(default="", description="the canonical pipeline expression")
    steps: dict[str, Any] = Field(
        default_factory=dict,
        description="per step path: the strategy's name, keep= and every parameter",
    )


@dataclass(frozen=True)
class ResolvedMethod:
    """``--method`` resolved: what a run records and what it executes."""

    info: StrategyInfo
    params: BaseModel
    label: str  # the canonical label the run logs and leaderboards show
    method: str  # RunRequest.method: the strategy's name, or the pipeline's label
    given: dict[str, Any] = field(default_factory=dict)  # RunRequest.params
    needs: frozenset[str] = frozenset()
    plan: Step | Node | None = None  # pipelines only


def resolve_method(text: str, params: Mapping[str, Any] | None = None) -> ResolvedMethod:
    """Resolve ``--method`` (and ``-p KEY=VALUE``) before any work; errors name the step
    or the position at fault."""
    node = expand_recipes(parse_method(text))
    params = dict(params or {})
    if not is_pipeline(node):
        assert isinstance(node, MethodSpec)
        return _single(node, params)
    if params:
        raise ConfigError(
            f"-p/--param sets one strategy's parameters ({', '.join(sorted(params))}); "
            f"inside a pipeline write them in the expression, e.g. clip_score(embedder=proxy)"
        )
    plan = build_plan(node)
    label = _expression(plan).format()
    identity = {
        path: {"name": step.name, "keep": step.keep, **step.params.model_dump(mode="json")}
        for path, step in steps_of(plan)
    }
    needs = frozenset(n for _, step in steps_of(plan) for n in step.info.cls.needs)
    from selbench.run.pipeline import PIPELINE_INFO  # the executor; it imports this module

    return ResolvedMethod(
        info=PIPELINE_INFO,
        params=PipelineParams(expression=label, steps=identity),
        label=label,
        method=label,
        needs=needs,
        plan=plan,
    )


def _single(spec: MethodSpec, params: dict[str, Any]) -> ResolvedMethod:
    twice = sorted(set(spec.params) & set(params))
    if twice:
        raise ConfigError(
            f"method {spec.format()!r}: {', '.join(twice)} given both in the expression and "
            "with -p/--param; give each parameter once"
        )
    info = get_registry().get(spec.name)  # unknown names fail here, naming the method
    given = {**spec.params, **params}
    model = parse_params(info.cls, given)
    defaults = info.cls.Params().model_dump()
    label = MethodSpec.from_params(info.name, model.model_dump(), defaults).format()
    return ResolvedMethod(info, model, label, info.name, given, frozenset(info.cls.needs))


# -- recipes ------------------------------------------------------------------------------
def recipe_dir() -> Any:
    return config_dir() / "recipes"


def recipe_names() -> list[str]:
    folder = recipe_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_recipe(name: str) -> dict[str, Any]:
    """``configs/recipes/NAME.yaml``: its ``pipeline`` and the paper it comes from."""
    path = recipe_dir() / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(recipe_names()) or "none"
        raise ConfigError(f"unknown recipe {name!r} (no {path}); known recipes: {known}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("pipeline"), str):
        raise ConfigError(f"recipe {path} has no `pipeline:` expression")
    return data


def expand_recipes(node: Expression, seen: tuple[str, ...] = ()) -> Expression:
    """``recipe:NAME`` anywhere in an expression, replaced by the recipe's pipeline."""
    if isinstance(node, MethodSpec):
        if not node.name.startswith(RECIPE_PREFIX):
            return node
        name = node.name[len(RECIPE_PREFIX) :]
        if node.params:
            raise ConfigError(f"recipe {name!r} takes no parameters; write its pipeline out")
        if name in seen:
            raise ConfigError(f"recipe {name!r} includes itself: {' -> '.join((*seen, name))}")
        expanded = parse_method(load_recipe(name)["pipeline"])
        return expand_recipes(expanded, (*seen, name))
    if isinstance(node, Chain):
        return Chain(tuple(expand_recipes(s, seen) for s in node.steps))
    if isinstance(node, Combine):
        return Combine(node.op, tuple(expand_recipes(s, seen) for s in node.operands))
    return Fuse(tuple(expand_recipes(s, seen) for s in node.operands), node.options)


# -- building a plan ------------------------------------------------------------------------
def _fraction(value: str, where: str) -> float:
    try:
        keep = float(value)
    except ValueError:
        raise ConfigError(f"{where}: keep={value!r} is not a number") from None
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"{where}: keep={value} must be a fraction in (0, 1]")
    return keep


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _step(spec: MethodSpec) -> Step:
    """A strategy of a pipeline. ``keep=NUMBER`` is the step's fraction; any other
    ``keep=`` value is the strategy's own parameter (semdedup's ``keep=closest``,
    prototypes' ``keep=easy``), which no numeric fraction can be mistaken for."""
    params = dict(spec.params)
    keep = None
    if "keep" in params and _is_number(params["keep"]):
        keep = _fraction(params.pop("keep"), f"step {spec.format()!r}")
    info = get_registry().get(spec.name)
    return Step(info, parse_params(info.cls, params), keep)


def build_plan(node: Expression, role: str = "top") -> Step | Node:
    """Resolve an expression into steps and operators, checking what each may do where it
    stands: ``role`` is ``top`` (the whole pipeline), ``operand`` (inside ``&``, ``|`` or
    ``fuse``: must score every sample) or ``step`` (a step of the top chain)."""
    if isinstance(node, MethodSpec):
        step = _step(node)
        if role == "operand" and not step.info.cls.is_scorer():
            raise ConfigError(
                f"{step.name!r} does not score every sample (it only chooses a subset), so "
                "it cannot be combined by &, | or fuse(...); use it as a step of a chain "
                f"(... >> {step.name}) instead"
            )
        return step
    if isinstance(node, Chain):
        if role == "operand":
            raise ConfigError(
                f"{node.format()!r} is a chain, which gives no score per sample; &, | and "
                "fuse(...) take strategies that score (or &, |, fuse of them)"
            )
        steps = tuple(build_plan(s, "step") for s in node.steps)
        for before in steps[:-1]:
            _check_keeps_something(before)
        if steps[-1].keep is not None:
            raise ConfigError(
                f"the last step {_expression(steps[-1]).format()!r} has keep=; the last "
                "step keeps the run's budget (--budget), drop keep= there"
            )
        return Node("chain", steps)
    if isinstance(node, Combine):
        return Node(node.op, tuple(build_plan(s, "operand") for s in node.operands))
    return _fuse(node)


def _has_own_count(item: Step | Node) -> bool:
    """Whether ``item`` keeps a definite set without being told a count: ``keep=``, a
    strategy's own rule, or ``&``/``|`` of such operands."""
    if item.keep is not None:
        return True
    if isinstance(item, Step):
        return item.info.cls.has_rule()
    return item.op in ("&", "|") and all(_has_own_count(c) for c in item.children)


def _check_keeps_something(step: Step | Node) -> None:
    """A step that is not last must say what it keeps (the last keeps the budget)."""
    if not _has_own_count(step):
        raise ConfigError(
            f"step {_expression(step).format()!r} is not the last, so it needs keep=FRACTION "
            "(the fraction of its input it keeps; for & and |, on each operand), e.g. "
            "semdedup(keep=0.8) >> clip_score"
        )


def _fuse(node: Fuse) -> Node:
    options = dict(node.options)
    unknown = sorted(set(options) - {"how", "weights", "keep"})
    if unknown:
        raise ConfigError(
            f"{node.format()!r}: unknown option(s) {', '.join(unknown)}; fuse takes how, "
            "weights and keep"
        )
    how = options.get("how", "rank")
    if how not in FUSE_HOW:
        raise ConfigError(f"{node.format()!r}: how={how!r}; choose one of {', '.join(FUSE_HOW)}")
    children = tuple(build_plan(s, "operand") for s in node.operands)
    weights = None
    if "weights" in options:
        if how == "fit":
            raise ConfigError(f"{node.format()!r}: how=fit learns the weights; drop weights=")
        weights = _weights(options["weights"], len(children), node.format())
    keep = _fraction(options["keep"], f"{node.format()!r}") if "keep" in options else None
    return Node("fuse", children, how=how, weights=weights, keep=keep)


def _weights(text: str, count: int, where: str) -> tuple[float, ...]:
    try:
        values = yaml.safe_load(text)
        weights = tuple(float(w) for w in values)
    except (yaml.YAMLError, TypeError, ValueError):
        raise ConfigError(f"{where}: weights={text!r}; write a list such as [2,1]") from None
    if len(weights) != count:
        raise ConfigError(f"{where}: {len(weights)} weights for {count} steps")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"{where}: weights must be non-negative with a positive sum")
    return weights


def derive_seed(seed: int, path: str) -> int:
    """The seed of the step at ``path`` in a run seeded ``seed``: a hash of both, so steps
    draw independently and the same run draws the same."""
    digest = hashlib.sha256(f"selbench-step:{seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2**31


# -- online strategies -------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedOnline:
    """``--online NAME(K=V)`` resolved: the registered online strategy, its validated
    parameters and its canonical spec (parameters that differ from the defaults)."""

    info: StrategyInfo
    params: BaseModel
    label: str  # e.g. "jest(ratio=2)": RunRequest.online and the label's online step

    def strategy(self) -> Any:
        return self.info.cls(self.params)


def resolve_online(text: str) -> ResolvedOnline:
    """One online strategy with its parameters (``jest``, ``jest(ratio=2)``; a leading
    ``online:`` is accepted); unknown names and invalid values fail here, before any work."""
    from selbench.online.contract import parse_online_params
    from selbench.run.spec import ONLINE_PREFIX

    node = parse_method(text.strip())
    if not isinstance(node, MethodSpec):
        raise ConfigError(
            f"--online {text!r}: one online strategy with its parameters, e.g. jest(ratio=2); "
            "pipelines are offline (put them in --method)"
        )
    name = node.name.removeprefix(ONLINE_PREFIX)
    info = get_registry().get_online(name)
    params = parse_online_params(info.cls, dict(node.params))
    defaults = info.cls.Params().model_dump()
    label = MethodSpec.from_params(name, params.model_dump(), defaults).format()
    return ResolvedOnline(info, params, label)
