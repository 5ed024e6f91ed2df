"""What each source modality looks like to a tokenizer: crop + resize, model input, loss, metrics, pictures.

One :class:`Adapter` per source modality, shared by training and by token writing, so both see exactly the
same preprocessing:

- ``prepare(label, crop, image_hw)``: cut one crop (``top, left, height, width, hflip`` in pixels of the stored
  rgb image) out of a decoded label, flip it, resize it to the tokenizer's input size with the right
  interpolation (bilinear with antialiasing for images and continuous maps, nearest for class maps and edges)
  and return the *target* tensor;
- ``to_input(target)``: the model input (normalised floats; one-hot for class maps);
- ``loss(pred, target)``, ``metrics(pred, target)`` (summed, so they aggregate over batches), ``to_rgb``.

Normal maps flip their x component when the crop is flipped. Teacher features (``clip``, ``dinov2``,
``imagebind`` and their ``*_global`` vectors, :data:`PER_CROP_SOURCES`) are stored per crop, row c computed by
the teacher on crop c (already cut, resized and flipped, as 4M does): :func:`crop_label` picks row c for crop c,
and the adapter only brings that row to the tokenizer's grid. Body poses have no geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

SEMSEG_CLASSES = 133  # COCO-panoptic classes 0..132; 255 = unlabelled
IGNORE = 255


def _crop_array(label: np.ndarray, crop) -> np.ndarray:
    top, left, h, w = (int(v) for v in crop[:4])
    if top < 0 or left < 0 or top + h > label.shape[0] or left + w > label.shape[1] or h < 1 or w < 1:
        raise ValueError(f"crop {list(map(int, crop[:4]))} lies outside the {label.shape[0]}x{label.shape[1]} label")
    return label[top:top + h, left:left + w]


def resize_chw(t: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """[C, h, w] float -> [C, size, size]: bilinear (antialiased) or nearest-exact."""
    if tuple(t.shape[-2:]) == (size, size):
        return t
    if mode == "nearest":
        return F.interpolate(t[None], size=(size, size), mode="nearest-exact")[0]
    return F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def _hw_channels(label: np.ndarray) -> np.ndarray:
    return label[..., None] if label.ndim == 2 else label


@dataclass(frozen=True)
class Adapter:
    """Base: an image-like label at the stored rgb's geometry."""

    source: str
    in_channels: int
    out_channels: int
    size: int = 224
    interpolation: str = "bilinear"
    scale: float = 255.0  # stored integer range -> [0, 1]
    loss_name: str = "mse"
    kind: ClassVar[str] = "pixel"
    model_family: ClassVar[str] = "spatial"
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ data
    def prepare(self, label: Any, crop, image_hw: tuple[int, int]) -> torch.Tensor:
        arr = np.asarray(label)
        if arr.shape[:2] != tuple(image_hw):
            raise ValueError(f"{self.source} label is {arr.shape[:2]}, the stored rgb is {tuple(image_hw)}")
        arr = _hw_channels(_crop_array(arr, crop))
        t = torch.from_numpy(np.array(arr, dtype=np.float32)).permute(2, 0, 1) / self.scale
        t = resize_chw(t, self.size, self.interpolation)
        if int(crop[4]):
            t = self.hflip(t)
        return t.contiguous()

    def hflip(self, t: torch.Tensor) -> torch.Tensor:
        return torch.flip(t, dims=[-1])

    def items(self, label: Any, crop, image_hw: tuple[int, int]) -> list[torch.Tensor]:
        """The training/encoding targets one crop of a label gives: one, except for SAM instances (one per
        instance left in the crop)."""
        return [self.prepare(label, crop, image_hw)]

    def to_input(self, target: torch.Tensor) -> torch.Tensor:
        return target * 2 - 1

    def normalisation(self) -> dict:
        return {"target": f"stored value / {self.scale:g} in [0, 1]", "input": "2 * target - 1",
                "interpolation": self.interpolation}

    # ------------------------------------------------------------------ objective
    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rec = self.reconstruct(pred)
        if self.loss_name == "l1":
            return F.l1_loss(rec, target)
        return F.mse_loss(rec, target)

    def reconstruct(self, pred: torch.Tensor) -> torch.Tensor:
        """Model output -> the target's space ([0, 1] for images)."""
        return (pred + 1) / 2

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Summed per-sample statistics: ``n``, ``se`` (squared error sum), ``n_values``, ``psnr_sum``."""
        rec = self.reconstruct(pred).clamp(0, 1)
        se = ((rec - target) ** 2).flatten(1).sum(1)
        n_val = target[0].numel()
        mse = se / n_val
        psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
        return {"n": float(target.shape[0]), "se": float(se.sum()), "n_values": float(n_val * target.shape[0]),
                "psnr_sum": float(psnr.sum())}

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        mse = sums["se"] / max(sums["n_values"], 1)
        return {"mse": mse, "psnr": sums["psnr_sum"] / max(sums["n"], 1),
                "psnr_of_mean_mse": 10 * math.log10(1.0 / max(mse, 1e-10))}

    def baseline(self, target: torch.Tensor) -> torch.Tensor:
        """A trivial prediction in the model's output space: the mean target everywhere (per channel)."""
        mean = target.mean(dim=(0, 2, 3), keepdim=True).expand_as(target)
        return mean * 2 - 1

    def to_rgb(self, target: torch.Tensor) -> np.ndarray:
        """[C, S, S] in target space -> uint8 [S, S, 3] picture."""
        t = target.clamp(0, 1)
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        return (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@dataclass(frozen=True)
class NormalAdapter(Adapter):
    def hflip(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.flip(t, dims=[-1]).clone()
        t[0] = 1 - t[0]  # the x component changes sign: in [0, 1] storage v -> 1 - v
        return t


@dataclass(frozen=True)
class EdgeAdapter(Adapter):
    """Edge maps: 0/255 stored, nearest resize, BCE on logits."""

    interpolation: str = "nearest"
    loss_name: str = "bce"
    pos_weight: float = 4.0  # edges are ~5-10 % of pixels: weight them up so the model cannot settle on "no edges"
    kind: ClassVar[str] = "edge"

    def loss(self, pred, target):
        w = torch.tensor(self.pos_weight, dtype=pred.dtype, device=pred.device)
        return F.binary_cross_entropy_with_logits(pred, target, pos_weight=w)

    def reconstruct(self, pred):
        # BCE with pos_weight w makes the logit log(w) too high: undo it to get the edge probability
        return torch.sigmoid(pred - math.log(self.pos_weight))

    def baseline(self, target):
        p = target.mean().clamp(1e-4, 1 - 1e-4)
        return torch.full_like(target, float(torch.log(p / (1 - p))) + math.log(self.pos_weight))

    def normalisation(self):
        return {"target": "edge > 0 -> 1, else 0", "input": "2 * target - 1", "interpolation": "nearest",
                "output": f"logits; BCE with pos_weight {self.pos_weight:g}; probability sigmoid(logit - log "
                          f"{self.pos_weight:g})"}


@dataclass(frozen=True)
class SemsegAdapter(Adapter):
    """COCO-panoptic class maps: nearest resize, one-hot input (255 -> an extra 'unlabelled' channel), CE."""

    in_channels: int = SEMSEG_CLASSES + 1
    out_channels: int = SEMSEG_CLASSES
    interpolation: str = "nearest"
    loss_name: str = "cross_entropy"
    kind: ClassVar[str] = "class"

    def prepare(self, label, crop, image_hw):
        arr = np.asarray(label)
        if arr.shape[:2] != tuple(image_hw):
            raise ValueError(f"{self.source} label is {arr.shape[:2]}, the stored rgb is {tuple(image_hw)}")
        t = torch.from_numpy(np.ascontiguousarray(_crop_array(arr, crop)).astype(np.float32))[None]
        t = resize_chw(t, self.size, "nearest")
        if int(crop[4]):
            t = torch.flip(t, dims=[-1])
        return t.long().contiguous()  # [1, S, S] class ids, 255 unlabelled

    def to_input(self, target):
        ids = torch.where(target[:, 0] == IGNORE, SEMSEG_CLASSES, target[:, 0]).clamp(0, SEMSEG_CLASSES)
        return F.one_hot(ids, SEMSEG_CLASSES + 1).permute(0, 3, 1, 2).float()

    def loss(self, pred, target):
        return F.cross_entropy(pred, target[:, 0], ignore_index=IGNORE)

    def reconstruct(self, pred):
        return pred.argmax(dim=1, keepdim=True)

    def baseline(self, target):
        ids = target[target != IGNORE]
        cls = int(torch.mode(ids).values) if ids.numel() else 0
        out = torch.full((target.shape[0], SEMSEG_CLASSES, *target.shape[-2:]), -10.0)
        out[:, cls] = 10.0
        return out

    def metrics(self, pred, target):
        rec = self.reconstruct(pred)[:, 0]
        t = target[:, 0]
        valid = t != IGNORE
        inter = torch.bincount(t[valid & (rec == t)], minlength=SEMSEG_CLASSES)[:SEMSEG_CLASSES]
        area_t = torch.bincount(t[valid], minlength=SEMSEG_CLASSES)[:SEMSEG_CLASSES]
        area_p = torch.bincount(rec[valid], minlength=SEMSEG_CLASSES)[:SEMSEG_CLASSES]
        return {"n": float(t.shape[0]), "correct": float(inter.sum()), "valid": float(valid.sum()),
                **{f"inter_{c}": float(inter[c]) for c in range(SEMSEG_CLASSES) if area_t[c] or area_p[c]},
                **{f"union_{c}": float(area_t[c] + area_p[c] - inter[c]) for c in range(SEMSEG_CLASSES)
                   if area_t[c] or area_p[c]}}

    def summarise(self, sums):
        ious = [sums[f"inter_{c}"] / sums[f"union_{c}"] for c in range(SEMSEG_CLASSES)
                if sums.get(f"union_{c}", 0) > 0]
        return {"accuracy": sums["correct"] / max(sums["valid"], 1), "miou": float(np.mean(ious)) if ious else 0.0}

    def to_rgb(self, target):
        ids = target[0].long().clamp(0, 255).numpy()
        rng = np.random.default_rng(0)
        palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
        palette[IGNORE] = 0
        return palette[ids]

    def normalisation(self):
        return {"target": "class ids 0..132, 255 unlabelled (ignored by the loss)",
                "input": "one-hot over 134 channels (255 -> channel 133)", "interpolation": "nearest",
                "output": "133 class logits"}


@dataclass(frozen=True)
class FeatureMapAdapter(Adapter):
    """One crop's teacher patch features ``[h, w, C]`` (row c of the stored ``[n_crops, h, w, C]``, which the
    teacher computed on crop c: :func:`crop_label`). The crop is already cut, resized and flipped, so ``crop`` and
    ``image_hw`` are not used; a grid other than the tokenizer's is resized to it bilinearly."""

    interpolation: str = "none"
    scale: float = 1.0
    loss_name: str = "smooth_l1+cosine"
    kind: ClassVar[str] = "feature"

    def prepare(self, label, crop=None, image_hw=None):
        arr = np.asarray(label, dtype=np.float32)
        if arr.ndim != 3:
            raise ValueError(f"{self.source} features of one crop must be [h, w, C], got shape {arr.shape}")
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        if tuple(t.shape[-2:]) != (self.size, self.size):
            t = F.interpolate(t[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        return t.contiguous()

    def to_input(self, target):
        return target

    def reconstruct(self, pred):
        return pred

    def loss(self, pred, target):
        cos = F.cosine_similarity(pred, target, dim=1).mean()
        return F.smooth_l1_loss(pred, target) + (1 - cos)

    def baseline(self, target):
        return target.mean(dim=(0, 2, 3), keepdim=True).expand_as(target)

    def metrics(self, pred, target):
        se = ((pred - target) ** 2).flatten(1).sum(1)
        cos = F.cosine_similarity(pred, target, dim=1).flatten(1).mean(1)
        return {"n": float(target.shape[0]), "se": float(se.sum()), "n_values": float(target[0].numel() *
                                                                                     target.shape[0]),
                "cos_sum": float(cos.sum())}

    def summarise(self, sums):
        return {"mse": sums["se"] / max(sums["n_values"], 1), "cosine": sums["cos_sum"] / max(sums["n"], 1)}

    def to_rgb(self, target):
        flat = target.flatten(1).t()  # [S*S, C]
        v = flat[:, :3] if flat.shape[1] >= 3 else flat.repeat(1, 3)[:, :3]
        v = (v - v.min(0).values) / (v.max(0).values - v.min(0).values).clamp_min(1e-6)
        return (v.reshape(self.size, self.size, 3).numpy() * 255).round().astype(np.uint8)

    def normalisation(self):
        return {"target": "the teacher's features of the crop, as stored (float)", "input": "features",
                "interpolation": "none (the teacher ran on the crop); bilinear to the tokenizer's grid if it differs"}


@dataclass(frozen=True)
class VectorAdapter(Adapter):
    """Global embeddings (cosine loss) and the 207-d body pose (smooth L1); no geometry."""

    interpolation: str = "none"
    scale: float = 1.0
    kind: ClassVar[str] = "vector"
    model_family: ClassVar[str] = "mlp"

    def prepare(self, label, crop, image_hw):
        v = torch.from_numpy(np.asarray(label, dtype=np.float32).reshape(-1).copy())
        if v.numel() != self.in_channels and self.in_channels:
            raise ValueError(f"{self.source} vector has {v.numel()} values, expected {self.in_channels}")
        return v

    def to_input(self, target):
        return target

    def reconstruct(self, pred):
        return pred

    def loss(self, pred, target):
        if self.loss_name == "cosine":
            return 1 - F.cosine_similarity(pred, target, dim=-1).mean()
        return F.smooth_l1_loss(pred, target)

    def baseline(self, target):
        return target.mean(dim=0, keepdim=True).expand_as(target)

    def metrics(self, pred, target):
        se = ((pred - target) ** 2).sum(-1)
        cos = F.cosine_similarity(pred, target, dim=-1)
        return {"n": float(target.shape[0]), "se": float(se.sum()), "n_values": float(target.numel()),
                "cos_sum": float(cos.sum())}

    def summarise(self, sums):
        return {"mse": sums["se"] / max(sums["n_values"], 1), "cosine": sums["cos_sum"] / max(sums["n"], 1)}

    def to_rgb(self, target):
        raise ValueError(f"{self.source}: vectors have no picture")

    def normalisation(self):
        return {"target": "the vector as stored (float)", "input": "the vector", "loss": self.loss_name}


@dataclass(frozen=True)
class MaskAdapter(EdgeAdapter):
    """SAM instance masks: a 64x64 binary mask of the instance inside its own box (BCE).

    ``prepare`` takes one such mask; ``items(sam_mask_record, crop, image_hw)`` cuts every instance of a
    ``sam_mask`` label to the crop (:func:`crop_instances`) and returns one mask per instance left."""

    pos_weight: float = 1.0  # masks fill most of their own box: no re-weighting
    crop_size: int = 224  # the crop the instances are resized to before their boxes are taken (4M: 224)
    kind: ClassVar[str] = "mask"

    def prepare(self, label, crop=None, image_hw=None):
        m = torch.as_tensor(np.asarray(label, dtype=np.float32))
        if m.shape != (self.size, self.size):
            raise ValueError(f"instance masks must be {self.size}x{self.size}, got {tuple(m.shape)}")
        return m[None]

    def instances(self, label, crop, image_hw) -> list[dict]:
        return crop_instances(label, crop, image_hw, self.crop_size, self.size)

    def items(self, label, crop, image_hw):
        return [self.prepare(inst["mask"]) for inst in self.instances(label, crop, image_hw)]

    def normalisation(self):
        return {"target": f"each SAM instance of the crop (crop resized to {self.crop_size}x{self.crop_size}, "
                          f"flipped, boxes under {MIN_BOX_FRACTION:g} of the crop dropped) filled into a "
                          f"{self.size}x{self.size} mask spanning its own box, 0/1",
                "input": "2 * target - 1", "output": "logits; BCE", "interpolation": "polygon rasterisation"}

    def metrics(self, pred, target):
        out = super().metrics(pred, target)
        hard = self.reconstruct(pred) > 0.5
        t = target > 0.5
        out["iou_inter"] = float((hard & t).sum())
        out["iou_union"] = float((hard | t).sum())
        return out

    def summarise(self, sums):
        out = super().summarise(sums)
        out["iou"] = sums["iou_inter"] / max(sums["iou_union"], 1)
        return out


# ---------------------------------------------------------------------- per-crop labels

# labels stored with one row per crop_settings row (the teacher ran on each crop): row c belongs to crop c
PER_CROP_SOURCES = ("clip", "dinov2", "imagebind", "clip_global", "dinov2_global", "imagebind_global")


def crop_label(source: str, label: Any, c: int, n_crops: int) -> Any:
    """The part of a stored label that crop ``c`` (of ``n_crops``) is tokenized from: row c for the per-crop
    teacher features (:data:`PER_CROP_SOURCES`), the whole label for everything else (cut by the adapter)."""
    if source not in PER_CROP_SOURCES:
        return label
    arr = np.asarray(label)
    want = 4 if source in FEATURE_GRID else 2
    if arr.ndim != want or arr.shape[0] != n_crops:
        raise ValueError(f"{source} must hold one row per crop_settings row ([{n_crops}, ...]), got shape "
                         f"{arr.shape}; features stored by an older modalmill (crop 0 only) must be recomputed: "
                         f"modalmill run JOB.yaml --only {source} --force")
    return arr[c]


# ---------------------------------------------------------------------- the table

FEATURE_GRID = {"clip": 14, "dinov2": 16, "imagebind": 16}  # 224 / patch 16 and 224 / patch 14, as 4M


def adapter_for(source: str, in_channels: int | None = None) -> Adapter:
    """The adapter of a source modality; ``in_channels`` is needed for feature maps and vectors."""
    if source == "rgb":
        return Adapter("rgb", 3, 3)
    if source == "depth":
        return Adapter("depth", 1, 1, scale=65535.0, loss_name="l1")
    if source == "normal":
        return NormalAdapter("normal", 3, 3, loss_name="l1")
    if source in ("canny_edge", "sam_edge"):
        return EdgeAdapter(source, 1, 1)
    if source == "semseg_coco":
        return SemsegAdapter("semseg_coco")
    if source in FEATURE_GRID:
        c = int(in_channels or 0)
        return FeatureMapAdapter(source, c, c, size=FEATURE_GRID[source])
    if source in ("dinov2_global", "imagebind_global", "clip_global"):
        c = int(in_channels or 0)
        return VectorAdapter(source, c, c, loss_name="cosine")
    if source == "human_poses":
        return VectorAdapter("human_poses", 207, 207, loss_name="smooth_l1")
    if source == "sam_instance":
        return MaskAdapter("sam_instance", 1, 1, size=64)
    from ..schemas.modalities import MODALITIES, PIXEL

    spec = MODALITIES.get(source)
    if spec is not None and spec.kind == PIXEL and spec.dtype in ("uint8", "uint16"):  # a plugin's pixel modality
        c = int(spec.shape[2]) if len(spec.shape) == 3 else 1
        return Adapter(source, c, c, scale=255.0 if spec.dtype == "uint8" else 65535.0)
    raise ValueError(f"no tokenizer input defined for modality {source!r}")


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
    scale = np.array([size / max(xmax - xmin, 1e-6), size / max(ymax - ymin, 1e-6)])
    scaled = [((p - [xmin, ymin]) * scale).astype(np.int32).reshape(-1, 1, 2) for p in pts]
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
