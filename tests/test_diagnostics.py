import pytest

from selbench.diagnostics import concept_coverage, pathology_fractions


def obj(colour, shape):
    return {"colour": colour, "shape": shape}


TRUTH = {
    "a": {"pathology": "clean", "scene": {"objects": [obj("red", "circle")]}},
    "b": {"pathology": "clean", "scene": {"objects": [obj("blue", "star")]}},
    "c": {"pathology": "misaligned", "scene": {"objects": [obj("red", "circle")]}},
    "d": {"pathology": "boilerplate", "scene": {"objects": [obj("green", "cross")]}},
}


def test_pathology_fractions_worked_by_hand():
    got = pathology_fractions(TRUTH, ["a", "c"])
    assert got["diag/pool_frac/clean"] == 0.5
    assert got["diag/pool_frac/misaligned"] == 0.25
    assert got["diag/selected_frac/clean"] == 0.5
    assert got["diag/selected_frac/boilerplate"] == 0.0
    assert got["diag/kept/clean"] == 0.5  # 1 of 2 clean samples kept
    assert got["diag/kept/misaligned"] == 1.0


def test_concept_coverage_counts_colour_shape_pairs():
    # pool has 3 pairs: (red, circle), (blue, star), (green, cross); a and c share one
    assert concept_coverage(TRUTH, ["a", "c"]) == pytest.approx(1 / 3)
    assert concept_coverage(TRUTH, ["a", "b", "d"]) == 1.0
