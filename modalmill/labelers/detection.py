"""COCO object detection -> ``det`` (4M's bounding-box modality): D-FINE-X (default) and DETR-R50 (light).

4M-21's boxes came from ViTDet ViT-H with a Cascade Mask R-CNN head (detectron2; ml-4m ``README_DATA.md``;
58.7 box AP on COCO val2017 in the ViTDet paper, Table 5, ImageNet-1K MAE pre-training). transformers has ViTDet
only as a backbone, without that detection head. The default here is the transformers detector that comes
closest: **D-FINE-X pre-trained on Objects365 and fine-tuned on COCO** (``DFineForObjectDetection``,
``ustc-community/dfine-xlarge-obj2coco``, 59.3 box AP on COCO val2017: D-FINE's model zoo and paper abstract,
quoted in transformers' D-FINE documentation; the model card shows the same table as a figure). The same boxes
choose the people HMR 2.0 regresses and feed the ``n_humans`` / COCO-count metadata. **DETR with a ResNet-50**
(``facebook/detr-resnet-50``, 42.0 box AP, its model card) stays as the light option (``detr_coco``: 41M
parameters against D-FINE-X's 62M, and no deformable attention).

Output ``det`` (both): ``{"instances": [{"boxes": [xmin, ymin, xmax, ymax], "class_name": str, "score": float}]}``,
boxes normalised to [0, 1] by the stored image's width and height (the stored image is a resize of the
original with the same aspect ratio, so the normalised boxes are those of the original image), class names
from COCO's 80 thing classes, sorted by score (highest first; ties by query/class order). Stored unfiltered, as
4M expects (its loader keeps score >= 0.6): every candidate scoring at least ``min_score`` (0.05 by default,
detectron2's test threshold), at most ``top_k`` (100, detectron2's detections per image).

Score thresholds (per detector; docs/labelers.md "Detector score thresholds"): 4M-21 kept ViTDet-H boxes scoring
>= 0.6 (ml-4m's ``DetectionTransform``) and HMR 2.0 regressed people scoring >= 0.5 (its demo). Those are
thresholds of a Cascade R-CNN's softmax scores; D-FINE's sigmoid (focal-loss) scores and DETR's softmax over 92
classes are calibrated differently. The stated rule: a detector's thresholds keep 4M's offsets from the
threshold its own authors' inference shows boxes at (detectron2's demo, which ViTDet and HMR 2.0 use: 0.5; 4M's
boxes +0.1, people +0.0), so ViTDet-H gives back 4M's 0.6 / 0.5, D-FINE (its ``torch_inf.py`` draws at 0.4)
0.5 / 0.4 and DETR (its official demo keeps 0.7) 0.8 / 0.7. Each record carries them (``score_threshold``,
``person_score_threshold``): modalmill's serialisation for 4M (``det_to_text``), the derived metadata counts, the
HMR 2.0 person selection and ``modalmill show`` read them (:func:`det_thresholds`); a record without them gets
ViTDet's 0.6 / 0.5.

D-FINE, as its official inference (``tools/inference/torch_inf.py``) and transformers' ``RTDetrImageProcessor``
(its ``preprocessor_config.json``): the whole image resized to 640 x 640 (bilinear, antialiased; the aspect
ratio is not kept, so the predicted normalised boxes are those of the image itself), scaled to [0, 1], no
mean/std; post-processing as D-FINE's ``PostProcessor`` (focal-loss scores): ``sigmoid`` over the
``[queries, 80]`` logits, the best ``num_top_queries`` (query, class) pairs of the flattened scores (so one
query can give boxes of two classes), boxes ``(cx, cy, w, h)`` -> ``(xmin, ymin, xmax, ymax)`` clipped to [0, 1].

DETR: the input as DETR's own image processor makes it (transformers ``DetrImageProcessor`` defaults,
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
from .depth import IMAGENET_MEAN, IMAGENET_STD, split_usable
from .model import ModelConfig, ModelLabeler
from .semseg import COCO_THING_CLASSES, load_checked, processor_batches
from .pins import Pin

__all__ = ["DETR_COCO_LABELS", "DFineCocoLabeler", "DetrCocoLabeler", "VITDET_THRESHOLDS", "det_thresholds",
           "detections_from_focal_logits", "detections_from_logits"]

# 4M-21's: ViTDet-H boxes kept with score >= 0.6 (ml-4m's DetectionTransform), HMR 2.0 people with score >= 0.5
VITDET_THRESHOLDS = (0.6, 0.5)


def det_thresholds(det: Any) -> tuple[float, float]:
    """(box, person) score thresholds of a ``det`` record: the ones its detector wrote, else 4M-21's ViTDet-H's."""
    d = det if isinstance(det, dict) else {}
    return (float(d.get("score_threshold", VITDET_THRESHOLDS[0])),
            float(d.get("person_score_threshold", VITDET_THRESHOLDS[1])))


def with_thresholds(record: dict, config) -> dict:
    """The ``det`` record with its detector's (box, person) thresholds (see the module docstring)."""
    record["score_threshold"] = float(config.score_threshold)
    record["person_score_threshold"] = float(config.person_score_threshold)
    return record

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


def detections_from_focal_logits(logits, boxes, names: tuple[str, ...], *, min_score: float, top_k: int,
                                 num_top_queries: int, decimals: int) -> dict:
    """One image's ``det`` record from a focal-loss DETR's (D-FINE, RT-DETR) ``[Q, C]`` logits and ``[Q, 4]``
    normalised (cx, cy, w, h): D-FINE's post-processing (sigmoid, top ``num_top_queries`` of the flattened
    (query, class) scores), then ``score >= min_score``, at most ``top_k``."""
    import torch

    probs = logits.float().sigmoid()
    n_classes = probs.shape[-1]
    flat = probs.flatten()
    k = min(int(num_top_queries), flat.numel())
    # stable: equal scores keep (query, class) order, so the result does not depend on the device's top-k
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    scores, labels, queries = flat[order], order % n_classes, order // n_classes
    b = boxes.float()[queries]
    xyxy = torch.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2,
                        b[:, 1] + b[:, 3] / 2], dim=-1).clamp_(0.0, 1.0)
    keep = (scores >= min_score).nonzero().flatten()[:top_k]
    scores, labels, xyxy = (t.to("cpu").tolist() for t in (scores[keep], labels[keep], xyxy[keep]))
    return {"instances": [{"boxes": [round(float(c), decimals) for c in box], "class_name": names[label],
                           "score": round(float(score), decimals)}
                          for box, label, score in zip(xyxy, labels, scores)]}



def _check_settings(config, int_minimums: dict[str, int]) -> None:
    """The settings both detectors share: whole numbers with a lower bound, scores and thresholds in [0, 1]."""
    for f, lo in int_minimums.items():
        v = getattr(config, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{f} must be an int >= {lo}, got {v!r}")
    for f in ("min_score", "score_threshold", "person_score_threshold"):
        if not (0 <= getattr(config, f) <= 1):
            raise ValueError(f"{f} must lie in [0, 1], got {getattr(config, f)!r}")


@register_labeler
class DFineCocoLabeler(ModelLabeler):
    """D-FINE-X (Objects365 -> COCO) detection -> ``det``: the default detector (see the module docstring).

    Within 1 AP of 4M-21's ViTDet-H Cascade Mask R-CNN on COCO (59.3 vs 58.7 box AP). The checkpoint must be a
    transformers ``DFineForObjectDetection`` predicting COCO's 80 thing classes in their contiguous order.
    """

    name = "dfine_coco"
    version = "2"  # 2: the record carries the detector's score thresholds
    outputs = ("det",)
    architecture = ("D-FINE-X (HGNetV2-B5 backbone, hybrid encoder, 6-layer FDR decoder), transformers "
                    "DFineForObjectDetection, COCO 80 classes")
    weights = "ustc-community/dfine-xlarge-obj2coco"
    weights_pin = Pin(file="model.safetensors", note="no published sha256 of model.safetensors was found; "
                      "the hub's own checksum is what checks the download")
    weights_help = ("the hub id ustc-community/dfine-xlarge-obj2coco (online), or a local/s3:// copy of that "
                    "directory (config.json + model.safetensors); `modalmill weights fetch dfine_coco --to DIR` "
                    "stages it")
    input_size = 640
    license = "Apache-2.0 (D-FINE code and weights)"
    quality = "COCO val2017 box AP 59.3 (D-FINE-X Obj365->COCO, D-FINE model zoo); ViTDet-H Cascade: 58.7"
    default_resources = Resources(num_cpus=1, num_gpus=0.25, memory_mb=3072)
    default_batch_size = 16
    description = ("D-FINE-X COCO boxes (59.3 AP, the default: near 4M-21's ViTDet-H at 58.7), unfiltered, "
                   "score >= min_score")

    @dataclass(frozen=True)
    class Config(ModelConfig):
        input_size: int = 640  # square model input: the image is resized to it (as D-FINE's own inference)
        min_score: float = 0.05  # keep (query, class) candidates scoring at least this (sigmoid)
        top_k: int = 100  # at most this many instances per image (the highest scores)
        num_top_queries: int = 300  # D-FINE's post-processor: candidates taken from the flattened scores
        # comparable to 4M-21's ViTDet-H >= 0.6 boxes / >= 0.5 people: D-FINE's demo threshold (0.4) + 4M's offsets
        score_threshold: float = 0.5
        person_score_threshold: float = 0.4
        decimals: int = 4  # boxes and scores are rounded to this many decimals

        def __post_init__(self):
            _check_settings(self, {"input_size": 32, "top_k": 1, "num_top_queries": 1, "decimals": 1})
            if self.input_size % 32:
                raise ValueError(f"input_size must be a multiple of 32 (the backbone's stride), got {self.input_size}")

    def build(self, path: str):
        from transformers import DFineForObjectDetection

        return load_checked(self, DFineForObjectDetection, "d_fine", COCO_THING_CLASSES, path)

    def predict(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        import torch
        import torch.nn.functional as F

        results, ok = split_usable(batch)
        if not ok:
            return results
        c = self.config
        side = (c.input_size, c.input_size)
        x = torch.cat([F.interpolate(torch.tensor(batch[i].image, device=self.device).permute(2, 0, 1)[None].float()
                                     / 255.0, size=side, mode="bilinear", align_corners=False, antialias=True)
                       for i in ok]).clamp_(0.0, 1.0)
        out = self.model(pixel_values=x)
        for j, i in enumerate(ok):
            logits, boxes = out.logits[j], out.pred_boxes[j]
            if not (bool(logits.isfinite().all()) and bool(boxes.isfinite().all())):
                results[i] = LabelFailure("the model predicted non-finite logits or boxes")
                continue
            results[i] = {"det": with_thresholds(detections_from_focal_logits(
                logits, boxes, COCO_THING_CLASSES, min_score=c.min_score, top_k=c.top_k,
                num_top_queries=c.num_top_queries, decimals=c.decimals), c)}
        return results


@register_labeler
class DetrCocoLabeler(ModelLabeler):
    """DETR (ResNet-50) COCO detection -> ``det`` (unfiltered, normalised xyxy boxes, sorted by score).

    The light option (42.0 box AP; the default is ``dfine_coco``, see the module docstring). The checkpoint must be
    a ``DetrForObjectDetection`` with DETR's 91 COCO ids.
    """

    name = "detr_coco"
    version = "3"  # 3: the record carries the detector's score thresholds
    outputs = ("det",)
    architecture = "DETR (ResNet-50), transformers DetrForObjectDetection, COCO 80 classes (91 ids)"
    weights = "facebook/detr-resnet-50"
    weights_pin = Pin(sha256="830f5e2eeaada8c8c8281779dcc8ab12833972eb8514ed0a35be6c1d4420ad81",
                      file="model.safetensors", source="the hub's LFS pointer of facebook/detr-resnet-50 "
                      "model.safetensors")
    weights_help = ("the hub id facebook/detr-resnet-50 (online), or a local/s3:// copy of that directory "
                    "(config.json + model.safetensors)")
    input_size = 800  # shortest edge, as the image processor's size["shortest_edge"]
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    license = "Apache-2.0 (facebookresearch/detr)"
    quality = "COCO val2017 box AP 42.0 (facebook/detr-resnet-50 model card); the light option"
    default_resources = Resources(num_cpus=1, num_gpus=0.25, memory_mb=3072)
    default_batch_size = 16
    description = "DETR-R50 COCO boxes (42.0 AP, the light option), unfiltered, score >= min_score"

    @dataclass(frozen=True)
    class Config(ModelConfig):
        input_size: int = 800  # shorter input side (the processor's shortest_edge) ...
        max_size: int = 1333  # ... unless the longer side would then exceed this (longest_edge)
        min_score: float = 0.05  # keep queries whose best class has at least this probability
        top_k: int = 100  # at most this many instances per image (the highest scores)
        # comparable to 4M-21's ViTDet-H >= 0.6 boxes / >= 0.5 people: DETR's demo threshold (0.7) + 4M's offsets
        score_threshold: float = 0.8
        person_score_threshold: float = 0.7
        decimals: int = 4  # boxes and scores are rounded to this many decimals

        def __post_init__(self):
            _check_settings(self, {"input_size": 32, "max_size": 32, "top_k": 1, "decimals": 1})
            if self.max_size < self.input_size:
                raise ValueError(f"max_size ({self.max_size}) must be >= input_size ({self.input_size})")

    def build(self, path: str):
        from transformers import DetrForObjectDetection

        return load_checked(self, DetrForObjectDetection, "detr", DETR_COCO_LABELS, path)

    def predict(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        results, ok = split_usable(batch)
        if not ok:
            return results
        c = self.config
        for (logits, boxes), i in zip(self.raw_predictions([batch[i].image for i in ok]), ok):
            if not (bool(logits.isfinite().all()) and bool(boxes.isfinite().all())):
                results[i] = LabelFailure("the model predicted non-finite logits or boxes")
                continue
            results[i] = {"det": with_thresholds(detections_from_logits(
                logits, boxes, DETR_COCO_LABELS, min_score=c.min_score, top_k=c.top_k, decimals=c.decimals), c)}
        return results

    def raw_predictions(self, images: list) -> list:
        """Per image: (logits ``[Q, C + 1]``, boxes ``[Q, 4]``), the input made as DETR's image processor makes it."""
        outs: list = [None] * len(images)
        for idx, x, mask in processor_batches(self, images, self.config.input_size, self.config.max_size):
            out = self.model(pixel_values=x, pixel_mask=mask)
            for j, i in enumerate(idx):
                outs[i] = (out.logits[j], out.pred_boxes[j])
        return outs
