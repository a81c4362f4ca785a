"""Decoding helper processes (selbench.decoding) and the embedding pass that uses them."""

from __future__ import annotations

import io
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import selbench.decoding as decoding
from selbench.cache import EmbeddingCache
from selbench.decoding import DecodeError, DecodeHelpers, decode
from selbench.embedders import EmbeddingService, pool_batches
from selbench.errors import PoolError
from selbench.pools import resolve_pool
from selbench.registry import get_registry
from selbench.train import build_model

pytestmark = pytest.mark.skipif(os.name != "posix", reason="decoding helpers are POSIX-only")


@pytest.fixture(scope="module")
def pool(tiny_pool):
    return resolve_pool(str(tiny_pool)).pool.strategy_view()


@pytest.fixture(scope="module")
def preprocess():
    return build_model("selbench-tiny", seed=0)[1]


@pytest.fixture(autouse=True)
def fresh_helpers():
    """Each test starts without shared helpers and leaves none running."""
    decoding._close_shared()
    yield
    decoding._close_shared()


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format=fmt)
    return out.getvalue()


def test_helpers_decode_png_and_other_formats_exactly_as_in_process():
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (17, 40), (64, 48), (32, 32), (5, 7)]
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    items = [(_encoded(im, "PNG"), "png") for im in images]
    items += [(_encoded(im, "JPEG"), "jpg") for im in images]  # lossy: compare with PIL's
    grey = _encoded(images[0][:, :, 0], "PNG")  # one channel: comes back as RGB
    items.append((grey, "png"))
    helpers = DecodeHelpers(2)
    processes = [h.process for h in helpers.helpers]
    try:
        for _ in range(2):  # the shared files are reused (and grown) across batches
            helpers.submit(items)
            decoded = helpers.collect()
            assert len(decoded) == len(items)
            for (data, ext), image in zip(items, decoded, strict=True):
                expected = np.asarray(decode(data, ext))
                assert image.shape == expected.shape and image.dtype == np.uint8
                assert np.array_equal(image, expected)
    finally:
        helpers.close()
    assert all(p.poll() is not None for p in processes)  # closed helpers have exited


def test_without_opencv_pngs_decode_with_pil_to_the_same_pixels(monkeypatch):
    # OpenCV is imported on the first PNG, and is optional: the GPU check's machine has none.
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (9, 13, 3), dtype=np.uint8)
    wide = Image.fromarray(rng.integers(0, 65535, (6, 5), dtype=np.uint16))  # 16-bit grey
    out = io.BytesIO()
    wide.save(out, format="PNG")
    items = [_encoded(rgb, "PNG"), _encoded(rgb[:, :, 0], "PNG"), out.getvalue()]
    assert decoding.png_decoder().startswith("OpenCV ")
    with_opencv = [np.asarray(decode(data, "png")) for data in items]
    monkeypatch.setattr(decoding, "_opencv", lambda: None)
    assert decoding.png_decoder() == "PIL"
    for data, expected in zip(items, with_opencv, strict=True):
        image = decode(data, "png")
        assert isinstance(image, Image.Image) and np.array_equal(np.asarray(image), expected)
    assert np.array_equal(with_opencv[0], rgb)


def test_a_corrupt_image_is_reported_by_position_and_the_helpers_stay_usable():
    good = _encoded(np.zeros((8, 8, 3), np.uint8), "PNG")
    helpers = DecodeHelpers(2)
    try:
        helpers.submit([(good, "png")] * 3 + [(b"not an image", "png")] + [(good, "png")] * 2)
        with pytest.raises(DecodeError) as err:
            helpers.collect()
        assert err.value.position == 3
        assert "UnidentifiedImageError" in str(err.value)
        helpers.submit([(good, "png")] * 4)
        assert len(helpers.collect()) == 4
        helpers.submit([])
        assert helpers.collect() == []
    finally:
        helpers.close()


def test_helper_batches_equal_in_process_batches(pool, preprocess):
    for helpers in (1, 3):
        via_helpers = list(pool_batches(pool, preprocess, 5, batch_size=7, helpers=helpers))
        in_process = list(pool_batches(pool, preprocess, 5, batch_size=7, workers=2))
        assert len(via_helpers) == len(in_process) > 1
        for (a, ca), (b, cb) in zip(via_helpers, in_process, strict=True):
            assert torch.equal(a, b) and ca == cb


def test_the_embedding_pass_through_helpers_writes_the_in_process_entry(
    pool, tmp_path, monkeypatch
):
    model, _, _ = build_model("selbench-tiny", seed=7)
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    spec = f"open_clip:selbench-tiny:{weights}"

    def embed(name: str):
        cache = EmbeddingCache(tmp_path / name)
        service = EmbeddingService(pool, "cpu", get_registry().make_embedder, cache=cache)
        return service.embeddings(spec)

    monkeypatch.setenv("SELBENCH_DECODE_HELPERS", "0")
    in_process = embed("in-process")
    monkeypatch.setenv("SELBENCH_DECODE_HELPERS", "1")
    started = []
    monkeypatch.setattr(decoding, "DecodeHelpers", lambda n: started.append(n) or DecodeHelpers(n))
    via_helpers = embed("helpers")
    assert started == [1]  # one helper on a CPU host, really used
    assert np.array_equal(np.asarray(via_helpers.image), np.asarray(in_process.image))
    assert np.array_equal(np.asarray(via_helpers.text), np.asarray(in_process.text))


def test_pool_batches_name_the_sample_whose_image_cannot_be_decoded(pool, preprocess):
    class Damaged:
        """The pool with one sample's bytes replaced by garbage."""

        captions = pool.captions

        def iter_image_bytes(self, start=0):
            for i, (uid, data, ext) in enumerate(pool.iter_image_bytes(start=start)):
                yield uid, (b"garbage" if i == 4 else data), ext

    uid = pool.uids[4]
    for kwargs in ({"helpers": 1}, {"workers": 2}, {"workers": 1}):
        with pytest.raises(PoolError, match=f"sample '{uid}'.*cannot be decoded"):
            list(pool_batches(Damaged(), preprocess, 0, batch_size=3, **kwargs))
    # The helpers are still in step: the next pass works.
    assert len(list(pool_batches(pool, preprocess, 0, batch_size=3, helpers=1))) > 1


def test_helpers_are_reused_across_passes_and_drained_when_a_pass_stops_early(pool, preprocess):
    batches = pool_batches(pool, preprocess, 0, batch_size=3, helpers=1)
    next(batches)  # the next batch is now in flight in the helper
    batches.close()
    (shared,) = decoding._shared.values()
    pid = shared.helpers[0].process.pid
    full = list(pool_batches(pool, preprocess, 0, batch_size=3, helpers=1))
    assert shared.helpers[0].process.pid == pid  # same helper, still in step
    assert sum(len(c) for _, c in full) == len(pool)


def test_a_helper_killed_mid_pass_fails_the_pass_clearly_and_the_next_pass_restarts_it(
    pool, preprocess
):
    batches = pool_batches(pool, preprocess, 0, batch_size=3, helpers=1)
    next(batches)
    (shared,) = decoding._shared.values()
    victim = shared.helpers[0].process
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    with pytest.raises(PoolError, match="decoding helper .* exited"):
        list(batches)
    full = list(pool_batches(pool, preprocess, 0, batch_size=3, helpers=1))
    assert sum(len(c) for _, c in full) == len(pool)
    (restarted,) = decoding._shared.values()
    assert restarted.helpers[0].process.pid != victim.pid


def test_closing_the_shared_helpers_leaves_no_process_behind(pool, preprocess):
    list(pool_batches(pool, preprocess, 0, batch_size=3, helpers=2))
    processes = [h.process for shared in decoding._shared.values() for h in shared.helpers]
    assert len(processes) == 2
    decoding._close_shared()
    assert all(p.poll() is not None for p in processes)


def test_helpers_can_be_switched_off(pool, preprocess, monkeypatch):
    monkeypatch.setenv("SELBENCH_DECODE_HELPERS", "0")
    assert not decoding.helpers_enabled()
    list(pool_batches(pool, preprocess, 0, batch_size=3, helpers=1))
    assert not decoding._shared


def test_a_host_that_cannot_start_helpers_decodes_in_process(pool, preprocess, monkeypatch):
    def no_interpreter(count):
        raise FileNotFoundError("no python here")

    monkeypatch.setattr(decoding, "DecodeHelpers", no_interpreter)
    with pytest.warns(UserWarning, match="decoding in-process"):
        batches = list(pool_batches(pool, preprocess, 0, batch_size=3, helpers=1))
    assert sum(len(c) for _, c in batches) == len(pool)
    with pytest.warns(UserWarning, match="decoding in-process"):  # the lock was released
        assert list(pool_batches(pool, preprocess, 0, batch_size=3, helpers=1))


def test_shared_files_avoid_a_small_dev_shm(monkeypatch):
    # A container's /dev/shm is often 64 MiB; a mapped write past a full one is a SIGBUS.
    class Stats:
        f_frsize = 4096
        f_bavail = (64 << 20) // 4096

    monkeypatch.setattr(decoding.os, "statvfs", lambda path: Stats())
    assert decoding._shared_folder() is None
    Stats.f_bavail = (8 << 30) // 4096
    assert decoding._shared_folder() == "/dev/shm"
