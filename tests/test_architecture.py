"""The shape of selbench/: its layers, where MLflow is used, how large its code grows.

Every module of selbench/ sits in one layer of LAYERS and may import (at module level or
inside a function) only modules of its own layer or lower ones; a new module fails here
until it is placed in the table. ``mlflow`` is imported by selbench/tracking.py alone.
No module is over 600 lines and no function over 80 (tests/code_metrics.py measures both;
``python benchmarks/code_size.py`` prints the largest).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from code_metrics import (
    MAX_FUNCTION_LINES,
    MAX_MODULE_LINES,
    function_lengths,
    module_lengths,
    module_name,
    python_files,
)

ROOT = Path(__file__).resolve().parents[1] / "selbench"

#: Lowest first. ``x.*`` is the package ``x`` and every module under it.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", [
        "selbench.errors",
        "selbench.paths",
        "selbench.progress",
        "selbench.fileutil",
        "selbench.hookspecs",
        "selbench.columns",
    ]),
    ("storage", [
        "selbench.tracking",
        "selbench.cache.*",
        "selbench.rundir",
        "selbench.configs",
    ]),
    ("identity", [
        "selbench.run",  # the package's __init__ imports nothing
        "selbench.run.spec",
    ]),
    ("services", [
        "selbench",  # the package's __init__: the public API of strategies
        "selbench.strategy",
        "selbench.positions",
        "selbench.executors",
        "selbench.registry",
        "selbench.embedders",
        "selbench.embed_ranks",
        "selbench.embed_ray",
        "selbench.toolbox",
        "selbench.testing",
        "selbench.train",
        "selbench.train_open_clip",
        "selbench.open_clip_worker",
        "selbench.evaluate",
        "selbench.materialize",
        "selbench.decoding",
        "selbench.pools.*",
        "selbench.synthweb.*",
        "selbench.reference",
        "selbench.reference_captioner",
        "selbench.probe",
        "selbench.captioning",
        "selbench.target",
        "selbench.diagnostics",
        "selbench.datacomp_metadata",
        "selbench.neighbours",
        "selbench.decontaminate",
        "selbench.run.selection_io",
        "selbench.run.views",
        "selbench.run.fusion",
        "selbench.run.plan",
        "selbench.run.pipeline",
        "selbench.run.compute",
        "selbench.online.*",
        "selbench.flops",
    ]),
    ("stages", [
        "selbench.run.stages",
    ]),
    ("run", [
        "selbench.run.lifecycle",
    ]),
    ("app", [
        "selbench.sweep",
        "selbench.leaderboard.*",  # its plots included
        "selbench.export",
    ]),
    ("cli", [
        "selbench.cli.*",
    ]),
]  # fmt: skip


def layer_of(module: str) -> tuple[int, str] | None:
    """(number, name) of ``module``'s layer; None when the table does not place it."""
    for number, (name, members) in enumerate(LAYERS):
        for member in members:
            if member.endswith(".*"):
                package = member[:-2]
                if module == package or module.startswith(package + "."):
                    return number, name
            elif module == member:
                return number, name
    return None


def _modules() -> dict[str, Path]:
    return {module_name(path, ROOT): path for path in python_files(ROOT)}


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` names (relative ones resolved)."""
    if node.level == 0:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def selbench_imports(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) of every selbench module ``path`` imports, anywhere in the file.

    ``from A import x`` imports the module ``A.x`` when there is one, otherwise ``A``.
    """
    module = module_name(path, ROOT)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, module, is_package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((node.lineno, submodule if submodule in modules else base))
    return sorted(
        (line, name) for line, name in found if name == "selbench" or name.startswith("selbench.")
    )


def test_every_module_imports_only_its_own_layer_or_lower_ones():
    modules = _modules()
    problems = []
    for module, path in sorted(modules.items()):
        where = path.relative_to(ROOT.parent)
        own = layer_of(module)
        if own is None:
            problems.append(
                f"{where}: module {module} is in no layer: place it in LAYERS "
                "(tests/test_architecture.py)"
            )
            continue
        for line, imported in selbench_imports(path, modules):
            if imported == module:
                continue
            if imported not in modules:
                problems.append(f"{where}:{line}: {module} imports {imported}, no such module")
                continue
            theirs = layer_of(imported)
            if theirs is not None and theirs[0] > own[0]:
                problems.append(
                    f"{where}:{line}: {module} (layer {own[0]} {own[1]}) imports {imported} "
                    f"(layer {theirs[0]} {theirs[1]}), a higher layer"
                )
    if problems:
        pytest.fail("layering of selbench/ broken:\n" + "\n".join(problems), pytrace=False)


def mlflow_imports(path: Path) -> list[int]:
    """Lines of ``path`` that import mlflow or one of its submodules."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(name == "mlflow" or name.startswith("mlflow.") for name in names):
            lines.append(node.lineno)
    return lines


def test_only_tracking_imports_mlflow():
    tracking = ROOT / "tracking.py"
    offenders = [
        f"{path.relative_to(ROOT.parent)}:{line}"
        for path in python_files(ROOT)
        if path != tracking
        for line in mlflow_imports(path)
    ]
    if offenders:
        pytest.fail(
            "mlflow is imported outside selbench/tracking.py (go through selbench.tracking): "
            + ", ".join(offenders),
            pytrace=False,
        )


def test_no_module_or_function_is_too_long():
    problems = [
        f"{m.where(ROOT)}: module {m.name} has {m.lines} lines (limit {MAX_MODULE_LINES})"
        for m in module_lengths(ROOT)
        if m.lines > MAX_MODULE_LINES
    ]
    problems += [
        f"{f.where(ROOT)}: function {f.name} has {f.lines} lines (limit {MAX_FUNCTION_LINES})"
        for f in function_lengths(ROOT)
        if f.lines > MAX_FUNCTION_LINES
    ]
    if problems:
        pytest.fail("selbench/ code too long:\n" + "\n".join(problems), pytrace=False)
