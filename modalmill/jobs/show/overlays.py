"""Renderers that draw a label over the stored rgb: crops as rectangles, semantic classes, detection boxes, body
poses and keypoints, OCR lines, SAM instances and person masks."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageDraw

from ...labelers.detection import det_thresholds
from .canvas import PANEL, Context, _draw_label, _fit, _font, _rgb_or_blank, _text, id_colours
from .registry import renders


SCORE_THRESHOLD = 0.6  # 4M kept ViTDet-H detections with score >= 0.6; a record's own threshold takes precedence


@renders("crop_settings")
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


@renders("semseg_coco")
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


@renders("det")
def _r_det(spec, value, ctx):
    inst = value.get("instances", []) if isinstance(value, dict) else []
    img = _fit(Image.fromarray(_rgb_or_blank(ctx)))
    draw = ImageDraw.Draw(img)
    font = _font(12)
    kept = 0
    cut = det_thresholds(value)[0]
    for _, d in sorted(enumerate(inst), key=lambda t: t[1].get("score", 0)):
        x0, y0, x1, y1 = d["boxes"]
        box = (x0 * img.width, y0 * img.height, x1 * img.width, y1 * img.height)
        if d.get("score", 0) >= cut:
            kept += 1
            colour = tuple(int(c) for c in id_colours(np.array(hash_name(d.get("class_name", "")))))
            draw.rectangle(box, outline=colour, width=3)
            _draw_label(draw, (box[0] + 2, box[1] + 2), f"{d.get('class_name')} {d.get('score', 0):.2f}", colour, font)
        else:
            draw.rectangle(box, outline=(160, 160, 160), width=1)
    return img, f"{len(inst)} boxes, {kept} with score >= {cut:g} (bold)"


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


@renders("human_poses")
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


@renders("pose_keypoints")
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


@renders("ocr")
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


@renders("sam_mask")
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


@renders("person_mask")
def _r_mask(spec, value, ctx):
    mask = np.asarray(value) > 0
    rgb = _rgb_or_blank(ctx, *mask.shape[:2])
    if rgb.shape[:2] != mask.shape[:2]:
        rgb = np.full((*mask.shape[:2], 3), 128, np.uint8)
    out = rgb.astype(np.float32) * 0.35
    out[mask] = rgb[mask] * 0.5 + np.array([255, 60, 60]) * 0.5
    return Image.fromarray(out.astype(np.uint8)), f"mask over the rgb, {mask.mean():.1%} of pixels"


def _cv_contours(contours) -> list:
    """One instance's contour(s) as OpenCV point arrays."""
    return [np.asarray(c, np.int32).reshape(-1, 1, 2) for c in (contours if isinstance(contours, list) else [contours])]


def _crop0(ctx: Context, size: int = 224) -> np.ndarray:
    rgb = _rgb_or_blank(ctx, size, size)
    if ctx.crops is not None and len(ctx.crops) and ctx.rgb is not None:
        top, left, h, w, flip = (int(c) for c in ctx.crops[0])
        rgb = rgb[top:top + h, left:left + w]
        if flip:
            rgb = rgb[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((size, size), Image.Resampling.BILINEAR))


@renders("sam_instance")
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
