"""Imported ground truth as labelers: ``import_det``, ``import_semseg_coco``, ``import_depth``, ``import_normal``,
``import_caption`` (written by ``modalmill import``, see docs/own-labels.md).

The import job (:mod:`modalmill.jobs.importer`) reads the user's annotations, matches them to sample keys and writes
a resolved index (``OUT/_modalmill/imports/<modality>-<digest>.json``: key -> value) whose URL and the source's
digest are this labeler's config. The pipeline's ``--only`` update path then runs the labeler like any other: it
serves each sample's value from the index, and a sample the index lacks fails with ``no_annotation``, which drops
it from every tar of its shard (the update path's realignment) and records it in the manifest. The marker records
``provenance: imported`` and the source's digest (:meth:`ImportedLabeler.producer_extra`).

Pixel annotations are read on the workers and must be at the geometry of the stored rgb image or of the original
image; the latter are resized to the stored size with nearest-neighbour sampling (values are never interpolated).
Anything else fails the sample with ``annotation_size``. Conversions (what 4M's tokenizers expect):

- ``semseg_coco``: a 1-channel (or palette) PNG of class ids; the index's ``class_map`` (source id -> 4M id,
  0..132 = COCO-panoptic classes, 255 = unlabelled) is applied as a lookup table; ids were checked by the job. Or a
  COCO panoptic PNG (RGB segment ids) with each segment's 4M class id from the index; void -> 255;
- ``depth``: 16-bit PNG (times ``png_scale``) or float ``.npy``, in ``units`` ``metres`` (any linear depth),
  ``inverse_depth`` or ``disparity`` (both: depth = 1 / value); pixels that are not finite or not > 0 are set to
  the farthest valid depth; then normalised per image by min/max to 0..65535, larger = farther, as the depth
  labelers store it (4M's depth transform divides by 65535 and standardises each crop, so only depth up to an
  affine map matters and inverse depth must be inverted, not rescaled);
- ``normal``: 8-bit RGB PNG (x, y, z in [-1, 1] mapped to 0..255) kept as is, or float ``.npy`` [H, W, 3] in
  [-1, 1] mapped with ``round((n + 1) * 127.5)``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from .base import LabelFailure, LabelInput, Labeler, register_labeler
from ..io import storage

DEPTH_UNITS = ("metres", "inverse_depth", "disparity")


@dataclass(frozen=True)
class ImportConfig:
    index: str = ""  # the resolved index the import job wrote
    digest: str = ""  # sha256 of the imported source
    units: str = "metres"  # depth only
    png_scale: float = 1.0  # depth only: 16-bit PNG value x png_scale = the value in ``units``


class ImportedLabeler(Labeler):
    """Serves one modality's imported annotations from the job's resolved index."""

    version = "1"
    Config = ImportConfig
    default_batch_size = 16
    kind: ClassVar[str] = ""

    def setup(self) -> None:
        if not self.config.index:
            raise ValueError(f"{self.name} runs only through `modalmill import` (no index configured)")
        data = json.loads(storage.read_bytes(self.config.index))
        self.records: dict[str, Any] = data["records"]
        self.class_map = data.get("class_map")

    def checkpoint_id(self) -> str:
        return f"sha256:{self.config.digest}"

    def producer_extra(self) -> dict:
        return {"provenance": "imported", "source_digest": f"sha256:{self.config.digest}"}

    def process_batch(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        if not hasattr(self, "records"):
            self.setup()
        out = []
        for inp in batch:
            rec = self.records.get(inp.key)
            if rec is None:
                out.append(LabelFailure("no_annotation: the imported source has no annotation for this sample"))
                continue
            try:
                out.append({self.outputs[0]: self.value(rec, inp)})
            except _SampleProblem as e:
                out.append(LabelFailure(str(e)))
        return out

    def value(self, rec: Any, inp: LabelInput) -> Any:
        raise NotImplementedError


class _SampleProblem(Exception):
    pass


def _fit(arr: np.ndarray, url: str, inp: LabelInput) -> np.ndarray:
    """``arr`` at the stored rgb's geometry: as is, or from the original size by nearest-neighbour resizing."""
    h, w = inp.image.shape[:2]
    ah, aw = arr.shape[:2]
    if (ah, aw) == (h, w):
        return arr
    if (aw, ah) == tuple(inp.original_size):
        if arr.ndim == 3:
            return np.stack([_fit(arr[..., c], url, inp) for c in range(arr.shape[2])], -1)
        mode = "F" if arr.dtype.kind == "f" else None
        src = arr.astype(np.float32) if mode else arr
        return np.asarray(Image.fromarray(src, mode).resize((w, h), Image.NEAREST)).astype(arr.dtype)
    raise _SampleProblem(f"annotation_size: {url} is {aw}x{ah}, neither the stored image ({w}x{h}) nor the "
                         f"original ({inp.original_size[0]}x{inp.original_size[1]})")


def read_array(url: str) -> np.ndarray:
    data = storage.read_bytes(url)
    if url.lower().endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im)


@register_labeler
class ImportDet(ImportedLabeler):
    name = "import_det"
    outputs = ("det",)
    description = "imported detection ground truth (COCO / YOLO) as 4M's det JSON, score 1"

    def value(self, rec, inp):
        size = rec.get("size")
        if size and tuple(size) != tuple(inp.original_size):
            raise _SampleProblem(f"annotation_size: the annotation is for a {size[0]}x{size[1]} image, the sample's "
                                 f"original is {inp.original_size[0]}x{inp.original_size[1]}")
        return rec["det"]


@register_labeler
class ImportSemseg(ImportedLabeler):
    name = "import_semseg_coco"
    outputs = ("semseg_coco",)
    description = "imported class-index masks as COCO-panoptic ids (nearest only)"

    def value(self, rec, inp):
        if isinstance(rec, dict):  # COCO panoptic: segment ids in RGB, each segment's class from the JSON
            return _fit(panoptic_to_ids(read_array(rec["png"]), rec["segments"]), rec["png"], inp)
        arr = read_array(rec)
        if arr.ndim == 3:
            arr = arr[..., 0]
        if self.class_map is not None:
            lut = np.full(65536, 255, np.uint8)
            for k, v in self.class_map.items():
                lut[int(k)] = v
            arr = lut[arr.astype(np.int64)]
        return _fit(arr.astype(np.uint8), rec, inp)


def panoptic_to_ids(rgb: np.ndarray, segments: dict[str, int]) -> np.ndarray:
    """COCO panoptic PNG (segment id = R + 256 G + 65536 B) -> class ids; void (0) and unlisted segments -> 255."""
    rgb = rgb[..., :3].astype(np.int64)
    seg = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    out = np.full(seg.shape, 255, np.uint8)
    for sid, cid in segments.items():
        out[seg == int(sid)] = cid
    return out


def to_depth(values: np.ndarray, units: str) -> np.ndarray | None:
    """Depth (larger = farther) from ``values`` in ``units``; invalid pixels become the farthest valid depth.
    None when no pixel is valid."""
    v = values.astype(np.float64)
    valid = np.isfinite(v) & (v > 0)
    if not valid.any():
        return None
    d = np.zeros_like(v)
    d[valid] = v[valid] if units == "metres" else 1.0 / v[valid]
    d[~valid] = d[valid].max()
    return d


def depth_to_uint16(d: np.ndarray) -> np.ndarray:
    lo, hi = float(d.min()), float(d.max())
    if hi - lo <= 0:
        return np.zeros(d.shape, np.uint16)
    return np.clip(np.round((d - lo) / (hi - lo) * 65535.0), 0, 65535).astype(np.uint16)


@register_labeler
class ImportDepth(ImportedLabeler):
    name = "import_depth"
    outputs = ("depth",)
    description = "imported depth (metres, inverse depth or disparity) as 4M's 16-bit depth"

    def value(self, rec, inp):
        arr = read_array(rec)
        if arr.ndim != 2:
            raise _SampleProblem(f"depth_shape: {rec} has shape {arr.shape}, expected [H, W]")
        values = arr.astype(np.float64) * (self.config.png_scale if arr.dtype.kind in "ui" else 1.0)
        d = to_depth(_fit(values, rec, inp), self.config.units)
        if d is None:
            raise _SampleProblem(f"invalid_depth: {rec} has no finite value > 0")
        return depth_to_uint16(d)


@register_labeler
class ImportNormal(ImportedLabeler):
    name = "import_normal"
    outputs = ("normal",)
    description = "imported surface normals as 4M's 8-bit RGB normals"

    def value(self, rec, inp):
        arr = read_array(rec)
        if arr.ndim != 3 or arr.shape[2] < 3:
            raise _SampleProblem(f"normal_shape: {rec} has shape {arr.shape}, expected [H, W, 3]")
        arr = arr[..., :3]
        if arr.dtype.kind == "f":
            arr = np.clip(np.round((arr.astype(np.float64) + 1.0) * 127.5), 0, 255)
        elif arr.dtype != np.uint8:
            raise _SampleProblem(f"normal_dtype: {rec} is {arr.dtype}; expected an 8-bit RGB PNG or float .npy")
        return _fit(arr.astype(np.uint8), rec, inp)


@register_labeler
class ImportCaption(ImportedLabeler):
    name = "import_caption"
    outputs = ("caption",)
    description = "imported captions (CSV / JSONL)"

    def value(self, rec, inp):
        return rec
