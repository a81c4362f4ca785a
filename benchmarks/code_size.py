"""The largest modules and the longest functions of selbench/ (or another folder).

The measurement is tests/code_metrics.py's, the one tests/test_architecture.py holds to
its limits (600 lines a module, 80 a function, def line to the end of the body)::

    python benchmarks/code_size.py              # the 15 largest of each
    python benchmarks/code_size.py --top 40 --root plugins/selbench_plugins
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from code_metrics import (  # noqa: E402 - found through the path set just above
    MAX_FUNCTION_LINES,
    MAX_MODULE_LINES,
    function_lengths,
    module_lengths,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "selbench", help="package folder")
    parser.add_argument("--top", type=int, default=15, help="rows per table")
    args = parser.parse_args(argv)
    root = args.root.resolve()

    modules = module_lengths(root)
    functions = function_lengths(root)
    print(f"{len(modules)} modules, {sum(m.lines for m in modules)} lines, under {root}")
    print(f"\nlargest modules (limit {MAX_MODULE_LINES} lines):")
    for m in modules[: args.top]:
        flag = "  OVER" if m.lines > MAX_MODULE_LINES else ""
        print(f"  {m.lines:5d}  {m.name}{flag}")
    print(f"\nlongest functions (limit {MAX_FUNCTION_LINES} lines):")
    for f in functions[: args.top]:
        flag = "  OVER" if f.lines > MAX_FUNCTION_LINES else ""
        print(f"  {f.lines:5d}  {f.name}  ({f.where(root)}){flag}")
    over_modules = sum(m.lines > MAX_MODULE_LINES for m in modules)
    over_functions = sum(f.lines > MAX_FUNCTION_LINES for f in functions)
    print(f"\nover the limits: {over_modules} modules, {over_functions} functions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
