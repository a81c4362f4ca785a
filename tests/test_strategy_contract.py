import pytest

from selbench.errors import ConfigError, PluginError
from selbench.strategy import Selection, Strategy, budget_count, parse_params, validate_selection

POOL = [f"u{i}" for i in range(10)]


def test_budget_count_rounds_the_fraction_of_the_pool():
    assert budget_count(0.25, 10) == 2  # round(2.5) -> banker's rounding gives 2
    assert budget_count(0.25, 8000) == 2000
    assert budget_count(1.0, 7) == 7


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.7, float("nan")])
def test_budget_outside_unit_interval_is_rejected(budget):
    with pytest.raises(ConfigError, match="budget"):
        budget_count(budget, 100)


def test_budget_that_selects_nothing_is_rejected():
    with pytest.raises(ConfigError, match="selects nothing"):
        budget_count(0.001, 100)


def test_valid_selection_passes():
    got = validate_selection(Selection(uids=["u1", "u2"]), POOL, 2, "mine")
    assert got.uids == ["u1", "u2"]


@pytest.mark.parametrize(
    "selection, message",
    [
        (Selection(uids=["u1", "u1"]), "duplicate"),
        (Selection(uids=["u1", "nope"]), "not in the pool"),
        (Selection(uids=["u1", "u2", "u3"]), "budget is exactly 2"),
        (Selection(uids=["u1"]), "budget is exactly 2"),
        (["u1", "u2"], "expected selbench.Selection"),
        (Selection(uids=["u1", 2]), "non-string"),
        (Selection(uids=["u1", "u2"], captions={"u3": "x"}), "unselected"),
        (Selection(uids=["u1", "u2"], captions={"u1": ""}), "empty caption"),
        (Selection(uids=["u1", "u2"], scores={"zzz": 1.0}), "scores"),
    ],
)
def test_invalid_selections_are_rejected_naming_the_plugin(selection, message):
    with pytest.raises(PluginError, match=message) as info:
        validate_selection(selection, POOL, 2, "bad_plugin")
    assert "bad_plugin" in str(info.value)


def test_params_are_validated_with_the_strategy_name_in_the_error():
    from pydantic import BaseModel, ConfigDict

    class P(BaseModel):
        model_config = ConfigDict(extra="forbid")
        k: int = 3

    class S(Strategy):
        name = "withparams"
        Params = P

    assert S({"k": "5"}).params.k == 5  # CLI strings are coerced to the declared type
    with pytest.raises(ConfigError, match="withparams.*k"):
        parse_params(S, {"k": "many"})
    with pytest.raises(ConfigError, match="known parameters: k"):
        parse_params(S, {"kk": 1})


@pytest.mark.parametrize(
    "report, message",
    [
        ({"metrics": {"clusters": float("nan")}}, "'clusters' = nan"),
        ({"metrics": {"bad name!": 1.0}}, "bad name"),
        ({"metrics": {"seconds": "12"}}, "not a number"),
        ({"series": {"loss": [(0, 1.0), (10, float("inf"))]}}, "'loss' = inf"),
        ({"artifacts": ["/nonexistent/plot.png"]}, "not a file"),
    ],
)
def test_strategy_reports_are_checked_naming_the_plugin(report, message):
    selection = Selection(uids=["a"], **report)
    with pytest.raises(PluginError, match=message) as info:
        validate_selection(selection, {"a", "b"}, 1, "reporter")
    assert "reporter" in str(info.value)


def test_a_valid_report_passes_through(tmp_path):
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"png")
    selection = Selection(
        uids=["a"],
        metrics={"seconds_stage": 1.5, "clusters_used": 3},
        series={"loss": [(0, 2.0), (10, 1.0)]},
        artifacts=[plot],
    )
    checked = validate_selection(selection, {"a"}, 1, "reporter")
    assert checked.metrics == selection.metrics and checked.artifacts == [plot]
    assert checked.series == selection.series
