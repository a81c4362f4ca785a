import json

from click.testing import CliRunner

from selbench.cli import main

SMALL = [
    "--set",
    "n_retrieval=20",
    "--set",
    "n_classification=20",
    "--set",
    "n_target=10",
    "--set",
    "shard_size=50",
    "--set",
    "n_reasoning_train=20",
    "--set",
    "n_reasoning_test=10",
]


def test_every_command_has_help():
    for args in (
        ["--help"],
        ["run", "--help"],
        ["methods", "--help"],
        ["leaderboard", "--help"],
        ["datasets", "make", "--help"],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "Usage" in result.output, args


def test_datasets_make_generates_into_the_data_home_once(isolated_home):
    args = ["datasets", "make", "synthweb", "--n-samples", "100", *SMALL]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    made = list((isolated_home / "datasets").glob("synthweb-*"))
    assert len(made) == 1
    manifest = json.loads((made[0] / "manifest.json").read_text())
    assert manifest["counts"]["pool"] == 100
    again = CliRunner().invoke(main, args)
    assert "Already generated" in again.output


def test_datasets_make_to_an_explicit_folder(tmp_path):
    out = tmp_path / "sw"
    result = CliRunner().invoke(
        main, ["datasets", "make", "synthweb", "--n-samples", "60", "--out", str(out), *SMALL]
    )
    assert result.exit_code == 0, result.output
    assert (out / "pool" / "00000.tar").is_file()
    refused = CliRunner().invoke(main, ["datasets", "make", "synthweb", "--out", str(out)])
    assert refused.exit_code != 0 and "already exists" in refused.output


def test_bad_synthweb_setting_is_named():
    result = CliRunner().invoke(
        main, ["datasets", "make", "synthweb", "--set", "rate_misaligned=3"]
    )
    assert result.exit_code != 0 and "rate_misaligned" in result.output


def test_commands_that_train_nothing_do_not_import_the_heavy_libraries(isolated_home):
    """Every command loads every plugin; open_clip, scikit-learn and vector_quantize_pytorch
    are imported only where a model is built or TL;DR counts keywords (docs/design.md,
    "Start-up"), so `selbench methods` or a refused run does not pay seconds for them."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from selbench.cli import main\n"
        "runner = CliRunner()\n"
        "assert runner.invoke(main, ['methods']).exit_code == 0\n"
        "refused = runner.invoke(main, ['run', '--method', 'no-such', '--budget', '0.25'])\n"
        "assert refused.exit_code != 0\n"
        "heavy = ('open_clip', 'sklearn', 'vector_quantize_pytorch', 'transformers')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
