"""COCO object detection -> ``det`` (4M's bounding-box modality).

4M-21's boxes came from ViTDet ViT-H with a Cascade Mask R-CNN head (detectron2; ml-4m ``README_DATA.md``).
transformers has ViTDet only as a backbone, without that detection head, so the default here is the COCO
detector transformers does implement end to end, DETR with a ResNet-50 (``DetrForObjectDetection``,
``facebook/detr-resnet-50``, 42.0 box AP on COCO val2017 against ViTDet-H Cascade's ~58.7). The output format
and class names are the same, so a better detector can be swapped in later without changing anything
downstream.

Output ``det``: ``{"instances": [{"boxes": [xmin, ymin, xmax, ymax], "class_name": str, "score": float}]}``,
boxes normalised to [0, 1] by the stored image's width and height (the stored image is a resize of the
original with the same aspect ratio, so the normalised boxes are those of the original image), class names
from COCO's 80 thing classes, sorted by score (highest first; ties by query order). Stored unfiltered, as 4M
expects (its loader keeps score >= 0.6): every query whose best class scores at least ``min_score`` (0.05 by
default), at most ``top_k`` instances.

Method: the input as DETR's own image processor makes it (transformers ``DetrImageProcessor`` defaults,
detectron2's ``ResizeShortestEdge(800, max_size=1333)`` sizes: shorter side ``input_size`` unless the longer
side would exceed ``max_size``; PIL bilinear; ImageNet mean/std; see
:func:`modalmill.labelers.semseg.processor_size`); images of the same input size run as one batch without
padding, so DETR's boxes are relative to the image itself and no image's result depends on its batch; per
query, DETR's post-processing: ``softmax`` over the classes, the no-object column dropped, the best class and
its probability; boxes ``(cx, cy, w, h)`` -> ``(xmin, ymin, xmax, ymax)``, clipped to [0, 1]. Queries whose
best class is one of COCO's unused ids ('N/A') are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import LabelFailure, LabelInput, Resources, register_labeler
from .depth import IMAGENET_MEAN, IMAGENET_STD, load_pretrained, split_usable
from .model import ModelConfig, ModelLabeler
from .semseg import COCO_THING_CLASSES, check_class_names, processor_batches

__all__ = ["DETR_COCO_LABELS", "DetrCocoLabeler", "detections_from_logits"]

# DETR's 91 output ids are COCO category ids; 0 and the ten ids COCO never annotated are 'N/A'.
_COCO_UNUSED_IDS = frozenset({0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
_things = iter(COCO_THING_CLASSES)
DETR_COCO_LABELS: tuple[str, ...] = tuple("N/A" if i in _COCO_UNUSED_IDS else next(_things) for i in range(91))
del _things


def detections_from_logits(logits, boxes, names: tuple[str, ...], *, min_score: float, top_k: int,
                           decimals: int) -> dict:
    """One image's ``det`` record from DETR's ``[Q, C + 1]`` logits and ``[Q, 4]`` normalised (cx, cy, w, h)."""
    import torch

    probs = logits.float().softmax(-1)[:, :-1]
    scores, labels = probs.max(-1)
    b = boxes.float()
    xyxy = torch.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2,
                        b[:, 1] + b[:, 3] / 2], dim=-1).clamp_(0.0, 1.0)
    valid = torch.tensor([names[i] != "N/A" for i in range(len(names))], device=labels.device)
    keep = (scores >= min_score) & valid[labels]
    idx = keep.nonzero().flatten()
    order = idx[torch.sort(scores[idx], descending=True, stable=True).indices][:top_k]
    scores, labels, xyxy = (t.to("cpu").tolist() for t in (scores[order], labels[order], xyxy[order]))
    return {"instances": [{"boxes": [round(float(c), decimals) for c in box], "class_name": names[label],
                           "score": round(float(score), decimals)}
                          for box, label, score in zip(xyxy, labels, scores)]}


@register_labeler
class DetrCocoLabeler(ModelLabeler):
    """DETR (ResNet-50) COCO detection -> ``det`` (unfiltered, normalised xyxy boxes, sorted by score).

    The default detector of modalmill because 4M-21's ViTDet-H Cascade Mask R-CNN is not in transformers; see
    the module docstring. The checkpoint must be a ``DetrForObjectDetection`` with DETR's 91 COCO ids.
    """

    name = "detr_coco"
    version = "2"
    outputs = ("det",)
    architecture = "DETR (ResNet-50), transformers DetrForObjectDetection, COCO 80 classes (91 ids)"
    weights = "facebook/detr-resnet-50"
    weights_help = ("the hub id facebook/detr-resnet-50 (online), or a local/s3:// copy of that directory "
                    "(config.json + model.safetensors)")
    input_size = 800  # shortest edge, as the image processor's size["shortest_edge"]
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    license = "Apache-2.0 (facebookresearch/detr)"
    default_resources = Resources(num_cpus=1, num_gpus=0.25, memory_mb=3072)
    default_batch_size = 16
    description = ("DETR-R50 COCO boxes (stand-in for 4M-21's ViTDet-H, not in transformers), unfiltered, "
                   "score >= min_score")

    @dataclass(frozen=True)
    class Config(ModelConfig):
        input_size: int = 800  # shorter input side (the processor's shortest_edge) ...
        max_size: int = 1333  # ... unless the longer side would then exceed this (longest_edge)
        min_score: float = 0.05  # keep queries whose best class has at least this probability
        top_k: int = 100  # at most this many instances per image (the highest scores)
        decimals: int = 4  # boxes and scores are rounded to this many decimals

        def __post_init__(self):
            for f, lo in (("input_size", 32), ("max_size", 32), ("top_k", 1), ("decimals", 1)):
                v = getattr(self, f)
                if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                    raise ValueError(f"{f} must be an int >= {lo}, got {v!r}")
            if self.max_size < self.input_size:
                raise ValueError(f"max_size ({self.max_size}) must be >= input_size ({self.input_size})")
            if not (0 <= self.min_score <= 1):
                raise ValueError(f"min_score must lie in [0, 1], got {self.min_score!r}")

    def build(self, path: str):
        from transformers import DetrForObjectDetection

        where = f"{self.name} ({self.architecture})"
        model = load_pretrained(DetrForObjectDetection, path, model_type="detr", where=where,
                                how_to_get=self.weights_help)
        check_class_names(model.config, DETR_COCO_LABELS, where=where, path=path, how_to_get=self.weights_help)
        return model

    def predict(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        results, ok = split_usable(batch)
        if not ok:
            return results
        c = self.config
        for (logits, boxes), i in zip(self.raw_predictions([batch[i].image for i in ok]), ok):
            if not (bool(logits.isfinite().all()) and bool(boxes.isfinite().all())):
                results[i] = LabelFailure("the model predicted non-finite logits or boxes")
                continue
            results[i] = {"det": detections_from_logits(logits, boxes, DETR_COCO_LABELS, min_score=c.min_score,
                                                        top_k=c.top_k, decimals=c.decimals)}
        return results

    def raw_predictions(self, images: list) -> list:
        """Per image: (logits ``[Q, C + 1]``, boxes ``[Q, 4]``), the input made as DETR's image processor makes it."""
        outs: list = [None] * len(images)
        for idx, x, mask in processor_batches(self, images, self.config.input_size, self.config.max_size):
            out = self.model(pixel_values=x, pixel_mask=mask)
            for j, i in enumerate(idx):
                outs[i] = (out.logits[j], out.pred_boxes[j])
        return outs
