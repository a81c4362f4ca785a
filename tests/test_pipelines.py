"""Pipelines (docs/pipelines.md): the grammar, what each operator selects, views, the trace."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import BaseModel, ConfigDict, Field

import selbench
from selbench.embedders import Embedder, EmbeddingService
from selbench.errors import ConfigError, PluginError, SelbenchError
from selbench.registry import Registry, make_plugin_manager
from selbench.run import fusion
from selbench.run.pipeline import PipelineStrategy, run_strategy
from selbench.run.plan import derive_seed, resolve_method
from selbench.run.spec import MethodSpecError, RunRequest, cell_key, parse_method
from selbench.run.views import SubsetView, ViewServices, whole_view
from selbench.strategy import Selection, SelectionContext, Strategy
from selbench.testing import (
    FixedEmbeddings,
    MemoryPool,
    RecordingServices,
    make_memory_pool,
    parametrize_with_checks,
)
from selbench.toolbox import top_k

N = 40
RNG = np.random.default_rng(7)
# Known scores over a pool of N samples (uids s00000...), no ties.
SCORES = {name: RNG.permutation(N).astype(float) for name in ("a", "b", "c")}


class KnownParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    column: str = Field(default="a", description="which known score column (test only)")


class Known(Strategy):
    """A scorer whose scores the test knows: SCORES[column] at each sample's pool index."""

    name = "known"
    stochastic = False
    Params = KnownParams

    def score(self, ctx: SelectionContext) -> np.ndarray:
        return SCORES[self.params.column][[int(u[1:]) for u in ctx.pool.uids]]

    def select(self, ctx: SelectionContext) -> Selection:
        chosen = top_k(self.score(ctx), ctx.budget_count)
        return Selection(uids=[ctx.pool.uids[i] for i in chosen])


class FirstOnes(Strategy):
    """A chooser: the first ``budget_count`` samples of its view."""

    name = "first_ones"
    stochastic = False

    def select(self, ctx: SelectionContext) -> Selection:
        return Selection(uids=list(ctx.pool.uids[: ctx.budget_count]))


@pytest.fixture
def registry(monkeypatch):
    module = types.ModuleType("pipeline_test_plugin")

    @selbench.hookimpl
    def register_strategies(register):
        register(Known)
        register(FirstOnes)

    module.register_strategies = register_strategies
    found = Registry(make_plugin_manager())
    found.add_plugin(module, package="pipeline-test", version="0")
    monkeypatch.setattr("selbench.run.plan.get_registry", lambda: found)
    return found


def pool_of(n: int = N) -> MemoryPool:
    return make_memory_pool(n, seed=3)


def select(expression: str, count: int, tmp_path, pool=None, services=None, seed: int = 0):
    pool = pool or pool_of()
    services = services or RecordingServices(pool)
    method = resolve_method(expression)
    ctx = SelectionContext(
        pool=pool,
        budget_count=count,
        budget_fraction=count / len(pool),
        seed=seed,
        device="cpu",
        work_dir=tmp_path,
        services=services,
        strategy=method.info.name,
        needs=method.needs,
        truth=getattr(services, "ground_truth", None),
    )
    return run_strategy(method.info, method.params, ctx)


def indices(selection: Selection) -> set[int]:
    return {int(u[1:]) for u in selection.uids}


def percentile(scores: np.ndarray) -> np.ndarray:
    """Rank fraction by a plain sort (no ties in SCORES): 1 for the best."""
    order = np.argsort(-scores, kind="stable")
    out = np.empty(len(scores))
    out[order] = (len(scores) - np.arange(len(scores))) / len(scores)
    return out


def top_set(scores: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-scores, kind="stable")[:k].tolist())


# -- the grammar ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "written, canonical",
    [
        ("semdedup(keep=0.8)>>clip_score", "semdedup(keep=0.8) >> clip_score"),
        ("a&b|c", "a & b | c"),
        ("(a|b)&c", "(a | b) & c"),
        ("a >> (b >> c)", "a >> b >> c"),
        (
            "fuse( a(x=1 ,y=2),b , weights=[2,1],how=zscore)",
            "fuse(a(x=1,y=2), b, how=zscore, weights=[2,1])",
        ),
        ("tldr(refine=false, clusters=1)", "tldr(clusters=1,refine=false)"),
    ],
)
def test_an_expression_has_one_canonical_spelling(written, canonical):
    assert parse_method(written).format() == canonical
    assert parse_method(canonical) == parse_method(written)


@pytest.mark.parametrize(
    "text, position, problem",
    [
        ("a >> & b", 5, "expected a method name"),
        ("a & b)", 5, "unexpected ')'"),
        ("(a & b", 0, "unclosed '('"),
        ("fuse(a)", 4, "at least two steps"),
        ("a >> b(k=1", 6, "unclosed '('"),
        ("fuse(a, how=rank, b(x", 4, "unclosed '('"),
    ],
)
def test_a_malformed_expression_points_at_the_position(text, position, problem):
    with pytest.raises(MethodSpecError) as caught:
        parse_method(text)
    assert caught.value.position == position
    assert problem in str(caught.value) and text in str(caught.value)


def test_the_label_leaves_out_defaults_and_the_cell_key_ignores_spelling(registry):
    one = resolve_method("known(column=a,keep=0.5)>>fuse(known(column=b),known(column=c),how=rank)")
    two = resolve_method("known(keep=0.5) >> fuse(known(column=b), known(column=c))")
    assert one.label == two.label == "known(keep=0.5) >> fuse(known(column=b), known(column=c))"
    keys = {cell_key(RunRequest(method=m.method, budget=0.25), m.params) for m in (one, two)}
    assert len(keys) == 1
    other = resolve_method("known(keep=0.6) >> fuse(known(column=b), known(column=c))")
    assert cell_key(RunRequest(method=other.method, budget=0.25), other.params) not in keys


def test_a_single_method_resolves_as_it_always_has(registry):
    resolved = resolve_method("known(column=b)")
    assert (resolved.method, resolved.given, resolved.label) == (
        "known",
        {"column": "b"},
        "known(column=b)",
    )
    assert resolved.info.name == "known"
    with pytest.raises(ConfigError, match="given both"):
        resolve_method("known(column=b)", {"column": "c"})


@pytest.mark.parametrize(
    "expression, message",
    [
        ("fuse(random, known)", "'random' does not score every sample"),
        ("known & first_ones", "'first_ones' does not score every sample"),
        ("(known(keep=0.5) >> known) & known", "is a chain"),
        ("known(keep=0.5) >> known(keep=0.5)", "the last step"),
        ("known >> first_ones", "needs keep=FRACTION"),
        ("known(keep=1.5) >> first_ones", "must be a fraction"),
        ("fuse(known, known(column=b), how=best)", "choose one of rank, zscore, fit"),
        ("fuse(known, known(column=b), weights=[1])", "1 weights for 2 steps"),
        ("fuse(known, known(column=b), how=fit, weights=[1,2])", "learns the weights"),
        ("recipe:nope", "unknown recipe 'nope'"),
        ("known(keep=0.5) >> nope", "nope"),
    ],
)
def test_a_pipeline_that_cannot_run_is_refused_before_any_work(registry, expression, message):
    with pytest.raises(SelbenchError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolve_method(expression)


def test_params_given_beside_a_pipeline_are_refused(registry):
    with pytest.raises(ConfigError, match="inside a pipeline"):
        resolve_method("known(keep=0.5) >> known", {"column": "b"})


# -- what each operator selects -------------------------------------------------------
def test_a_chain_selects_what_its_steps_select_by_hand(tmp_path):
    pool = pool_of()
    services = RecordingServices(pool)
    chained = select(
        "clip_score(embedder=proxy,keep=0.5) >> random", 8, tmp_path / "p", pool, services
    )

    # By hand: clip_score keeps half of the pool, random chooses 8 of those with step 2's seed.
    ctx = SelectionContext(pool, 20, 0.5, derive_seed(0, "1"), "cpu", tmp_path)
    ctx.services = services
    from selbench_plugins.clip_score import ClipScore
    from selbench_plugins.random_strategy import RandomStrategy

    first = ClipScore({"embedder": "proxy"}).select(ctx)
    rows = np.array(sorted(pool.uids.index(u) for u in first.uids))
    view = SubsetView(pool, rows)
    ctx2 = SelectionContext(view, 8, 8 / 20, derive_seed(0, "2"), "cpu", tmp_path)
    second = RandomStrategy().select(ctx2)
    assert set(chained.uids) == set(second.uids)
    dropped = chained.dropped or {}
    assert set(dropped) == set(pool.uids) - set(chained.uids)
    assert {v for u, v in dropped.items() if u not in first.uids} == {
        "1: clip_score(embedder=proxy,keep=0.5)"
    }
    assert set(dropped.values()) == {"1: clip_score(embedder=proxy,keep=0.5)", "2: random"}


@pytest.mark.parametrize("count", [3, 15])
def test_and_is_the_intersection_of_top_fractions_filled_in_score_order(registry, tmp_path, count):
    chosen = indices(select("known(column=a,keep=0.4) & known(column=b,keep=0.5)", count, tmp_path))
    both = top_set(SCORES["a"], 16) & top_set(SCORES["b"], 20)
    worst = np.minimum(percentile(SCORES["a"]), percentile(SCORES["b"]))
    if count <= len(both):
        assert chosen <= both
        expected = sorted(both, key=lambda i: -worst[i])[:count]
    else:
        assert chosen >= both
        rest = sorted(set(range(N)) - both, key=lambda i: -worst[i])
        expected = sorted(both) + rest[: count - len(both)]
    assert chosen == set(expected)


@pytest.mark.parametrize("count", [10, 35])
def test_or_is_the_union_of_top_fractions_filled_in_score_order(registry, tmp_path, count):
    chosen = indices(select("known(column=a,keep=0.2) | known(column=b,keep=0.3)", count, tmp_path))
    either = top_set(SCORES["a"], 8) | top_set(SCORES["b"], 12)
    best = np.maximum(percentile(SCORES["a"]), percentile(SCORES["b"]))
    if count <= len(either):
        assert chosen == set(sorted(either, key=lambda i: -best[i])[:count])
    else:
        assert chosen >= either
        rest = sorted(set(range(N)) - either, key=lambda i: -best[i])
        assert chosen == either | set(rest[: count - len(either)])


def test_fuse_by_rank_and_by_zscore_follow_their_formulas(registry, tmp_path):
    by_rank = indices(select("fuse(known(column=a), known(column=b), weights=[3,1])", 10, tmp_path))
    fused = (3 * percentile(SCORES["a"]) + percentile(SCORES["b"])) / 4
    assert by_rank == top_set(fused, 10)

    by_z = indices(select("fuse(known(column=a), known(column=c), how=zscore)", 10, tmp_path))
    z = [(SCORES[k] - SCORES[k].mean()) / SCORES[k].std() for k in ("a", "c")]
    assert by_z == top_set(z[0] + z[1], 10)


def test_the_label_model_learns_which_voters_agree_with_the_truth():
    rng = np.random.default_rng(0)
    truth = rng.random(4000) < 0.3
    accuracies = (0.95, 0.85, 0.55)
    votes = np.stack([np.where(rng.random(4000) < a, truth, ~truth) for a in accuracies], axis=1)
    model = fusion.fit_label_model(votes)
    assert np.allclose(model.accuracy, accuracies, atol=0.04)
    assert model.weights[0] > model.weights[1] > model.weights[2]
    assert abs(model.prior - 0.3) < 0.04


def test_fuse_fit_reports_its_learned_weights(registry, tmp_path):
    chosen = select(
        "fuse(known(column=a), known(column=b), known(column=c), how=fit)", 10, tmp_path
    )
    metrics = chosen.metrics or {}
    weights = [metrics[f"step1/1.{i}/fit_weight"] for i in (1, 2, 3)]
    assert all(np.isfinite(weights))
    assert len(chosen.uids) == 10


@pytest.mark.parametrize(
    "expression",
    [
        "known(column=a,keep=0.5) >> known(column=b)",
        "known(column=a) & known(column=b)",
        "known(column=a) | known(column=b)",
        "fuse(known(column=a), known(column=b))",
        "fuse(known(column=a), known(column=b), how=zscore)",
        "fuse(known(column=a), known(column=b), known(column=c), how=fit)",
        "(known(column=a,keep=0.6) & known(column=b,keep=0.6))"
        " >> fuse(known(column=a), known(column=c))",
        "fuse(known(column=a), known(column=b), keep=0.7) >> first_ones",
    ],
)
@pytest.mark.parametrize("count", [1, 7, 13])
def test_the_budget_is_exact_for_every_operator(registry, tmp_path, expression, count):
    chosen = select(expression, count, tmp_path)
    assert len(chosen.uids) == len(set(chosen.uids)) == count


def test_too_few_survivors_for_the_budget_is_a_clear_error(registry, tmp_path):
    with pytest.raises(ConfigError, match="fewer than the budget"):
        select("known(keep=0.25) >> known(column=b)", 20, tmp_path)


def test_a_plugin_failing_inside_a_pipeline_is_named(registry, tmp_path, monkeypatch):
    monkeypatch.setitem(SCORES, "a", np.full(N, np.nan))
    with pytest.raises(PluginError, match="'known' returned .* non-finite scores"):
        select("known(column=a) & known(column=b)", 5, tmp_path)


def test_each_step_gets_its_own_seed_derived_from_the_runs(tmp_path):
    pool = pool_of()
    first = select("random(keep=0.5) >> random", 5, tmp_path / "a", pool, seed=1)
    again = select("random(keep=0.5) >> random", 5, tmp_path / "b", pool, seed=1)
    other = select("random(keep=0.5) >> random", 5, tmp_path / "c", pool, seed=2)
    assert first.uids == again.uids and first.uids != other.uids
    assert derive_seed(1, "1") != derive_seed(1, "2")


# -- views, the cache, the trace ---------------------------------------------------------
def test_a_view_serves_the_whole_pools_embedding_rows(tmp_path):
    pool = pool_of(10)
    image = np.eye(10, dtype=np.float16)
    services = FixedEmbeddings(pool, image, image)
    view = whole_view(pool).subset(np.array([1, 4, 7]))
    got = ViewServices(services, view).embeddings("proxy")
    assert list(got.uids) == ["s00001", "s00004", "s00007"]
    assert np.array_equal(got.image, image[[1, 4, 7]])
    assert view.fingerprint != pool.fingerprint
    assert whole_view(pool).fingerprint == pool.fingerprint
    assert [u for u, _ in view.iter_images()] == ["s00001", "s00004", "s00007"]


class CountingEmbedder(Embedder):
    """Serves fixed features as a pool's precomputed ones, counting the rows it produces."""

    name = "counting"
    produced = 0

    @property
    def architecture(self) -> str:
        return "counting"

    def prepare(self, pool, device, progress) -> None:
        self.weights_digest = "0123456789abcdef"

    def precomputed_batches(self, pool, start, batch):
        for first in range(start, len(pool), batch):
            rows = np.arange(first, min(first + batch, len(pool)))
            CountingEmbedder.produced += len(rows)
            image = np.stack([np.cos(rows + k) for k in range(8)], axis=1).astype(np.float32)
            text = np.stack([np.sin(rows * (k + 1) + 1.0) for k in range(8)], axis=1).astype(
                np.float32
            )
            yield (
                image / np.linalg.norm(image, axis=1, keepdims=True),
                text / np.linalg.norm(text, axis=1, keepdims=True),
            )


def test_a_chain_embeds_the_pool_once_and_the_cache_serves_every_step(tmp_path):
    pool = pool_of()
    CountingEmbedder.produced = 0

    def service() -> EmbeddingService:
        return EmbeddingService(pool, "cpu", lambda spec: CountingEmbedder(), chunk_size=16)

    first = service()
    expression = (
        "clip_score(embedder=counting,keep=0.6) >> semdedup(embedder=counting,keep=0.7)"
        " >> clip_score(embedder=counting)"
    )
    chosen = select(expression, 10, tmp_path / "a", pool, first)
    assert CountingEmbedder.produced == N  # one pass over the pool for three steps
    assert list(first.usage) == ["counting"] and not first.usage["counting"]["hit"]
    again = select(expression, 10, tmp_path / "b", pool, service())
    assert CountingEmbedder.produced == N  # the next run: a cache hit, nothing embedded
    assert again.uids == chosen.uids


def test_the_trace_counts_each_step_and_records_the_pathology_mix(tmp_path):
    pool = pool_of()
    chosen = select(
        "clip_score(embedder=proxy,keep=0.5) >> random(keep=0.5) >> random", 4, tmp_path, pool
    )
    metrics = chosen.metrics or {}
    assert [metrics[f"pipeline/{i}/in"] for i in (1, 2, 3)] == [40, 20, 10]
    assert [metrics[f"pipeline/{i}/out"] for i in (1, 2, 3)] == [20, 10, 4]
    assert 0 <= metrics["pipeline/1/mix/clean"] <= 1
    assert metrics["pipeline/3/mix/clean"] + metrics["pipeline/3/mix/misaligned"] == pytest.approx(
        1
    )
    names = {p.name for p in chosen.artifacts or []}
    assert names == {"pipeline_trace.json", "pipeline_funnel.png"}
    assert (tmp_path / "pipeline_funnel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_selection_parquet_records_the_step_that_dropped_each_uid(tmp_path):
    from selbench.run.selection_io import only_selected, selection_frame

    pool = pool_of()
    chosen = select("clip_score(embedder=proxy,keep=0.5) >> random", 5, tmp_path, pool)
    resolved = types.SimpleNamespace(pool=pool)
    frame = selection_frame(resolved, chosen)
    assert len(frame) == N and frame["selected"].sum() == 5
    assert frame["uid"].tolist()[:5] == chosen.uids
    assert frame.loc[~frame["selected"], "dropped_by"].value_counts().to_dict() == {
        "1: clip_score(embedder=proxy,keep=0.5)": 20,
        "2: random": 15,
    }
    assert pd.isna(frame.loc[frame["selected"], "dropped_by"]).all()
    assert only_selected(frame)["uid"].tolist() == chosen.uids


def test_the_pipeline_strategy_is_stochastic_when_a_step_is(registry):
    assert not PipelineStrategy({"expression": "known & known(column=b)"}).is_stochastic()
    assert PipelineStrategy({"expression": "known(keep=0.5) >> random"}).is_stochastic()


# -- from the command line -----------------------------------------------------------------
def test_a_pipeline_runs_from_the_command_line_with_its_trace(tiny, tmp_path):
    from click.testing import CliRunner
    from e2e_helpers import logged_runs
    from mlflow.tracking import MlflowClient

    from selbench.cli import main
    from selbench.sweep import plan

    pool, scale = tiny
    written = "random(keep=0.5)>>random"
    args = ["run", "--method", written, "--budget", "0.25", "--pool", str(pool)]
    result = CliRunner().invoke(main, [*args, "--scale", str(scale), "--stage", "select"])
    assert result.exit_code == 0, result.output
    (run,) = logged_runs("selbench")
    assert run.data.tags["selbench.label"] == "random(keep=0.5) >> random"
    assert run.data.metrics["strategy/pipeline/1/in"] == 320
    assert run.data.metrics["strategy/pipeline/1/out"] == 160
    assert run.data.metrics["strategy/pipeline/2/out"] == 80
    assert 0 < run.data.metrics["strategy/pipeline/2/mix/clean"] < 1
    logged = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "strategy")}
    assert logged == {"strategy/pipeline_trace.json", "strategy/pipeline_funnel.png"}
    frame = pd.read_parquet(next(Path(run.data.tags["selbench.run_dir"]).glob("selection.parquet")))
    assert frame["selected"].sum() == 80 and len(frame) == 320
    assert frame["dropped_by"].value_counts().to_dict() == {
        "1: random(keep=0.5)": 160,
        "2: random": 80,
    }
    # A sweep spelling the pipeline differently finds the same cell.
    (cell,) = plan(
        [" random( keep=0.5 ) >>random"],
        [0.25],
        [0],
        pool=str(pool),
        scale=str(scale),
        full_pool=False,
    )
    assert cell.key == run.data.tags["selbench.cell_key"]
    out = tmp_path / "export"
    result = CliRunner().invoke(
        main, ["export", run.info.run_id, "--format", "parquet", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(out / f"{run.info.run_id}.parquet")) == 80


# -- the conformance kit ------------------------------------------------------------------
@parametrize_with_checks(
    [
        "semdedup(embedder=proxy,keep=0.8) >> clip_score(embedder=proxy)",
        "prototypes(embedder=proxy,keep=0.7) >> random",
    ],
    budgets=(0.1, 0.25, 0.5),
)
def test_a_chain_of_built_ins_passes_the_conformance_kit(strategy, check):
    check(strategy)


@parametrize_with_checks(
    [
        "clip_score(embedder=proxy,keep=0.5) & negcliploss(embedder=proxy)",
        "fuse(clip_score(embedder=proxy), prototypes(embedder=proxy), how=fit)",
    ]
)
def test_operators_over_built_ins_pass_the_conformance_kit(strategy, check):
    check(strategy)


def test_the_leaderboard_shows_a_pipeline_as_its_label():
    from selbench import leaderboard as lb

    labels = ["semdedup(keep=0.75) >> prototypes", "fuse(clip_score, normsim)", "random"]
    rows = [
        {
            "run_id": f"{label}-{seed}",
            "params.pool": "synthweb",
            "params.pool_fingerprint": "abc",
            "params.scale": "tiny",
            "params.protocol": "fixed-compute",
            "params.method_label": label,
            "params.budget": "0.25",
            "params.seed": str(seed),
            "params.param.expression": label if "(" in label else None,
            "metrics.mean_R1": 0.1 + 0.01 * seed + 0.05 * i,
            "metrics.zeroshot_acc1": 0.3,
        }
        for i, label in enumerate(labels)
        for seed in range(3)
    ]
    runs = lb.split_mixed_parameters(pd.DataFrame(rows))
    table = lb.summarise(runs).table
    assert set(table["method"]) == set(labels)
    assert (table["seeds"] == 3).all()
