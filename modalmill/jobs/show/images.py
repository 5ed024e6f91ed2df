"""Renderers of image-like modalities drawn as pictures of their own: the stored rgb, depth as a colour map,
normals, edge maps (and any ``pixel`` modality without a renderer of its own)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ...schemas.modalities import IMAGE, PIXEL
from .canvas import PANEL, _colormap
from .registry import renders


@renders("rgb", kind=IMAGE)
def _r_image(spec, value, ctx):
    return Image.fromarray(np.asarray(value, np.uint8)), f"{value.shape[1]}x{value.shape[0]} stored image"


@renders("depth")
def _r_depth(spec, value, ctx):
    v = value.astype(np.float32)
    lo, hi = np.percentile(v, [2, 98])
    img = Image.fromarray(_colormap((v - lo) / ((hi - lo) or 1.0)))
    return img, f"turbo colour map, values {int(value.min())}..{int(value.max())}"


@renders("canny_edge", "sam_edge", kind=PIXEL)
def _r_grey(spec, value, ctx):
    if value.ndim == 3:
        return Image.fromarray(value.astype(np.uint8)), f"{value.shape[1]}x{value.shape[0]}"
    v = value.astype(np.float32)
    lo, hi = float(v.min()), float(v.max())
    u8 = ((v - lo) / ((hi - lo) or 1.0) * 255).astype(np.uint8)
    img = Image.fromarray(u8, "L")
    # thin edges vanish when an image is shrunk: keep every edge pixel by max-pooling to the panel size
    factor = int(np.ceil(max(img.size) / PANEL))
    if factor > 1:
        img = Image.fromarray(_maxpool(u8, factor), "L")
    frac = float((value > 0).mean())
    return img.convert("RGB"), f"{value.shape[1]}x{value.shape[0]}, {frac:.1%} non-zero"


def _maxpool(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape
    hp, wp = -(-h // f) * f, -(-w // f) * f
    padded = np.zeros((hp, wp), a.dtype)
    padded[:h, :w] = a
    return padded.reshape(hp // f, f, wp // f, f).max(axis=(1, 3))


@renders("normal")
def _r_normal(spec, value, ctx):
    return Image.fromarray(value.astype(np.uint8)), "normals, xyz in [-1, 1] -> RGB"
