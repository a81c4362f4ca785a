"""Third-party plugin packages, pip-installed from their own folders, show up, pass the
conformance kit (their own kit test, run against the installed package) and run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SELBENCH = [sys.executable, "-m", "selbench.cli"]
# fixture folder -> (distribution, method, a parameter `selbench methods` must list)
PLUGINS = {
    "example_plugin": ("selbench-example-plugin", "longest_captions", "min_words"),
    "example_cluster_plugin": ("selbench-cluster-plugin", "cluster_balanced", "clusters"),
}


@pytest.fixture(scope="module", params=sorted(PLUGINS))
def installed_plugin(request, tmp_path_factory):
    """pip-install a fixture package into a private target dir (the venv is untouched);
    returns (fixture name, environment that sees it)."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / request.param
    shutil.copytree(FIXTURES / request.param, source)  # setuptools writes build/ there
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
    )
    path = os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])
    return request.param, dict(os.environ, PYTHONPATH=path, COLUMNS="250")


def test_installed_plugin_is_listed_with_its_package(installed_plugin):
    fixture, env = installed_plugin
    package, method, parameter = PLUGINS[fixture]
    out = subprocess.run(
        SELBENCH + ["methods"], env=env, capture_output=True, text=True, check=True, timeout=120
    ).stdout
    (line,) = [line for line in out.splitlines() if line.split()[:1] == [method]]
    assert f"({package})" in line  # a third-party strategy's line names its package
    assert "random" in out and "Broken plugins" not in out
    detail = subprocess.run(
        SELBENCH + ["methods", method],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert detail.startswith(f"{method}: offline strategy") and package in detail
    assert f"  {parameter} = " in detail  # its parameters and defaults


def test_installed_plugin_passes_its_own_kit_test(installed_plugin, tmp_path):
    fixture, env = installed_plugin
    # The kit test alone, away from the package's source: it imports the installed module.
    checks = shutil.copy(FIXTURES / fixture / "plugin_checks.py", tmp_path / "plugin_checks.py")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
        env=dict(env, SELBENCH_HOME=str(tmp_path / "home")),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "12 passed" in done.stdout  # two configurations x six checks, one item each


def test_methods_without_the_plugins_does_not_list_them():
    env = dict(os.environ, COLUMNS="250")
    out = subprocess.run(
        SELBENCH + ["methods"], env=env, capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "longest_captions" not in out and "cluster_balanced" not in out


@pytest.mark.slow
def test_installed_plugin_runs_end_to_end(installed_plugin, tiny, tmp_path):
    fixture, env = installed_plugin
    pool, scale = tiny
    done = subprocess.run(
        SELBENCH
        + ["run", "--method", PLUGINS[fixture][1], "--budget", "0.25", "--pool", str(pool)]
        + ["--scale", str(scale)],
        env=dict(env, SELBENCH_HOME=str(tmp_path / "home")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "zero-shot top-1" in done.stdout
