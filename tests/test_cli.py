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
