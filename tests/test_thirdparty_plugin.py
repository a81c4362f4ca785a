"""A third-party plugin package, pip-installed from its own folder, shows up and runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_helpers import make_tiny_pool, make_tiny_scale

FIXTURE = Path(__file__).parent / "fixtures" / "example_plugin"
SELBENCH = [sys.executable, "-m", "selbench.cli"]


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """pip-install the fixture package into a private target dir (the venv is untouched)."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "example_plugin"
    shutil.copytree(FIXTURE, source)  # setuptools writes build/ into the source folder
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
    return dict(os.environ, PYTHONPATH=path, COLUMNS="200")


def test_installed_plugin_is_listed_with_its_package(installed_plugin):
    out = subprocess.run(
        SELBENCH + ["methods"],
        env=installed_plugin,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "longest_captions" in out
    assert "selbench-example-plugin" in out
    assert "min_words" in out  # parameters and defaults are listed
    assert "random" in out


def test_methods_without_the_plugin_does_not_list_it():
    env = dict(os.environ, COLUMNS="200")
    out = subprocess.run(
        SELBENCH + ["methods"], env=env, capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "longest_captions" not in out


@pytest.mark.slow
def test_installed_plugin_runs_end_to_end(installed_plugin, tmp_path):
    pool = make_tiny_pool(tmp_path)
    scale = make_tiny_scale(tmp_path)
    env = dict(installed_plugin, SELBENCH_HOME=str(tmp_path / "home"))
    done = subprocess.run(
        SELBENCH
        + [
            "run",
            "--method",
            "longest_captions",
            "--budget",
            "0.25",
            "--pool",
            str(pool),
            "--scale",
            str(scale),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "zero-shot top-1" in done.stdout
