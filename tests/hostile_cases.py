"""The hostile pool inputs of docs/reliability.md, one :class:`Case` per row of its table.

Each case builds the members of one sample (key ``hostile``) or a whole broken shard, and
says what the pool reader must do with it: keep the sample, skip it and count it under a
reason, or stop with an error naming the shard. The images are made here, cheaply: the
20000 x 20000 decompression bomb is a 1-bit PNG whose zlib stream of zero rows is 48 kB.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Member:
    """One tar member: a file with ``data``, or a link (``link`` = ``symlink``/``hardlink``)."""

    name: str
    data: bytes = b""
    link: str | None = None
    target: str = ""


@dataclass
class Case:
    """A row of the table: ``outcome`` is ``kept``, a skip reason, or ``error``."""

    id: str
    members: Callable[[Path], list[Member]] | None = None  # the hostile sample's members
    outcome: str = "kept"
    shard: Callable[[Path], None] | None = None  # writes a whole (broken) shard instead
    second_shard: list[Member] = field(default_factory=list)  # a second, clean shard
    check: Callable[[dict], None] | None = None  # further checks on a kept sample's row


# -- images ----------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` zero pixels (about 48 kB).

    Written chunk by chunk with zlib, because building the image in PIL first would hold
    the 400-megapixel image the test is about in memory."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _gradient() -> Image.Image:
    """A 32 x 24 RGB image with different channels, so a rotation or swap shows."""
    grey = Image.linear_gradient("L").resize((32, 24))
    return Image.merge("RGB", [grey, grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT), grey])


def _with_exif_rotation(fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return _encode(_gradient(), fmt, exif=exif)


def grey16_png() -> bytes:
    values = (np.arange(32 * 24, dtype=np.uint16).reshape(24, 32) * 80).astype(np.uint16)
    return _encode(Image.fromarray(values), "PNG")


def rgb16_png() -> bytes:
    import cv2

    values = (np.arange(32 * 24 * 3, dtype=np.uint16).reshape(24, 32, 3) * 27).astype(np.uint16)
    ok, encoded = cv2.imencode(".png", values)
    assert ok
    return encoded.tobytes()


def palette_alpha_png() -> bytes:
    palette = _gradient().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(palette, "PNG", transparency=0)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((250, 0, 0), (0, 250, 0))]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)


def truncated_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    photo = _encode(Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)), "JPEG")
    return photo[: len(photo) // 2]


def clean_png(shade: int = 90) -> bytes:
    return _encode(Image.new("RGB", (16, 16), (shade, 120, 200 - shade)), "PNG")


def sample(key: str, image: bytes | None, ext: str = "png", caption: bytes = b"a test pair"):
    members = [Member(f"{key}.txt", caption), Member(f"{key}.json", json.dumps({}).encode())]
    if image is not None:
        members.append(Member(f"{key}.{ext}", image))
    return members


def _image(data: Callable[[], bytes], ext: str) -> Callable[[Path], list[Member]]:
    return lambda root: sample("hostile", data(), ext, b"a hostile image")


def _caption(text: bytes | None) -> Callable[[Path], list[Member]]:
    def members(root: Path) -> list[Member]:
        found = sample("hostile", clean_png(10), caption=text or b"")
        return [m for m in found if text is not None or not m.name.endswith(".txt")]

    return members


def _json(raw: bytes) -> Callable[[Path], list[Member]]:
    def members(root: Path) -> list[Member]:
        found = sample("hostile", clean_png(30))
        return [Member(m.name, raw) if m.name.endswith(".json") else m for m in found]

    return members


def _under(folder: Callable[[Path], str]) -> Callable[[Path], list[Member]]:
    """The sample's members under another folder (one that escapes, an absolute one)."""

    def members(root: Path) -> list[Member]:
        found = sample("hostile", clean_png(40))
        return [Member(f"{folder(root)}/{m.name}", m.data) for m in found]

    return members


def _pixels(expected: Callable[[np.ndarray], bool]) -> Callable[[dict], None]:
    def check(row: dict) -> None:
        assert expected(row["pixels"]), row["pixels"].shape

    return check


def _caption_is(text: str) -> Callable[[dict], None]:
    def check(row: dict) -> None:
        assert row["caption"] == text

    return check


def _uid_is(uid: str) -> Callable[[dict], None]:
    def check(row: dict) -> None:
        assert row["uid"] == uid

    return check


def _truncated_shard(path: Path) -> None:
    write_tar(path, sample("k0", clean_png()) + sample("k1", clean_png(5)))
    path.write_bytes(path.read_bytes()[:1500])


def _not_a_tar(path: Path) -> None:
    path.write_bytes(b"this is not a tar archive\n" * 100)


#: Folders the escaping member names point into: relative to the pool directory, and
#: an absolute one beside the pool directory. Neither may exist after a scan.
ESCAPE_RELATIVE = "../../escaped-by-a-member"
ESCAPE_ABSOLUTE = "escaped-absolute"

CASES = [
    Case("image_decompression_bomb", _image(bomb_png, "png"), "image_too_large"),
    Case(
        "image_cmyk_jpeg",
        _image(lambda: _encode(_gradient().convert("CMYK"), "JPEG"), "jpg"),
        check=_pixels(lambda p: p.shape == (24, 32, 3)),
    ),
    Case(
        "image_16bit_greyscale_png",
        _image(grey16_png, "png"),
        # high byte of the 16-bit value, not PIL's clip at 255 (which made it white)
        check=_pixels(lambda p: p[0, 1, 0] == 80 >> 8 and p[23, 31, 0] == (767 * 80) >> 8),
    ),
    Case("image_16bit_rgb_png", _image(rgb16_png, "png")),
    Case("image_palette_with_alpha_png", _image(palette_alpha_png, "png")),
    Case(
        "image_exif_rotated_jpeg",
        _image(lambda: _with_exif_rotation("JPEG"), "jpg"),
        check=_pixels(lambda p: p.shape == (24, 32, 3)),  # stored orientation, as PIL reads it
    ),
    Case(
        "image_exif_rotated_png",
        _image(lambda: _with_exif_rotation("PNG"), "png"),
        check=_pixels(lambda p: p.shape == (24, 32, 3)),
    ),
    Case(
        "image_1x1",
        _image(lambda: _encode(Image.new("RGB", (1, 1), (5, 6, 7)), "PNG"), "png"),
        check=_pixels(lambda p: p.shape == (1, 1, 3) and p.tolist() == [[[5, 6, 7]]]),
    ),
    Case(
        "image_animated_png",
        _image(lambda: animated("PNG"), "png"),
        check=_pixels(lambda p: tuple(p[0, 0]) == (250, 0, 0)),  # the first frame
    ),
    Case(
        "image_animated_webp",
        _image(lambda: animated("WEBP"), "webp"),
        check=_pixels(lambda p: p.shape == (16, 16, 3) and p[0, 0, 0] > 200 > p[0, 0, 1]),
    ),
    Case("image_truncated_jpeg", _image(truncated_jpeg, "jpg"), "unreadable_image"),
    Case("image_zero_bytes", _image(lambda: b"", "png"), "unreadable_image"),
    Case("caption_empty", _caption(b""), "empty_caption"),
    Case("caption_whitespace_only", _caption(b" \t\n\r\n  "), "empty_caption"),
    Case("caption_missing", _caption(None), "empty_caption"),
    Case(
        "caption_not_utf8",
        _caption(b"caf\xe9 au lait \xff"),
        check=_caption_is("caf\ufffd au lait \ufffd"),
    ),
    Case(
        "caption_100kb",
        _caption(("long caption " * 8000).encode()[:100_000]),
        check=lambda row: len(row["caption"]) == len(("long caption " * 8000)[:100_000].strip()),
    ),
    Case("caption_with_nul", _caption(b"a red\x00 square"), check=_caption_is("a red\x00 square")),
    Case("json_not_json", _json(b"{not json"), check=_uid_is("hostile")),
    Case("json_nested_too_deep", _json(b"[" * 100_000), check=_uid_is("hostile")),
    Case(
        "json_uid_path_traversal",
        _json(json.dumps({"uid": "../../escaped-uid"}).encode()),
        check=_uid_is("../../escaped-uid"),  # a uid is data, never a file name
    ),
    Case(
        "member_path_traversal",
        _under(lambda root: ESCAPE_RELATIVE),
        "unsafe_member",
    ),
    Case(
        "member_absolute_name",
        _under(lambda root: str(root.parent / ESCAPE_ABSOLUTE)),
        "unsafe_member",
    ),
    Case(
        "member_symlink",
        lambda root: [
            *sample("hostile", None),
            Member("hostile.png", link="symlink", target="/etc/passwd"),
        ],
        "link_member",
    ),
    Case(
        "member_hardlink",
        lambda root: [
            *sample("hostile", None),
            Member("hostile.png", link="hardlink", target="k0.png"),
        ],
        "link_member",
    ),
    Case(
        "member_duplicate_name",
        lambda root: [*sample("hostile", clean_png(50)), Member("hostile.png", clean_png(60))],
        "duplicate_member",
    ),
    Case(
        "key_duplicate_across_shards",
        lambda root: sample("hostile", clean_png(70)),
        "duplicate_uid",
        second_shard=sample("hostile", clean_png(80)),
    ),
    Case("shard_truncated", outcome="error", shard=_truncated_shard),
    Case("shard_not_a_tar", outcome="error", shard=_not_a_tar),
]


def write_tar(path: Path, members: list[Member]) -> Path:
    """A tar of ``members`` in order, with fixed header fields."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.mtime = 0
            if member.link == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, member.target
                tar.addfile(info)
            elif member.link == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, member.target
                tar.addfile(info)
            else:
                info.size = len(member.data)
                tar.addfile(info, io.BytesIO(member.data))
    return path


def build_pool(root: Path, case: Case) -> Path:
    """A pool directory holding two clean samples and ``case``'s hostile one."""
    pool = root / "pool"
    shard = pool / "00000.tar"
    if case.shard is not None:
        pool.mkdir(parents=True)
        case.shard(shard)
        return pool
    clean = sample("k0", clean_png(0)) + sample("k1", clean_png(20))
    write_tar(shard, clean + case.members(pool))
    if case.second_shard:
        write_tar(pool / "00001.tar", case.second_shard)
    return pool
