"""``selbench methods``: what is installed, one line each; ``selbench methods NAME``: one
method's parameters and paper; ``--json`` for scripts; and the shell completion of method
names (``selbench methods NAME``, ``run --method``, ``run --online``, ``sweep
--methods``).

Listing the methods loads every plugin (the registry), so this module imports it inside
its functions: completing a name loads it too, starting ``selbench`` does not.
"""

from __future__ import annotations

import difflib
import inspect
import json
import shutil
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any

import click
from click.shell_completion import CompletionItem
from rich.markup import escape

from selbench.cli.common import err_console, friendly_errors, main

#: The ``--json`` format's version; bumped when a key changes meaning or goes away.
JSON_VERSION = 1

#: Each kind of entry, in listing order, with its section heading.
SECTIONS: dict[str, str] = {
    "strategy": "Offline strategies (run --method NAME; scorers combine in pipelines)",
    "online": "Online strategies (run --online NAME)",
    "embedder": "Embedders (--embedder SPEC, -p embedder=SPEC)",
    "recipe": "Recipes (run --method recipe:NAME; docs/pipelines.md)",
    "broken": "Broken plugins (not loaded; a run asking for them fails)",
}
RECIPE_PREFIX = "recipe:"
ELLIPSIS = "…"

#: pydantic (annotated_types) constraint attributes and how a parameter's type shows them.
_BOUNDS = (
    ("ge", ">="),
    ("gt", ">"),
    ("le", "<="),
    ("lt", "<"),
    ("min_length", "min length"),
    ("max_length", "max length"),
)


@dataclass(frozen=True)
class Entry:
    """One line of ``selbench methods``: a strategy, online strategy, embedder, recipe or
    broken plugin."""

    name: str  # as typed: `clip_score`, `jest`, `proxy`, `recipe:d4`, a broken entry point
    kind: str  # a key of SECTIONS
    traits: tuple[str, ...]  # strategy: scorer|chooser (+ rule); online: needs_reference
    summary: str
    package: str
    version: str
    source: Any  # the class, the recipe's YAML mapping, or the BrokenPlugin


def summary_of(cls: type) -> str:
    """The class's ``summary``, else the first sentence of its own docstring."""
    summary = str(getattr(cls, "summary", "") or "").strip()
    if summary:
        return " ".join(summary.split())
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    paragraph = " ".join(doc.split("\n\n", 1)[0].split())
    sentence, dot, _ = paragraph.partition(". ")
    return sentence + ("." if dot else "")


def collect_entries() -> list[Entry]:
    """Every installed method, by kind (SECTIONS' order) and name."""
    from selbench.registry import get_registry
    from selbench.run.plan import load_recipe, recipe_names

    registry = get_registry()
    entries: list[Entry] = []
    traits: tuple[str, ...]
    for info in registry.infos():
        traits = ("scorer",) if info.cls.is_scorer() else ("chooser",)
        traits += ("rule",) if info.cls.has_rule() else ()
        entries.append(_entry(info, "strategy", traits))
    for online in registry.online_infos():
        traits = ("needs_reference",) if online.cls.needs_reference else ()
        entries.append(_entry(online, "online", traits))
    for embedder in registry.embedder_infos():
        entries.append(_entry(embedder, "embedder", ()))
    for name in recipe_names():
        recipe = load_recipe(name)
        pipeline = str(recipe["pipeline"])
        entries.append(Entry(RECIPE_PREFIX + name, "recipe", (), pipeline, "selbench", "", recipe))
    for broken in registry.broken:
        summary = f"{broken.package} {broken.version}".strip() + f": {broken.error}"
        entries.append(
            Entry(broken.entry_point, "broken", (), summary, broken.package, broken.version, broken)
        )
    return entries


def _entry(info: Any, kind: str, traits: tuple[str, ...]) -> Entry:
    return Entry(
        info.name, kind, traits, summary_of(info.cls), info.package, info.version, info.cls
    )


def fit(line: str, width: int) -> str:
    """``line`` cut to ``width`` characters, an ellipsis marking the cut."""
    return line if len(line) <= width else line[: max(width - 1, 0)] + ELLIPSIS


def terminal_width() -> int:
    """The terminal's columns ($COLUMNS first; 80 when not a terminal), at least 40."""
    return max(shutil.get_terminal_size((80, 24)).columns, 40)


def _trait_text(entry: Entry) -> str:
    if entry.kind == "online":
        return "needs ref" if entry.traits else ""
    return "+".join(entry.traits)


def _summary_text(entry: Entry) -> str:
    if entry.kind in ("strategy", "online", "embedder") and entry.package != "selbench":
        return f"({entry.package}) {entry.summary}"  # a third-party plugin says whose
    return entry.summary


def list_lines(entries: list[Entry], width: int) -> list[str]:
    """The listing: a heading per kind, then one line per entry (``name  traits
    summary``, columns aligned within the kind), none longer than ``width``."""
    lines: list[str] = []
    for kind, heading in SECTIONS.items():
        section = [e for e in entries if e.kind == kind]
        if not section:
            continue
        name_width = max(len(e.name) for e in section)
        trait_width = max(len(_trait_text(e)) for e in section)
        lines.append(fit(heading, width))
        for entry in section:
            columns = [entry.name.ljust(name_width)]
            if trait_width:
                columns.append(_trait_text(entry).ljust(trait_width))
            columns.append(_summary_text(entry))
            lines.append(fit("  " + "  ".join(columns), width).rstrip())
    lines.append(fit("`selbench methods NAME`: a method's parameters and paper.", width))
    return lines


def _annotation_text(annotation: Any) -> str:
    """A parameter's type as a reader writes it: ``int``, ``'a' | 'b'``, ``int | None``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_annotation_text(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and origin is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def type_text(field: Any) -> str:
    """The field's type and its bounds: ``int, >= 1``."""
    bounds = [
        f"{text} {getattr(constraint, attr)}"
        for constraint in field.metadata
        for attr, text in _BOUNDS
        if getattr(constraint, attr, None) is not None
    ]
    return ", ".join([_annotation_text(field.annotation), *bounds])


def _json_value(value: Any) -> Any:
    from pydantic_core import to_jsonable_python

    try:
        return to_jsonable_python(value)
    except Exception:  # a default pydantic cannot serialise: its repr
        return repr(value)


def parameters(params: Any) -> list[dict[str, Any]]:
    """Each field of a pydantic Params model: name, type, default, description, required."""
    from pydantic_core import PydanticUndefined

    rows = []
    for name, field in getattr(params, "model_fields", {}).items():
        required = field.is_required()
        try:
            default = field.get_default(call_default_factory=True)
        except Exception:  # a factory that wants the other fields' values
            default = None
        default = None if default is PydanticUndefined else default
        rows.append(
            {
                "name": name,
                "type": type_text(field),
                "default": None if required else _json_value(default),
                "default_repr": "(required)" if required else repr(default),
                "description": field.description or "",
                "required": required,
            }
        )
    return rows


def describe(entry: Entry) -> dict[str, Any]:
    """What ``selbench methods NAME --json`` prints (keys in docs/cli.md)."""
    source = entry.source
    record: dict[str, Any] = {
        "name": entry.name,
        "kind": entry.kind,
        "traits": list(entry.traits),
        "summary": entry.summary,
        "package": entry.package,
        "version": entry.version,
        "reference": "",
        "params": [],
    }
    if entry.kind in ("strategy", "online", "embedder"):
        record["reference"] = str(getattr(source, "reference", "") or "")
        record["params"] = [
            {k: v for k, v in p.items() if k != "default_repr"}
            for p in parameters(getattr(source, "Params", None))
        ]
    if entry.kind == "strategy":
        record["needs"] = sorted(source.needs)
        record["stochastic"] = bool(source.stochastic)
    elif entry.kind == "online":
        record["needs_reference"] = bool(source.needs_reference)
    elif entry.kind == "recipe":
        record["pipeline"] = entry.summary
        record["reference"] = str(source.get("paper", ""))
    elif entry.kind == "broken":
        record["module"] = source.module
        record["error"] = source.error
    return record


def _wrapped(label: str, text: str, width: int) -> list[str]:
    return textwrap.wrap(
        f"{label}{text}", width, subsequent_indent="  ", break_on_hyphens=False
    ) or [label.rstrip()]


def detail_lines(entry: Entry, width: int, others: list[Entry]) -> list[str]:
    """``selbench methods NAME``: the summary, paper, parameters and defaults."""
    record = describe(entry)
    kind = {"strategy": "offline strategy", "online": "online strategy"}.get(entry.kind, entry.kind)
    traits = f" ({_trait_text(entry)})" if _trait_text(entry) else ""
    where = f"{entry.package} {entry.version}".strip()
    lines = _wrapped("", f"{entry.name}: {kind}{traits}, from {where}", width)
    lines += _wrapped("", entry.summary, width) if entry.kind != "recipe" else []
    if entry.kind == "recipe":
        lines += _wrapped("pipeline: ", record["pipeline"], width)
    if entry.kind == "broken":
        lines += _wrapped("module: ", record["module"], width)
        lines += _wrapped("error: ", record["error"], width)
    if record["reference"]:
        lines += _wrapped("reference: ", record["reference"], width)
    if entry.kind == "strategy":
        lines += _wrapped("needs: ", ", ".join(record["needs"]) or "the pool only", width)
        lines.append(
            f"stochastic: {'yes' if record['stochastic'] else 'no'} (with the default parameters)"
        )
    params = parameters(getattr(entry.source, "Params", None))
    if params:
        lines.append("parameters (-p KEY=VALUE; NAME(KEY=VALUE,...) in a pipeline):")
    elif entry.kind in ("strategy", "online"):
        lines.append("parameters: none")
    for param in params:
        lines += _wrapped(
            "  ", f"{param['name']} = {param['default_repr']}  ({param['type']})", width
        )
        if param["description"]:
            lines += textwrap.wrap(
                param["description"],
                width,
                initial_indent=" " * 6,
                subsequent_indent=" " * 6,
                break_on_hyphens=False,
            )
    for other in others:
        lines.append(
            fit(f"also a {other.kind}: `selbench methods {other.kind}:{other.name}`", width)
        )
    return lines


def find(entries: list[Entry], name: str) -> list[Entry]:
    """The entries ``name`` names: the exact name (``recipe:`` optional for recipes), or
    ``KIND:NAME`` for one kind (``online:jest``, ``embedder:proxy``)."""
    kind, sep, bare = name.partition(":")
    if sep and kind in SECTIONS and kind != "recipe":
        return [e for e in entries if e.kind == kind and e.name == bare]
    exact = [e for e in entries if e.name == name]
    return exact or [e for e in entries if e.kind == "recipe" and e.name == RECIPE_PREFIX + name]


def close_matches(entries: list[Entry], name: str, limit: int = 5) -> list[str]:
    """Names like ``name``: difflib's close matches, then names containing it."""
    names = list(dict.fromkeys(e.name for e in entries))
    close = difflib.get_close_matches(name, names, n=limit, cutoff=0.6)
    close += [n for n in names if name.lower() in n.lower() and n not in close]
    return close[:limit]


def complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """Shell completion of ``selbench methods NAME``: every installed method's name."""
    return [
        CompletionItem(e.name, help=e.summary)
        for e in _entries_quietly()
        if e.name.startswith(incomplete)
    ]


def complete_run_method(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """Shell completion of ``run --method``: strategy and recipe names (a pipeline
    expression is left to the user)."""
    if any(c in incomplete for c in "()>&|, "):
        return []
    return [
        CompletionItem(e.name, help=e.summary)
        for e in _entries_quietly()
        if e.kind in ("strategy", "recipe") and e.name.startswith(incomplete)
    ]


def complete_method_list(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """Shell completion of ``sweep --methods``: the name after the last comma."""
    head, comma, last = incomplete.rpartition(",")
    return [
        CompletionItem(head + comma + item.value, help=item.help)
        for item in complete_run_method(ctx, param, last)
    ]


def complete_online(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """Shell completion of ``run --online``: the online strategies' names."""
    return [
        CompletionItem(e.name, help=e.summary)
        for e in _entries_quietly()
        if e.kind == "online" and e.name.startswith(incomplete)
    ]


def _entries_quietly() -> list[Entry]:
    """The entries for completion; none when loading fails (a completion must not print)."""
    try:
        return collect_entries()
    except Exception:
        return []


@main.command()
@click.argument("name", required=False, shell_complete=complete_names)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON for scripts (keys in docs/cli.md) instead of text.",
)
@friendly_errors
def methods(name: str | None, as_json: bool) -> None:
    """List the installed methods, one line each: offline strategies (scorer or chooser),
    online strategies, embedders, pipeline recipes and plugins that failed to load.

    With NAME (a strategy, online strategy, embedder or recipe), show its parameters with
    their types, defaults and descriptions, and the paper it follows. An unknown NAME exits
    with status 2 and lists close matches.

    \b
    Examples:
      selbench methods
      selbench methods clip_score
      selbench methods --json | jq -r '.methods[].name'
    """
    entries = collect_entries()
    width = terminal_width()
    if name is None:
        if as_json:
            _print_json(_listing(entries))
        else:
            click.echo("\n".join(list_lines(entries, width)))
        return
    found = find(entries, name)
    if not found:
        close = close_matches(entries, name)
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        message = f"unknown method {name!r}{hint} (`selbench methods` lists them all)"
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    entry = found[0]
    others = [e for e in entries if e.name == entry.name and e is not entry]
    if as_json:
        _print_json(describe(entry))
    else:
        click.echo("\n".join(detail_lines(entry, width, others)))


def _listing(entries: list[Entry]) -> dict[str, Any]:
    """What ``selbench methods --json`` prints (keys in docs/cli.md)."""
    keys = ("name", "kind", "traits", "summary", "package", "version")
    return {
        "version": JSON_VERSION,
        "methods": [
            {k: list(e.traits) if k == "traits" else getattr(e, k) for k in keys}
            for e in entries
            if e.kind != "broken"
        ],
        "broken": [
            {
                "entry_point": e.source.entry_point,
                "module": e.source.module,
                "package": e.package,
                "version": e.version,
                "error": e.source.error,
            }
            for e in entries
            if e.kind == "broken"
        ],
    }


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))
