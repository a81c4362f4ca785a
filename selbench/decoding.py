"""Image decoding for embedding passes, in the calling process or in helper processes.

:func:`decode` turns encoded bytes into an RGB uint8 ``(H, W, 3)`` array or an RGB PIL
image. :class:`DecodeHelpers` runs it in long-lived helper processes, so decoding batch
``i + 1`` overlaps encoding batch ``i`` without holding the encoder's GIL.

Why processes, and why written here rather than a ``DataLoader``: threads decoding beside
the encoder fight the tokenizer (open_clip's is pure Python) for the GIL. On an H200 that
held an embedding pass to about half the encoder's speed, and on a 2-core CPU the encoder
already keeps both cores busy (docs/embeddings.md). A ``DataLoader`` worker runs ahead on
its own schedule, and it starts its workers once per loader: forked workers after torch's
OpenMP threads exist can hang, and spawned ones re-import the main module for seconds per
pass. These helpers are plain ``python -m selbench.decoding`` children (fork + exec, so no
fork-safety question), started once per process and reused. Each one decodes only when
handed a batch, and the batch is handed over just before the encoder tokenises, the one
stretch of a CPU pass that leaves a core idle. Bytes in and pixels out go through files
both processes map (unlinked temporary files, on ``/dev/shm`` when it has room), so a
batch crosses with one copy in and none out; the pipes carry only a few bytes of
bookkeeping per batch.

Set ``SELBENCH_DECODE_HELPERS=0`` to decode in the calling process instead (the previous
behaviour: one thread per torch intra-op thread).
"""

from __future__ import annotations

import atexit
import functools
import io
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from typing import IO, Any

import numpy as np
from PIL import Image

#: PIL modes holding more than 8 bits per sample (16-bit greyscale PNGs open as these).
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")

# Wire format (little-endian). Request: item count, input bytes used, then per item its
# byte length (u32) and whether it is a PNG (u8). Reply: status, then either the item
# count, the output bytes used and per item (height, width) (u32 each), or, on failure,
# the failing item's position and a UTF-8 message.
_REQUEST = struct.Struct("<IQ")
_REPLY = struct.Struct("<BIQ")
_OK, _FAILED = 0, 1


def decode_image_bytes(data: bytes) -> Image.Image:
    """Decode an encoded image (any format PIL reads) to RGB.

    16-bit greyscale is scaled to 8 bits by its high byte, as libpng (and so OpenCV)
    does; PIL's own ``convert("RGB")`` clips it at 255, which turns almost every such
    image white. The first frame of an animation is used; EXIF orientation is not applied.
    """
    image: Image.Image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode in _WIDE_MODES:
        wide = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L")
    return image.convert("RGB")


@functools.cache
def _opencv() -> Any:
    """The ``cv2`` module, imported on the first PNG decoded, or None where OpenCV is not
    installed (PNGs then decode with PIL: the same pixels, about three times slower). So
    importing this module needs no OpenCV (the GPU check's embedding part,
    docs/gpu-check.md)."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def png_decoder() -> str:
    """What :func:`decode` decodes PNGs with here: ``"OpenCV <version>"`` or ``"PIL"``."""
    cv2 = _opencv()
    return "PIL" if cv2 is None else f"OpenCV {cv2.__version__}"


def decode(data: bytes, ext: str) -> Any:
    """Decode for embedding: PNG with OpenCV when installed (lossless, so pixel-identical
    to PIL, tested, and about three times faster on small images, which is most of the
    reading cost of an embedding pass on CPU); other formats, and PNGs without OpenCV,
    with PIL, like the trainer."""
    cv2 = _opencv() if ext == "png" else None
    if cv2 is not None:
        buffer = np.frombuffer(data, dtype=np.uint8)
        # OpenCV turns an image by its EXIF orientation unless told not to; PIL (the
        # trainer, the evaluator, and webdataset's decoder in open_clip_train) never does.
        # Ignoring it keeps the embedding pass on the pixels training sees
        # (docs/reliability.md).
        no_rotation = cv2.IMREAD_IGNORE_ORIENTATION
        rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)  # None before OpenCV 4.10
        if rgb is not None:  # OpenCV >= 4.10 decodes straight to RGB
            image = cv2.imdecode(buffer, rgb | no_rotation)
        else:
            bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR | no_rotation)
            image = None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if image is not None:
            return image
    return decode_image_bytes(data)


def _rgb_array(image: Any) -> np.ndarray:
    """``decode``'s result as a C-contiguous RGB uint8 (H, W, 3) array."""
    array = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(array)


class DecodeError(RuntimeError):
    """A helper could not decode an item, or the helper itself failed."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


class _Region:
    """A temporary file both processes map; grown with ``ftruncate`` and re-mapped."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.map: mmap.mmap | None = None
        self.size = 0

    def ensure(self, size: int, grow: bool) -> mmap.mmap:
        """The mapping, at least ``size`` bytes long: the file is grown first when
        ``grow`` (the writer's side), else the file's current size is mapped."""
        current = os.fstat(self.fd).st_size
        if grow and current < max(size, 1):  # never map an empty file
            current = max(size, 2 * current, 1 << 20)
            os.ftruncate(self.fd, current)
        if self.map is None or self.size != current:
            # No close(): arrays still viewing the old mapping keep it alive until dropped.
            self.map = mmap.mmap(self.fd, current)
            self.size = current
        return self.map


def _shared_folder() -> str | None:
    """Where the shared files live: ``/dev/shm`` (memory) when it has 1 GiB free, else
    the temporary directory. A container's ``/dev/shm`` is often 64 MiB, and writing past
    a full one through a mapping kills the writer with SIGBUS."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if stats.f_bavail * stats.f_frsize >= 1 << 30 else None


def _serve(stdin: IO[bytes], stdout: IO[bytes], in_fd: int, out_fd: int) -> None:
    """The helper's loop: decode each batch handed over until stdin closes."""
    source, target = _Region(in_fd), _Region(out_fd)
    stdout.write(b"R")  # ready
    stdout.flush()
    while True:
        try:
            count, used = _REQUEST.unpack(_read_exact(stdin, _REQUEST.size))
        except EOFError:
            return
        sizes = np.frombuffer(_read_exact(stdin, 4 * count), dtype="<u4")
        pngs = np.frombuffer(_read_exact(stdin, count), dtype=np.uint8)
        data = source.ensure(used, grow=False)
        shapes = np.zeros((count, 2), dtype="<u4")
        position, written = 0, 0
        try:
            for i in range(count):
                size = int(sizes[i])
                image = decode(data[position : position + size], "png" if pngs[i] else "")
                position += size
                array = _rgb_array(image)
                out = target.ensure(written + array.nbytes, grow=True)
                out[written : written + array.nbytes] = array.data.cast("B")
                written += array.nbytes
                shapes[i] = array.shape[:2]
        except Exception as exc:  # reported to the caller, who raises it with the sample's uid
            message = f"{type(exc).__name__}: {exc}".encode()
            stdout.write(_REPLY.pack(_FAILED, i, len(message)) + message)
            stdout.flush()
            continue
        stdout.write(_REPLY.pack(_OK, count, written) + shapes.tobytes())
        stdout.flush()


class _Helper:
    """One helper process and its two shared files (bytes in, pixels out)."""

    def __init__(self) -> None:
        self._files = [tempfile.TemporaryFile(dir=_shared_folder()) for _ in range(2)]
        in_fd, out_fd = (f.fileno() for f in self._files)
        self.source, self.target = _Region(in_fd), _Region(out_fd)
        # The helper imports the same selbench as this process, installed or not.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "selbench.decoding", str(in_fd), str(out_fd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(in_fd, out_fd),
            env=env,
        )
        assert self.process.stdin is not None and self.process.stdout is not None  # PIPEs
        self.requests, self.replies = self.process.stdin, self.process.stdout
        self.ready = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def _wait_ready(self) -> None:
        if not self.ready:
            if self.replies.read(1) != b"R":
                raise DecodeError(self._exit_message())
            self.ready = True

    def _exit_message(self) -> str:
        code = self.process.poll()
        return f"decoding helper (pid {self.process.pid}) exited" + (
            f" with code {code}" if code is not None else ""
        )

    def submit(self, items: Sequence[tuple[bytes, str]]) -> None:
        used = sum(len(data) for data, _ in items)
        region = self.source.ensure(used, grow=True)
        sizes = np.empty(len(items), dtype="<u4")
        pngs = np.empty(len(items), dtype=np.uint8)
        position = 0
        for i, (data, ext) in enumerate(items):
            region[position : position + len(data)] = data
            position += len(data)
            sizes[i], pngs[i] = len(data), ext == "png"
        try:
            self.requests.write(_REQUEST.pack(len(items), used) + sizes.tobytes() + pngs.tobytes())
            self.requests.flush()
        except (BrokenPipeError, OSError):
            raise DecodeError(self._exit_message()) from None

    def collect(self) -> list[np.ndarray]:
        """The decoded images of the last batch handed over: views of the shared file,
        valid until the next :meth:`submit`."""
        try:
            self._wait_ready()
            status, count, size = _REPLY.unpack(_read_exact(self.replies, _REPLY.size))
            if status == _FAILED:
                message = _read_exact(self.replies, size).decode(errors="replace")
                raise DecodeError(message, position=count)
            shapes = np.frombuffer(_read_exact(self.replies, 8 * count), dtype="<u4")
        except EOFError:
            raise DecodeError(self._exit_message()) from None
        pixels = np.frombuffer(self.target.ensure(size, grow=False), np.uint8, size)
        images, offset = [], 0
        for height, width in shapes.reshape(count, 2).tolist():
            length = height * width * 3
            images.append(pixels[offset : offset + length].reshape(height, width, 3))
            offset += length
        return images

    def close(self) -> None:
        try:
            self.requests.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.replies.close()
        for handle in self._files:
            handle.close()


class DecodeHelpers:
    """``count`` helper processes that decode batches split between them, in order.

    :meth:`submit` hands a batch over and returns at once; :meth:`collect` waits for it.
    One batch at a time; after an error mid-batch, :meth:`drain` (or a fresh instance)
    brings the helpers back in step.
    """

    def __init__(self, count: int) -> None:
        self.helpers = [_Helper() for _ in range(max(1, count))]
        self._parts: list[tuple[_Helper, int]] = []

    def alive(self) -> bool:
        return all(helper.alive() for helper in self.helpers)

    def submit(self, items: Sequence[tuple[bytes, str]]) -> None:
        if self._parts:
            raise RuntimeError("collect() the previous batch before submitting another")
        step = max(1, -(-len(items) // len(self.helpers)))  # an empty batch: no parts
        for start, helper in zip(range(0, len(items), step), self.helpers, strict=False):
            helper.submit(items[start : start + step])
            self._parts.append((helper, start))

    def collect(self) -> list[np.ndarray]:
        parts, self._parts = self._parts, []
        images: list[np.ndarray] = []
        failure: DecodeError | None = None
        for helper, start in parts:  # every part is read, so the helpers stay in step
            try:
                images.extend(helper.collect())
            except DecodeError as exc:
                if exc.position is not None:
                    exc.position += start
                failure = failure or exc
        if failure is not None:
            raise failure
        return images

    def drain(self) -> None:
        """Collect and drop a batch still in flight (after the consumer stopped early)."""
        if self._parts:
            try:
                self.collect()
            except DecodeError:
                pass

    def close(self) -> None:
        for helper in self.helpers:
            helper.close()
        self.helpers = []


_shared: dict[int, DecodeHelpers] = {}
_shared_lock = threading.Lock()


def helpers_enabled() -> bool:
    """Whether embedding passes decode in helper processes: POSIX hosts (the helpers
    receive their shared files as inherited descriptors), unless
    ``SELBENCH_DECODE_HELPERS=0``."""
    return os.name == "posix" and os.environ.get("SELBENCH_DECODE_HELPERS", "1") != "0"


def acquire_helpers(count: int) -> DecodeHelpers | None:
    """This process's ``count`` helpers, started on first use and reused by later passes;
    None while another pass is using them (that pass then decodes in-process).
    Release with :func:`release_helpers`."""
    if not _shared_lock.acquire(blocking=False):
        return None
    try:
        helpers = _shared.get(count)
        if helpers is not None and not helpers.alive():
            helpers.close()
            helpers = None
        if helpers is None:
            helpers = _shared[count] = DecodeHelpers(count)
        return helpers
    except OSError as exc:  # no interpreter to start (an embedded or frozen Python, say)
        warnings.warn(f"decoding in-process: helper processes cannot start ({exc})", stacklevel=2)
        _shared_lock.release()
        return None
    except BaseException:
        _shared_lock.release()
        raise


def release_helpers(helpers: DecodeHelpers, broken: bool = False) -> None:
    """Hand ``helpers`` back; ``broken`` ones (interrupted mid-batch) are shut down and
    the next pass starts fresh ones."""
    try:
        if broken:
            for count, shared in list(_shared.items()):
                if shared is helpers:
                    del _shared[count]
            helpers.close()
    finally:
        _shared_lock.release()


@atexit.register
def _close_shared() -> None:
    for helpers in _shared.values():
        helpers.close()
    _shared.clear()


if __name__ == "__main__":
    _serve(sys.stdin.buffer, sys.stdout.buffer, int(sys.argv[1]), int(sys.argv[2]))
