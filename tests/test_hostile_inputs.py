"""Hostile pool data: every case of docs/reliability.md's table, through every stage.

Each case is scanned by the pool reader; a kept sample is then decoded by all three
decoders (PIL as the trainer does, OpenCV as the embedding pass does, and the decoding
helper processes) and must give the same pixels. The slow test runs one pool holding
every case through an embedding pass, training and evaluation.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from hostile_cases import CASES, ESCAPE_ABSOLUTE, ESCAPE_RELATIVE, Case, build_pool, write_tar

from selbench import tracking
from selbench.decoding import DecodeHelpers, decode, decode_image_bytes
from selbench.errors import PoolError
from selbench.pools import ShardPool

ROOT = Path(__file__).resolve().parent.parent
TABLE_HEADING = "## Hostile pool data"


@pytest.fixture(scope="module")
def helpers():
    started = DecodeHelpers(1)
    yield started
    started.close()


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def _escaped(pool_dir: Path) -> list[Path]:
    targets = [pool_dir / ESCAPE_RELATIVE, pool_dir.parent / ESCAPE_ABSOLUTE]
    return [t for t in targets if t.exists()]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_input(case: Case, tmp_path, helpers):
    pool_dir = build_pool(tmp_path / "work", case)
    before = _files(tmp_path)
    if case.outcome == "error":
        shard = pool_dir / "00000.tar"
        with pytest.raises(PoolError, match=re.escape(str(shard))):
            len(ShardPool(pool_dir))
    else:
        pool = ShardPool(pool_dir)
        index = pool.index
        skipped = dict(pool.scan_stats.skipped)
        if case.outcome == "kept":
            assert skipped == {}
            assert index["key"].tolist() == ["k0", "k1", "hostile"]
            row = index.iloc[2].to_dict()
            ((uid, data, ext),) = pool.iter_image_bytes([row["uid"]])
            by_pil = np.asarray(decode_image_bytes(data))  # trainer, evaluator
            by_opencv = np.asarray(decode(data, ext))  # embedding pass in this process
            helpers.submit([(data, ext)])
            (by_helper,) = (np.array(a) for a in helpers.collect())  # embedding helpers
            assert by_pil.dtype == np.uint8 and by_pil.ndim == 3 and by_pil.shape[2] == 3
            assert np.array_equal(by_pil, by_opencv)
            assert np.array_equal(by_pil, by_helper)
            if case.check is not None:
                case.check({**row, "pixels": by_pil})
        else:
            assert skipped == {case.outcome: 1}
            assert index["key"].tolist().count("hostile") == (1 if case.second_shard else 0)
            assert index["key"].tolist()[:2] == ["k0", "k1"]
    assert _files(tmp_path) == before  # the scan wrote nothing beside the pool
    assert _escaped(pool_dir) == []


@pytest.mark.parametrize("helpers_count", [0, 1], ids=["in-process", "helper-process"])
def test_an_image_the_embedding_pass_cannot_decode_is_an_error_naming_shard_and_member(
    tmp_path, monkeypatch, helpers_count
):
    """An image that decoded in the scan but not in the embedding pass (changed since,
    or a decoder that disagrees) stops the pass with an error naming where it lives."""
    import selbench.decoding
    import selbench.embedders
    from selbench.embedders import pool_batches
    from selbench.train import build_model

    pool_dir = build_pool(tmp_path, next(c for c in CASES if c.id == "image_1x1"))
    pool = ShardPool(pool_dir)
    hostile = pool.index["uid"].tolist()[2]

    def refuse_1x1(data, ext):
        if decode_image_bytes(data).size == (1, 1):
            raise ValueError("refused by the test")
        return decode(data, ext)

    monkeypatch.setattr(selbench.embedders, "decode", refuse_1x1)
    monkeypatch.setattr(selbench.decoding, "decode", refuse_1x1)  # not seen by helpers
    if helpers_count:  # a helper process decodes unpatched: corrupt the bytes it is handed
        real = ShardPool.iter_image_bytes

        def corrupt(self, uids=None, start=0):
            for uid, data, ext in real(self, uids, start):
                yield uid, (b"\x89PNG broken" if uid == hostile else data), ext

        monkeypatch.setattr(ShardPool, "iter_image_bytes", corrupt)
    _, preprocess, _ = build_model("selbench-tiny", seed=0)
    with pytest.raises(PoolError) as raised:
        list(pool_batches(pool.strategy_view(), preprocess, helpers=helpers_count))
    message = str(raised.value)
    assert f"member hostile.png of shard {pool_dir / '00000.tar'}" in message
    assert repr(hostile) in message


def _table() -> dict[str, str]:
    """``{case id: outcome cell}`` from the table under :data:`TABLE_HEADING`."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    section = text.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        found = re.match(r"\|\s*`([a-z0-9_]+)`\s*\|(.*)\|\s*$", line)
        if found:
            rows[found.group(1)] = found.group(2).split("|")[-1]
    return rows


def test_the_reliability_table_and_the_cases_list_the_same_rows_and_outcomes():
    rows = _table()
    assert list(rows) == [case.id for case in CASES]
    for case in CASES:
        cell = rows[case.id]
        if case.outcome in ("kept", "error"):
            assert cell.strip().lower().startswith(case.outcome), (case.id, cell)
        else:
            assert cell.strip().startswith(f"skipped, `{case.outcome}`"), (case.id, cell)


# -- every case at once, through embedding, training and evaluation -----------------------
def _renamed(members, key):
    from hostile_cases import Member

    return [
        Member(m.name.replace("hostile", key), m.data, m.link, m.target.replace("hostile", key))
        for m in members
    ]


def _hostile_pool(root: Path, tiny: Path) -> tuple[Path, Counter, list[str]]:
    """A pool config: the tiny SynthWeb shards plus one shard of every member-level case."""
    shards = root / "shards"
    shards.mkdir(parents=True)
    for path in (tiny / "pool").iterdir():
        shutil.copy(path, shards / path.name)
    members, expected, kept_keys = [], Counter(), []
    for i, case in enumerate(c for c in CASES if c.shard is None):
        key = f"hostile{i:02d}"
        members += _renamed(case.members(shards), key)
        if case.second_shard:
            write_tar(shards / "00091.tar", _renamed(case.second_shard, key))
        if case.outcome == "kept" or case.second_shard:
            kept_keys.append(key)
        if case.outcome != "kept":
            expected[case.outcome] += 1
    write_tar(shards / "00090.tar", members)
    manifest = json.loads((tiny / "manifest.json").read_text())
    evals = [
        {
            "name": name,
            "task": (tiny / rel / "dataset_type.txt").read_text().strip(),
            "path": str(tiny / rel),
        }
        for name, rel in manifest["eval_sets"].items()
    ]
    config = root / "hostile.yaml"
    config.write_text(
        yaml.safe_dump({"name": "hostile", "kind": "shards", "path": str(shards), "eval": evals})
    )
    return config, expected, kept_keys


@pytest.mark.slow
def test_a_pool_of_every_case_embeds_trains_and_evaluates(tiny_pool, tiny_scale, tmp_path):
    from selbench.run.lifecycle import execute
    from selbench.run.spec import RunRequest
    from selbench.train import build_model

    scale = tiny_scale
    model, _, _ = build_model("selbench-tiny", seed=7)
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    config, expected, kept_keys = _hostile_pool(tmp_path / "hostile", tiny_pool)
    before = _files(tmp_path)

    request = RunRequest(
        method="clip_score",
        budget=1.0,
        pool=str(config),
        scale=str(scale),
        params={"embedder": f"open_clip:selbench-tiny:{weights}"},
    )
    outcome = execute(request)

    assert _files(tmp_path) == before  # the run wrote only under its home
    tracking.setup()
    found = mlflow.MlflowClient().get_run(outcome.run_id)
    assert found.info.status == "FINISHED"
    assert Counter(json.loads(found.data.params["pool_skipped"])) == expected
    pool = ShardPool(config.parent / "shards")
    keys = dict(zip(pool.index["uid"], pool.index["key"], strict=True))
    selected = {keys[uid] for uid in outcome.selection.uids}
    assert set(kept_keys) <= selected  # every kept hostile sample was embedded and trained on
    assert outcome.metrics["samples_seen"] > 0 and 0.0 <= outcome.metrics["mean_R1"] <= 1.0
