"""Write constraints.txt: the installed version of every distribution that selbench[dev,ray]
needs, directly or through its dependencies (the dependency closure, extras followed),
selbench itself left out. Run it in the environment CI's install made, after changing a
dependency on purpose: `python tests/tools/freeze-constraints.py > constraints.txt`
(docs/install.md)."""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT, ROOT_EXTRAS = "selbench", ("dev", "ray")
HEADER = """\
# What CI installs and tests: the README's install command is
#   pip install -e '.[dev]' -c constraints.txt
# and its test command adds the ray extra: pip install -e '.[ray]' -c constraints.txt
# pyproject.toml says which ranges selbench accepts; this file pins one tested set
# (Python 3.11, Linux). Written by tests/tools/freeze-constraints.py (docs/install.md).
"""


def closure() -> dict[str, str]:
    """Installed distribution name -> version, for everything selbench[dev] pulls in."""
    found: dict[str, str] = {}
    todo = [(ROOT, frozenset(ROOT_EXTRAS))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{name} is required but not installed: install selbench[dev] first")
        found[canonicalize_name(name)] = f"{dist.metadata['Name']}=={dist.version}"
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in wanted):
                todo.append((req.name, frozenset(req.extras)))
    found.pop(canonicalize_name(ROOT))
    return found


if __name__ == "__main__":
    sys.stdout.write(HEADER + "".join(f"{pin}\n" for _, pin in sorted(closure().items())))
