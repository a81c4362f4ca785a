"""Embedders and the shared embedding service strategies reach through ``ctx``.

An embedder turns images and captions into L2-normalised vectors. Embedders are plugins
(hook ``register_embedders``), named on the command line by a spec ``NAME[:ARGS]``:
``proxy`` (a CLIP trained on the pool itself) or ``open_clip:ARCH:/path/to/weights.pt``.

Every embedder has an id that names the model, a fingerprint of its weights and its
preprocessing, so a cache entry is reused only for exactly the same embedding function.
:class:`EmbeddingService` computes each (pool, embedder) pair once through the
:class:`~selbench.cache.EmbeddingCache` and records what it did for MLflow.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from selbench.cache import EmbeddingCache, Ranks
from selbench.decoding import (
    DecodeError,
    acquire_helpers,
    decode,
    helpers_enabled,
    release_helpers,
)
from selbench.errors import ConfigError, PoolError, UndecodableImageError
from selbench.progress import NullProgress
from selbench.strategy import SelectionServices

ENCODE_BATCH = 512


class Embedder:
    """Base class: an open_clip-style model with ``encode_image``/``encode_text``.

    Subclasses set ``name``, ``summary`` and ``reference``, parse their spec arguments in
    ``__init__(args)``, and load or train the model in :meth:`prepare`, setting
    ``self.model``, ``self.preprocess``, ``self.tokenizer`` and ``self.weights_digest``.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""

    def __init__(self, args: str = "") -> None:
        self.args = args
        self.model: Any = None
        self.preprocess: Any = None
        self.tokenizer: Any = None
        self.weights_digest: str = ""
        self.device = "cpu"
        self.details: dict[str, Any] = {}  # what prepare() did (logged with the run)

    def prepare(self, pool: Any, device: str, progress: Any) -> None:  # pragma: no cover
        raise NotImplementedError

    @property
    def architecture(self) -> str:
        return self.args.split(":", 1)[0] or self.name

    @property
    def embedder_id(self) -> str:
        """``name:architecture:w<weights sha256>:p<preprocess hash>``."""
        if not self.weights_digest:
            raise RuntimeError(f"embedder {self.name!r} used before prepare()")
        return (
            f"{self.name}:{self.architecture}:w{self.weights_digest[:16]}"
            f":p{preprocess_digest(self.preprocess)}"
        )

    @torch.inference_mode()
    def encode(
        self, images: torch.Tensor, captions: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Float32 embeddings (not yet normalised) of preprocessed images and captions."""
        self.model.eval()
        # Tokenise first: it is single-threaded, and an embedding pass's decoding helper
        # works on the next batch meanwhile, on the core the tokenizer leaves idle.
        tokens = self.tokenizer(list(captions))
        image = self.model.encode_image(images.to(self.device))
        text = self.model.encode_text(tokens.to(self.device))
        return image.float().cpu().numpy(), text.float().cpu().numpy()


def preprocess_digest(preprocess: Any) -> str:
    """A short hash of the preprocessing pipeline's description (sizes, interpolation, norm)."""
    return hashlib.sha256(repr(preprocess).encode()).hexdigest()[:8]


def _normalize_params(preprocess: Any) -> tuple[int, tuple, tuple] | None:
    """(size, mean, std) when ``preprocess`` is open_clip's Resize/CenterCrop/ToTensor/Normalize."""
    transforms = getattr(preprocess, "transforms", None)
    if not transforms:
        return None
    size, mean, std = None, None, None
    for t in transforms:
        kind = type(t).__name__
        if kind == "Resize" and isinstance(t.size, int):
            size = t.size
        elif kind == "CenterCrop":
            crop = t.size if isinstance(t.size, (tuple, list)) else (t.size, t.size)
            if len(set(crop)) != 1 or (size is not None and crop[0] != size):
                return None
            size = crop[0]
        elif kind == "Normalize":
            mean, std = tuple(t.mean), tuple(t.std)
        elif kind not in ("MaybeConvertMode", "MaybeToTensor", "ToTensor"):
            return None
    if size is None or mean is None or std is None:
        return None
    return size, mean, std


def preprocess_batch(images: Sequence[Any], preprocess: Any) -> torch.Tensor:
    """Preprocess images (PIL, or RGB uint8 ``(H, W, 3)`` arrays) into one batch tensor.

    Fast path, written by hand because torchvision transforms work one image at a time:
    when every image is RGB and already at the model's input size, open_clip's
    Resize/CenterCrop are no-ops and ToTensor+Normalize are one multiply and one add
    over the whole batch, equal to the per-image pipeline within 1e-6 (tested). Otherwise
    each image goes through ``preprocess``.

    The multiply and add run on the images' own (H, W, 3) layout, flattened, against
    per-channel factors tiled to one image's length: broadcasting a (1, 3, 1, 1) factor
    over the channels-last batch instead was 2.5x slower (innermost axis of 3, not
    vectorised). The batch comes back as an (N, 3, H, W) view of that channels-last
    memory, as before, which is the layout the encoder is fastest on here.
    """
    params = _normalize_params(preprocess)
    if params is not None:
        size, mean, std = params
        arrays = [_as_rgb_array(im, size) for im in images]
        rgb = [a for a in arrays if a is not None]
        if arrays and len(rgb) == len(arrays):
            batch = torch.from_numpy(np.stack(rgb)).float()  # (N, H, W, 3)
            std_t = torch.tensor(std, dtype=torch.float64)
            scale = (1.0 / (255.0 * std_t)).float().repeat(size * size)
            shift = (-torch.tensor(mean, dtype=torch.float64) / std_t).float().repeat(size * size)
            batch.view(len(arrays), -1).mul_(scale).add_(shift)
            return batch.permute(0, 3, 1, 2)
    pil = [Image.fromarray(im) if isinstance(im, np.ndarray) else im for im in images]
    return torch.stack([preprocess(im) for im in pil])


def image_batches(
    images: Iterable[Any], preprocess: Any, batch_size: int = 256
) -> Iterator[torch.Tensor]:
    """``(B, 3, H, W)`` batches of ``images`` (PIL images, e.g. ``ctx.target().images`` or
    the images of ``ctx.pool.iter_images()``), for scoring with a model. Images already at
    the model's size skip the per-image transforms (equal within 1e-6)."""
    batch: list[Any] = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield preprocess_batch(batch, preprocess)
            batch = []
    if batch:
        yield preprocess_batch(batch, preprocess)


def _as_rgb_array(image: Any, size: int) -> np.ndarray | None:
    """``image`` as a (size, size, 3) uint8 array, or None if it is not RGB at that size."""
    if isinstance(image, np.ndarray):
        return image if image.shape == (size, size, 3) and image.dtype == np.uint8 else None
    if image.mode == "RGB" and image.size == (size, size):
        return np.asarray(image, dtype=np.uint8)
    return None


def _prefetch(iterator: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``iterator`` in a thread, ``depth`` items ahead, so decoding overlaps encoding.

    Items come out in order; an exception in ``iterator`` is re-raised here after the
    items before it. When the consumer stops early (an error downstream, or ``close()``),
    the thread stops after the item in hand, closes ``iterator`` (releasing its files and
    decoding threads) and ends: nothing is left blocked on a full queue.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()
    failure: list[BaseException] = []

    def fill() -> None:
        try:
            for item in iterator:
                buffer.put(item)
                if stop.is_set():
                    break
        except BaseException as exc:  # re-raised in the consumer
            failure.append(exc)
        finally:
            close = getattr(iterator, "close", None)
            if callable(close):
                close()
            buffer.put(done)

    thread = threading.Thread(target=fill, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not done:
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a put() on the full queue until the thread ends
            try:
                buffer.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
    if failure:
        raise failure[0]


def overlap_decoding(device: str) -> bool:
    """Whether an embedding pass decodes the next batch while the current one encodes:
    only when the encoder runs on an accelerator, which leaves the CPU free. On a CPU-only
    host the encoder already uses every core, and overlapping made the pass slower than
    alternating (docs/embeddings.md)."""
    return torch.device(device).type != "cpu"


def decode_workers() -> int:
    """Decoding threads for an in-process embedding pass: one per intra-op thread torch
    uses on this host (capped at 8), so decoding a batch uses the cores the encoder uses."""
    return max(1, min(8, torch.get_num_threads()))


def local_ranks() -> int:
    """Processes embedding side by side on this host: torchrun's ``LOCAL_WORLD_SIZE``, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def decode_helper_count(device: str) -> int:
    """Helper processes that decode for an embedding pass on ``device``.

    CPU: one. It decodes batch ``i + 1`` while the encoder tokenises batch ``i``, the
    single-threaded stretch of each batch; a second helper would run into the encoder's
    matrix products, which already use every core. Accelerator: one per core but the
    one that drives the device, capped at 8, since the CPU has nothing else to do. Under
    torchrun the host's cores are shared by its ranks (:func:`local_ranks`), so each rank
    counts only its share of them.
    """
    if torch.device(device).type == "cpu":
        return 1
    cores = (os.cpu_count() or 2) // local_ranks()
    return max(1, min(8, cores - 1))


def _decode_all(
    items: Sequence[tuple[bytes, str]],
    uids: Sequence[str],
    executor: ThreadPoolExecutor | None,
    parts: int,
) -> list:
    """Decode ``(bytes, ext)`` items in order, split into contiguous parts over
    ``executor``'s threads; a failure names the sample's uid.

    Threads suffice here: OpenCV's ``imdecode`` releases the GIL while it decodes.
    16,000 32-px PNGs on 2 cores: 0.29 s on one thread, 0.22 s on two (the rest holds
    the GIL).
    """

    def decode_part(first: int, part: Sequence[tuple[bytes, str]]) -> list:
        out = []
        for i, (data, ext) in enumerate(part):
            try:
                out.append(decode(data, ext))
            except Exception as exc:
                raise _undecodable(uids[first + i], f"{type(exc).__name__}: {exc}") from exc
        return out

    if executor is None or len(items) < 64:
        return decode_part(0, items)
    step = -(-len(items) // parts)
    starts = list(range(0, len(items), step))
    chunks = [items[i : i + step] for i in starts]
    return [image for part in executor.map(decode_part, starts, chunks) for image in part]


def _undecodable(uid: str, reason: str, pool: Any = None) -> UndecodableImageError:
    """The error for a sample whose image does not decode, naming its shard and member
    when the pool can say where the sample lives (``pool.locate``)."""
    locate = getattr(pool, "locate", None)
    where = f" ({locate(uid)})" if callable(locate) else ""
    message = f"sample {uid!r}{where}: its image cannot be decoded ({reason})"
    return UndecodableImageError(message, uid, reason)


def _raw_batches(
    pool: Any, start: int, batch_size: int
) -> Iterator[tuple[int, list[str], list[tuple[bytes, str]]]]:
    """``(position, uids, [(image bytes, ext)])`` per batch, in pool order from ``start``."""
    uids: list[str] = []
    raw: list[tuple[bytes, str]] = []
    position = start
    for uid, data, ext in pool.iter_image_bytes(start=start):
        uids.append(uid)
        raw.append((data, ext))
        if len(raw) == batch_size:
            yield position, uids, raw
            position += len(raw)
            uids, raw = [], []
    if raw:
        yield position, uids, raw


def pool_batches(
    pool: Any,
    preprocess: Any,
    start: int = 0,
    batch_size: int = ENCODE_BATCH,
    workers: int = 1,
    helpers: int = 0,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Preprocessed image batches and their captions, in pool order from ``start``.

    With ``helpers`` > 0 (and helpers enabled on this host), images are decoded in that
    many helper processes (:mod:`selbench.decoding`): each batch is handed over before
    the one before it is yielded, so it decodes while the consumer encodes. Otherwise
    each batch's images are decoded on ``workers`` threads of this process when it is
    asked for. Both give the same tensors (tested).
    """
    shared = acquire_helpers(helpers) if helpers > 0 and helpers_enabled() else None
    if shared is None:
        yield from _batches_in_process(pool, preprocess, start, batch_size, workers)
        return
    captions = pool.captions
    batches = _raw_batches(pool, start, batch_size)
    broken = True  # until the helpers are known to be in step again
    try:
        current = next(batches, None)
        if current is not None:
            _submit(shared, current[2])
        while current is not None:
            position, uids, raw = current
            following = next(batches, None)
            try:
                images = shared.collect()
            except DecodeError as exc:
                if exc.position is None:  # the helper itself failed
                    raise PoolError(_helper_failed(exc)) from None
                broken = False
                raise _undecodable(uids[exc.position], str(exc), pool) from None
            batch = preprocess_batch(images, preprocess)  # copies out of the shared file
            del images
            if following is not None:
                _submit(shared, following[2])
            yield batch, list(captions[position : position + len(raw)])
            current = following
        broken = False
    finally:
        if broken:  # stopped early: collect the batch in flight, if the helpers still answer
            try:
                shared.drain()
                broken = not shared.alive()
            except BaseException:
                broken = True
        release_helpers(shared, broken=broken)


def _submit(shared: Any, raw: list[tuple[bytes, str]]) -> None:
    try:
        shared.submit(raw)
    except DecodeError as exc:  # a helper exited before taking the batch
        raise PoolError(_helper_failed(exc)) from None


def _helper_failed(exc: DecodeError) -> str:
    return (
        f"decoding the pool's images: {exc} (the next pass starts a new one; "
        "SELBENCH_DECODE_HELPERS=0 decodes in this process instead)"
    )


def _batches_in_process(
    pool: Any, preprocess: Any, start: int, batch_size: int, workers: int
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    captions = pool.captions
    executor = ThreadPoolExecutor(workers, thread_name_prefix="decode") if workers > 1 else None
    try:
        for position, uids, raw in _raw_batches(pool, start, batch_size):
            try:
                decoded = _decode_all(raw, uids, executor, workers)
            except UndecodableImageError as exc:
                raise _undecodable(exc.uid, exc.reason, pool) from exc.__cause__
            images = preprocess_batch(decoded, preprocess)
            yield images, list(captions[position : position + len(raw)])
    finally:
        if executor is not None:
            executor.shutdown(wait=True)


@dataclass
class Embeddings:
    """Cached, L2-normalised float16 embeddings of a whole pool, rows in pool order."""

    image: np.ndarray
    text: np.ndarray
    uids: Sequence[str]
    embedder_id: str
    entry_id: str


@dataclass
class EmbeddingService(SelectionServices):
    """Embeds a pool at most once per embedder, through the cache; what strategies call
    (the :class:`~selbench.strategy.SelectionServices` of a run).

    ``usage`` records, per embedder spec, the cache entry, whether it was a hit and the
    seconds spent, for the run's MLflow record.
    """

    pool: Any
    device: str
    make_embedder: Callable[[str], Embedder]
    progress: Any = field(default_factory=NullProgress)
    load_target: Callable[[], Any] | None = None  # returns a selbench.target.TargetSet
    cache: EmbeddingCache = field(default_factory=EmbeddingCache)
    chunk_size: int = 4096  # rows per resumable cache chunk
    ranks: Ranks | None = None  # set under torchrun: the ranks share each embedding pass
    usage: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per embedder spec without a model (precomputed features), the model that embedded
    #: other images for it (:meth:`embed_images`: the target set's), spec and id
    image_models: dict[str, str] = field(default_factory=dict)
    _embedders: dict[str, Embedder] = field(default_factory=dict)
    _embeddings: dict[str, Embeddings] = field(default_factory=dict)
    _target: Any = None

    @property
    def loaded_target(self) -> Any:
        """The target set if a strategy asked for it during this run, else None."""
        return self._target

    def target(self) -> Any:
        """The run's target set, loaded and checked against the eval sets on first use."""
        if self._target is None:
            if self.load_target is None:
                raise ConfigError(
                    "this pool has no target split; give target data with --target PATH "
                    "(a CLIP_benchmark wds directory or an image folder)"
                )
            self._target = self.load_target()
        return self._target

    def embed_images(self, spec: str, images: Sequence[Any]) -> np.ndarray:
        """L2-normalised float32 image embeddings of ``images`` (e.g. target images)."""
        embedder = self._image_model(spec)
        rows = []
        for batch in image_batches(images, embedder.preprocess, ENCODE_BATCH):
            with torch.inference_mode():
                rows.append(embedder.model.encode_image(batch.to(embedder.device)).float().cpu())
        from selbench import flops
        from selbench.neighbours import unit_rows  # faiss: imported when first needed
        from selbench.run.spec import usage_key

        if flops.charging():  # never cached: charged each time, the image tower's forwards
            key = ("embedder", embedder.embedder_id)
            count = sum(len(r) for r in rows)
            image = flops.clip_forward_flops(embedder.model, None, None, count, ("image",), key)
            flops.charge(f"image_embedding/{usage_key(spec)}", image["image"])
        return unit_rows(torch.cat(rows).numpy())

    def _image_model(self, spec: str) -> Embedder:
        """The embedder that embeds images for ``spec``: itself, or, for precomputed
        features of the pool's pairs (``datacomp:l14:PATH``), the model that computed
        them (its ``image_embedder()``: the pool YAML's ``features_model``), recorded in
        :attr:`image_models`. The pool's rows still come from the features."""
        embedder = self.embedder(spec)
        if embedder.model is not None:
            return embedder
        stand_in = getattr(embedder, "image_embedder", None)
        if stand_in is None:
            raise ConfigError(
                f"embedder {spec!r} has no model, only precomputed features of the pool's "
                "pairs, so it cannot embed other images; name a model embedder "
                "(open_clip:ARCH:/path/to/weights.pt) for them"
            )
        model: Embedder = stand_in()
        self.image_models[spec] = f"{model.name}:{model.args} ({model.embedder_id})"
        return model

    def embedder(self, spec: str = "proxy") -> Embedder:
        """The prepared embedder for ``spec`` (trained or loaded on first use)."""
        if spec not in self._embedders:
            embedder = self.make_embedder(spec)
            started = time.perf_counter()
            embedder.prepare(self.pool, self.device, self.progress)
            embedder.details.setdefault("prepare_seconds", time.perf_counter() - started)
            self._embedders[spec] = embedder
        return self._embedders[spec]

    def embeddings(self, spec: str = "proxy") -> Embeddings:
        """Image and text embeddings of the pool by ``spec``; computed once, then cached."""
        if spec in self._embeddings:
            return self._embeddings[spec]
        started = time.perf_counter()
        embedder = self.embedder(spec)
        n = len(self.pool)
        bar = self.progress.counter(f"Embedding pool ({spec})")

        def produce(start: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            precomputed = getattr(embedder, "precomputed_batches", None)
            if precomputed is not None:  # features shipped with the pool: nothing to decode
                yield from precomputed(self.pool, start, ENCODE_BATCH)
                return
            # ``workers`` also serves a pass that finds the helpers busy or unable to start.
            workers = decode_workers()
            if helpers_enabled():
                helpers = decode_helper_count(self.device)
                batches = pool_batches(
                    self.pool, embedder.preprocess, start, workers=workers, helpers=helpers
                )
            else:
                batches = pool_batches(self.pool, embedder.preprocess, start, workers=workers)
                if overlap_decoding(self.device):
                    batches = _prefetch(batches)
            for images, texts in batches:
                yield embedder.encode(images, texts)

        result = self.cache.get_or_compute(
            self.pool.fingerprint,
            embedder.embedder_id,
            n,
            produce,
            chunk_size=self.chunk_size,
            meta={"embedder_spec": spec, "pool_name": getattr(self.pool, "name", "")},
            progress=bar,
            ranks=self.ranks,
        )
        entry = result.entry
        found = Embeddings(
            entry.image, entry.text, self.pool.uids, embedder.embedder_id, entry.entry_id
        )
        self._embeddings[spec] = found
        self.usage[spec] = {
            "entry_id": entry.entry_id,
            "embedder_id": embedder.embedder_id,
            "hit": result.hit,
            "cache_seconds": result.seconds,
            "total_seconds": time.perf_counter() - started,
            "resumed_from": result.resumed_from,
            **{f"embedder_{k}": v for k, v in embedder.details.items()},
        }
        return found


def parse_spec(spec: str) -> tuple[str, str]:
    """``"open_clip:ViT-B-32:/w.pt"`` -> ``("open_clip", "ViT-B-32:/w.pt")``."""
    name, _, args = spec.partition(":")
    if not name:
        raise ConfigError(f"empty embedder spec {spec!r}; e.g. 'proxy' or 'open_clip:ARCH:PATH'")
    return name, args
