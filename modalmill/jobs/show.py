"""Render one sample of an output as a single PNG: every modality as a titled picture in a grid.

``show_sample(root, key)`` finds the sample (through the completion markers, or by scanning the tars of an
output without markers), reads its member from every modality tar of that shard, decodes each with the
registry's codec and draws one panel per modality:

- ``rgb``: the stored image; ``crop_settings``: the crops as rectangles on it (crop 0 thick, ``f`` = flipped);
- ``depth``: turbo colour map (2nd-98th percentile); ``normal``: the normal image; edges: the edge map;
- ``semseg_coco``: classes as a colour overlay on the rgb (255 = unlabelled stays clear), largest classes
  labelled with their ids; ``sam_instance``: crop 0 of the rgb at 224x224 with each instance's contours filled;
- ``det``: boxes on the rgb (score >= 0.6 bold and coloured, the rest thin grey, as 4M's trainer filters);
  ``human_poses``: each person's box (scaled from the original image) with its 8 pose token ids (a skeleton
  from the SMPL parameters would need the SMPL body model, which modalmill does not ship);
  ``pose_keypoints``: the 33 MediaPipe landmarks and their skeleton; ``ocr``: text-line polygons and their
  text; ``sam_mask``: each instance's polygons filled on the rgb; ``person_mask``: the mask tinted over the rgb;
- ``color_palette``: swatches, one row per k = 1..7; ``caption`` and ``metadata``: text;
- feature maps (``clip``, ``dinov2``, ``imagebind`` ``[n_crops, h, w, C]``): the first three principal components
  as RGB, up to four crops side by side; ``t5_caption``: the same over the token embeddings (one row per
  caption, padding grey); global vectors (``[n_crops, C]``): crop 0's as a diverging heat grid (blue < 0 < red),
  32 values per row;
- token modalities: each crop's ids as a grid (a colour per id), up to four crops side by side.

Decoding tokens back into pictures needs the tokenizers of issue 4: ``tokenizers={"tok_rgb@224": PATH}``
(``--tokenizer M=PATH``) loads the checkpoint through ``modalmill.tokenize`` (see :class:`TokenDecoder`) and
shows the decoded crops instead of the id grid. Where ``modalmill.tokenize`` has no loader, asking for it
raises :class:`TokenizerUnavailable` ("not available yet").

Pillow, numpy and OpenCV's colour maps only (no matplotlib).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..io import manifest
from ..io.tars import decode_member, iter_tar_groups, scan_layout, spec_for_folder
from ..schemas.modalities import ARRAY, FEATURE_MAP, GLOBAL, IMAGE, MODALITIES, PIXEL, TEXT, TOKENS, ModalitySpec

PANEL = 320  # the picture area of a panel (square)
TITLE_H = 40  # two lines: the modality, then what is shown
HEADER_H = 30
PAD = 8
COLUMNS = 4
BG = (246, 246, 246)
INK = (20, 20, 20)
SCORE_THRESHOLD = 0.6  # 4M's trainer keeps detections with score >= 0.6


class TokenizerUnavailable(NotImplementedError):
    """``--tokenizer`` was given but ``modalmill.tokenize`` has no loader yet."""


@dataclass
class Panel:
    modality: str
    title: str
    subtitle: str
    box: tuple[int, int, int, int]  # the picture area on the canvas: (x0, y0, x1, y1)
    ok: bool = True


@dataclass
class ShowResult:
    image: Image.Image
    panels: list[Panel]
    key: str
    shard: str | None = None
    path: str | None = None


@dataclass
class Context:
    """What the renderers may use besides the modality's own value."""

    rgb: np.ndarray | None = None  # the stored image [H, W, 3]
    crops: np.ndarray | None = None  # crop_settings [n_crops, 5]
    original_size: tuple[int, int] | None = None  # (width, height) of the original image
    tokenizers: dict[str, Any] = field(default_factory=dict)  # modality -> loaded tokenizer


# ============================================================================ drawing helpers


def _cv_contours(contours) -> list:
    """One instance's contour(s) as OpenCV point arrays."""
    return [np.asarray(c, np.int32).reshape(-1, 1, 2) for c in (contours if isinstance(contours, list) else [contours])]

def _font(size: int = 13) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


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
                draw.text((6, y), "…", fill=INK, font=font)
                return img
            draw.text((6, y), piece, fill=INK, font=font)
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
    box = draw.textbbox((x, y), text, font=font)
    draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=colour)
    draw.text((x, y), text, fill=(255, 255, 255), font=font)


# ============================================================================ renderers
# Each takes (spec, value, ctx) and returns (picture, subtitle). The picture may be any size: it is fitted.

Renderer = Callable[[ModalitySpec, Any, Context], tuple[Image.Image, str]]


def _r_image(spec, value, ctx):
    return Image.fromarray(np.asarray(value, np.uint8)), f"{value.shape[1]}x{value.shape[0]} stored image"


def _r_crops(spec, value, ctx):
    value = np.asarray(value)
    hh = int(max((value[:, 0] + value[:, 2]).max(), 1)) if len(value) else 224
    ww = int(max((value[:, 1] + value[:, 3]).max(), 1)) if len(value) else 224
    img = Image.fromarray(_rgb_or_blank(ctx, hh, ww)).copy()
    scale = PANEL / max(img.size)
    img = _fit(img)
    draw = ImageDraw.Draw(img)
    font = _font(13)
    rows = value.tolist()
    colours = [tuple(int(c) for c in id_colours(np.array(i + 3))) for i in range(len(rows))]
    boxes = [(left * scale, top * scale, (left + w) * scale - 1, (top + h) * scale - 1)
             for top, left, h, w, _ in rows]
    for i in reversed(range(len(rows))):  # crop 0 drawn last, on top
        draw.rectangle(boxes[i], outline=colours[i], width=4 if i == 0 else 2)
    for i, (box, row) in enumerate(zip(boxes, rows)):  # labels after every rectangle, staggered so none hides another
        _draw_label(draw, (box[0] + 6 + 26 * (i // 8), box[1] + 6 + 18 * (i % 8)), f"{i}{' f' if row[4] else ''}",
                    colours[i], font)
    return img, f"{len(value)} crops (0 = centre square, f = flipped)"


def _r_depth(spec, value, ctx):
    v = value.astype(np.float32)
    lo, hi = np.percentile(v, [2, 98])
    img = Image.fromarray(_colormap((v - lo) / ((hi - lo) or 1.0)))
    return img, f"turbo colour map, values {int(value.min())}..{int(value.max())}"


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


def _r_normal(spec, value, ctx):
    return Image.fromarray(value.astype(np.uint8)), "normals, xyz in [-1, 1] -> RGB"


def _r_semseg(spec, value, ctx):
    labels = np.asarray(value)
    rgb = _rgb_or_blank(ctx, *labels.shape[:2])
    if rgb.shape[:2] != labels.shape:
        rgb = np.full((*labels.shape, 3), 128, np.uint8)
    colours = id_colours(labels.astype(np.int64) + 7).astype(np.float32)
    labelled = labels != 255
    out = rgb.astype(np.float32)
    out[labelled] = 0.45 * out[labelled] + 0.55 * colours[labelled]
    img = Image.fromarray(out.astype(np.uint8))
    scale = PANEL / max(img.size)
    img = _fit(img)
    draw = ImageDraw.Draw(img)
    font = _font(12)
    ids, counts = np.unique(labels[labelled], return_counts=True)
    order = np.argsort(-counts)
    for cls in ids[order][:6]:
        ys, xs = np.nonzero(labels == cls)
        i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))  # the class pixel nearest its centroid
        colour = tuple(int(c) for c in id_colours(np.array(int(cls) + 7)))
        _draw_label(draw, (xs[i] * scale, ys[i] * scale), str(int(cls)), colour, font)
    top = ", ".join(f"{int(c)}:{n / labels.size:.0%}" for c, n in zip(ids[order][:4], counts[order][:4]))
    return img, f"{len(ids)} classes (id:area) {top}"


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


def _token_grid(ids: np.ndarray) -> np.ndarray:
    t = len(ids)
    side = round(float(np.sqrt(t)))
    cols = side if side * side == t else int(np.ceil(np.sqrt(t)))
    rows = -(-t // cols)
    grid = np.full(rows * cols, -1, np.int64)
    grid[:t] = ids
    cells = id_colours(np.maximum(grid, 0))
    cells[grid < 0] = 255
    return cells.reshape(rows, cols, 3)


def _r_tokens(spec, value, ctx):
    v = np.asarray(value)
    if v.ndim == 1:
        v = v[None]
    tok = ctx.tokenizers.get(spec.name)
    if tok is not None:
        decoded = np.asarray(tok.decode_tokens(v))
        tiles = [Image.fromarray(d.astype(np.uint8)) for d in decoded[:4]]
        return _hstack([_fit(t, 150) for t in tiles]), f"decoded with the tokenizer, {len(v)} crop(s)"
    tiles = []
    for row in v[:4]:
        grid = _token_grid(row)
        tile = _fit(Image.fromarray(grid), 150, nearest=True)
        if len(row) <= 16:  # small grids: write the ids into the cells
            draw = ImageDraw.Draw(tile)
            font = _font(11)
            gh, gw = grid.shape[:2]
            for j, tid in enumerate(row.tolist()):
                r, c = divmod(j, gw)
                draw.text((c * tile.width / gw + 3, r * tile.height / gh + 3), str(tid), fill=INK, font=font)
        tiles.append(tile)
    vocab = f", vocab {spec.vocab_size}" if spec.vocab_size else ""
    return (_hstack(tiles, labels=[f"crop {i}" for i in range(len(tiles))]),
            f"{v.shape[0]}x{v.shape[1]} ids{vocab}, {len(np.unique(v))} distinct")


def _hstack(tiles: list[Image.Image], labels: list[str] | None = None) -> Image.Image:
    h = max(t.height for t in tiles) + (16 if labels else 0)
    w = sum(t.width for t in tiles) + 6 * (len(tiles) - 1)
    out = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for i, t in enumerate(tiles):
        out.paste(t, (x, 16 if labels else 0))
        if labels:
            draw.text((x + 2, 1), labels[i], fill=INK, font=_font(11))
        x += t.width + 6
    return out


def _r_t5(spec, value, ctx):
    emb = np.asarray(value["emb"], np.float32)
    mask = np.asarray(value["mask_valid"], bool)
    n, length, c = emb.shape
    colours, _ = pca_rgb(emb.reshape(-1, c)[mask.ravel()]) if mask.any() else (np.zeros((0, 3)), 0.0)
    grid = np.full((n * length, 3), 200, np.uint8)
    grid[mask.ravel()] = colours
    img = Image.fromarray(grid.reshape(n, length, 3))
    return img, f"[{n}, {length}, {c}] token embeddings PCA->RGB, padding grey"


def _captions(value) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [c.get("caption", json.dumps(c)) if isinstance(c, dict) else str(c) for c in items]


def _r_caption(spec, value, ctx):
    caps = _captions(value)
    return _text([f"{i + 1}. {c}" for i, c in enumerate(caps)]), f"{len(caps)} caption(s)"


def _r_det(spec, value, ctx):
    inst = value.get("instances", []) if isinstance(value, dict) else []
    img = _fit(Image.fromarray(_rgb_or_blank(ctx)))
    draw = ImageDraw.Draw(img)
    font = _font(12)
    kept = 0
    for _, d in sorted(enumerate(inst), key=lambda t: t[1].get("score", 0)):
        x0, y0, x1, y1 = d["boxes"]
        box = (x0 * img.width, y0 * img.height, x1 * img.width, y1 * img.height)
        if d.get("score", 0) >= SCORE_THRESHOLD:
            kept += 1
            colour = tuple(int(c) for c in id_colours(np.array(hash_name(d.get("class_name", "")))))
            draw.rectangle(box, outline=colour, width=3)
            _draw_label(draw, (box[0] + 2, box[1] + 2), f"{d.get('class_name')} {d.get('score', 0):.2f}", colour, font)
        else:
            draw.rectangle(box, outline=(160, 160, 160), width=1)
    return img, f"{len(inst)} boxes, {kept} with score >= {SCORE_THRESHOLD} (bold)"


def hash_name(name: str) -> int:
    """A stable small integer for a class name (colours do not depend on Python's hash seed)."""
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name)) % 9973


def _people(value) -> list[dict]:
    """human_poses in either layout: 4M's per-field lists ({"bbox_xyxy": [[...], ...], ...}) or a list of
    per-person dicts; ``[]`` means no people."""
    if isinstance(value, dict):
        boxes = value.get("bbox_xyxy") or []
        tokens = value.get("pose_tokenized") or [None] * len(boxes)
        return [{"bbox_xyxy": b, "pose_tokenized": t} for b, t in zip(boxes, tokens)]
    return [p for p in value if isinstance(p, dict)] if isinstance(value, list) else []


def _r_poses(spec, value, ctx):
    people = _people(value)
    img = _fit(Image.fromarray(_rgb_or_blank(ctx)))
    rgb_w = ctx.rgb.shape[1] if ctx.rgb is not None else img.width
    orig_w = ctx.original_size[0] if ctx.original_size else rgb_w
    scale = img.width / orig_w
    draw = ImageDraw.Draw(img)
    font = _font(11)
    for i, p in enumerate(people):
        colour = tuple(int(c) for c in id_colours(np.array(i + 11)))
        box = [float(c) * scale for c in p.get("bbox_xyxy", [0, 0, 0, 0])]
        draw.rectangle(box, outline=colour, width=3)
        tokens = p.get("pose_tokenized")
        _draw_label(draw, (box[0] + 2, box[1] + 2), f"person {i}", colour, font)
        if tokens is not None:
            _draw_label(draw, (box[0] + 2, box[1] + 18), " ".join(str(t) for t in list(tokens)[:8]), colour, font)
    note = "" if ctx.original_size else " (original size unknown: boxes as stored)"
    return img, f"{len(people)} person(s): box + 8 pose tokens{note}"


# MediaPipe's 33-landmark pose topology (face, arms, hands, torso, legs, feet) as landmark index pairs.
POSE_EDGES = ((0, 1), (1, 2), (2, 3), (3, 7), (0, 4), (4, 5), (5, 6), (6, 8), (9, 10), (11, 12), (11, 13),
              (13, 15), (15, 17), (15, 19), (15, 21), (17, 19), (12, 14), (14, 16), (16, 18), (16, 20), (16, 22),
              (18, 20), (11, 23), (12, 24), (23, 24), (23, 25), (24, 26), (25, 27), (26, 28), (27, 29), (28, 30),
              (29, 31), (30, 32), (27, 31), (28, 32))


def _sized_canvas(value, ctx):
    """The rgb (or a blank of the label's own ``height`` x ``width``) fitted to the panel, a drawing context on it,
    and the scale from stored-rgb pixels to the panel: for labels in stored-rgb pixels."""
    size = value if isinstance(value, dict) else {}
    img = Image.fromarray(_rgb_or_blank(ctx, size.get("height", 224), size.get("width", 224)))
    scale = PANEL / max(img.size)
    img = _fit(img)
    return img, ImageDraw.Draw(img), scale


def _r_keypoints(spec, value, ctx):
    people = value.get("people", []) if isinstance(value, dict) else []
    img, draw, scale = _sized_canvas(value, ctx)
    for i, person in enumerate(people):
        kp = np.asarray(person.get("keypoints", []), np.float32)  # [33, >= 4]: x, y, z, visibility, ...
        kp = kp.reshape(len(kp), -1) if kp.size else np.zeros((0, 4), np.float32)
        colour = tuple(int(c) for c in id_colours(np.array(i + 11)))
        seen = kp[:, 3] >= 0.5
        for a, b in POSE_EDGES:
            if a < len(kp) and b < len(kp) and seen[a] and seen[b]:
                draw.line((kp[a, 0] * scale, kp[a, 1] * scale, kp[b, 0] * scale, kp[b, 1] * scale), fill=colour,
                          width=3)
        for x, y in kp[seen, :2] * scale:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(255, 255, 255), outline=colour)
    return img, f"{len(people)} person(s), landmarks with visibility >= 0.5"


def _r_ocr(spec, value, ctx):
    lines = value.get("lines", []) if isinstance(value, dict) else []
    img, draw, scale = _sized_canvas(value, ctx)
    font = _font(11)
    for line in lines:
        pts = [(x * scale, y * scale) for x, y in line.get("polygon", [])]
        if len(pts) >= 3:
            draw.polygon(pts, outline=(255, 40, 40), width=2)
            _draw_label(draw, (min(x for x, _ in pts), max(y for _, y in pts) + 1), line.get("text", "")[:40],
                        (255, 40, 40), font)
    texts = " | ".join(line.get("text", "") for line in lines[:3])
    return img, f"{len(lines)} text line(s)" + (f": {texts[:60]}" if texts else "")


def _r_sam_mask(spec, value, ctx):
    inst = value.get("instances", []) if isinstance(value, dict) else []
    h, w = (value.get("height", 224), value.get("width", 224)) if isinstance(value, dict) else (224, 224)
    base = _rgb_or_blank(ctx, h, w).astype(np.float32)
    overlay = base.copy()
    for i, d in enumerate(inst):
        polys = [np.asarray(p, np.int32).reshape(-1, 1, 2) for p in d.get("polygons", [])]
        cv2.fillPoly(overlay, polys, [int(c) for c in id_colours(np.array(i + 5))])
    out = (0.4 * base + 0.6 * overlay).astype(np.uint8)
    for d in inst:
        cv2.polylines(out, [np.asarray(p, np.int32).reshape(-1, 1, 2) for p in d.get("polygons", [])], True,
                      (255, 255, 255), 1)
    return Image.fromarray(out), f"{len(inst)} instance(s) as filled polygons"


def _r_mask(spec, value, ctx):
    mask = np.asarray(value) > 0
    rgb = _rgb_or_blank(ctx, *mask.shape[:2])
    if rgb.shape[:2] != mask.shape[:2]:
        rgb = np.full((*mask.shape[:2], 3), 128, np.uint8)
    out = rgb.astype(np.float32) * 0.35
    out[mask] = rgb[mask] * 0.5 + np.array([255, 60, 60]) * 0.5
    return Image.fromarray(out.astype(np.uint8)), f"mask over the rgb, {mask.mean():.1%} of pixels"


def _crop0(ctx: Context, size: int = 224) -> np.ndarray:
    rgb = _rgb_or_blank(ctx, size, size)
    if ctx.crops is not None and len(ctx.crops) and ctx.rgb is not None:
        top, left, h, w, flip = (int(c) for c in ctx.crops[0])
        rgb = rgb[top:top + h, left:left + w]
        if flip:
            rgb = rgb[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((size, size), Image.Resampling.BILINEAR))


def _r_sam(spec, value, ctx):
    entries = list(value) if isinstance(value, (list, np.ndarray)) else [value]
    if not entries:
        return _text(["(no crops)"]), "0 crops"
    first = entries[0] if isinstance(entries[0], dict) else {}
    base = _crop0(ctx).astype(np.float32)
    overlay = base.copy()
    points = first.get("points", [])
    for i, contours in enumerate(points):
        cs = _cv_contours(contours)
        colour = [int(c) for c in id_colours(np.array(i + 5))]
        cv2.fillPoly(overlay, cs, colour)
    out = (0.45 * base + 0.55 * overlay).astype(np.uint8)
    for contours in points:
        cs = _cv_contours(contours)
        cv2.polylines(out, cs, True, (255, 255, 255), 1)
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    for i, b in enumerate(np.asarray(first.get("bbox", np.zeros((0, 4)))).reshape(-1, 4).tolist()):
        ymin, xmin, ymax, xmax = b
        colour = tuple(int(c) for c in id_colours(np.array(i + 5)))
        draw.rectangle((xmin, ymin, xmax, ymax), outline=colour, width=1)
    return img, f"{len(points)} instance(s) in crop 0 (224x224), {len(entries)} crop(s)"


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
        draw.text((4, y0 + row_h // 2 - 7), f"k={k}", fill=INK, font=font)
        sw = (PANEL - 40) / max(len(triples), 1)
        for j, c in enumerate(triples):
            draw.rectangle((36 + j * sw, y0 + 2, 36 + (j + 1) * sw - 3, y0 + row_h - 3), fill=c, outline=(90, 90, 90))
    return img, f"k-means palettes, k = {', '.join(rows)}"


def _r_metadata(spec, value, ctx):
    lines = [f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in sorted(value.items())]
    return _text(lines, font_size=12, width_chars=46), f"{len(lines)} fields"


def _r_json(spec, value, ctx):
    return _text(json.dumps(value, sort_keys=True, indent=1).splitlines(), font_size=11, width_chars=50), "JSON"


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


RENDERERS: dict[str, Renderer] = {
    "rgb": _r_image,
    "crop_settings": _r_crops,
    "caption": _r_caption,
    "t5_caption": _r_t5,
    "det": _r_det,
    "depth": _r_depth,
    "normal": _r_normal,
    "semseg_coco": _r_semseg,
    "canny_edge": _r_grey,
    "sam_edge": _r_grey,
    "sam_instance": _r_sam,
    "human_poses": _r_poses,
    "pose_keypoints": _r_keypoints,
    "ocr": _r_ocr,
    "sam_mask": _r_sam_mask,
    "person_mask": _r_mask,
    "color_palette": _r_palette,
    "metadata": _r_metadata,
}
KIND_RENDERERS: dict[str, Renderer] = {
    IMAGE: _r_image,
    PIXEL: _r_grey,
    FEATURE_MAP: _r_feature_map,
    GLOBAL: _r_global,
    TOKENS: _r_tokens,
    TEXT: _r_json,
    ARRAY: _r_array,
}


def renderer_for(spec: ModalitySpec) -> Renderer:
    """The renderer of a modality: by name, else by kind. Raises KeyError when there is none."""
    r = RENDERERS.get(spec.name) or KIND_RENDERERS.get(spec.kind)
    if r is None:
        raise KeyError(f"no renderer for modality {spec.name!r} (kind {spec.kind!r})")
    return r


# ============================================================================ the grid


def _order(names: list[str]) -> list[str]:
    known = list(MODALITIES)
    return sorted(names, key=lambda m: (known.index(m) if m in known else len(known), m))


def render_values(values: dict[str, Any], key: str = "", header: str = "", ctx: Context | None = None,
                  errors: dict[str, str] | None = None) -> ShowResult:
    """Draw decoded ``values`` ({modality: value}) as a titled grid. ``errors`` ({modality: message}) become
    red panels. Returns the image and where each panel is."""
    ctx = ctx or Context()
    if ctx.rgb is None and isinstance(values.get("rgb"), np.ndarray):
        ctx.rgb = values["rgb"]
    if ctx.crops is None and isinstance(values.get("crop_settings"), np.ndarray):
        ctx.crops = values["crop_settings"]
    errors = dict(errors or {})
    names = _order(list(dict.fromkeys([*values, *errors])))
    cols = max(1, min(COLUMNS, len(names)))
    rows = -(-len(names) // cols)
    cell_w, cell_h = PANEL + 2 * PAD, PANEL + TITLE_H + 2 * PAD
    canvas = Image.new("RGB", (cols * cell_w + PAD, HEADER_H + rows * cell_h + PAD), BG)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD + 4, 7), header or f"key {key}", fill=INK, font=_font(15))
    title_font, sub_font = _font(14), _font(11)
    panels = []
    for i, m in enumerate(names):
        r, c = divmod(i, cols)
        x0, y0 = PAD + c * cell_w, HEADER_H + r * cell_h
        ok = m not in errors
        if ok:
            spec = spec_for_folder(m)
            try:
                if spec is None:
                    raise KeyError(f"{m!r} is not a registered modality")
                pic, subtitle = renderer_for(spec)(spec, values[m], ctx)
            except Exception as e:  # noqa: BLE001 - one bad label must not hide the others
                ok, errors[m] = False, f"{type(e).__name__}: {e}"
        if not ok:
            pic, subtitle = _text(["could not render:", errors[m]]), "error"
        pic = _fit(pic.convert("RGB"), nearest=pic.width * 4 <= PANEL)
        px, py = x0 + PAD + (PANEL - pic.width) // 2, y0 + TITLE_H + PAD + (PANEL - pic.height) // 2
        draw.rectangle((x0 + PAD - 1, y0 + TITLE_H + PAD - 1, x0 + PAD + PANEL, y0 + TITLE_H + PAD + PANEL),
                       fill=(255, 255, 255), outline=(200, 200, 200))
        canvas.paste(pic, (px, py))
        draw.text((x0 + PAD, y0 + PAD), m, fill=INK if ok else (190, 0, 0), font=title_font)
        draw.text((x0 + PAD, y0 + PAD + 19), _clip(subtitle, 58), fill=(90, 90, 90), font=sub_font)
        panels.append(Panel(m, m, subtitle, (px, py, px + pic.width, py + pic.height), ok))
    return ShowResult(image=canvas, panels=panels, key=key)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


# ============================================================================ finding and reading a sample


def parse_tokenizers(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["tok_rgb@224=/ckpt/rgb", ...]`` -> {modality: path}, validated."""
    out = {}
    for item in items:
        m, sep, path = item.partition("=")
        if not sep or not m or not path:
            raise ValueError(f"--tokenizer {item!r}: expected MODALITY=PATH, e.g. tok_rgb@224=/ckpt/tok_rgb")
        spec = MODALITIES.get(m)
        if spec is None or spec.kind != TOKENS:
            raise ValueError(f"--tokenizer {item!r}: {m!r} is not a token modality "
                             f"({', '.join(n for n, s in MODALITIES.items() if s.kind == TOKENS)})")
        out[m] = path
    return out


class TokenDecoder:
    """Token ids -> pictures through a tokenizer checkpoint of ``modalmill.tokenize`` (issue 4).

    Uses ``modalmill.tokenize.checkpoint.load_tokenizer(PATH) -> (model, config)``, the model's
    ``decode_indices(ids [B, T]) -> output`` and the source modality's adapter
    (``modalmill.tokenize.adapters.adapter_for(source, in_channels)``: ``reconstruct`` then ``to_rgb``).
    Only tokenizers of image-like modalities decode to pictures; vector tokenizers (global embeddings, poses)
    are refused with a clear error.
    """

    def __init__(self, modality: str, path: str):
        try:
            from ..tokenize.adapters import adapter_for
            from ..tokenize.checkpoint import load_tokenizer
        except ImportError:
            raise TokenizerUnavailable(
                f"--tokenizer {modality}={path}: decoding tokens into pictures needs modalmill.tokenize's tokenizer "
                "loader (issue 4), which is not available yet; without --tokenizer, token modalities are shown as "
                "id grids") from None
        model, config = load_tokenizer(path)
        made_for = config.get("token_modality")
        if made_for and made_for != modality:
            raise ValueError(f"--tokenizer {modality}={path}: this checkpoint makes {made_for!r}, not {modality!r}")
        source = config.get("modality") or MODALITIES[modality].source
        self.adapter = adapter_for(source, config.get("model", {}).get("in_channels"))
        if getattr(self.adapter, "kind", "pixel") == "vector":
            raise TokenizerUnavailable(f"--tokenizer {modality}={path}: {source} tokens decode to vectors, not "
                                       "pictures; they are shown as id grids")
        self.model, self.config = model, config

    def decode_tokens(self, ids: np.ndarray) -> np.ndarray:
        """[n_crops, T] ids -> uint8 [n_crops, S, S, 3] pictures."""
        import torch

        with torch.inference_mode():
            pred = self.model.decode_indices(torch.as_tensor(np.asarray(ids, np.int64)))
        rec = self.adapter.reconstruct(pred.float()).cpu()
        return np.stack([self.adapter.to_rgb(r) for r in rec])


def load_tokenizers(paths: dict[str, str]) -> dict[str, TokenDecoder]:
    """Load the tokenizers named by ``--tokenizer`` (raises :class:`TokenizerUnavailable` without issue 4)."""
    return {m: TokenDecoder(m, path) for m, path in paths.items()}


def find_sample(root: str, key: str, shard: str | None = None) -> tuple[str, dict[str, str]]:
    """(shard name, {modality folder: tar url}) of the shard holding ``key``."""
    markers = manifest.list_markers(root)
    layout = scan_layout(root)
    if shard is None and markers:
        shard = next((name for name, mk in sorted(markers.items()) if key in mk.get("keys", ())), None)
    if shard is None:
        # no markers (or a key not in them): scan the tars of one modality folder, the rgb if there is one
        folders = sorted(layout.folders, key=lambda f: (f != "rgb", f))
        if folders:
            for name in sorted(layout.folders[folders[0]]):
                url = layout.folders[folders[0]][name]
                if name.endswith(".tar") and any(k == key for k, _ in iter_tar_groups(url)):
                    shard = name[: -len(".tar")]
                    break
    if shard is None:
        raise ValueError(f"{root}: no sample with key {key!r}")
    urls = {f: files[f"{shard}.tar"] for f, files in layout.folders.items() if f"{shard}.tar" in files}
    if shard in markers:
        urls = {f: u for f, u in urls.items() if f in markers[shard].get("modalities", {})}
    if not urls:
        raise ValueError(f"{root}: shard {shard!r} has no modality tars")
    return shard, urls


def read_sample(root: str, key: str, shard: str | None = None,
                modalities: list[str] | None = None) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(shard, {modality: decoded value}, {modality: error}) of the sample ``key``."""
    shard, urls = find_sample(root, key, shard)
    if modalities:
        unknown = [m for m in modalities if m not in urls]
        if unknown:
            raise ValueError(f"{root}: {shard} has no {', '.join(unknown)} (it has {', '.join(sorted(urls))})")
        urls = {m: urls[m] for m in modalities}
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for m, url in urls.items():
        spec = spec_for_folder(m)
        try:
            members = next((mem for k, mem in iter_tar_groups(url) if k == key), None)
            if members is None:
                errors[m] = f"key {key!r} is not in {m}/{shard}.tar"
                continue
            if spec is None:
                errors[m] = f"{m!r} is not a registered modality"
                continue
            ext = next((e for e in members if e == spec.ext), next(iter(members)))
            values[m] = decode_member(spec, ext, members[ext])
        except Exception as e:  # noqa: BLE001 - show what is readable, say what is not
            errors[m] = f"{type(e).__name__}: {e}"
    return shard, values, errors


def _original_size(root: str, shard: str, key: str, values: dict[str, Any]) -> tuple[int, int] | None:
    meta = values.get("metadata")
    if isinstance(meta, dict) and "original_width" in meta and "original_height" in meta:
        return int(meta["original_width"]), int(meta["original_height"])
    for row in manifest.read_rows(root, shard):
        if row.key == key and row.original_width and row.original_height:
            return int(row.original_width), int(row.original_height)
    return None


def default_path(root: str, key: str) -> str:
    """``<output folder name>_<key>.png`` in the current directory."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.rstrip("/").rsplit("/", 1)[-1] or "output")
    return f"{base}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}.png"


def show_sample(root: str, key: str, out: str | None = None, shard: str | None = None,
                modalities: list[str] | None = None, tokenizers: dict[str, str] | None = None) -> ShowResult:
    """Render sample ``key`` of the output ``root`` and write it as a PNG (``out``, default
    :func:`default_path`). Returns the image, the panel layout and the path."""
    loaded = load_tokenizers(tokenizers or {})
    shard, values, errors = read_sample(root, key, shard, modalities)
    ctx = Context(tokenizers=loaded, original_size=_original_size(root, shard, key, values))
    result = render_values(values, key=key, header=f"{root}   key {key}   ({shard})", ctx=ctx, errors=errors)
    result.shard = shard
    result.path = out or default_path(root, key)
    directory = os.path.dirname(os.path.abspath(result.path))
    os.makedirs(directory, exist_ok=True)
    result.image.save(result.path, format="PNG", optimize=True)
    return result
