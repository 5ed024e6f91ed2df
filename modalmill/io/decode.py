"""Turning one image file's bytes into the stored rgb image.

``decode_image`` is the only place where untrusted image bytes are parsed. It

* identifies the format from the magic bytes (only ``SUPPORTED_FORMATS``: no Ghostscript for EPS, no guessing of
  magic-less formats such as TGA, so random bytes are never "decoded" into noise),
* checks the size declared by the header against ``DecodeConfig.max_pixels`` (and ``min_size``) before a single
  pixel is decoded,
* loads the first frame (animated GIF/PNG/WebP), refusing truncated files (``ImageFile.LOAD_TRUNCATED_IMAGES`` is
  never touched),
* applies the EXIF orientation (the table of ``ImageOps.exif_transpose``), converts any mode to 8-bit RGB
  (alpha and palette transparency are composited on ``background``; 16-bit is scaled 0..65535 -> 0..255; float
  is normalised by min/max), resizes so the longer side is at most ``max_size`` (JPEGs are decoded at a reduced
  DCT scale first with ``draft``) and
* stores a JPEG: the source bytes themselves when the source is an RGB (YCbCr) JPEG that needs no rotation and no
  resize (``reencoded=False``), otherwise a deterministic re-encode at ``jpeg_quality`` (4:2:0, baseline, no
  optimize). A grayscale JPEG is re-encoded too, so the stored rgb is always a 3-channel JPEG.

``DecodedImage.image`` is always exactly ``decode_stored_rgb(stored_bytes)``: labels are computed from what is
stored, not from the pre-encode pixels. With a ``draft`` (the shard task's, when every labeler of the job reads only
crops resized to a bounded side), it is ``decode_stored_rgb(stored_bytes, draft=draft)``: the stored JPEG decoded
at a reduced DCT scale, never smaller than what the labelers need (a 12-megapixel photo held at 1/4 or 1/8 of
each side while it waits for its labels).

Every failure is a ``DecodeError`` with a short one-line ``reason`` ("empty file (0 bytes)", "truncated JPEG: ...",
"not an image: ...", "decompression bomb: ...", "corrupt PNG: ...", "unsupported format: ...",
"unsupported mode: ...", "too small: ...").

No global state is changed (warning filters, ``Image.MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``), so this is
safe to call from several threads at once. The file is opened through Pillow's plugin registry rather than
``Image.open`` so that Pillow's own open-time bomb check (a *warning* above ``Image.MAX_IMAGE_PIXELS``, an error
above twice that) does not fire before ours: ``max_pixels`` is the one limit that applies to the declared size.
Pillow's later checks (e.g. GIF frame extents) still raise ``DecompressionBombError``, which becomes a
``DecodeError('decompression bomb: ...')``; the final decoded size is checked against ``max_pixels`` again.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin
from PIL.JpegImagePlugin import JpegImageFile

__all__ = ["SUPPORTED_FORMATS", "DecodeConfig", "DecodeError", "DecodedImage", "Draft", "decode_image",
           "decode_stored_rgb"]

# Formats identified by their magic bytes. Anything else Pillow could open is refused as "unsupported format: X".
SUPPORTED_FORMATS: tuple[str, ...] = (
    "JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "JPEG2000", "AVIF", "HEIF", "QOI",
)
_STORED_FORMATS = ("JPEG",)  # the JPEG factory also returns MPO for JPEGs with an MPF segment

# JPEGs that are resized are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that is still >= this many times the
# target size, then Lanczos-resized to the exact target. 1.0 is 2-5x faster than a full decode + resize; on a photo
# the result is within ~36-43 dB PSNR of full decode + Lanczos (2.0, Image.thumbnail's default, gives ~48-53 dB).
_DRAFT_GAP = 1.0
# decode_image's ``draft``: (stored width, stored height) -> the smallest (width, height) needed, or None (full size)
Draft = Callable[[int, int], "tuple[int, int] | None"]
_RESIZE_GAP = 3.0  # Image.resize reducing_gap: box-reduce by an integer factor first, then Lanczos
_JPEG_SUBSAMPLING = 2  # 4:2:0, fixed so that the output does not depend on Pillow's defaults
_ORIENTATION = ExifTags.Base.Orientation
_F32_MAX = float(np.finfo(np.float32).max)
_U16_TO_U8 = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257)
_TRANSPOSE = {  # the table of ImageOps.exif_transpose
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class DecodeError(Exception):
    """An image that cannot be decoded; ``reason`` is a short, precise one-line reason, e.g.
    'truncated JPEG: image file is truncated (12 bytes not processed)', 'empty file (0 bytes)',
    'not an image: cannot identify image file format',
    'decompression bomb: 100000x100000 = 1e10 pixels > limit 1.8e8'."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class DecodeConfig:
    max_pixels: int = 178_956_970  # declared width*height above this -> DecodeError before any pixel is decoded
    max_size: int | None = None  # cap on the LONGER side of the stored image (None = keep size); never upscale
    jpeg_quality: int = 95
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited on this colour
    min_size: int = 1  # images whose shorter side (of the source) is below this -> DecodeError

    def __post_init__(self):
        def whole(name, lo, hi=None, none_ok=False):
            v = getattr(self, name)
            if v is None and none_ok:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
                raise ValueError(f"decode.{name} must be an integer {rng}{' or None' if none_ok else ''}, got {v!r}")

        whole("max_pixels", 1)
        whole("max_size", 1, none_ok=True)
        whole("jpeg_quality", 1, 100)
        whole("min_size", 1)
        bg = self.background
        if (not isinstance(bg, (tuple, list)) or len(bg) != 3
                or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 255 for c in bg)):
            raise ValueError(f"decode.background must be three integers in 0..255, got {bg!r}")
        object.__setattr__(self, "background", tuple(bg))


@dataclass
class DecodedImage:
    image: np.ndarray  # [H, W, 3] uint8, upright, RGB: exactly what decoding `stored_bytes` gives (read-only;
    # with a ``draft``: what decoding them at the reduced DCT scale gives)
    stored_bytes: bytes  # the JPEG to store as the sample's `rgb`
    original_size: tuple[int, int]  # (width, height) of the source after EXIF orientation, before resizing
    source_format: str  # PIL format name, e.g. 'JPEG', 'PNG', 'GIF'
    reencoded: bool  # False when the source bytes were stored unchanged
    # (width, height) of the stored rgb: ``image``'s own size unless a ``draft`` asked for a reduced decode
    stored_size: tuple[int, int] = (0, 0)

    @property
    def reduced(self) -> bool:
        """Whether ``image`` is smaller than the stored rgb (a draft decode of it)."""
        return self.stored_size != (self.image.shape[1], self.image.shape[0])


# ---------------------------------------------------------------------------------------------------- public API


def decode_image(data: bytes, config: DecodeConfig = DecodeConfig(), draft: Draft | None = None) -> DecodedImage:
    """Decode one image file's bytes into the stored rgb image. Raises ``DecodeError`` (only) for bad input.

    ``draft(width, height)``, given the stored rgb's size, may return the smallest size the caller needs of it
    (None: the full size): ``image`` is then the stored JPEG decoded at the smallest DCT scale (1/2, 1/4, 1/8)
    that is at least that size (``DecodedImage.stored_size`` keeps the stored size). A source stored as it is is
    decoded so from the start; one that is re-encoded is decoded in full first (the stored rgb keeps its size)."""
    data = _as_bytes(data)
    img = _open(data, SUPPORTED_FORMATS)
    fmt = img.format or "image"
    try:
        return _decode(img, data, fmt, config, draft)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(_reason(e, fmt)) from e
    finally:
        img.close()


def decode_stored_rgb(data: bytes, *, max_pixels: int = DecodeConfig.max_pixels,
                      draft: Draft | None = None) -> np.ndarray:
    """Decode an already-stored rgb JPEG to a read-only [H, W, 3] uint8 array (no EXIF rotation: stored rgb is
    upright by construction); ``draft`` as in :func:`decode_image`. Raises ``DecodeError`` (only)."""
    data = _as_bytes(data)
    img = _open(data, _STORED_FORMATS)
    fmt = img.format or "JPEG"
    try:
        _check_declared(img.size, max_pixels, 1)
        _apply_draft(img, draft)
        img.load()
        return _stored_pixels(img)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(_reason(e, fmt)) from e
    finally:
        img.close()


def _apply_draft(img: Image.Image, draft: Draft | None) -> None:
    """Ask the JPEG decoder for a reduced DCT scale when ``draft`` needs less than the full size."""
    if draft is None or not isinstance(img, JpegImageFile):
        return
    want = draft(*img.size)
    if want is not None and (want[0] < img.size[0] or want[1] < img.size[1]):
        img.draft("RGB", (max(1, int(want[0])), max(1, int(want[1]))))


# ---------------------------------------------------------------------------------------------------- decoding


def _decode(img: Image.Image, data: bytes, fmt: str, config: DecodeConfig, draft: Draft | None) -> DecodedImage:
    w0, h0 = img.size  # as stored, before orientation: from the header, nothing decoded yet
    _check_declared((w0, h0), config.max_pixels, config.min_size)
    is_jpeg = isinstance(img, JpegImagePlugin.JpegImageFile)
    if fmt == "TIFF":
        _check_tiff_strips(img)
    if not is_jpeg:
        img.load()  # e.g. PNG keeps its eXIf chunk after the pixels: getexif() would load anyway
    orientation, exif_ok = _orientation(img)
    method = _TRANSPOSE.get(orientation)
    swap = orientation in (5, 6, 7, 8)
    original_size = (h0, w0) if swap else (w0, h0)

    target = _target_size(original_size, config.max_size)  # upright (w, h), or None to keep the size
    target_stored = None if target is None else ((target[1], target[0]) if swap else target)
    # An RGB (YCbCr) JPEG that is upright and small enough is stored as it is (its mode is known from the header)
    as_is = fmt == "JPEG" and img.mode == "RGB" and exif_ok and orientation in (None, 1) and target is None
    if is_jpeg:
        if as_is:
            _apply_draft(img, draft)
        elif target_stored is not None:
            tw, th = target_stored
            img.draft("RGB", (max(1, math.ceil(tw * _DRAFT_GAP)), max(1, math.ceil(th * _DRAFT_GAP))))
        img.load()
    _check_loaded(img.size, config.max_pixels)

    if as_is and img.mode == "RGB":  # store the source bytes; the image is what decoding them gives
        return DecodedImage(image=_stored_pixels(img), stored_bytes=data, original_size=original_size,
                            source_format=fmt, reencoded=False, stored_size=(w0, h0))

    rgb = _to_rgb(img, config.background)
    if target_stored is not None and rgb.size != target_stored:
        rgb = rgb.resize(target_stored, Image.Resampling.LANCZOS, reducing_gap=_RESIZE_GAP)
    if method is not None:
        rgb = rgb.transpose(method)
    stored, stored_size = _encode_jpeg(rgb, config.jpeg_quality), rgb.size
    del rgb
    # decoded again: exactly what is stored (at the reduced scale ``draft`` asks for)
    image = decode_stored_rgb(stored, max_pixels=config.max_pixels, draft=draft)
    return DecodedImage(image=image, stored_bytes=stored, original_size=original_size, source_format=fmt,
                        reencoded=True, stored_size=stored_size)


def _stored_pixels(img: Image.Image) -> np.ndarray:
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def _encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # Only the settings named here (encoderinfo), never the source's exif/icc/dpi: same input -> same bytes.
    img.save(buf, format="JPEG", quality=quality, subsampling=_JPEG_SUBSAMPLING, optimize=False,
             progressive=False)
    return buf.getvalue()


def _target_size(size: tuple[int, int], max_size: int | None) -> tuple[int, int] | None:
    w, h = size
    if max_size is None or max(w, h) <= max_size:
        return None
    if w >= h:
        return max_size, max(1, min(max_size, round(h * max_size / w)))
    return max(1, min(max_size, round(w * max_size / h))), max_size


def _orientation(img: Image.Image) -> tuple[int | None, bool]:
    """(EXIF orientation or None, whether the EXIF could be read). Unreadable EXIF is treated as upright, but
    the image is then re-encoded so that no stored file carries EXIF that other decoders may read differently."""
    try:
        value = img.getexif().get(_ORIENTATION)
    except Exception:  # noqa: BLE001 - corrupt EXIF is not a reason to lose the image
        return None, False
    if value is None:
        return None, True
    try:
        value = int(value if not isinstance(value, (tuple, list)) else value[0])
    except (TypeError, ValueError, IndexError):
        return None, False
    return value, True


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; alpha and palette/tRNS transparency are composited on ``background``."""
    mode = img.mode
    transparent = "transparency" in img.info
    if mode == "RGB" and not transparent:
        return img
    if mode == "La":  # premultiplied LA (Pillow has no converter for it): un-premultiply
        la = np.asarray(img).astype(np.uint32)
        lum, alpha = la[..., 0], la[..., 1]
        lum = np.where(alpha > 0, np.minimum(255, (lum * 255 + alpha // 2) // np.maximum(alpha, 1)), 0)
        img, mode = Image.fromarray(np.stack([lum, alpha], axis=-1).astype(np.uint8)), "LA"
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (transparent and mode in ("P", "L", "RGB", "1")):
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] == 255:  # fully opaque after all
            return rgba.convert("RGB")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, (0, 0), rgba)  # alpha-blend over the background
        return out
    if mode == "F" or mode == "I" or mode.startswith("I;"):
        return Image.fromarray(_to_uint8(np.asarray(img), eight_bit_ok=mode == "I")).convert("RGB")
    try:
        return img.convert("RGB")  # 1, L, P, CMYK (Adobe-inverted CMYK is undone by the JPEG plugin), YCbCr, HSV...
    except (ValueError, OSError) as e:
        raise DecodeError(f"unsupported mode: {mode} ({e})") from e


def _to_uint8(a: np.ndarray, eight_bit_ok: bool = False) -> np.ndarray:
    """One band of 16/32-bit integers or floats -> uint8. Integers within 0..65535 are 16-bit samples (scaled by
    1/257 with rounding, so 0 -> 0, 65535 -> 255, 257*k -> k) -- except, with ``eight_bit_ok`` (Pillow's 32-bit
    "I" mode, whose bit depth is unknown), integers within 0..255, which are taken as they are. Anything else is
    normalised by its min/max (NaN and -inf count as the finite minimum, +inf as the finite maximum); a flat image
    keeps its value, clipped to 0..255."""
    if a.ndim != 2:
        raise DecodeError(f"unsupported mode: {a.ndim}-d {a.dtype} samples")
    if a.size == 0:
        return np.zeros(a.shape, np.uint8)
    if a.dtype.kind in "ui":
        lo, hi = int(a.min()), int(a.max())
        if eight_bit_ok and lo >= 0 and hi <= 255:
            return a.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return _U16_TO_U8[a]
    x = a.astype(np.float32)  # a copy: arrays from Pillow are read-only
    lo, hi = x.min(), x.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        finite = np.isfinite(x)
        if not finite.any():
            return np.zeros(x.shape, np.uint8)
        lo, hi = x[finite].min(), x[finite].max()
        np.nan_to_num(x, copy=False, nan=lo, posinf=hi, neginf=lo)
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        return np.full(x.shape, min(255, max(0, round(lo))), np.uint8)
    if hi - lo > _F32_MAX / 2:
        x = x.astype(np.float64)  # the range itself overflows float32
    x -= lo
    x *= 255.0 / (hi - lo)
    x += 0.5  # now in [0.5, 255.5]: truncation rounds half up, and nothing wraps
    return x.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- checks


def _check_declared(size: tuple[int, int], max_pixels: int, min_size: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise DecodeError(f"invalid size: {w}x{h}")
    if w * h > max_pixels:
        raise DecodeError(f"decompression bomb: {w}x{h} = {_sci(w * h)} pixels > limit {_sci(max_pixels)}")
    if min(w, h) < min_size:
        raise DecodeError(f"too small: {w}x{h} (shorter side {min(w, h)} < min_size {min_size})")


def _check_loaded(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise DecodeError(f"invalid size: decoded {w}x{h}")
    if w * h > max_pixels:
        raise DecodeError(f"decompression bomb: decoded {w}x{h} = {_sci(w * h)} pixels > limit {_sci(max_pixels)}")


def _check_tiff_strips(img: Image.Image) -> None:
    """Pillow decodes uncompressed TIFF strips itself and leaves rows that no strip covers black: refuse that."""
    w, h = img.size
    covered = 0
    for tile in img.tile:
        x0, y0, x1, y1 = tile[1]
        covered += max(0, min(x1, w) - max(x0, 0)) * max(0, min(y1, h) - max(y0, 0))
    if img.tile and covered < w * h:
        raise DecodeError(f"corrupt TIFF: strips/tiles cover {covered} of {w}x{h} = {w * h} pixels")


def _sci(n: int) -> str:
    """178956970 -> '1.8e8', 10**10 -> '1e10', 512 -> '512'."""
    if n < 1000:
        return str(n)
    mantissa, exp = f"{n:.2g}".split("e")
    return f"{mantissa}e{int(exp)}"


# ---------------------------------------------------------------------------------------------------- opening


def _as_bytes(data) -> bytes:
    if isinstance(data, bytes):
        out = data
    elif isinstance(data, (bytearray, memoryview)):
        out = bytes(data)
    else:
        raise DecodeError(f"not an image: expected bytes, got {type(data).__name__}")
    if not out:
        raise DecodeError("empty file (0 bytes)")
    return out


def _registry(fmt: str):
    entry = Image.OPEN.get(fmt)
    if entry is None:  # not among the common plugins that preinit() imports: import them all (once)
        Image.init()
        entry = Image.OPEN.get(fmt)
    return entry


def _accepts(accept, prefix: bytes) -> bool:
    if accept is None:
        return True
    result = accept(prefix)
    return bool(result) and not isinstance(result, str)


def _open(data: bytes, formats: tuple[str, ...]) -> Image.Image:
    """Identify and lazily open (header only) like ``Image.open(io.BytesIO(data), formats=formats)``, minus Pillow's
    open-time bomb check (``max_pixels`` is checked by the caller), with precise reasons for failures."""
    Image.preinit()
    prefix = data[:16]
    fp = io.BytesIO(data)
    for fmt in formats:
        entry = _registry(fmt)
        if entry is None:
            continue
        factory, accept = entry
        try:
            if not _accepts(accept, prefix):
                continue
        except Exception:  # noqa: BLE001, S112 - a plugin's accept() choking on odd bytes means "not this format"
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning: if made an error
            raise DecodeError(f"decompression bomb: {fmt} header: {e}") from e
        except MemoryError as e:
            raise DecodeError(f"decompression bomb: {fmt} header needs too much memory") from e
        except Exception as e:
            ends = fp.tell() >= len(data)
            msg = str(e) or type(e).__name__
            if ends or "truncated" in msg.lower() or isinstance(e, EOFError):
                raise DecodeError(f"truncated {fmt}: file ends inside the header ({len(data)} bytes; {msg})") from e
            raise DecodeError(f"corrupt {fmt} header: {msg}") from e
    raise DecodeError(_unidentified(data, formats))


def _unidentified(data: bytes, formats: tuple[str, ...]) -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "not an image: HTML document"
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "not an image: SVG document (vector images are not supported)"
    if formats is SUPPORTED_FORMATS:
        Image.init()
        prefix = data[:16]
        for fmt, (factory, accept) in list(Image.OPEN.items()):
            if fmt in formats or accept is None:  # magic-less formats (TGA...) would "recognise" random bytes
                continue
            try:
                if not _accepts(accept, prefix):
                    continue
                factory(io.BytesIO(data), "").close()  # header only; nothing is decoded
            except Exception:  # noqa: BLE001, S112 - not this format either
                continue
            return f"unsupported format: {fmt} (supported: {', '.join(SUPPORTED_FORMATS)})"
    elif data[:3] != b"\xff\xd8\xff":
        return "not a JPEG: stored rgb must be a JPEG"
    return "not an image: cannot identify image file format"


def _reason(e: BaseException, fmt: str) -> str:
    msg = str(e) or type(e).__name__
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb: {msg}"
    if isinstance(e, MemoryError):
        return f"out of memory decoding {fmt}"
    if isinstance(e, EOFError):
        return f"truncated {fmt}: {msg if msg != 'EOFError' else 'unexpected end of data'}"
    if isinstance(e, OSError) and "truncated" in msg.lower():
        return f"truncated {fmt}: {msg}"
    if isinstance(e, (OSError, SyntaxError)):
        return f"corrupt {fmt}: {msg}"
    return f"corrupt {fmt}: {type(e).__name__}: {msg}"
