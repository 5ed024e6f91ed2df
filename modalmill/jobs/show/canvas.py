"""The canvas every renderer draws on: panel geometry, colours, fonts and the drawing helpers they share.

Names with a leading underscore are private to the ``modalmill.jobs.show`` package (used by its renderer modules).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw

from .fonts import FontChain, font_chain


PANEL = 320  # the picture area of a panel (square)


TITLE_H = 40  # two lines: the modality, then what is shown


HEADER_H = 30


PAD = 8


COLUMNS = 4


BG = (246, 246, 246)


INK = (20, 20, 20)


@dataclass
class Context:
    """What the renderers may use besides the modality's own value."""

    rgb: np.ndarray | None = None  # the stored image [H, W, 3]
    crops: np.ndarray | None = None  # crop_settings [n_crops, 5]
    original_size: tuple[int, int] | None = None  # (width, height) of the original image
    tokenizers: dict[str, Any] = field(default_factory=dict)  # modality -> loaded tokenizer


def _font(size: int = 13) -> FontChain:
    """The fonts text is drawn with: a chain tried per character (:mod:`.fonts`), so any script gets glyphs."""
    return font_chain(size)


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill, font) -> None:
    """``draw.text`` through a font chain: each run of characters with the font that has them."""
    if isinstance(font, FontChain):
        font.text(draw, xy, text, fill)
    else:
        draw.text(xy, text, fill=fill, font=font)


def _fit(img: Image.Image, size: int = PANEL, nearest: bool = False) -> Image.Image:
    """Scale ``img`` to fit a ``size`` square (up or down), keeping its aspect ratio."""
    w, h = img.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(new, Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS)


def _text(lines: list[str], size: int = PANEL, font_size: int = 13, width_chars: int = 44) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font(font_size)
    y = 6
    for line in lines:
        for piece in textwrap.wrap(line, width_chars, subsequent_indent="  ") or [""]:
            if y > size - font_size - 4:
                _draw_text(draw, (6, y), "…", INK, font)
                return img
            _draw_text(draw, (6, y), piece, INK, font)
            y += font_size + 4
    return img


def _rgb_or_blank(ctx: Context, h: int = 224, w: int = 224) -> np.ndarray:
    if ctx.rgb is not None:
        return ctx.rgb
    return np.full((h, w, 3), 128, np.uint8)


def _colormap(values01: np.ndarray, cmap: int = cv2.COLORMAP_TURBO) -> np.ndarray:
    """[...] floats in [0, 1] -> [..., 3] uint8 RGB through an OpenCV colour map."""
    u8 = np.clip(np.nan_to_num(values01) * 255, 0, 255).astype(np.uint8)
    flat = u8.reshape(-1, 1)
    rgb = cv2.cvtColor(cv2.applyColorMap(flat, cmap), cv2.COLOR_BGR2RGB)
    return rgb.reshape(*values01.shape, 3)


def _diverging(values: np.ndarray) -> np.ndarray:
    """Blue (negative) - white (0) - red (positive), symmetric around 0; NaN is grey."""
    lim = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    t = np.clip(np.nan_to_num(values / (lim or 1.0)), -1, 1)
    blue, white, red = np.array([40, 80, 200.0]), np.array([255, 255, 255.0]), np.array([200, 40, 40.0])
    out = np.where(t[..., None] < 0, white + (blue - white) * -t[..., None], white + (red - white) * t[..., None])
    out[~np.isfinite(values)] = 170
    return out.astype(np.uint8)


def id_colours(ids: np.ndarray) -> np.ndarray:
    """A distinct, deterministic colour per integer id (golden-ratio hues): [...] -> [..., 3] uint8."""
    ids = np.asarray(ids, dtype=np.int64)
    hue = ((ids * 0.6180339887) % 1.0 * 179).astype(np.uint8)
    sat = (150 + (ids * 37) % 100).astype(np.uint8)
    val = (170 + (ids * 53) % 80).astype(np.uint8)
    hsv = np.stack([hue, sat, val], -1).reshape(-1, 1, 3)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).reshape(*ids.shape, 3)


def pca_rgb(x: np.ndarray) -> tuple[np.ndarray, float]:
    """[N, C] vectors -> [N, 3] uint8 colours from the first three principal components (each stretched over
    its 1st-99th percentile; signs fixed so the result is deterministic), and the variance they explain."""
    x = np.asarray(x, np.float32)
    x = x - x.mean(0, keepdims=True)
    if x.shape[0] < 2 or not np.any(x):
        return np.full((x.shape[0], 3), 128, np.uint8), 0.0
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(3, vt.shape[0])
    comps = vt[:k]
    comps = comps * np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])[:, None]
    proj = x @ comps.T
    out = np.full((x.shape[0], 3), 0.5, np.float32)
    for i in range(k):
        lo, hi = np.percentile(proj[:, i], [1, 99])
        out[:, i] = np.clip((proj[:, i] - lo) / ((hi - lo) or 1.0), 0, 1)
    explained = float((s[:k] ** 2).sum() / max((s ** 2).sum(), 1e-12))
    return (out * 255).astype(np.uint8), explained


def _draw_label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour, font) -> None:
    x, y = xy
    if isinstance(font, FontChain):
        box = font.textbbox(draw, (x, y), text)
    else:
        box = draw.textbbox((x, y), text, font=font)
    draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=colour)
    _draw_text(draw, (x, y), text, (255, 255, 255), font)


def _hstack(tiles: list[Image.Image], labels: list[str] | None = None) -> Image.Image:
    h = max(t.height for t in tiles) + (16 if labels else 0)
    w = sum(t.width for t in tiles) + 6 * (len(tiles) - 1)
    out = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for i, t in enumerate(tiles):
        out.paste(t, (x, 16 if labels else 0))
        if labels:
            _draw_text(draw, (x + 2, 1), labels[i], INK, _font(11))
        x += t.width + 6
    return out
