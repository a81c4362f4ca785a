"""``selbench methods``: one line per installed method at 80 columns, ``methods NAME`` with
every parameter and its default, ``--json`` for scripts, close matches for an unknown
name, and the shell completion of method names."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from selbench.cli import main
from selbench.registry import get_registry

#: `selbench methods`' section heading of each kind, as the listing starts it.
HEADINGS = {
    "strategy": "Offline strategies",
    "online": "Online strategies",
    "embedder": "Embedders",
    "recipe": "Recipes",
}


def _methods(*args: str, columns: int = 80):
    return CliRunner().invoke(main, ["methods", *args], env={"COLUMNS": str(columns)})


def _sections(output: str) -> dict[str, list[str]]:
    """The listing's item lines (indented) under each heading (not indented)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("  "):
            assert current is not None, line
            sections[current].append(line)
        else:
            current = line
            sections[current] = []
    return sections


def _names_under(sections: dict[str, list[str]], heading: str) -> list[str]:
    (key,) = [k for k in sections if k.startswith(heading)]
    return [line.split()[0] for line in sections[key]]


def test_listing_at_80_columns_is_one_line_per_installed_method():
    result = _methods()
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines and all(len(line) <= 80 for line in lines), max(lines, key=len)
    registry = get_registry()
    sections = _sections(result.output)
    strategies = _names_under(sections, HEADINGS["strategy"])
    assert strategies == registry.names()  # exactly one line each, in name order
    assert _names_under(sections, HEADINGS["online"]) == registry.online_names()
    embedders = [info.name for info in registry.embedder_infos()]
    assert _names_under(sections, HEADINGS["embedder"]) == embedders
    assert "recipe:d4" in _names_under(sections, HEADINGS["recipe"])
    # each line says what kind of strategy it is and what it does, cut to fit
    (clip_score,) = [line for line in lines if line.split()[:1] == ["clip_score"]]
    assert clip_score.split()[1] == "scorer" and "CLIP-score filtering" in clip_score
    (random,) = [line for line in lines if line.split()[:1] == ["random"]]
    assert random.split()[1] == "chooser"
    assert any(line.endswith("…") for line in lines)  # long summaries are truncated


def test_listing_follows_a_narrower_terminal():
    result = _methods(columns=50)
    assert result.exit_code == 0, result.output
    assert all(len(line) <= 50 for line in result.output.splitlines())
    assert _names_under(_sections(result.output), "Offline") == get_registry().names()


@pytest.mark.parametrize("kind", ["strategy", "online"])
def test_methods_name_shows_every_parameter_with_its_default(kind):
    registry = get_registry()
    infos = registry.infos() if kind == "strategy" else registry.online_infos()
    for info in infos:
        result = _methods(info.name)
        assert result.exit_code == 0, result.output
        assert all(len(line) <= 80 for line in result.output.splitlines()), info.name
        text = " ".join(result.output.split())  # descriptions wrap at 80 columns
        if info.cls.reference:
            assert "reference: " + " ".join(info.cls.reference.split()[:3]) in text
        for key, field in info.cls.Params.model_fields.items():
            assert f"{key} = {field.default!r}" in text, (info.name, key)
            if field.description:
                assert " ".join(field.description.split()[:4]) in text, (info.name, key)


def test_methods_name_for_an_embedder_and_a_recipe():
    proxy = _methods("proxy")
    assert proxy.exit_code == 0 and proxy.output.startswith("proxy: embedder")
    recipe = _methods("d4")  # `recipe:` may be left out
    assert recipe.exit_code == 0, recipe.output
    assert "pipeline: semdedup(keep=0.75) >> prototypes" in recipe.output
    assert _methods("recipe:d4").output == recipe.output
    assert _methods("online:jest").output == _methods("jest").output


def test_json_listing_and_details_round_trip_names_and_parameters():
    result = _methods("--json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert listing["version"] == 1 and listing["broken"] == []
    registry = get_registry()
    by_kind: dict[str, list[str]] = {}
    for method in listing["methods"]:
        assert set(method) == {"name", "kind", "traits", "summary", "package", "version"}
        by_kind.setdefault(method["kind"], []).append(method["name"])
    assert by_kind["strategy"] == registry.names()
    assert by_kind["online"] == registry.online_names()
    for info in registry.infos() + registry.online_infos():
        detail = json.loads(_methods(info.name, "--json").output)
        assert (detail["name"], detail["package"]) == (info.name, info.package)
        assert detail["reference"] == info.cls.reference
        params = info.cls.Params()
        dumped = params.model_dump(mode="json")
        # a Params model may leave a default out of its dumps (tldr's refine_captioner,
        # so that earlier runs keep their cell key); methods NAME still lists it
        defaults = {k: dumped.get(k, getattr(params, k)) for k in type(params).model_fields}
        assert [p["name"] for p in detail["params"]] == list(defaults)
        assert {p["name"]: p["default"] for p in detail["params"]} == defaults
        # the parameters as -p KEY=VALUE would give them back parse to the defaults
        assert info.cls.Params(**{p["name"]: p["default"] for p in detail["params"]}) == (
            info.cls.Params()
        )


def test_unknown_name_lists_close_matches_and_exits_2():
    result = _methods("clipscore")
    assert result.exit_code == 2
    assert "unknown method 'clipscore'" in result.output and "clip_score" in result.output
    far = _methods("zzzz-nothing")
    assert far.exit_code == 2 and "did you mean" not in far.output


def _complete(words: str) -> list[str]:
    env = {
        "_SELBENCH_COMPLETE": "bash_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
    }
    result = CliRunner().invoke(main, [], prog_name="selbench", env=env)
    assert result.exit_code == 0, result.output
    return [line.split(",", 1)[1] for line in result.output.splitlines()]


def test_shell_completion_of_method_names():
    assert _complete("selbench methods cl") == ["clip_score"]
    assert set(get_registry().names()) <= set(_complete("selbench methods "))
    assert _complete("selbench run --method tldr") == ["tldr", "tldr-release"]
    assert _complete("selbench run --method recipe:d") == [
        "recipe:d4",
        "recipe:datacomp-basic",
        "recipe:datacomp-image-clip",
    ]
    assert _complete("selbench run --online j") == ["jest"]
    assert _complete("selbench sweep --methods random,clip") == ["random,clip_score"]
