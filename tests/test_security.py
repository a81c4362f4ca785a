"""The security review of docs/reliability.md, kept true by reading the source's syntax trees.

Pools and cache entries are untrusted input, so no code that may read them can run code
from them: no pickle, no ``yaml.load``, ``torch.load`` only with ``weights_only=True``, no
``np.load(allow_pickle=True)``, no shell, no ``eval``/``exec``, and tar members are read,
never extracted. The check walks the AST of every module of selbench and its built-in
plugins, so comments and strings that mention these names do not count, and calls do.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("selbench", "plugins", "benchmarks")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal"}
YAML_UNSAFE = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
EXTRACTING = {"extractall", "extract", "unpack_archive"}
SHELL_FUNCTIONS = {("os", "system"), ("os", "popen")}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def problems(source: str, filename: str = "<source>") -> list[str]:
    """Every forbidden construct in ``source``, as ``file:line: what``."""
    found = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    flag(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLE_MODULES:
                flag(node, f"imports from {node.module}")
            if node.module == "yaml" and any(a.name in YAML_UNSAFE for a in node.names):
                flag(node, "imports an unsafe yaml loader")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            if name in ("eval", "exec"):
                flag(node, f"calls {name}()")
            if owner == "yaml" and last in YAML_UNSAFE:
                flag(node, f"calls {name}() (use yaml.safe_load)")
            if last in ("read_pickle", "to_pickle"):
                flag(node, f"calls {name}()")
            if last in EXTRACTING:
                flag(node, f"calls {name}(): read tar members, never extract them")
            if tuple(name.split(".")[-2:]) in SHELL_FUNCTIONS:
                flag(node, f"calls {name}(), which runs a shell")
            shell = _keyword(node, "shell")
            if shell is not None and not _is_constant(shell, False):
                flag(node, f"calls {name or 'a function'}() with shell=")
            if name == "torch.load" or name.endswith(".torch.load"):
                if not _is_constant(_keyword(node, "weights_only"), True):
                    flag(node, "calls torch.load() without weights_only=True")
            if last == "load" and owner in ("np", "numpy"):
                allow = _keyword(node, "allow_pickle")
                if allow is not None and not _is_constant(allow, False):
                    flag(node, "calls np.load() with allow_pickle")
    return found


def _sources() -> list[Path]:
    return sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py"))


def test_no_module_unpickles_extracts_or_runs_a_shell():
    assert len(_sources()) > 40  # the scan sees the code base, not an empty folder
    found = [
        problem
        for path in _sources()
        for problem in problems(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert found == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import pickle", "imports pickle"),
        ("from dill import loads", "imports from dill"),
        ("import yaml\nyaml.load(s)", "yaml.load()"),
        ("from yaml import unsafe_load", "unsafe yaml loader"),
        ("import torch\ntorch.load(p)", "weights_only=True"),
        ("import torch\ntorch.load(p, weights_only=False)", "weights_only=True"),
        ("import numpy as np\nnp.load(p, allow_pickle=True)", "allow_pickle"),
        ("import pandas as pd\npd.read_pickle(p)", "read_pickle"),
        ("import subprocess\nsubprocess.run(c, shell=True)", "shell="),
        ("import subprocess\nsubprocess.run(c, shell=flag)", "shell="),
        ("import os\nos.system(c)", "runs a shell"),
        ("tar.extractall(d)", "never extract"),
        ("tar.extract(m, d)", "never extract"),
        ("eval(text)", "eval()"),
    ],
)
def test_the_check_catches_each_forbidden_construct(source, expected):
    (problem,) = problems(source)
    assert expected in problem


@pytest.mark.parametrize(
    "source",
    [
        "# import pickle; yaml.load(x); torch.load(p)",  # comments do not count
        "'''tar.extractall() and shell=True in a docstring'''",
        "import yaml\nyaml.safe_load(s)",
        "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
        "import numpy as np\nnp.load(p, allow_pickle=False)\nnp.load(p)",
        "import subprocess\nsubprocess.run(['ls'], shell=False)",
        "model.eval()",
    ],
)
def test_the_check_allows_the_safe_forms(source):
    assert problems(source) == []
