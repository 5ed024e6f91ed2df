"""COCO-panoptic semantic segmentation with Mask2Former (4M-21's ``semseg_coco`` pseudo-labeler).

4M-21 used Mask2Former with a Swin-B backbone trained on COCO panoptic (ml-4m ``README_DATA.md``, Mask2Former
model zoo, panoptic segmentation). transformers implements it as ``Mask2FormerForUniversalSegmentation``; the
default weights are the hub conversion of that model, ``facebook/mask2former-swin-base-coco-panoptic``.

Output ``semseg_coco``: uint8 ``[H, W]`` at the stored rgb's geometry holding COCO-panoptic class ids 0..132 in
the panoptic order (:data:`COCO_PANOPTIC_CLASSES`: the 80 thing classes, then the 53 stuff classes), 255 for
unlabelled pixels.

Method:

1. input as Mask2Former's own image processor makes it (transformers ``Mask2FormerImageProcessor`` defaults,
   the sizes of detectron2's ``ResizeShortestEdge(800, max_size=1333)``): the shorter side scaled to
   ``input_size`` (800) unless the longer side would then exceed ``max_size`` (1333), both sides then rounded
   up to multiples of 32 (:func:`processor_size`), PIL bilinear, ImageNet mean/std. Images of the same input
   size run as one batch, without padding, so each image's result does not depend on its batch;
2. semantic inference as in Mask2Former: with ``p = softmax(class logits)`` without the no-object column and
   ``m = sigmoid(mask logits)`` upsampled bilinearly to the model input, the score of class c at a pixel is
   ``sum_q p[q, c] * m[q, pixel]``; the label is the class with the highest score, or 255 where that score
   is below ``min_confidence`` (0 by default: every pixel is labelled);
3. the label map is resized to ``H, W`` with nearest-neighbour sampling (labels are never interpolated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.fetch import WeightsError
from .base import LabelFailure, LabelInput, Resources, register_labeler
from .depth import IMAGENET_MEAN, IMAGENET_STD, load_pretrained, split_usable
from .model import ModelConfig, ModelLabeler
from .pins import Pin

__all__ = ["COCO_PANOPTIC_CLASSES", "COCO_THING_CLASSES", "N_COCO_THINGS", "Mask2FormerCocoLabeler",
           "processor_batches", "processor_size", "semantic_map"]

# COCO panoptic categories in the contiguous order of the panoptic annotations (detectron2's order, used by
# Mask2Former and by 4M's semseg_coco): ids 0..79 are things, 80..132 stuff.
COCO_PANOPTIC_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
    "banner", "blanket", "bridge", "cardboard", "counter", "curtain", "door-stuff", "floor-wood", "flower",
    "fruit", "gravel", "house", "light", "mirror-stuff", "net", "pillow", "platform", "playingfield",
    "railroad", "river", "road", "roof", "sand", "sea", "shelf", "snow", "stairs", "tent", "towel",
    "wall-brick", "wall-stone", "wall-tile", "wall-wood", "water-other", "window-blind", "window-other",
    "tree-merged", "fence-merged", "ceiling-merged", "sky-other-merged", "cabinet-merged", "table-merged",
    "floor-other-merged", "pavement-merged", "mountain-merged", "grass-merged", "dirt-merged", "paper-merged",
    "food-other-merged", "building-other-merged", "rock-merged", "wall-other-merged", "rug-merged",
)
N_COCO_THINGS = 80
COCO_THING_CLASSES: tuple[str, ...] = COCO_PANOPTIC_CLASSES[:N_COCO_THINGS]
UNLABELLED = 255


def processor_size(h: int, w: int, shortest: int = 800, longest: int | None = 1333,
                   divisor: int = 0) -> tuple[int, int]:
    """The model input size transformers' DETR / Mask2Former image processors give an ``h x w`` image.

    ``{"shortest_edge": shortest, "longest_edge": longest}`` as ``get_size_with_aspect_ratio`` computes it (the
    shorter side becomes ``shortest`` unless the longer side would exceed ``longest``, in which case the longer
    side becomes about ``longest``; sides are truncated to ints), then, with ``divisor`` (Mask2Former's
    ``size_divisor`` 32), both sides rounded up to a multiple of it.
    """
    size: float = shortest
    raw = None
    lo, hi = float(min(h, w)), float(max(h, w))
    if longest is not None and hi / lo * size > longest:
        raw = longest * lo / hi
        size = int(round(raw))
    if (h <= w and h == size) or (w <= h and w == size):
        oh, ow = h, w
    elif w < h:
        ow = int(size)
        oh = int((raw if raw is not None else size) * h / w)
    else:
        oh = int(size)
        ow = int((raw if raw is not None else size) * w / h)
    if divisor:
        oh, ow = int(math.ceil(oh / divisor) * divisor), int(math.ceil(ow / divisor) * divisor)
    return oh, ow


def processor_batches(labeler: ModelLabeler, images: list[np.ndarray], shortest: int, longest: int | None,
                      divisor: int = 0):
    """Yield ``(positions, pixel_values [B, 3, h, w], pixel_mask [B, h, w])`` for ``images`` grouped by their
    :func:`processor_size`: each resized with PIL bilinear (as the PIL image processors and detectron2 do),
    scaled to [0, 1], normalised with the labeler's mean/std; no padding within a group (all the same size)."""
    import torch

    from .depth import resize_uint8

    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(processor_size(*im.shape[:2], shortest, longest, divisor), []).append(i)
    for hw, idx in groups.items():
        x = labeler.to_tensor([resize_uint8(images[i], hw, "bilinear") for i in idx], size=hw)
        yield idx, x, torch.ones((len(idx), *hw), dtype=torch.long, device=x.device)


def semantic_map(class_logits, mask_logits, canvas: int | tuple[int, int], region: tuple[int, int],
                 out_hw: tuple[int, int], min_confidence: float = 0.0) -> np.ndarray:
    """One image's uint8 semantic map from Mask2Former's ``[Q, C + 1]`` class and ``[Q, h, w]`` mask logits.

    The masks are upsampled to the model input ``canvas`` (side or ``(h, w)``), of which the image's own
    ``region`` (top-left ``(h, w)``; the whole canvas when there is no padding) is labelled and resized to
    ``out_hw`` by nearest neighbour."""
    import torch
    import torch.nn.functional as F

    canvas_hw = (canvas, canvas) if isinstance(canvas, int) else tuple(canvas)
    probs = class_logits.float().softmax(-1)[:, :-1]  # [Q, C]
    masks = F.interpolate(mask_logits.float()[None], size=canvas_hw, mode="bilinear",
                          align_corners=False)[0, :, :region[0], :region[1]].sigmoid()  # [Q, rh, rw]
    scores = torch.einsum("qc,qhw->chw", probs, masks)
    best, labels = scores.max(dim=0)
    labels = torch.where(best >= min_confidence, labels, torch.full_like(labels, UNLABELLED))
    labels = F.interpolate(labels[None, None].float(), size=out_hw, mode="nearest-exact")[0, 0]
    return np.ascontiguousarray(labels.to("cpu").numpy().astype(np.uint8))


@register_labeler
class Mask2FormerCocoLabeler(ModelLabeler):
    """Mask2Former (Swin-B, COCO panoptic) semantic segmentation -> ``semseg_coco`` uint8 [H, W].

    See the module docstring for the input sizes and the semantic inference. The checkpoint must have the
    133 COCO-panoptic classes in the panoptic order (when its ``id2label`` names classes, they are checked).
    """

    name = "mask2former_coco"
    version = "2"
    outputs = ("semseg_coco",)
    architecture = "Mask2Former (Swin-B backbone), transformers Mask2FormerForUniversalSegmentation, 133 classes"
    weights = "facebook/mask2former-swin-base-coco-panoptic"
    weights_pin = Pin(note="no published sha256 of its weights file was found; the hub's own checksum checks "
                          "the download")
    weights_help = ("the hub id facebook/mask2former-swin-base-coco-panoptic (online), or a local/s3:// copy of "
                    "that directory (config.json + model.safetensors)")
    input_size = 800  # shortest edge, as the image processor's size["shortest_edge"]
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    license = "MIT (facebookresearch/Mask2Former model zoo)"
    default_resources = Resources(num_cpus=1, num_gpus=0.5, memory_mb=4096)
    default_batch_size = 8
    description = "Mask2Former Swin-B COCO-panoptic semantic map (4M-21's choice): class ids 0..132, 255 unlabelled"

    @dataclass(frozen=True)
    class Config(ModelConfig):
        input_size: int = 800  # shorter input side (the processor's shortest_edge) ...
        max_size: int = 1333  # ... unless the longer side would exceed this (longest_edge); sides then ceil to 32
        min_confidence: float = 0.0  # pixels whose best class score is below this become 255

        def __post_init__(self):
            for f in ("input_size", "max_size"):
                v = getattr(self, f)
                if isinstance(v, bool) or not isinstance(v, int) or v < 32:
                    raise ValueError(f"{f} must be an integer >= 32, got {v!r}")
            if self.max_size < self.input_size:
                raise ValueError(f"max_size ({self.max_size}) must be >= input_size ({self.input_size})")
            if not (self.min_confidence >= 0):
                raise ValueError(f"min_confidence must be >= 0, got {self.min_confidence!r}")

    def build(self, path: str):
        from transformers import Mask2FormerForUniversalSegmentation

        return load_checked(self, Mask2FormerForUniversalSegmentation, "mask2former", COCO_PANOPTIC_CLASSES, path)

    def predict(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        results, ok = split_usable(batch)
        if not ok:
            return results
        outs = self.raw_predictions([batch[i].image for i in ok])
        for (cls_logits, mask_logits, hw), i in zip(outs, ok):
            if not (bool(cls_logits.isfinite().all()) and bool(mask_logits.isfinite().all())):
                results[i] = LabelFailure("the model predicted non-finite logits")
                continue
            results[i] = {"semseg_coco": semantic_map(cls_logits, mask_logits, hw, hw, batch[i].image.shape[:2],
                                                      self.config.min_confidence)}
        return results

    def raw_predictions(self, images: list[np.ndarray]) -> list[tuple[Any, Any, tuple[int, int]]]:
        """Per image: (class logits ``[Q, C + 1]``, mask logits ``[Q, h/4, w/4]``, model input ``(h, w)``), the
        input made as Mask2Former's image processor makes it (:func:`processor_batches`, size divisor 32)."""
        outs: list = [None] * len(images)
        for idx, x, mask in processor_batches(self, images, self.config.input_size, self.config.max_size, 32):
            out = self.model(pixel_values=x, pixel_mask=mask)
            for j, i in enumerate(idx):
                outs[i] = (out.class_queries_logits[j], out.masks_queries_logits[j], tuple(x.shape[-2:]))
        return outs


def load_checked(labeler: ModelLabeler, model_cls, model_type: str, classes: tuple[str, ...], path: str):
    """``model_cls`` (a transformers model of ``model_type``) loaded from ``path`` and checked to predict
    ``classes``, in order (:func:`check_class_names`); errors name the labeler and where to get its weights."""
    where = f"{labeler.name} ({labeler.architecture})"
    model = load_pretrained(model_cls, path, model_type=model_type, where=where, how_to_get=labeler.weights_help)
    check_class_names(model.config, classes, where=where, path=path, how_to_get=labeler.weights_help)
    return model


def check_class_names(config, expected: tuple[str, ...], *, where: str, path: str, how_to_get: str = "",
                      skip: tuple[str, ...] = ()) -> None:
    """Raise a WeightsError unless ``config`` has ``len(expected)`` labels named ``expected`` (in order).

    Generic names (``LABEL_i``) are accepted; names in ``skip`` may stand anywhere (e.g. DETR's 'N/A' ids).
    """
    hint = f" Get it: {how_to_get}." if how_to_get else ""
    n = int(config.num_labels)
    if n != len(expected):
        raise WeightsError(f"{where}: {path!r} predicts {n} classes, expected {len(expected)}.{hint}")
    names = [str(config.id2label.get(i, config.id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]
    if all(nm == f"LABEL_{i}" for i, nm in enumerate(names)):
        return
    bad = [(i, nm, want) for i, (nm, want) in enumerate(zip(names, expected)) if nm != want and nm not in skip]
    if bad:
        i, nm, want = bad[0]
        raise WeightsError(f"{where}: {path!r} names class {i} {nm!r}, expected {want!r} "
                           f"({len(bad)} class name(s) differ): not the expected label set.{hint}")
