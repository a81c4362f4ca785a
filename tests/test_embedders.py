"""Embedders, the embedding service and the `selbench embed` command."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from selbench.cache import EmbeddingCache
from selbench.embedders import EmbeddingService, _prefetch, preprocess_batch
from selbench.errors import ConfigError
from selbench.pools import resolve_pool
from selbench.registry import get_registry
from selbench.run.spec import usage_key
from selbench.train import build_model


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """open_clip weights made by the test itself: a seeded selbench-tiny state dict."""
    model, _, _ = build_model("selbench-tiny", seed=123)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def test_batched_preprocessing_equals_open_clips_per_image_pipeline():
    _, preprocess, _ = build_model("selbench-tiny", seed=0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    fast = preprocess_batch(images, preprocess)
    slow = torch.stack([preprocess(im) for im in images])
    assert torch.allclose(fast, slow, atol=1e-6)
    arrays = [np.asarray(im) for im in images]  # decoded straight to arrays (OpenCV path)
    assert torch.allclose(preprocess_batch(arrays, preprocess), slow, atol=1e-6)
    mixed = images[:2] + [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))]
    assert torch.allclose(
        preprocess_batch(mixed, preprocess), torch.stack([preprocess(im) for im in mixed])
    )


def _service(pool_dir, spec_device="cpu", chunk_size=4096):
    pool = resolve_pool(str(pool_dir)).pool
    return EmbeddingService(
        pool.strategy_view(), spec_device, get_registry().make_embedder, chunk_size=chunk_size
    ), pool


def test_open_clip_embedder_with_local_weights_matches_the_model(tiny_pool, weights):
    service, pool = _service(tiny_pool)
    found = service.embeddings(f"open_clip:selbench-tiny:{weights}")
    model, preprocess, tokenizer = build_model("selbench-tiny", seed=0)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    uid, image = next(pool.iter_images())
    with torch.no_grad():
        ref_img = torch.nn.functional.normalize(model.encode_image(preprocess(image)[None]), dim=-1)
        ref_txt = torch.nn.functional.normalize(
            model.encode_text(tokenizer([pool.captions[0]])), dim=-1
        )
    assert found.image.dtype == np.float16 and found.image.shape == (len(pool), 128)
    assert np.allclose(found.image[0], ref_img[0].numpy(), atol=2e-3)
    assert np.allclose(found.text[0], ref_txt[0].numpy(), atol=2e-3)
    assert (
        f"w{__import__('hashlib').sha256(weights.read_bytes()).hexdigest()[:16]}"
        in found.embedder_id
    )


def test_weights_for_another_architecture_are_refused(tiny_pool, weights):
    service, _ = _service(tiny_pool)
    with pytest.raises(ConfigError, match="do not fit"):
        service.embeddings(f"open_clip:RN50:{weights}")


def test_second_service_hits_the_cache_without_encoding(tiny_pool, weights, monkeypatch):
    spec = f"open_clip:selbench-tiny:{weights}"
    first, _ = _service(tiny_pool)
    computed = first.embeddings(spec)
    assert first.usage[spec]["hit"] is False
    second, _ = _service(tiny_pool)
    monkeypatch.setattr(
        "selbench.embedders.Embedder.encode", lambda *a: pytest.fail("re-encoded on a hit")
    )
    again = second.embeddings(spec)
    assert second.usage[spec]["hit"] is True
    assert again.entry_id == computed.entry_id
    assert np.array_equal(np.asarray(again.image), np.asarray(computed.image))


def test_proxy_is_trained_once_per_pool_and_reused(tiny_pool):
    first, _ = _service(tiny_pool)
    embedder = first.embedder("proxy")
    assert embedder.details["trained"] is True
    second, _ = _service(tiny_pool)
    reused = second.embedder("proxy")
    assert reused.details["trained"] is False
    assert reused.embedder_id == embedder.embedder_id


def _embed_cmd(pool_dir, spec, chunk_size):
    return [
        sys.executable,
        "-m",
        "selbench.cli",
        "embed",
        "--pool",
        str(pool_dir),
        "--embedder",
        spec,
        "--chunk-size",
        str(chunk_size),
    ]


@pytest.mark.slow
def test_kill_9_during_embedding_then_the_same_command_resumes(tmp_path, weights):
    """`selbench embed` killed with SIGKILL mid-way resumes and gives the same arrays."""
    from selbench.synthweb import SynthWebConfig, generate_synthweb

    pool_dir = tmp_path / "pool"
    generate_synthweb(
        pool_dir,
        SynthWebConfig(
            n_samples=1600,  # 25 chunks of 64: killed after 3, far from the end
            shard_size=400,
            n_retrieval=20,
            n_classification=20,
            n_target=10,
            n_reasoning_train=0,
            n_reasoning_test=0,
        ),
    )
    spec = f"open_clip:selbench-tiny:{weights}"
    killed_home, clean_home = tmp_path / "killed", tmp_path / "clean"
    env = dict(os.environ, SELBENCH_HOME=str(killed_home), COLUMNS="200")
    proc = subprocess.Popen(
        _embed_cmd(pool_dir, spec, 64), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    chunks = []
    while time.time() < deadline and proc.poll() is None:
        chunks = list((killed_home / "embeddings").glob("*.partial/chunk-*"))
        if len(chunks) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "embedding finished before it could be killed"
    again = subprocess.run(
        _embed_cmd(pool_dir, spec, 64), env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from sample" in again.stdout
    env_clean = dict(env, SELBENCH_HOME=str(clean_home))
    subprocess.run(
        _embed_cmd(pool_dir, spec, 64), env=env_clean, check=True, capture_output=True, timeout=600
    )
    resumed = EmbeddingCache(killed_home / "embeddings").ls()
    clean = EmbeddingCache(clean_home / "embeddings").ls()
    assert [r["status"] for r in resumed] == ["complete"]
    for name in ("image", "text"):
        a = np.load(f"{resumed[0]['path']}/{name}.npy")
        b = np.load(f"{clean[0]['path']}/{name}.npy")
        assert np.array_equal(a, b), name


@pytest.mark.parametrize("rgb_flag", [True, False], ids=["imread-rgb", "bgr-then-convert"])
def test_png_decoding_for_embedding_is_pixel_identical_to_pil(tiny_pool, rgb_flag, monkeypatch):
    import cv2

    from selbench.decoding import decode, png_decoder

    assert png_decoder().startswith("OpenCV")  # the test environment has OpenCV
    if not rgb_flag:  # the path for OpenCV builds without IMREAD_COLOR_RGB (before 4.10)
        monkeypatch.delattr(cv2, "IMREAD_COLOR_RGB", raising=False)
    pool = resolve_pool(str(tiny_pool)).pool
    for (uid, data, ext), (_, image) in zip(
        pool.iter_image_bytes(), pool.iter_images(), strict=True
    ):
        assert ext == "png"
        assert np.array_equal(decode(data, ext), np.asarray(image)), uid


def test_threaded_decoding_keeps_pool_order_and_captions(tiny_pool):
    from selbench.embedders import pool_batches

    pool = resolve_pool(str(tiny_pool)).pool.strategy_view()
    _, preprocess, _ = build_model("selbench-tiny", seed=0)
    # batch 100 over 3 threads: parts of 34, 34 and 32 images, and a short last batch
    serial = list(pool_batches(pool, preprocess, start=5, batch_size=100, workers=1))
    threaded = list(pool_batches(pool, preprocess, start=5, batch_size=100, workers=3))
    assert len(serial) == len(threaded) > 1
    assert sum(len(texts) for _, texts in threaded) == len(pool) - 5
    for (a, ta), (b, tb) in zip(serial, threaded, strict=True):
        assert torch.equal(a, b)
        assert ta == tb
    assert threaded[0][1][0] == pool.captions[5]


def test_prefetch_keeps_order_and_reraises_the_source_error_after_its_items():
    def source():
        yield from range(5)
        raise ValueError("shard 3 is unreadable")

    got = []
    with pytest.raises(ValueError, match="shard 3 is unreadable"):
        for item in _prefetch(source(), depth=2):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]


def test_prefetch_stopped_early_closes_its_source_and_leaves_no_thread_behind():
    # The accelerator path: an error downstream (say a NaN batch) abandons the pass while
    # the reading thread is blocked on a full queue; it must not stay blocked holding the
    # pool's files and decoding threads.
    closed = threading.Event()

    def source():
        try:
            yield from range(1000)
        finally:
            closed.set()

    batches = _prefetch(source(), depth=2)
    assert [next(batches), next(batches)] == [0, 1]
    time.sleep(0.05)  # let the thread fill the queue and block
    batches.close()
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]


def test_overlapped_decoding_of_accelerator_hosts_gives_the_same_entry(
    tiny_pool, weights, tmp_path, monkeypatch
):
    # No accelerator here: force the in-process accelerator schedule (prefetch thread)
    # on the CPU; it is what hosts without decoding helpers use.
    monkeypatch.setenv("SELBENCH_DECODE_HELPERS", "0")
    spec = f"open_clip:selbench-tiny:{weights}"
    pool = resolve_pool(str(tiny_pool)).pool.strategy_view()
    make = get_registry().make_embedder

    def embed(name: str):
        cache = EmbeddingCache(tmp_path / name)
        return EmbeddingService(pool, "cpu", make, cache=cache, chunk_size=64).embeddings(spec)

    import selbench.embedders as embedders

    batches = embedders.pool_batches  # batches of 50: several in flight at once
    monkeypatch.setattr(embedders, "pool_batches", lambda *a, **k: batches(*a, **k, batch_size=50))
    alternating = embed("alternating")
    monkeypatch.setattr(embedders, "overlap_decoding", lambda device: True)
    prefetched = []
    prefetch = embedders._prefetch
    monkeypatch.setattr(embedders, "_prefetch", lambda it: prefetched.append(1) or prefetch(it))
    overlapped = embed("overlapped")
    assert prefetched  # the accelerator schedule really ran
    assert np.array_equal(np.asarray(overlapped.image), np.asarray(alternating.image))
    assert np.array_equal(np.asarray(overlapped.text), np.asarray(alternating.text))


def test_each_embedder_spec_gets_its_own_mlflow_key():
    # A run that asks for two proxies (tldr-release: the proxy and the scorer) or two
    # weight files logs both; one shared key would make MLflow refuse the second value.
    specs = [
        "proxy",
        "proxy:scorer",
        "proxy:proxy",
        "open_clip:ViT-B-32:/models/a.pt",
        "open_clip:ViT-B-32:/models/b.pt",
    ]
    keys = [usage_key(s) for s in specs]
    assert len(set(keys)) == len(keys)
    assert keys[:2] == ["proxy", "proxy_scorer"]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys)


def test_embed_without_embedder_fills_the_entry_the_strategies_default_to(tiny_pool):
    # `selbench embed` warms the cache the runs will read: the strategies that embed
    # default to the reference model, so the command does too.
    from click.testing import CliRunner

    from selbench.cli import main

    result = CliRunner().invoke(main, ["embed", "--pool", str(tiny_pool)])
    assert result.exit_code == 0, result.output
    assert "computed: entry" in result.output and "reference" in result.output
    service, _ = _service(tiny_pool)
    service.embeddings("reference")
    assert service.usage["reference"]["hit"]
