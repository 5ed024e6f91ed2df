"""Bad and odd image files, generated in memory (nothing binary is committed).

``CASES`` maps a case name to a zero-argument function returning the file's bytes; ``EXPECTED`` maps the same name
to the expected outcome of ``modalmill.io.decode.decode_image`` with the default ``DecodeConfig``: ``"ok"``,
or the prefix of the ``DecodeError.reason``. Each function also carries it as ``fn.expected``. The reliability suite
reuses these to build corrupt tar shards: ``[(name, CASES[name]()) for name in BAD_CASES]``.

Geometry used by the checks in tests/test_decode.py:

* ``UPRIGHT`` is the 64x48 (w x h) quadrant pattern that every ``exif_rot*`` case must decode to: top-left red,
  top-right green, bottom-left blue, bottom-right white.
* ``gradient16_png`` holds ``x * 257`` in column ``x`` (0..255), so a correct 16-bit -> 8-bit conversion gives ``x``.
* animated cases have a red first frame and a blue second frame.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import ExifTags, Image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
UPRIGHT_W, UPRIGHT_H = 64, 48


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def upright_pattern() -> np.ndarray:
    """[48, 64, 3]: top-left red, top-right green, bottom-left blue, bottom-right white (the top row is red|green)."""
    a = np.zeros((UPRIGHT_H, UPRIGHT_W, 3), np.uint8)
    h2, w2 = UPRIGHT_H // 2, UPRIGHT_W // 2
    a[:h2, :w2], a[:h2, w2:], a[h2:, :w2], a[h2:, w2:] = RED, GREEN, BLUE, WHITE
    return a


@functools.cache
def _astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


# ------------------------------------------------------------------------------------------------ good and odd


@functools.cache
def real_photo_jpeg() -> bytes:
    """A real photo (skimage astronaut, 512x512) as a baseline YCbCr JPEG: stored unchanged."""
    return _save(Image.fromarray(_astronaut()), "JPEG", quality=90)


@functools.cache
def big_photo_jpeg() -> bytes:
    """The astronaut tiled to 2048x1536: big enough for draft() to decode at 1/2 or 1/4 scale."""
    a = np.tile(_astronaut(), (3, 4, 1))  # 1536 x 2048
    return _save(Image.fromarray(a), "JPEG", quality=85)


@functools.cache
def progressive_jpeg() -> bytes:
    return _save(Image.fromarray(_astronaut()[:200, :300]), "JPEG", quality=90, progressive=True)


def _exif_rotated(orientation: int) -> bytes:
    undo = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}
    stored = Image.fromarray(upright_pattern()).transpose(undo[orientation])  # what a camera writes
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return _save(stored, "JPEG", quality=95, exif=exif.tobytes())


@functools.cache
def exif_rot6_jpeg() -> bytes:
    return _exif_rotated(6)


@functools.cache
def exif_rot8_jpeg() -> bytes:
    return _exif_rotated(8)


@functools.cache
def exif_rot3_jpeg() -> bytes:
    return _exif_rotated(3)


@functools.cache
def exif_rot1_jpeg() -> bytes:
    """An RGB JPEG whose EXIF says orientation 1: stored unchanged."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 1
    return _save(Image.fromarray(upright_pattern()), "JPEG", quality=95, exif=exif.tobytes())


@functools.cache
def exif_rot6_png() -> bytes:
    """EXIF orientation in a PNG eXIf chunk (after the pixels in Pillow's writer)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    return _save(Image.fromarray(upright_pattern()).transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif.tobytes())


@functools.cache
def gradient16_png() -> bytes:
    """16-bit greyscale PNG, 256x16, column x = x * 257 (0..65535)."""
    a = np.tile((np.arange(256, dtype=np.uint16) * 257)[None, :], (16, 1))
    return _save(Image.fromarray(a), "PNG")


@functools.cache
def gradient16b_tiff() -> bytes:
    """Big-endian 16-bit greyscale TIFF (mode I;16B), column x = x * 257."""
    a = np.tile((np.arange(256, dtype=np.uint16) * 257)[None, :], (16, 1)).astype(">u2")
    img = Image.frombytes("I;16B", (256, 16), a.tobytes())
    return _save(img, "TIFF")


@functools.cache
def float_tiff() -> bytes:
    """32-bit float TIFF (mode F), a gradient from -1.5 to 2.5 across 256 columns: normalised by min/max."""
    a = np.tile(np.linspace(-1.5, 2.5, 256, dtype=np.float32)[None, :], (16, 1))
    return _save(Image.fromarray(a), "TIFF")


@functools.cache
def flat_float_tiff() -> bytes:
    """A flat float image (all 100.0): no division by zero, value kept."""
    return _save(Image.fromarray(np.full((8, 8), 100.0, np.float32)), "TIFF")


@functools.cache
def cmyk_jpeg() -> bytes:
    """CMYK JPEG (Pillow writes Adobe-inverted CMYK with an APP14 marker): left half red, right half blue."""
    a = np.zeros((32, 64, 4), np.uint8)
    a[:, :32] = (0, 255, 255, 0)  # red
    a[:, 32:] = (255, 255, 0, 0)  # blue
    return _save(Image.frombytes("CMYK", (64, 32), a.tobytes()), "JPEG", quality=95)


@functools.cache
def palette_transparent_png() -> bytes:
    """P-mode PNG with tRNS: index 0 fully transparent (left half), index 1 opaque red (right half)."""
    img = Image.new("P", (32, 16), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (16, 0, 32, 16))
    return _save(img, "PNG", transparency=0)


@functools.cache
def palette_png() -> bytes:
    """P-mode PNG without transparency: left half green, right half blue."""
    img = Image.new("P", (32, 16), 0)
    img.putpalette([0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.paste(1, (16, 0, 32, 16))
    return _save(img, "PNG")


@functools.cache
def rgba_png() -> bytes:
    """RGBA PNG: left half transparent black, right half half-transparent blue (composited: (127, 127, 255))."""
    a = np.zeros((16, 32, 4), np.uint8)
    a[:, 16:] = (0, 0, 255, 128)
    return _save(Image.fromarray(a), "PNG")


@functools.cache
def la_png() -> bytes:
    """LA PNG: left half black and transparent (-> background), right half mid-grey 100 and opaque."""
    a = np.zeros((16, 32, 2), np.uint8)
    a[:, 16:] = (100, 255)
    return _save(Image.frombytes("LA", (32, 16), a.tobytes()), "PNG")


@functools.cache
def bilevel_png() -> bytes:
    """Mode '1' PNG, left half black, right half white."""
    img = Image.new("1", (32, 16), 0)
    img.paste(1, (16, 0, 32, 16))
    return _save(img, "PNG")


@functools.cache
def grayscale_jpeg() -> bytes:
    """Single-channel (L) JPEG: re-encoded as a 3-channel JPEG."""
    return _save(Image.fromarray(_astronaut()[:128, :160].mean(axis=2).astype(np.uint8)), "JPEG", quality=95)


@functools.cache
def animated_gif() -> bytes:
    """Two frames, red then blue: the first frame (red) is the one decoded."""
    frames = [Image.new("RGB", (24, 16), c) for c in (RED, BLUE)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


@functools.cache
def animated_png() -> bytes:
    frames = [Image.new("RGB", (24, 16), c) for c in (RED, BLUE)]
    return _save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100, loop=0)


@functools.cache
def animated_webp() -> bytes:
    frames = [Image.new("RGB", (24, 16), c) for c in (RED, BLUE)]
    return _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)


@functools.cache
def one_pixel_png() -> bytes:
    return _save(Image.new("RGB", (1, 1), GREEN), "PNG")


@functools.cache
def wide_png() -> bytes:
    """10000x20 RGB PNG (a horizontal gradient): with max_size=512 it becomes 512x1."""
    a = np.zeros((20, 10000, 3), np.uint8)
    a[..., 0] = (np.arange(10000) * 255 // 9999)[None, :]
    return _save(Image.fromarray(a), "PNG", compress_level=1)


@functools.cache
def photo_webp() -> bytes:
    return _save(Image.fromarray(_astronaut()[:128, :192]), "WEBP", quality=90)


@functools.cache
def photo_bmp() -> bytes:
    return _save(Image.fromarray(_astronaut()[:96, :128]), "BMP")


@functools.cache
def photo_tiff() -> bytes:
    return _save(Image.fromarray(_astronaut()[:96, :128]), "TIFF", compression="tiff_lzw")


@functools.cache
def ycbcr_tiff() -> bytes:
    """A TIFF whose pixels Pillow opens in a non-RGB mode (YCbCr saved by Pillow's writer)."""
    return _save(Image.fromarray(_astronaut()[:64, :64]).convert("YCbCr"), "TIFF")


@functools.cache
def photo_ppm() -> bytes:
    return _save(Image.fromarray(_astronaut()[:32, :48]), "PPM")


# ------------------------------------------------------------------------------------------------ bad


@functools.cache
def truncated_jpeg() -> bytes:
    """A real photo JPEG cut in the middle of the entropy-coded data."""
    data = real_photo_jpeg()
    return data[: len(data) // 2]


@functools.cache
def truncated_jpeg_header() -> bytes:
    """A JPEG cut inside its header (before the frame/scan headers are complete)."""
    return real_photo_jpeg()[:300]


@functools.cache
def jpeg_missing_eoi() -> bytes:
    """A JPEG whose last two bytes (the EOI marker) are missing: Pillow reports it truncated."""
    return real_photo_jpeg()[:-2]


def jpeg_magic_garbage() -> bytes:
    """JPEG magic followed by garbage."""
    return b"\xff\xd8\xffgarbage"


@functools.cache
def truncated_png() -> bytes:
    data = _save(Image.fromarray(_astronaut()[:128, :128]), "PNG")
    return data[: len(data) // 2]


@functools.cache
def corrupt_png_idat() -> bytes:
    """A PNG whose compressed pixel data was overwritten in the middle (CRC left stale)."""
    data = bytearray(_save(Image.fromarray(_astronaut()[:128, :128]), "PNG"))
    i = data.index(b"IDAT") + 4 + 200
    data[i: i + 64] = bytes(range(64))
    return bytes(data)


@functools.cache
def truncated_gif() -> bytes:
    data = _save(Image.fromarray(_astronaut()[:128, :128]).convert("P"), "GIF")
    return data[: len(data) // 2]


@functools.cache
def tiff_short_strips() -> bytes:
    """An uncompressed 16x16 TIFF whose ImageLength was patched to 4096 rows: the strips cover 16 of them (Pillow
    would silently leave the rest black)."""
    data = bytearray(_save(Image.fromarray(_astronaut()[:16, :16, 0]), "TIFF"))
    assert data[:2] == b"II"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag == 257:  # ImageLength
            struct.pack_into("<H" if kind == 3 else "<I", data, entry + 8, 4096)
    return bytes(data)


def empty_file() -> bytes:
    return b""


@functools.cache
def random_bytes() -> bytes:
    return np.random.default_rng(1234).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def html_page() -> bytes:
    return b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def svg_image() -> bytes:
    return b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>\n'


@functools.cache
def icon_ico() -> bytes:
    """A Windows icon: Pillow reads it, the pipeline does not take it."""
    return _save(Image.new("RGBA", (32, 32), RED + (255,)), "ICO", sizes=[(32, 32)])


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bomb_png() -> bytes:
    """A 100000x100000 RGB PNG header with a tiny IDAT (59 bytes in all): rejected from the header alone."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _png_chunk(b"IEND", b""))


def bomb_gif() -> bytes:
    """A GIF whose logical screen and only frame are 65535x65535 (4.3e9 pixels)."""
    screen = struct.pack("<HHBBB", 65535, 65535, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"  # 2-colour table
    frame = b"," + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b";"


@functools.cache
def bomb_jpeg() -> bytes:
    """A small JPEG whose SOF0 frame header was patched to declare 65500x65500."""
    data = bytearray(_save(Image.new("RGB", (16, 16), RED), "JPEG"))
    i = data.index(b"\xff\xc0")
    data[i + 5: i + 9] = struct.pack(">HH", 65500, 65500)
    return bytes(data)


# ------------------------------------------------------------------------------------------------ the table

_TABLE: list[tuple[Callable[[], bytes], str]] = [
    (real_photo_jpeg, "ok"),
    (big_photo_jpeg, "ok"),
    (progressive_jpeg, "ok"),
    (exif_rot6_jpeg, "ok"),
    (exif_rot8_jpeg, "ok"),
    (exif_rot3_jpeg, "ok"),
    (exif_rot1_jpeg, "ok"),
    (exif_rot6_png, "ok"),
    (gradient16_png, "ok"),
    (gradient16b_tiff, "ok"),
    (float_tiff, "ok"),
    (flat_float_tiff, "ok"),
    (cmyk_jpeg, "ok"),
    (palette_transparent_png, "ok"),
    (palette_png, "ok"),
    (rgba_png, "ok"),
    (la_png, "ok"),
    (bilevel_png, "ok"),
    (grayscale_jpeg, "ok"),
    (animated_gif, "ok"),
    (animated_png, "ok"),
    (animated_webp, "ok"),
    (one_pixel_png, "ok"),
    (wide_png, "ok"),
    (photo_webp, "ok"),
    (photo_bmp, "ok"),
    (photo_tiff, "ok"),
    (ycbcr_tiff, "ok"),
    (photo_ppm, "ok"),
    (truncated_jpeg, "truncated JPEG"),
    (truncated_jpeg_header, "truncated JPEG"),
    (jpeg_missing_eoi, "truncated JPEG"),
    (jpeg_magic_garbage, "corrupt JPEG"),
    (truncated_png, "truncated PNG"),
    (corrupt_png_idat, "corrupt PNG"),
    (truncated_gif, "truncated GIF"),
    (tiff_short_strips, "corrupt TIFF"),
    (empty_file, "empty file (0 bytes)"),
    (random_bytes, "not an image"),
    (html_page, "not an image: HTML"),
    (svg_image, "not an image: SVG"),
    (icon_ico, "unsupported format: ICO"),
    (bomb_png, "decompression bomb"),
    (bomb_gif, "decompression bomb"),
    (bomb_jpeg, "decompression bomb"),
]

for _fn, _expected in _TABLE:
    _fn.expected = _expected  # type: ignore[attr-defined]

CASES: dict[str, Callable[[], bytes]] = {fn.__name__: fn for fn, _ in _TABLE}
EXPECTED: dict[str, str] = {fn.__name__: expected for fn, expected in _TABLE}
OK_CASES: list[str] = [name for name, e in EXPECTED.items() if e == "ok"]
BAD_CASES: list[str] = [name for name, e in EXPECTED.items() if e != "ok"]
