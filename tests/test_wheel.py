"""The wheel works outside the checkout, and the packaging rules hold.

``test_the_wheel_runs_outside_the_checkout`` builds selbench's wheel (hatchling, no build
isolation: no download), installs it without ``-e`` into a fresh virtual environment and
runs ``selbench methods`` and a small ``selbench run`` (its console script) from a folder
outside the checkout: about 25 s on 2 cores, most of it the run.
What an installed selbench reads besides its modules must be in the wheel: the configs
(``selbench/_configs``), the published rankings, the committed SynthWeb leaderboard
(``selbench/_leaderboards``) and the built-in plugins with their entry points.

The fresh environment reuses the dependencies installed here instead of installing torch
again: its ``.pth`` file names a folder of links to this environment's site-packages,
every entry but selbench's own (the editable install's finder, ``.pth`` and metadata), so
``import selbench`` can only find the wheel's copy.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]

# What the installed selbench reports about itself, printed as JSON by the new environment,
# with what `selbench methods` prints (run in the same process: its imports are the
# registry's, which take seconds; `selbench run` below goes through the console script).
PROBE = """
import contextlib, io, json, selbench, selbench_plugins
from selbench.cli import main
from selbench.leaderboard import published
from selbench.paths import committed_leaderboard_dir, config_dir
from selbench.registry import make_plugin_manager

pm = make_plugin_manager()
boards = committed_leaderboard_dir()
methods = io.StringIO()
with contextlib.redirect_stdout(methods):
    main(["methods"], prog_name="selbench", standalone_mode=False)
print(json.dumps({
    "methods": methods.getvalue(),
    "selbench": selbench.__file__,
    "selbench_plugins": selbench_plugins.__file__,
    "configs": str(config_dir()),
    "models": sorted(p.name for p in (config_dir() / "models").glob("*.json")),
    "boards": str(boards) if boards else None,
    "board_files": sorted(p.name for p in boards.iterdir()) if boards else [],
    "published": {n: len(published.load_table(n).rows) for n in published.available_tables()},
    "plugins": {n: d[0] for n, d in pm.distributions.items()},
    "plugin_files": sorted({m.__file__ for m in pm.get_plugins() if hasattr(m, "__file__")}),
    "broken": [f"{b.entry_point}: {b.error}" for b in pm.broken],
}))
"""


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


def _dependencies_folder(root: Path) -> Path:
    """Links to every entry of this environment's site-packages but selbench's own."""
    folder = root / "dependencies"
    folder.mkdir()
    sites = dict.fromkeys(Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib"))
    for site in sites:
        for entry in site.iterdir():
            if "selbench" in entry.name.lower() or (folder / entry.name).exists():
                continue
            (folder / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return folder


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--quiet", "--wheel-dir", str(out), str(REPO)],
        check=True,
        timeout=300,
    )
    (found,) = out.glob("selbench-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh environment with the wheel installed: its folder."""
    root = tmp_path_factory.mktemp("wheel-env")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "_selbench_test_dependencies.pth").write_text(f"{_dependencies_folder(root)}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    _run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        root,
        env,
    )
    return venv


@pytest.mark.slow
def test_the_wheel_runs_outside_the_checkout(installed, tiny, tmp_path):
    pool, scale = tiny
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert REPO not in outside.parents
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{installed / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(installed)

    probe = json.loads(_run([str(installed / "bin" / "python"), "-c", PROBE], outside, env).stdout)
    inside = str(installed.resolve())
    for key in ("selbench", "selbench_plugins", "configs", "boards"):
        assert probe[key] and str(Path(probe[key]).resolve()).startswith(inside), (key, probe)
    assert "selbench-tiny.json" in probe["models"]
    assert {"synthweb.csv", "synthweb.md"} <= set(probe["board_files"])
    assert probe["published"] and all(probe["published"].values()), probe["published"]
    assert probe["broken"] == []
    assert {"random", "tldr", "embedders"} <= set(probe["plugins"]), probe["plugins"]
    assert set(probe["plugins"].values()) == {"selbench"}
    assert all(Path(f).resolve().is_relative_to(inside) for f in probe["plugin_files"])

    methods = probe["methods"]
    assert re.search(r"^\s*random\b", methods, re.M) and re.search(r"^\s*tldr\b", methods, re.M)

    run = _run(
        [str(installed / "bin" / "selbench"), "run", "--method", "random", "--budget", "0.25"]
        + ["--pool", str(pool), "--scale", str(scale)],
        outside,
        env,
        timeout=600,
    )
    assert "R@1" in run.stdout and "zero-shot top-1" in run.stdout, run.stdout


# -- the packaging rules (issue 34), checked in milliseconds ------------------------------


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions only: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_runtime_dependencies_are_ranges_not_pins():
    for line in _project()["dependencies"]:
        requirement = Requirement(line)
        assert not any(s.operator in ("==", "===") for s in requirement.specifier), line


def test_constraints_pin_every_dependency_within_its_range():
    pins = _pins()
    project = _project()
    extras = project["optional-dependencies"]
    direct = project["dependencies"] + extras["dev"] + extras["docs"] + extras["ray"]
    for line in direct:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == "selbench":
            continue
        assert name in pins, f"constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (line, pins[name])
    assert "selbench" not in pins
    # CI's machine has these builds on disk; any other torch is a download of gigabytes.
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_the_readme_installs_with_the_constraints():
    readme = (REPO / "README.md").read_text()
    install = readme.split("<!-- ci:install -->", 1)[1].split("```", 2)[1]
    assert "pip install -e '.[dev]' -c constraints.txt" in install
    test = readme.split("<!-- ci:test -->", 1)[1].split("```", 2)[1]
    assert "mkdocs build --strict" in test
