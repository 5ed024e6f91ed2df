"""Renderers of learned features: feature maps as their first three principal components in RGB, global
vectors as bars and a diverging heat grid, T5 caption embeddings by PCA per token."""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image, ImageDraw

from ...schemas.modalities import FEATURE_MAP, GLOBAL
from .canvas import PANEL, _diverging, _fit, _hstack, pca_rgb
from .registry import renders
from .text import _r_array


@renders(kind=FEATURE_MAP)
def _r_feature_map(spec, value, ctx):
    v = np.asarray(value, np.float32)
    if v.ndim == 3:  # one map (not modalmill's per-crop layout): show it alone
        v = v[None]
    if v.ndim != 4:
        return _r_array(spec, value, ctx)
    n, h, w, c = v.shape
    shown = v[:4]
    colours, explained = pca_rgb(shown.reshape(-1, c))  # one projection for all crops shown: comparable colours
    tiles = [_fit(Image.fromarray(t), 150, nearest=True) for t in colours.reshape(len(shown), h, w, 3)]
    return (_hstack(tiles, labels=[f"crop {i}" for i in range(len(tiles))]),
            f"[{n}, {h}, {w}, {c}] per crop, PCA->RGB ({explained:.0%} of variance)")


@renders(kind=GLOBAL)
def _r_global(spec, value, ctx):
    v = np.asarray(value, np.float32)
    crops = f"crop 0 of {v.shape[0]}, " if v.ndim == 2 else ""
    v = (v[0] if v.ndim == 2 else v).ravel()
    # top: a bar per dimension (bins of dimensions averaged when there are more than fit); bottom: a heat grid
    bins = min(len(v), PANEL)
    edges = np.linspace(0, len(v), bins + 1).astype(int)
    means = np.array([v[a:b].mean() for a, b in itertools.pairwise(edges)]) if len(v) else np.zeros(0)
    img = Image.new("RGB", (PANEL, PANEL), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    lim = float(np.abs(means).max()) if len(means) and np.abs(means).max() > 0 else 1.0
    mid, half = 75, 68
    bar_w = PANEL / max(bins, 1)
    colours = _diverging(means)
    for i, m in enumerate(means):
        y = mid - m / lim * half
        draw.rectangle((i * bar_w, min(y, mid), (i + 1) * bar_w - (1 if bar_w > 3 else 0), max(y, mid)),
                       fill=tuple(int(c) for c in colours[i]))
    draw.line((0, mid, PANEL, mid), fill=(120, 120, 120))
    cols = 32
    rows = -(-len(v) // cols)
    grid = np.full(rows * cols, np.nan, np.float32)
    grid[: len(v)] = v
    heat = Image.fromarray(_diverging(grid.reshape(rows, cols)))
    cell = max(1, min(PANEL // cols, (PANEL - 160) // max(rows, 1)))
    heat = heat.resize((cols * cell, rows * cell), Image.Resampling.NEAREST)
    img.paste(heat, ((PANEL - heat.width) // 2, 155))
    return img, f"{crops}[{len(v)}] bars + heat grid (32/row), |v|={float(np.linalg.norm(v)):.3g}"


@renders("t5_caption")
def _r_t5(spec, value, ctx):
    emb = np.asarray(value["emb"], np.float32)
    mask = np.asarray(value["mask_valid"], bool)
    n, length, c = emb.shape
    colours, _ = pca_rgb(emb.reshape(-1, c)[mask.ravel()]) if mask.any() else (np.zeros((0, 3)), 0.0)
    grid = np.full((n * length, 3), 200, np.uint8)
    grid[mask.ravel()] = colours
    img = Image.fromarray(grid.reshape(n, length, 3))
    return img, f"[{n}, {length}, {c}] token embeddings PCA->RGB, padding grey"
