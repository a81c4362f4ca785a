"""Pools as the real tools write them: img2dataset from a loopback HTTP server, DataComp-style
shards carrying uids, and the parallel, resumable index over them."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import math
import os
import shutil
import subprocess
import threading
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
from e2e_helpers import png_bytes, write_shard
from PIL import Image

from selbench.errors import PoolError
from selbench.export import read_datacomp_npy, write_datacomp_npy
from selbench.pools import ShardPool
from selbench.pools import shards as shards_module


def jpeg_bytes(colour, size=24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 (an OS-chosen port) serving ``tmp_path/www``; stopped
    when the test ends."""
    www = tmp_path / "www"
    www.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_QuietHandler, directory=str(www))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


REPO = Path(__file__).resolve().parents[1]


def img2dataset_command() -> str:
    """img2dataset's command line, from ``$SELBENCH_IMG2DATASET``, the environment that
    ``tests/tools/install-img2dataset.sh`` makes, or the PATH. It lives in an environment of
    its own because it pins pandas<3 (see the script)."""
    for candidate in (
        os.environ.get("SELBENCH_IMG2DATASET"),
        str(REPO / ".venv-img2dataset" / "bin" / "img2dataset"),
        shutil.which("img2dataset"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("img2dataset is not installed: run tests/tools/install-img2dataset.sh")


def download_with_img2dataset(tmp_path: Path, server: tuple[Path, str]) -> tuple[Path, list]:
    """img2dataset's command line run on a url list served by ``server``: ten images, an
    undecodable file and two dead links. Returns the output folder and the url rows."""
    command = img2dataset_command()
    www, base = server
    rows = []
    for i in range(10):
        (www / f"img{i}.jpg").write_bytes(jpeg_bytes((25 * i, 100, 200 - 10 * i)))
        uid = hashlib.md5(f"sample {i}".encode()).hexdigest()
        rows.append({"url": f"{base}/img{i}.jpg", "caption": f"picture number {i}", "uid": uid})
    (www / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    rows.append({"url": f"{base}/broken.jpg", "caption": "undecodable", "uid": "b" * 32})
    for name in ("gone1.jpg", "gone2.jpg"):  # dead links: 404 from the server
        rows.append({"url": f"{base}/{name}", "caption": "dead link", "uid": "d" * 31 + name[4]})
    urls = tmp_path / "urls.parquet"
    pd.DataFrame(rows).to_parquet(urls, index=False)

    out = tmp_path / "pool"
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"  # albumentations checks PyPI on import otherwise
    env["WANDB_MODE"] = "disabled"
    # img2dataset imports wandb, which makes temporary folders it never removes: keep them
    # in this test's own folder, not the session's temporary directory.
    (tmp_path / "tool-tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tool-tmp")
    # img2dataset's command line (python-fire): one --flag=value per keyword of download().
    flags = {
        "url_list": urls,
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "save_additional_columns": "[uid]",
        "output_format": "webdataset",
        "output_folder": out,
        "processes_count": 1,
        "thread_count": 4,
        "number_sample_per_shard": 6,
        "image_size": 24,
        "resize_mode": "no",
        "timeout": 5,
        "retries": 0,
        "enable_wandb": False,
    }
    argv = [command] + [f"--{k}={v}" for k, v in flags.items()]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out, rows


def test_pool_written_by_img2dataset_reads_as_written(tmp_path, loopback_server):
    out, rows = download_with_img2dataset(tmp_path, loopback_server)
    written = sorted(p.name for p in out.iterdir())
    assert "00000.tar" in written and "00000_stats.json" in written
    assert "00000.parquet" in written and "sizes.json" not in written

    pool = ShardPool(out)
    good = {r["uid"]: r["caption"] for r in rows[:10]}
    assert sorted(pool.uids) == sorted(good)  # DataComp uids from the json, not the keys
    assert dict(zip(pool.uids, pool.captions, strict=True)) == good
    records = pd.concat(pd.read_parquet(p) for p in sorted(out.glob("*.parquet")))
    failed = int((records["status"] != "success").sum())
    assert failed >= 2  # the dead links at least; img2dataset may also reject broken.jpg
    skipped = pool.scan_stats.skipped
    assert skipped["failed_download"] == failed
    assert pool.scan_stats.total + failed == len(rows)
    assert pool.scan_stats.total - pool.scan_stats.kept == skipped["unreadable_image"]
    # Every image reads back by its recorded offset.
    assert [uid for uid, _ in pool.iter_images()] == pool.uids
    # And the pool's uids export as a DataComp subset file.
    back = read_datacomp_npy(write_datacomp_npy(pool.uids, tmp_path / "subset.npy"))
    assert back == sorted(good)


def datacomp_uid(i: int) -> str:
    return hashlib.md5(f"commonpool {i}".encode()).hexdigest()


def write_datacomp_shard(root: Path, shard: int, ids: list[int], failed: int = 0) -> None:
    """A CommonPool-style shard: ``{shard:08d}.tar`` with keys ``{shard:08d}{n:04d}`` and
    the uid in the json, its parquet (uid, status) and its stats."""
    samples = [
        (
            f"{shard:08d}{n:04d}",
            png_bytes((i % 256, 40, 90)),
            f"caption {i}",
            {"uid": datacomp_uid(i), "key": f"{shard:08d}{n:04d}", "caption": f"caption {i}"},
        )
        for n, i in enumerate(ids)
    ]
    write_shard(root / f"{shard:08d}.tar", samples)
    statuses = ["success"] * len(ids) + ["failed_to_download"] * failed
    uids = [datacomp_uid(i) for i in ids] + [f"{n:032x}" for n in range(failed)]
    pd.DataFrame({"uid": uids, "status": statuses}).to_parquet(root / f"{shard:08d}.parquet")
    (root / f"{shard:08d}_stats.json").write_text(
        json.dumps({"count": len(ids) + failed, "successes": len(ids)})
    )


@pytest.fixture
def datacomp_pool_dir(tmp_path) -> Path:
    root = tmp_path / "commonpool"
    write_datacomp_shard(root, 0, list(range(0, 5)), failed=2)
    write_datacomp_shard(root, 1, list(range(5, 9)))
    write_datacomp_shard(root, 2, list(range(9, 14)), failed=1)
    return root


def test_datacomp_shards_give_their_json_uids_in_pool_order(datacomp_pool_dir):
    pool = ShardPool(datacomp_pool_dir)
    assert pool.uids == [datacomp_uid(i) for i in range(14)]
    assert pool.index["key"].tolist()[:2] == ["000000000000", "000000000001"]
    assert pool.scan_stats.skipped == {"failed_download": 3}
    assert pool.scan_stats.total == pool.scan_stats.kept == 14


def test_a_uid_seen_twice_keeps_its_first_sample(tmp_path):
    root = tmp_path / "dup"
    write_datacomp_shard(root, 0, [1, 2, 3])
    write_datacomp_shard(root, 1, [3, 4])
    pool = ShardPool(root)
    assert pool.uids == [datacomp_uid(i) for i in (1, 2, 3, 4)]
    assert pool.index["shard"].tolist() == [0, 0, 0, 1]
    assert pool.scan_stats.skipped == {"duplicate_uid": 1}


def test_shard_disagreeing_with_its_stats_is_an_error_naming_it(datacomp_pool_dir):
    stats = datacomp_pool_dir / "00000001_stats.json"
    stats.write_text(json.dumps({"count": 9, "successes": 9}))
    with pytest.raises(PoolError, match=r"00000001.tar holds 4 samples.*records 9 successes"):
        len(ShardPool(datacomp_pool_dir))


def test_parallel_index_equals_the_serial_one(datacomp_pool_dir, monkeypatch, tmp_path):
    serial = ShardPool(datacomp_pool_dir, workers=1).index
    monkeypatch.setenv("SELBENCH_HOME", str(tmp_path / "other-home"))  # no cached index
    parallel_pool = ShardPool(datacomp_pool_dir, workers=2)
    pd.testing.assert_frame_equal(parallel_pool.index, serial)
    assert parallel_pool.scan_stats.skipped == {"failed_download": 3}


def test_a_killed_scan_resumes_from_its_finished_shards(datacomp_pool_dir, monkeypatch):
    real_scan = shards_module.scan_shard
    scanned: list[str] = []

    def dies_on_the_last_shard(shard):
        if shard.name == "00000002.tar":
            raise KeyboardInterrupt  # the user's Ctrl-C, mid-scan
        scanned.append(shard.name)
        return real_scan(shard)

    monkeypatch.setattr(shards_module, "scan_shard", dies_on_the_last_shard)
    with pytest.raises(KeyboardInterrupt):
        len(ShardPool(datacomp_pool_dir, workers=1))
    assert scanned == ["00000000.tar", "00000001.tar"]

    scanned.clear()
    monkeypatch.setattr(
        shards_module, "scan_shard", lambda shard: (scanned.append(shard.name), real_scan(shard))[1]
    )
    pool = ShardPool(datacomp_pool_dir, workers=1)
    assert pool.uids == [datacomp_uid(i) for i in range(14)]
    assert scanned == ["00000002.tar"]  # only the shard the killed scan had not finished
    assert not pool._parts_dir().exists()  # partial files go once the index is written


def test_bad_worker_setting_is_a_clear_error(datacomp_pool_dir, monkeypatch):
    monkeypatch.setenv("SELBENCH_INDEX_WORKERS", "two")
    monkeypatch.setattr(shards_module, "PARALLEL_MIN_BYTES", 0)
    with pytest.raises(PoolError, match="SELBENCH_INDEX_WORKERS='two'"):
        len(ShardPool(datacomp_pool_dir))


@pytest.mark.parametrize(
    "name, variable, suite",
    [
        ("cc3m", "SELBENCH_CC3M_SHARDS", "seed"),
        ("cc12m", "SELBENCH_CC12M_SHARDS", "seed"),
        ("yfcc15m", "SELBENCH_YFCC15M_SHARDS", "seed"),
        ("laion400m-subset", "SELBENCH_LAION_SUBSET_SHARDS", "seed"),
        ("datacomp-small", "SELBENCH_DATACOMP_SMALL_SHARDS", "datacomp-38"),
        ("datacomp-medium", "SELBENCH_DATACOMP_MEDIUM_SHARDS", "datacomp-38"),
    ],
)
def test_bundled_real_pool_configs_resolve(name, variable, suite, datacomp_pool_dir, monkeypatch):
    from selbench.errors import ConfigError
    from selbench.evaluate import resolve_eval_suite
    from selbench.pools import resolve_pool

    monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ConfigError, match=rf"{name}.yaml: key 'path' uses \${{{variable}}}"):
        resolve_pool(name)
    monkeypatch.setenv(variable, str(datacomp_pool_dir))
    resolved = resolve_pool(name)
    assert resolved.kind == "shards" and resolved.pool.name == name
    assert resolved.eval_sets == resolve_eval_suite(suite, check=False)
    assert len(resolved.pool) == 14


def test_decodability_check_catches_cut_and_corrupt_images():
    from selbench.pools.shards import is_decodable

    photo = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(photo, format="JPEG", quality=90)
    jpeg = photo.getvalue()
    assert is_decodable(jpeg) and is_decodable(png_bytes())
    assert not is_decodable(jpeg[: len(jpeg) // 2])  # cut mid-scan: caught at 1/8 scale too
    noisy = io.BytesIO()
    Image.effect_noise((64, 48), 60).save(noisy, format="PNG")
    assert not is_decodable(noisy.getvalue()[: len(noisy.getvalue()) // 2])
    assert not is_decodable(b"\xff\xd8\xff\xe0 not a jpeg")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_clip_score_runs_end_to_end_on_an_img2dataset_pool_with_an_eval_suite(
    tmp_path, loopback_server, tiny_scale
):
    """Issue 18's acceptance: `selbench run --pool <YAML over img2dataset's output> --method
    clip_score --budget 0.25 --eval <a suite>`, every stage on the real tools' files: the pool
    from img2dataset, the suite's sets from CLIP_benchmark's exporter."""
    from clip_benchmark.webdataset_builder import convert_dataset, convert_retrieval_dataset
    from test_eval_suites import TinyClassification, TinyRetrieval, write_suite

    out, _ = download_with_img2dataset(tmp_path, loopback_server)
    sets = tmp_path / "evalsets"
    convert_dataset(
        TinyClassification(), "test", str(sets / "wds_colours"), image_format="png", max_count=4
    )
    convert_retrieval_dataset(
        TinyRetrieval(), "test", str(sets / "wds_squares"), image_format="png", max_count=4
    )
    suite = write_suite(tmp_path / "tiny-suite.yaml", sets)
    pool_yaml = tmp_path / "i2dpool.yaml"
    pool_yaml.write_text(f"name: i2dpool\nkind: shards\npath: {out}\n")
    argv = [
        "selbench", "run", "--pool", str(pool_yaml), "--method", "clip_score",
        "--budget", "0.25", "--eval", str(suite), "--scale", str(tiny_scale),
        "--experiment", "i2d",
        # The pool's 10 downloads and the suite's 12 images are all flat 32-px shapes, which
        # the perceptual hash and a proxy trained on 10 images cannot tell apart:
        # decontamination (on by default for a real pool) would flag every sample.
        # tests/test_decontaminate.py covers it; this test is about the tools' files.
        "--no-decontaminate",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "R@1 (mean of image->text and text->image)" in done.stdout

    import mlflow

    from selbench import tracking

    tracking.setup("i2d")
    run = mlflow.search_runs(experiment_names=["i2d"]).iloc[0]
    assert run["status"] == "FINISHED"
    assert run["params.method"] == "clip_score" and run["params.budget_count"] == "2"
    assert run["params.eval_suite"] == str(suite)
    for metric in ("squares/mean_R1", "squares/main", "colours/acc1", "mean_R1"):
        assert math.isfinite(run[f"metrics.{metric}"]), metric


def test_a_pool_without_evaluation_sets_needs_eval(datacomp_pool_dir, tmp_path):
    from click.testing import CliRunner

    from selbench.cli import main

    pool_yaml = tmp_path / "bare.yaml"
    pool_yaml.write_text(f"name: bare\nkind: shards\npath: {datacomp_pool_dir}\n")
    result = CliRunner().invoke(
        main, ["run", "--pool", str(pool_yaml), "--method", "random", "--budget", "0.5"]
    )
    assert result.exit_code != 0
    assert "has no evaluation sets: pass --eval SUITE" in result.output
