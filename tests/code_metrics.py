"""Size of the code under a folder: lines per module and per function.

One implementation, shared by tests/test_architecture.py (which holds selbench/ to its
limits) and benchmarks/code_size.py (which prints the largest modules and functions).
A function's length runs from its ``def`` line to the last line of its body, as ``ast``
records them (decorators and the blank lines after it are not counted); a nested function
or a method counts on its own and inside the function that holds it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

#: The limits selbench/ keeps (issue #29).
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Measured:
    """One module or function: where it is and how many lines it spans."""

    path: Path
    name: str  # the module's dotted name, or a function's qualified name in its module
    line: int  # first line (1 for a module)
    lines: int

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root.parent)}:{self.line}"


def python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path, root: Path) -> str:
    """``selbench/run/spec.py`` -> ``selbench.run.spec``; a package's ``__init__`` is the
    package itself."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_lengths(root: Path) -> list[Measured]:
    """Every module under ``root`` with its line count, longest first."""
    found = [
        Measured(path, module_name(path, root), 1, len(path.read_text().splitlines()))
        for path in python_files(root)
    ]
    return sorted(found, key=lambda m: (-m.lines, m.name))


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{node.name}"
            yield name, node
            yield from _functions(node, f"{name}.<locals>.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def function_lengths(root: Path) -> list[Measured]:
    """Every function and method under ``root`` with its length in lines, longest first."""
    found = []
    for path in python_files(root):
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, node in _functions(tree):
            end = node.end_lineno if node.end_lineno is not None else node.lineno
            found.append(Measured(path, name, node.lineno, end - node.lineno + 1))
    return sorted(found, key=lambda m: (-m.lines, str(m.path), m.line))
