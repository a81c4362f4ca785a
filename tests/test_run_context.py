"""A finished run's summary shows ``random`` at its budget and the full pool beside it:
from the user's own runs, else from a committed leaderboard whose setting matches, and
says which (selbench.leaderboard.context)."""

from __future__ import annotations

import logging

import pytest

from selbench.leaderboard import context as rc

FINGERPRINT = "d1267b92210219bd"  # the committed synthweb leaderboard's pool
SETTING = {
    "pool": "synthweb",
    "pool_fingerprint": FINGERPRINT,
    "scale": "tiny",
    "protocol": "fixed-compute",
    "eval_suite": "pool",
    "train_samples": "1.0",
}
BOARD = """\
pool,pool_fingerprint,scale,protocol,method,budget,seeds,runs,reference,mean_R1_mean,mean_R1_ci95,zeroshot_acc1_mean,zeroshot_acc1_ci95
synthweb,d1267b92210219bd,tiny,fixed-compute,tldr,0.25,3,3,False,0.024,0.007,0.465,0.014
synthweb,d1267b92210219bd,tiny,fixed-compute,random,0.25,3,3,False,0.029,0.027,0.430,0.135
synthweb,d1267b92210219bd,tiny,fixed-compute,random,1.0,3,3,True,0.110,0.033,0.511,0.023
"""


def log_run(label: str, budget: float, seed: int, r1: float, experiment="selbench", **params):
    """A FINISHED run with the params and metrics a real one logs, without training."""
    import mlflow

    from selbench import tracking

    experiment_id = tracking.setup(experiment)
    values = {**SETTING, "method_label": label, "budget": budget, "seed": seed, **params}
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params(values)
        mlflow.log_metrics({"mean_R1": r1, "zeroshot_acc1": 0.4 + r1})
    return run.info.run_id


@pytest.fixture
def board_dir(tmp_path, monkeypatch):
    """A committed-leaderboards folder holding one board and its page."""
    folder = tmp_path / "leaderboards"
    folder.mkdir()
    (folder / "synthweb.csv").write_text(BOARD)
    (folder / "synthweb.md").write_text("Code: selbench 0.1.0; git commit 6eace43486.\n")
    monkeypatch.setattr(rc, "committed_leaderboard_dir", lambda: folder)
    return folder


@pytest.fixture
def no_boards(monkeypatch):
    monkeypatch.setattr(rc, "committed_leaderboard_dir", lambda: None)


def summary(run_id: str, capsys, r1: float = 0.026) -> str:
    """What ``selbench run`` prints at the end of run ``run_id``."""
    from selbench.cli.common import console
    from selbench.cli.runs import _print_outcome
    from selbench.run.lifecycle import RunOutcome

    outcome = RunOutcome(run_id, {"mean_R1": r1, "zeroshot_acc1": 0.45}, None, "sqlite://")
    width = console.width
    console.width = 200  # one line per table row
    try:
        _print_outcome(outcome, "tldr @ budget 0.25 (seed 0)")
    finally:
        console.width = width
    return capsys.readouterr().out


def test_your_runs_give_random_and_full_pool_rows(capsys, board_dir):
    for seed, r1 in enumerate([0.02, 0.03, 0.04]):
        log_run("random", 0.25, seed, r1)
    log_run("random", 1.0, 0, 0.10)
    log_run("random", 1.0, 1, 0.12)
    log_run("random", 0.25, 0, 0.9, scale="small")  # another setting: left out
    log_run("random [train 2x]", 0.25, 0, 0.9)  # another training length: left out
    log_run("random", 0.25, 0, 0.9, experiment="other")  # another experiment: left out
    this = log_run("tldr", 0.25, 0, 0.026)

    context = rc.lookup(this)
    assert context is not None
    assert [(r.name, r.seeds, r.source) for r in context.rows] == [
        ("random @ 0.25", 3, "your runs"),
        ("full pool", 2, "your runs"),
    ]
    assert context.rows[0].values["mean_R1"][0] == pytest.approx(0.03)
    assert context.rows[1].values["zeroshot_acc1"][0] == pytest.approx(0.51)

    out = summary(this, capsys)
    assert "R@1 (mean of image->text and text->image): 0.0260" in out
    assert "random @ 0.25" in out and "0.030 ± 0.025" in out
    assert "full pool" in out and "0.110 ± 0.127" in out
    assert "your runs: finished runs in MLflow experiment 'selbench', this one left out." in out
    assert "synthweb.csv" not in out


def test_the_run_itself_is_left_out_and_a_missing_row_comes_from_the_board(capsys, board_dir):
    log_run("random", 0.25, 1, 0.05)
    this = log_run("random", 0.25, 0, 0.026)
    context = rc.lookup(this)
    assert context is not None
    assert [(r.name, r.seeds, r.source) for r in context.rows] == [
        ("random @ 0.25", 1, "your runs"),
        ("full pool", 3, "synthweb.csv"),
    ]
    out = summary(this, capsys)
    assert "your runs: finished runs in MLflow" in out
    assert (
        "synthweb.csv: committed leaderboard leaderboards/synthweb.csv, runs at commit 6eace43486."
        in out
    )


def test_without_your_runs_the_committed_board_answers_when_its_setting_matches(capsys, board_dir):
    this = log_run("tldr", 0.25, 0, 0.026)
    context = rc.lookup(this)
    assert context is not None
    assert [(r.name, r.seeds, r.source) for r in context.rows] == [
        ("random @ 0.25", 3, "synthweb.csv"),
        ("full pool", 3, "synthweb.csv"),
    ]
    assert context.rows[1].values == {"mean_R1": (0.110, 0.033), "zeroshot_acc1": (0.511, 0.023)}
    out = summary(this, capsys)
    assert "0.029 ± 0.027" in out and "0.511 ± 0.023" in out
    assert (
        "synthweb.csv: committed leaderboard leaderboards/synthweb.csv, runs at commit 6eace43486."
        in out
    )
    assert "your runs" not in out


@pytest.mark.parametrize(
    "changed",
    [
        {"pool_fingerprint": "0000000000000000"},
        {"scale": "small"},
        {"protocol": "fixed-epochs"},
        {"budget": 0.1},  # random at 0.1 is not on the board, and the full pool alone
        {"method_label": "tldr [train 2x]", "train_samples": "2.0"},
        {"eval_suite": "datacomp"},
    ],
)
def test_a_board_of_another_setting_shows_nothing(capsys, board_dir, changed):
    params = {"method_label": "tldr", "budget": 0.25, **changed}
    label, budget = params.pop("method_label"), params.pop("budget")
    this = log_run(label, budget, 0, 0.026, **params)
    if "budget" in changed:
        # the full-pool row matches this setting; only the budget's row is missing
        context = rc.lookup(this)
        assert context is not None and [r.name for r in context.rows] == ["full pool"]
        return
    assert rc.lookup(this) is None
    out = summary(this, capsys)
    assert "Compared with" not in out and "synthweb.csv" not in out
    assert "R@1 (mean of image->text and text->image): 0.0260" in out


def test_nothing_anywhere_shows_nothing(capsys, no_boards):
    this = log_run("tldr", 0.25, 0, 0.026)
    assert rc.lookup(this) is None
    out = summary(this, capsys)
    assert "Compared with" not in out
    assert "Logged MLflow run" in out


def test_a_failing_lookup_is_a_warning_and_the_summary_still_prints(capsys, caplog, monkeypatch):
    this = log_run("tldr", 0.25, 0, 0.026)

    def broken(run_id):
        raise RuntimeError("store on fire")

    monkeypatch.setattr(rc, "lookup", broken)
    with caplog.at_level(logging.WARNING, logger=rc.__name__):
        out = summary(this, capsys)
    assert "R@1 (mean of image->text and text->image): 0.0260" in out
    assert "Logged MLflow run" in out
    assert "store on fire" in caplog.text


def test_the_checkout_s_committed_synthweb_board_is_found_and_read():
    """The real leaderboards/synthweb.csv (README's default: SynthWeb, tiny, 0.25)."""
    setting = rc.RunSetting.from_params("x", "selbench", {**SETTING, "budget": "0.25"})
    found = rc.committed_rows(setting, setting.budgets())
    assert {b: (path.name, row.seeds) for b, (path, row) in found.items()} == {
        0.25: ("synthweb.csv", 3),
        1.0: ("synthweb.csv", 3),
    }
    assert set(found[1.0][1].values) == {"mean_R1", "zeroshot_acc1"}
    assert "runs at commit" in rc.board_note(found[1.0][0])
