"""SynthWeb's reference model (selbench.reference): built once on a separate clean corpus,
cached, refused where it means nothing, and the default of the strategies whose papers
score with a pretrained model."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from e2e_helpers import TEST_REFERENCE_RECIPE, png_bytes, write_shard
from selbench_plugins.embedders import ReferenceEmbedder

from selbench import reference as ref
from selbench.cli import main
from selbench.errors import ConfigError
from selbench.pools import ShardPool, ensure_synthweb
from selbench.registry import get_registry
from selbench.train import build_model


@pytest.fixture
def own_reference_home(tmp_path, monkeypatch):
    """A data home whose reference folder is its own, not the session's shared one."""
    monkeypatch.setenv("SELBENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _recipe(tmp_path: Path, **corpus) -> Path:
    text = TEST_REFERENCE_RECIPE.read_text()
    for key, value in corpus.items():
        text = text.replace(f"  {key}: 0.0\n", f"  {key}: {value}\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_builds_once_on_the_clean_corpus_then_reuses_the_weights(own_reference_home):
    first = ref.build_reference()
    assert first.built and first.checkpoint.is_file()
    assert first.meta["corpus_size"] == 512 and first.meta["samples_seen"] == 1024
    assert first.checkpoint.is_relative_to(own_reference_home / "reference")
    second = ref.build_reference()
    assert not second.built
    assert (second.checkpoint, second.sha256) == (first.checkpoint, first.sha256)
    model, _, _ = build_model("selbench-tiny", 0)
    model.load_state_dict(torch.load(first.checkpoint, weights_only=True))


def test_an_interrupted_build_leaves_nothing_behind(own_reference_home, monkeypatch):
    import selbench.train

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(selbench.train, "train_clip", crash)
    with pytest.raises(KeyboardInterrupt):
        ref.build_reference()
    left = [p.name for p in (own_reference_home / "reference").iterdir()]
    assert all(name.endswith(".lock") for name in left), left


def test_a_noisy_or_missing_corpus_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="rate_misaligned=0.2"):
        ref.load_recipe(str(_recipe(tmp_path, rate_misaligned=0.2)))
    with pytest.raises(ConfigError, match="has no 'corpus'"):
        ref.load_recipe("scorer")
    with pytest.raises(ConfigError, match="unknown scale 'nope'"):
        ReferenceEmbedder("nope")


def _image_digests(root: Path) -> set[str]:
    digests = set()
    for shard in root.rglob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith((".png", ".jpg")):
                    data = tar.extractfile(member).read()
                    digests.add(hashlib.sha256(data).hexdigest())
    return digests


def test_the_corpus_shares_no_image_with_a_pool_or_its_evaluation_sets():
    recipe, corpus = ref.load_recipe()
    reference_images = _image_digests(ensure_synthweb(corpus.model_dump()))
    # a pool of the default seed, with its evaluation and target sets, at the test size
    pool = {**corpus.model_dump(), "seed": 0, "rate_misaligned": 0.2, "n_retrieval": 50}
    pool_images = _image_digests(ensure_synthweb(pool))
    assert len(reference_images) > 500 and len(pool_images) > 500
    assert not reference_images & pool_images


def _real_pool(tmp_path: Path, reference: str | None = None):
    write_shard(
        tmp_path / "shards" / "00000.tar",
        [(f"{i:09d}", png_bytes((40 * i, 0, 0)), f"photo {i}", {}) for i in range(6)],
    )
    pool = ShardPool(tmp_path / "shards", name="cc3m-mini")
    pool.reference = reference
    return pool.strategy_view()


def test_on_a_real_pool_reference_means_the_checkpoint_its_yaml_names(tmp_path):
    model, _, _ = build_model("selbench-tiny", 7)
    weights = tmp_path / "pretrained.pt"
    torch.save(model.state_dict(), weights)
    spec = f"open_clip:selbench-tiny:{weights}"
    view = _real_pool(tmp_path, reference=spec)
    assert view.kind == "shards" and view.reference == spec
    embedder = ReferenceEmbedder("")
    embedder.prepare(view, "cpu", None)
    assert embedder.details["resolved_to"] == spec
    assert embedder.weights_digest == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert embedder.embedder_id.startswith("reference:selbench-tiny:w")
    with pytest.raises(ConfigError, match="cannot be 'reference'"):
        ReferenceEmbedder("").prepare(_real_pool(tmp_path / "b", "reference"), "cpu", None)


def test_on_a_real_pool_without_one_it_falls_back_to_the_pool_scorer_and_says_so(tmp_path, caplog):
    view = _real_pool(tmp_path)
    embedder = ReferenceEmbedder("")
    with caplog.at_level("WARNING"):
        embedder.prepare(view, "cpu", None)
    assert "names no reference model" in caplog.text and "reference: open_clip:" in caplog.text
    assert embedder.details["resolved_to"] == "proxy:scorer"
    scorer = get_registry().make_embedder("proxy:scorer")
    scorer.prepare(view, "cpu", None)  # the cached scorer proxy: the same weights
    assert embedder.weights_digest == scorer.weights_digest


def test_strategies_whose_papers_use_a_pretrained_model_default_to_it():
    registry = get_registry()
    defaults = {
        "clip_score": ["embedder"],
        "semdedup": ["embedder"],
        "negcliploss": ["embedder"],
        "normsim": ["embedder"],
        "vas": ["embedder"],
        "tmars": ["embedder"],
        "knn_target": ["embedder"],
        "prototypes": ["embedder"],
        "nds": ["embedder"],
        "tldr": ["proxy", "match_embedder", "prototype_embedder"],
        "tldr-release": ["proxy", "match_embedder", "prototype_embedder"],
    }
    for method, fields in defaults.items():
        params = registry.get(method).cls.Params()
        assert {f: getattr(params, f) for f in fields} == dict.fromkeys(fields, "reference")
    # the in-pool proxies stay available, and strategies that train on the pool keep them
    assert registry.get("dfn").cls.Params().init_embedder == "proxy"
    assert {"proxy", "reference"} <= {info.name for info in registry.embedder_infos()}


def test_build_command_trains_then_reports_the_cached_model(own_reference_home):
    trained = CliRunner().invoke(main, ["reference", "build"])
    assert trained.exit_code == 0, trained.output
    assert "trained" in trained.output and "512 clean pairs" in trained.output
    cached = CliRunner().invoke(main, ["reference", "build"])
    assert cached.exit_code == 0 and "cached" in cached.output
    sha = next(line for line in trained.output.splitlines() if "sha256" in line)
    assert sha in cached.output
    bad = CliRunner().invoke(main, ["reference", "build", "--recipe", "scorer"])
    assert bad.exit_code == 1 and "has no 'corpus'" in bad.output
