"""Geometry helpers shared by tokenizer training and token writing: body poses of a ``human_poses`` label and the
SAM instances of a ``sam_mask`` label cut to one crop, as 4M's ``sam_instance`` files hold them.

(The per-modality preprocessing of 4M-format tokenizers is :mod:`modalmill.tokenize.fourm_inputs`; their training
objectives are :mod:`modalmill.tokenize.fourm_train`.)
"""

from __future__ import annotations

from typing import Any

import numpy as np


def body_poses(value: Any) -> list[np.ndarray]:
    """The 207-d body poses (23 x 3 x 3 rotation matrices, flattened) of every person in a ``human_poses`` label.

    Accepts a list of per-person dicts or 4M's dict of per-person lists."""
    if not value:
        return []
    if isinstance(value, dict):
        bodies = (value.get("pred_smpl_params") or {}).get("body_pose") or []
    else:
        bodies = [(p.get("pred_smpl_params") or {}).get("body_pose") for p in value if isinstance(p, dict)]
    out = []
    for b in bodies:
        arr = np.asarray(b, dtype=np.float32).reshape(-1)
        if arr.size != 207:
            raise ValueError(f"body_pose must have 23x3x3 = 207 values, got {arr.size}")
        out.append(arr)
    return out


MIN_BOX_FRACTION = 0.0005  # 4M drops instances whose box covers less than this fraction of the 224 crop


def instance_mask_in_box(contours, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A SAM instance as the SAM-instance tokenizer sees it: its filled contour(s) (OpenCV ``(P, 1, 2)`` x, y in
    crop pixels; one array or a list of them) drawn into a ``size`` x ``size`` mask spanning the instance's own
    box, points scaled as ``(p - min) / (max - min) * size`` and truncated to ints as 4M's transform does;
    returns (mask float32 0/1, bbox) with bbox ``[ymin, xmin, ymax, xmax]`` in crop pixels (4M's layout)."""
    import cv2

    parts = [contours] if isinstance(contours, np.ndarray) else list(contours)
    pts = [np.asarray(c, dtype=np.float64).reshape(-1, 2) for c in parts]
    allp = np.concatenate(pts)
    xmin, ymin = allp.min(0)
    xmax, ymax = allp.max(0)
    span = np.array([max(xmax - xmin, 1e-6), max(ymax - ymin, 1e-6)])
    # in 4M's order of operations, (p - min) / span * size: (p - min) * (size / span) rounds differently, and
    # truncation then moves some points by a pixel
    scaled = [((p - [xmin, ymin]) / span * size).astype(np.int32).reshape(-1, 1, 2) for p in pts]
    mask = np.zeros((size, size), dtype=np.uint8)
    cv2.drawContours(mask, scaled, -1, 255, thickness=cv2.FILLED)
    return (mask > 0).astype(np.float32), np.array([ymin, xmin, ymax, xmax], dtype=np.float32)


def crop_instances(record: dict, crop, image_hw: tuple[int, int], crop_size: int = 224,
                   mask_size: int = 64) -> list[dict]:
    """The SAM instances of a ``sam_mask`` label inside one crop, as 4M's ``sam_instance`` file holds them.

    ``crop`` is ``(top, left, height, width, hflip)`` in pixels of the stored rgb image (the label's own
    geometry). Each instance's polygons are mapped into the crop resized to ``crop_size`` x ``crop_size``
    (pixel centres to pixel centres), filled there (so whatever lies outside the crop is cut away), flipped
    with the crop, and traced again (``cv2.findContours``, outer contours, largest first). Instances with
    nothing left, or whose box covers less than :data:`MIN_BOX_FRACTION` of the crop (4M's threshold), are
    dropped; the rest keep the label's order. Returns per instance ``{"contours": [int32 (P, 1, 2), ...],
    "bbox": int32 [ymin, xmin, ymax, xmax], "mask": float32 [mask_size, mask_size]}`` (see
    :func:`instance_mask_in_box`)."""
    import cv2

    if not isinstance(record, dict) or not isinstance(record.get("instances"), list):
        raise ValueError("sam_mask label must be {'height', 'width', 'instances': [...]}")
    if (record.get("height"), record.get("width")) != tuple(int(v) for v in image_hw):
        raise ValueError(f"sam_mask label is {record.get('height')}x{record.get('width')}, the stored rgb is "
                         f"{image_hw[0]}x{image_hw[1]}")
    top, left, h, w, flip = (int(v) for v in crop[:5])
    if top < 0 or left < 0 or h < 1 or w < 1 or top + h > image_hw[0] or left + w > image_hw[1]:
        raise ValueError(f"crop {[top, left, h, w]} lies outside the {image_hw[0]}x{image_hw[1]} label")
    shift = 4  # sub-pixel precision of cv2.fillPoly (1/16 px)
    sx, sy = crop_size / w, crop_size / h
    min_area = MIN_BOX_FRACTION * crop_size * crop_size
    out = []
    for inst in record["instances"]:
        x0, y0, x1, y1 = inst["bbox_xyxy"]
        if x1 < left or y1 < top or x0 >= left + w or y0 >= top + h:
            continue  # entirely outside the crop
        polys = []
        for poly in inst["polygons"]:
            p = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            q = np.empty_like(p)
            q[:, 0] = (p[:, 0] - left + 0.5) * sx - 0.5
            q[:, 1] = (p[:, 1] - top + 0.5) * sy - 0.5
            polys.append(np.round(q * (1 << shift)).astype(np.int32).reshape(-1, 1, 2))
        canvas = np.zeros((crop_size, crop_size), dtype=np.uint8)
        cv2.fillPoly(canvas, polys, 255, lineType=cv2.LINE_8, shift=shift)
        if flip:
            canvas = np.ascontiguousarray(canvas[:, ::-1])
        found, _ = cv2.findContours(canvas, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not found:
            continue
        contours = sorted(found, key=lambda c: (-abs(cv2.contourArea(c)), -len(c), int(c[0, 0, 1]),
                                                int(c[0, 0, 0])))
        contours = [np.ascontiguousarray(c, dtype=np.int32) for c in contours]
        allp = np.concatenate([c.reshape(-1, 2) for c in contours])
        (xmin, ymin), (xmax, ymax) = allp.min(0), allp.max(0)
        if (xmax - xmin) * (ymax - ymin) < min_area:
            continue
        mask, _ = instance_mask_in_box(contours, mask_size)
        out.append({"contours": contours, "bbox": np.array([ymin, xmin, ymax, xmax], dtype=np.int32), "mask": mask})
    return out
