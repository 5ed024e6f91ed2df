"""Read ground-truth annotation sources (COCO, YOLO, class-index PNG folders, depth/normal files, caption tables).

Each reader returns an :class:`AnnotationSet`: one entry per annotated image, named as the source names it (COCO's
``file_name``, a file's path relative to the folder, a table's match column), with the raw value in source terms:

- ``det``: ``{"width", "height", "instances": [{"box_xyxy": [x0, y0, x1, y1] (pixels), "class_name": str}]}`` from
  COCO (``bbox`` = x, y, w, h in pixels of ``images[].width/height``; ``iscrowd`` regions are left out and
  counted), or ``{"instances": [{"box_norm": [...] (0..1)}]}`` from YOLO (``class cx cy w h``, normalised);
- ``semseg_coco``, ``depth``, ``normal``: the URL of the file (read by the import labeler on the workers); from a
  COCO panoptic JSON: ``{"png": URL of the segment PNG, "segments": {segment id: category name}}`` (the PNG's
  RGB encodes the segment id as R + 256 G + 65536 B);
- ``caption``: the text.

An image listed with no objects (a COCO image without annotations, an empty YOLO ``.txt``) *is* annotated (no
instances); only an image the source does not mention is unannotated. ``digest`` is the sha256 of the source
(a file: its bytes; a folder: its sorted relative paths and their files' sha256), recorded with the imported
modality. Matching names to sample keys is the import job's work (:mod:`modalmill.jobs.importer`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

from . import storage

PIXEL_EXTS = {"semseg_coco": (".png",), "depth": (".png", ".npy"), "normal": (".png", ".npy")}
FORMATS = ("coco", "yolo", "png", "npy", "csv", "jsonl")


class AnnotationError(ValueError):
    """A source that cannot be read as asked: says which file and why."""


@dataclass
class AnnotationSet:
    modality: str
    format: str
    source: str
    digest: str
    items: dict[str, Any]  # source name -> raw value (see the module docstring)
    notes: dict[str, Any] = field(default_factory=dict)  # counts worth reporting (crowd regions left out, ...)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _abs(source: str) -> str:
    return source if "://" in source else os.path.abspath(os.path.expanduser(source))


def _list_folder(root: str, exts: tuple[str, ...]) -> dict[str, str]:
    """relative path -> URL of every file under ``root`` ending in one of ``exts`` (sorted)."""
    root = root.rstrip("/")
    out = {}
    for url in sorted(storage.list_files(root + "/")):
        if url.lower().endswith(exts):
            out[url[len(root) + 1:]] = url
    return out


def folder_digest(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for rel, data in zip(files, (d for _, d in storage.read_many(files.values()))):
        if data is None:
            raise AnnotationError(f"{files[rel]}: could not be read")
        h.update(f"{rel}\t{_sha(data)}\n".encode())
    return h.hexdigest()


def detect_format(modality: str, source: str) -> str:
    src = source.lower()
    if modality == "det":
        return "coco" if src.endswith(".json") else "yolo"
    if modality == "caption":
        return "jsonl" if src.endswith((".jsonl", ".json")) else "csv"
    if modality == "semseg_coco":
        return "coco" if src.endswith(".json") else "png"
    return "npy" if src.endswith(".npy") else "png"


def read_annotations(modality: str, source: str, fmt: str | None = None, *, column: str = "key",
                     classes: str | None = None, panoptic_dir: str | None = None) -> AnnotationSet:
    """Read ``source`` as ``modality``'s annotations in format ``fmt`` (guessed from the source when None).

    ``column``: the caption table's column that names the sample. ``classes``: YOLO class names (a
    ``classes.txt``-style file, one name per line), default ``SOURCE/classes.txt``. ``panoptic_dir``: the folder of
    a COCO panoptic JSON's PNGs, default the JSON's path without ``.json`` (COCO's own layout)."""
    source = _abs(source)
    fmt = fmt or detect_format(modality, source)
    if modality == "det" and fmt == "coco":
        return read_coco_det(source)
    if modality == "det" and fmt == "yolo":
        return read_yolo(source, classes)
    if modality == "semseg_coco" and fmt == "coco":
        return read_coco_panoptic(source, panoptic_dir)
    if modality in PIXEL_EXTS and fmt in ("png", "npy"):
        files = _list_folder(source, PIXEL_EXTS[modality])
        if not files:
            raise AnnotationError(f"{source}: no {'/'.join(PIXEL_EXTS[modality])} files found")
        return AnnotationSet(modality, fmt, source, folder_digest(files), dict(files))
    if modality == "caption" and fmt in ("csv", "jsonl"):
        return read_captions(source, fmt, column)
    raise AnnotationError(f"cannot import {modality!r} from format {fmt!r} (see docs/own-labels.md for what each "
                          f"modality accepts)")


def read_coco_det(path: str) -> AnnotationSet:
    data = storage.read_bytes(path)
    try:
        coco = json.loads(data)
        images = {im["id"]: im for im in coco["images"]}
        names = {c["id"]: c["name"] for c in coco["categories"]}
        anns = coco.get("annotations", [])
    except (ValueError, KeyError, TypeError) as e:
        raise AnnotationError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from None
    items = {im["file_name"]: {"width": int(im["width"]), "height": int(im["height"]), "instances": []}
             for im in images.values()}
    crowd = 0
    for i, a in enumerate(anns):
        im = images.get(a.get("image_id"))
        if im is None or a.get("category_id") not in names or len(a.get("bbox") or []) != 4:
            raise AnnotationError(f"{path}: annotations[{i}] names an unknown image or category, or has no bbox")
        if a.get("iscrowd"):
            crowd += 1
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        items[im["file_name"]]["instances"].append({"box_xyxy": [x, y, x + w, y + h],
                                                     "class_name": names[a["category_id"]]})
    return AnnotationSet("det", "coco", path, _sha(data), items, {"crowd_regions_left_out": crowd})


def _yolo_names(root: str, classes: str | None) -> list[str]:
    url = _abs(classes) if classes else storage.join(root, "classes.txt")
    if not storage.exists(url):
        raise AnnotationError(f"YOLO labels need class names: {url} not found (one name per line, line i = class i; "
                              f"pass --classes FILE)")
    return [ln.strip() for ln in storage.read_bytes(url).decode().splitlines() if ln.strip()]


def read_yolo(root: str, classes: str | None = None) -> AnnotationSet:
    names = _yolo_names(root, classes)
    files = {rel: url for rel, url in _list_folder(root, (".txt",)).items() if rel != "classes.txt"}
    if not files:
        raise AnnotationError(f"{root}: no YOLO .txt label files found")
    items = {}
    h = hashlib.sha256("\n".join(names).encode())
    for (rel, url), (_, data) in zip(files.items(), storage.read_many(files.values())):
        h.update(f"{rel}\t{_sha(data)}\n".encode())
        insts = []
        for n, line in enumerate(data.decode().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            try:
                c, cx, cy, w, bh = int(parts[0]), *(float(v) for v in parts[1:5])
                if len(parts) < 5 or not 0 <= c < len(names):
                    raise ValueError
            except ValueError:
                raise AnnotationError(f"{url}:{n}: expected 'class cx cy w h' with a class in 0..{len(names) - 1}, "
                                      f"got {line!r}") from None
            insts.append({"box_norm": [cx - w / 2, cy - bh / 2, cx + w / 2, cy + bh / 2], "class_name": names[c]})
        items[rel] = {"instances": insts}
    return AnnotationSet("det", "yolo", root, h.hexdigest(), items)


def read_captions(path: str, fmt: str, column: str) -> AnnotationSet:
    data = storage.read_bytes(path)
    rows: list[dict] = []
    try:
        if fmt == "csv":
            rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
        else:
            rows = [json.loads(ln) for ln in data.decode("utf-8").splitlines() if ln.strip()]
    except (ValueError, csv.Error) as e:
        raise AnnotationError(f"{path}: not a {fmt} caption table ({e})") from None
    items: dict[str, str] = {}
    for i, r in enumerate(rows):
        text = r.get("caption", r.get("text")) if isinstance(r, dict) else None
        if not isinstance(r, dict) or column not in r or not isinstance(text, str):
            raise AnnotationError(f"{path}: row {i + 1} needs a {column!r} column and a 'caption' (or 'text') string")
        if str(r[column]) in items:
            raise AnnotationError(f"{path}: {column} {r[column]!r} appears twice")
        items[str(r[column])] = text
    return AnnotationSet("caption", fmt, path, _sha(data), items)


def read_coco_panoptic(path: str, png_dir: str | None = None) -> AnnotationSet:
    """A COCO panoptic JSON and its PNG folder. Entries are named by the image's ``file_name`` (from ``images``;
    without it, the PNG's). The digest covers the JSON and every PNG it names."""
    data = storage.read_bytes(path)
    png_dir = _abs(png_dir) if png_dir else (path[:-5] if path.endswith(".json") else path)
    try:
        coco = json.loads(data)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        image_names = {im["id"]: im["file_name"] for im in coco.get("images", [])}
        items, pngs = {}, {}
        for a in coco["annotations"]:
            name = image_names.get(a["image_id"], a["file_name"])
            pngs[a["file_name"]] = storage.join(png_dir, a["file_name"])
            items[name] = {"png": pngs[a["file_name"]],
                           "segments": {str(int(sg["id"])): names[sg["category_id"]] for sg in a["segments_info"]}}
    except (ValueError, KeyError, TypeError) as e:
        raise AnnotationError(f"{path}: not a COCO panoptic file ({type(e).__name__}: {e})") from None
    digest = hashlib.sha256(f"{_sha(data)}\n{folder_digest(pngs)}".encode()).hexdigest()
    return AnnotationSet("semseg_coco", "coco", path, digest, items)
