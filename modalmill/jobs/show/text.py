"""Renderers of text-like modalities (stored raw, as 4M stores them): captions, metadata fields, colour palettes
as swatches, and generic JSON and arrays for modalities without a renderer of their own."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageDraw

from ...schemas.modalities import ARRAY, TEXT
from .canvas import INK, PANEL, _draw_text, _font, _text
from .registry import renders


def _captions(value) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [c.get("caption", json.dumps(c)) if isinstance(c, dict) else str(c) for c in items]


@renders("caption")
def _r_caption(spec, value, ctx):
    caps = _captions(value)
    if len(caps) > 1 and len(set(caps)) == 1:  # one caption stored once per crop row
        return _text([caps[0]]), f"1 caption (x{len(caps)}, one per crop row)"
    return _text([f"{i + 1}. {c}" for i, c in enumerate(caps)]), f"{len(caps)} caption(s)"


@renders("color_palette")
def _r_palette(spec, value, ctx):
    pal = value[0] if isinstance(value, list) and value else {}
    img = Image.new("RGB", (PANEL, PANEL), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font(12)
    rows = sorted(pal, key=int)
    row_h = (PANEL - 8) // max(len(rows), 1)
    for r, k in enumerate(rows):
        flat = pal[k]
        triples = [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]
        y0 = 4 + r * row_h
        _draw_text(draw, (4, y0 + row_h // 2 - 7), f"k={k}", INK, font)
        sw = (PANEL - 40) / max(len(triples), 1)
        for j, c in enumerate(triples):
            draw.rectangle((36 + j * sw, y0 + 2, 36 + (j + 1) * sw - 3, y0 + row_h - 3), fill=c, outline=(90, 90, 90))
    return img, f"k-means palettes, k = {', '.join(rows)}"


@renders("metadata")
def _r_metadata(spec, value, ctx):
    lines = [f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in sorted(value.items())]
    return _text(lines, font_size=12, width_chars=46), f"{len(lines)} fields"


@renders(kind=TEXT)
def _r_json(spec, value, ctx):
    return _text(json.dumps(value, sort_keys=True, indent=1).splitlines(), font_size=11, width_chars=50), "JSON"


@renders(kind=ARRAY)
def _r_array(spec, value, ctx):
    if isinstance(value, dict):
        lines = [f"{k}: {np.asarray(v).dtype} {list(np.asarray(v).shape)}" for k, v in value.items()]
        return _text(lines), "arrays"
    a = np.asarray(value)
    lines = [f"dtype {a.dtype}, shape {list(a.shape)}"]
    if a.size and np.issubdtype(a.dtype, np.number):
        lines.append(f"min {a.min():.4g}  max {a.max():.4g}  mean {a.astype(np.float64).mean():.4g}")
    lines.extend(str(a).splitlines()[:12])
    return _text(lines, font_size=11, width_chars=50), "array"


@renders("aesthetic_score", "watermark_score", "clip_score", "nsfw_score")
def _r_score(spec, value, ctx):
    """A quality score: the number, large, over a bar filled to its place in the modality's range."""
    from .canvas import BG

    v = next(iter(value.values())) if isinstance(value, dict) else value
    v = float(np.asarray(v, np.float64).reshape(-1)[0])
    lo, hi = spec.value_range or (0.0, 1.0)
    img = Image.new("RGB", (PANEL, PANEL), BG)
    draw = ImageDraw.Draw(img)
    _draw_text(draw, (16, 40), f"{v:.3f}", INK, _font(48))
    frac = min(max((v - lo) / (hi - lo), 0.0), 1.0) if hi > lo else 0.0
    draw.rectangle((16, 160, PANEL - 16, 200), outline=INK, width=2)
    draw.rectangle((18, 162, 18 + frac * (PANEL - 36), 198), fill=(60, 120, 200))
    _draw_text(draw, (16, 210), f"{lo:g}", INK, _font(13))
    _draw_text(draw, (PANEL - 40, 210), f"{hi:g}", INK, _font(13))
    return img, f"{spec.name} in [{lo:g}, {hi:g}]"
