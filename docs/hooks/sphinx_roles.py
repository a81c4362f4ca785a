"""Griffe extension (mkdocs.yml, mkdocstrings' ``extensions``): selbench's docstrings name
other objects with reST roles (``:func:`rank```, ``:class:`~selbench.strategy.Strategy```),
which Markdown would print as they are. Each role becomes a cross-reference:

- a target that names a documented object of selbench (an API reference page renders
  it) links to it, and one that names nothing at all (``selbench.strategy.no_such``) is
  left as a reference autorefs cannot resolve, so ``mkdocs build --strict`` fails on it;
- a target in selbench that the reference does not render (an internal module) links
  where a page shows it and is plain code otherwise;
- anything else (torch, numpy, ...) is plain code.

``~`` shows the last component only, as in Sphinx.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?P<role>func|meth|class|data|attr|mod|exc|obj|const):`(?P<target>[^`]+)`"
)
#: The packages whose names are checked.
OWN = ("selbench", "selbench_plugins")


def _display(target: str) -> tuple[str, str]:
    """(what the link shows, the name it refers to) for a role's text."""
    explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<name>[^>]+)>", target)
    if explicit:
        return explicit["title"], explicit["name"]
    name = target.lstrip("~").lstrip(".")
    shown = name.rsplit(".", 1)[-1] if target.startswith("~") else name
    return shown, name


def _resolve(obj: Any, name: str) -> str | None:
    """The full path ``name`` stands for in ``obj``'s scope, or None."""
    if name.split(".", 1)[0] in OWN:
        return name
    first, _, rest = name.partition(".")
    for scope in (obj, getattr(obj, "parent", None)):
        if scope is None:
            continue
        try:
            base = scope.resolve(first)
        except Exception:  # griffe's NameResolutionError, or a scope that cannot resolve
            continue
        return f"{base}.{rest}" if rest else base
    return None


def _exists(loader: Any, path: str) -> bool | None:
    """Whether ``path`` names an object; None when its package is not loaded."""
    if path.split(".", 1)[0] not in loader.modules_collection:
        return None
    try:
        loader.modules_collection.get_member(path)
    except Exception:
        return False
    return True


class SphinxRoles(griffe.Extension):
    """Rewrites the reST roles of every docstring of the loaded packages."""

    def on_package(self, *, pkg: Any, loader: Any, **kwargs: Any) -> None:
        self._walk(pkg, loader)

    def _walk(self, obj: Any, loader: Any) -> None:
        if obj.is_alias:
            return
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(
                lambda m: self._role(m, obj, loader), obj.docstring.value
            )
        for member in obj.members.values():
            self._walk(member, loader)

    def _role(self, match: re.Match[str], obj: Any, loader: Any) -> str:
        shown, name = _display(match["target"])
        code = f"<code>{shown}</code>"
        path = _resolve(obj, name)
        if path is None or path.split(".", 1)[0] not in OWN:
            return code
        if _exists(loader, path) is False:
            # Names nothing: a reference autorefs reports, failing the strict build.
            return f'<autoref identifier="{path}">{code}</autoref>'
        return f'<autoref identifier="{path}" optional>{code}</autoref>'
