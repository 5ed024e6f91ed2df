"""SAM (Segment Anything) automatic instance masks: raw instances (``sam_mask``) and their edges (``sam_edge``).

The model is segment-anything's own ``Sam`` (``ImageEncoderViT`` + ``PromptEncoder`` + ``MaskDecoder``), run
by its own ``SamAutomaticMaskGenerator`` with the settings in the labeler's Config (so they are part of the
config hash the manifest records). 4M-21 uses SAM ViT-H (``sam_vit_h_4b8939.pth``), the default here.

Batching: the image encoder (nearly all of the compute) runs once over the whole batch (in float32 by default,
as the official SAM; under bf16/fp16 autocast on a GPU only when ``dtype`` asks for it); the point-prompt
decoding of the mask generator then runs per image on those precomputed embeddings, in float32. With
``crop_n_layers > 0`` the extra crops of each image are encoded by the generator itself (float32), as in SAM.

Outputs, both at the geometry of the stored rgb image:

- ``sam_mask`` (JSON), the raw instances as 4M's SAM-instance tokenizer is trained on them::

    {"height": H, "width": W,
     "instances": [{"polygons": [[[x, y], ...], ...],   # OpenCV outer contours, int pixels, largest first
                    "bbox_xyxy": [x0, y0, x1, y1],        # inclusive pixel extent of the mask
                    "area": int, "predicted_iou": float, "stability_score": float}, ...]}

  Instances are sorted by area, largest first (ties: by box). Each polygon is one outer contour of the mask
  (``cv2.findContours(RETR_EXTERNAL, CHAIN_APPROX_SIMPLE)``), sorted by contour area, largest first, so
  ``polygons[0]`` is the contour 4M's ``sam_instance`` loader uses (it reads ``points[i][0]``). Holes are not
  stored. The final 4M ``sam_instance`` file (per crop: contours in the 224 crop, tokenizer ids, boxes) is
  written by the tokenize stage from this.
- ``sam_edge`` (uint8 ``[H, W]``, 0/255): the boundaries of the instance map. The map is painted with the
  masks largest first (smaller masks on top, background = 0); a pixel is an edge pixel when a 4-neighbour
  has another id, both sides of a boundary are marked, the image border is not an edge.

Weights: the official checkpoints ``sam_vit_{h,l,b}_*.pth`` are plain state dicts whose key names are
exactly those of segment-anything's ``Sam`` module, so they load strictly, through
``torch.load(weights_only=True)``, with no conversion (a ``.safetensors`` copy works too).
``model_type: auto`` reads the image encoder's size from the checkpoint instead (see :func:`infer_sam_encoder`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.fetch import WeightsError
from .base import LabelFailure, LabelInput, Resources, register_labeler
from .model import ModelConfig, ModelLabeler
from .state_dicts import load_into, load_state_dict
from .pins import Pin

__all__ = ["SAM_VARIANTS", "SamLabeler", "build_sam", "find_weights_file", "infer_sam_encoder", "instance_edges",
           "mask_polygons", "variant_of"]

SAM_URLS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}

# The image encoders of the official variants (segment_anything/build_sam.py); all use 1024 px input, patch 16,
# window 14, relative positions, and the same prompt encoder / mask decoder.
SAM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
}
_ENCODER_DEFAULTS = {"img_size": 1024, "patch_size": 16, "window_size": 14, "mlp_ratio": 4.0, "out_chans": 256,
                     "use_rel_pos": True, "qkv_bias": True}


def find_weights_file(path: str, exts: tuple[str, ...], what: str) -> str:
    """``path`` itself when it is a file, else the single weights file with one of ``exts`` inside it."""
    if os.path.isfile(path):
        return path
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(exts))
    if len(found) != 1:
        raise WeightsError(f"{path}: expected exactly one {' or '.join(exts)} file with {what}, found "
                           f"{len(found)}{': ' + ', '.join(os.path.basename(f) for f in found[:5]) if found else ''}")
    return found[0]


# ---------------------------------------------------------------------- architecture


def infer_sam_encoder(state: dict) -> dict[str, Any]:
    """The ``ImageEncoderViT`` settings a SAM state dict was made with, read from its tensor shapes.

    embed_dim and patch size from ``patch_embed.proj.weight``; input size from ``pos_embed`` (``[1, S, S, C]``
    with S = img_size / patch); depth from the number of blocks; head dim (hence heads) and, per block, the
    attention span from ``attn.rel_pos_h`` (``[2 * span - 1, head_dim]``: span = S for global-attention
    blocks, the window size for windowed ones); MLP ratio from ``mlp.lin1``; neck width from ``neck.0``.
    """
    p = "image_encoder."
    try:
        proj = state[p + "patch_embed.proj.weight"]
        pos = state[p + "pos_embed"]
    except KeyError as e:
        raise WeightsError(f"not a SAM checkpoint: no {e.args[0]!r}") from None
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    grid = int(pos.shape[1])
    depth = len({k.split(".")[2] for k in state if k.startswith(p + "blocks.")})
    if p + "blocks.0.attn.rel_pos_h" not in state:
        raise WeightsError("SAM checkpoint without relative positions: its head count cannot be read; "
                           "use model_type vit_h / vit_l / vit_b")
    spans = [(int(state[f"{p}blocks.{i}.attn.rel_pos_h"].shape[0]) + 1) // 2 for i in range(depth)]
    head_dim = int(state[p + "blocks.0.attn.rel_pos_h"].shape[1])
    windows = sorted({s for s in spans if s != grid})
    if len(windows) > 1:
        raise WeightsError(f"SAM checkpoint with several window sizes {windows}: not a SAM image encoder")
    return {
        "embed_dim": embed_dim, "depth": depth, "num_heads": embed_dim // head_dim,
        "global_attn_indexes": tuple(i for i, s in enumerate(spans) if s == grid),
        "img_size": grid * patch, "patch_size": patch, "window_size": windows[0] if windows else 0,
        "mlp_ratio": int(state[p + "blocks.0.mlp.lin1.weight"].shape[0]) / embed_dim,
        "out_chans": int(state[p + "neck.0.weight"].shape[0]), "use_rel_pos": True,
        "qkv_bias": (p + "blocks.0.attn.qkv.bias") in state,
    }


def build_sam(encoder: dict[str, Any]):
    """segment-anything's ``Sam`` with the given image encoder and the official prompt encoder / mask decoder."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    e = {**_ENCODER_DEFAULTS, **encoder}
    prompt_dim = e["out_chans"]
    grid = e["img_size"] // e["patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=e["depth"], embed_dim=e["embed_dim"], img_size=e["img_size"], mlp_ratio=e["mlp_ratio"],
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=e["num_heads"],
            patch_size=e["patch_size"], qkv_bias=e["qkv_bias"], use_rel_pos=e["use_rel_pos"],
            global_attn_indexes=tuple(e["global_attn_indexes"]), window_size=e["window_size"],
            out_chans=prompt_dim),
        prompt_encoder=PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(e["img_size"], e["img_size"]), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def variant_of(encoder: dict[str, Any]) -> str | None:
    """The official variant (vit_h / vit_l / vit_b) whose image encoder ``encoder`` describes, or None."""
    for name, v in SAM_VARIANTS.items():
        if all(encoder.get(k) == (tuple(val) if isinstance(val, tuple) else val) for k, val in v.items()):
            return name
    return None


# ---------------------------------------------------------------------- post-processing


def mask_polygons(mask: np.ndarray) -> list[list[list[int]]]:
    """Outer contours of a binary mask as ``[[x, y], ...]`` int lists, largest contour first."""
    import cv2

    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    ranked = sorted(contours, key=lambda c: (-abs(cv2.contourArea(c)), -len(c), c[0, 0, 1], c[0, 0, 0]))
    return [c.reshape(-1, 2).astype(int).tolist() for c in ranked]


def instance_edges(masks: list[np.ndarray], hw: tuple[int, int]) -> np.ndarray:
    """uint8 0/255 boundaries of the instance map painted from ``masks`` in the given order (later on top)."""
    ids = np.zeros(hw, dtype=np.int32)
    for i, m in enumerate(masks, start=1):
        ids[m] = i
    edge = np.zeros(hw, dtype=bool)
    dx = ids[:, 1:] != ids[:, :-1]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    dy = ids[1:] != ids[:-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    return edge.astype(np.uint8) * np.uint8(255)


# ---------------------------------------------------------------------- the labeler


def _batched_predictor(sam):
    """segment-anything's SamPredictor, able to take an image embedding computed beforehand for a batch."""
    from segment_anything import SamPredictor

    class _Predictor(SamPredictor):
        pending: tuple | None = None  # (features [1, C, h, w], original (H, W), input (h, w))

        def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
            pre, self.pending = self.pending, None
            if pre is not None and tuple(image.shape[:2]) == pre[1]:
                self.reset_image()
                self.features, self.original_size, self.input_size = pre
                self.is_image_set = True
                return
            super().set_image(image, image_format)

    return _Predictor(sam)


@register_labeler
class SamLabeler(ModelLabeler):
    """SAM automatic mask generation: raw instances with polygons, boxes and scores, plus instance edges."""

    name = "sam"
    version = "1"
    outputs = ("sam_mask", "sam_edge")
    architecture = ("segment-anything Sam (ViT-H image encoder, prompt encoder, mask decoder) + "
                    "SamAutomaticMaskGenerator")
    weights = SAM_URLS["vit_h"]
    weights_pin = Pin(sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", size=2564550879,
                      source="sha256 of sam_vit_h_4b8939.pth as published by independent projects that verify it "
                      "(Meta publishes the md5 prefix 4b8939 in the file name only)")
    weights_help = ("download sam_vit_h_4b8939.pth (or sam_vit_l_0b3195.pth / sam_vit_b_01ec64.pth with model_type "
                    "vit_l / vit_b) from https://github.com/facebookresearch/segment-anything#model-checkpoints and "
                    "pass its local path or s3:// URL as the labeler's `weights`")
    input_size = 1024  # longest side, padded to a square (ResizeLongestSide)
    mean = (123.675 / 255, 116.28 / 255, 103.53 / 255)
    std = (58.395 / 255, 57.12 / 255, 57.375 / 255)
    license = "Apache-2.0 (SAM code and weights)"
    default_resources = Resources(num_cpus=1, num_gpus=0.5, memory_mb=8000)
    default_batch_size = 4
    description = "SAM ViT-H automatic instance masks: polygons/boxes/scores (sam_mask) and instance-map edges"

    @dataclass(frozen=True)
    class Config(ModelConfig):
        # float32 by default, as the official SAM: its mask thresholds (predicted IoU 0.88, stability 0.95) are
        # sensitive to the encoder's precision; bfloat16/float16 autocast of the encoder only when asked for
        dtype: str = "float32"
        model_type: str = "vit_h"  # vit_h | vit_l | vit_b | auto (encoder size read from the checkpoint)
        # SamAutomaticMaskGenerator settings (SAM's defaults, chosen by its authors for ViT-H)
        points_per_side: int = 32
        points_per_batch: int = 64
        pred_iou_thresh: float = 0.88
        stability_score_thresh: float = 0.95
        stability_score_offset: float = 1.0
        box_nms_thresh: float = 0.7
        crop_n_layers: int = 0
        crop_nms_thresh: float = 0.7
        crop_overlap_ratio: float = 512 / 1500
        crop_n_points_downscale_factor: int = 1
        min_mask_region_area: int = 0
        max_instances: int = 0  # keep at most this many instances, largest first; 0 = all

        def __post_init__(self):
            if self.model_type not in (*SAM_VARIANTS, "auto"):
                raise ValueError(f"model_type must be one of {', '.join((*SAM_VARIANTS, 'auto'))}, "
                                 f"got {self.model_type!r}")
            for f in ("points_per_side", "points_per_batch"):
                if isinstance(getattr(self, f), bool) or not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                    raise ValueError(f"{f} must be an integer >= 1, got {getattr(self, f)!r}")
            for f in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh",
                      "crop_overlap_ratio"):
                if not (0.0 <= float(getattr(self, f)) <= 1.0):
                    raise ValueError(f"{f} must lie in [0, 1], got {getattr(self, f)!r}")
            for f in ("crop_n_layers", "min_mask_region_area", "max_instances"):
                if isinstance(getattr(self, f), bool) or not isinstance(getattr(self, f), int) or getattr(self, f) < 0:
                    raise ValueError(f"{f} must be an integer >= 0, got {getattr(self, f)!r}")
            if self.crop_n_points_downscale_factor < 1:
                raise ValueError(f"crop_n_points_downscale_factor must be >= 1, got "
                                 f"{self.crop_n_points_downscale_factor!r}")

    # ------------------------------------------------------------------ model
    def build(self, path: str):
        file = find_weights_file(path, (".pth", ".pt", ".safetensors", ".bin"), "SAM weights")
        state = load_state_dict(file)
        found = infer_sam_encoder(state)
        if self.config.model_type == "auto":
            encoder = found
        else:
            encoder = {**_ENCODER_DEFAULTS, **SAM_VARIANTS[self.config.model_type]}
        sam = build_sam(encoder)
        try:
            load_into(sam, state, where=f"labeler {self.name!r} ({self.config.model_type}) from {file}")
        except WeightsError as e:
            variant = variant_of(found)
            hint = (f"; the checkpoint looks like SAM {variant}: set model_type: {variant}" if variant else
                    "; set model_type: auto to read the encoder's size from the checkpoint")
            raise WeightsError(f"{e}{hint}") from None
        return sam

    def generator(self):
        from segment_anything import SamAutomaticMaskGenerator

        c = self.config
        gen = SamAutomaticMaskGenerator(
            self.model, points_per_side=c.points_per_side, points_per_batch=c.points_per_batch,
            pred_iou_thresh=c.pred_iou_thresh, stability_score_thresh=c.stability_score_thresh,
            stability_score_offset=c.stability_score_offset, box_nms_thresh=c.box_nms_thresh,
            crop_n_layers=c.crop_n_layers, crop_nms_thresh=c.crop_nms_thresh,
            crop_overlap_ratio=c.crop_overlap_ratio,
            crop_n_points_downscale_factor=c.crop_n_points_downscale_factor,
            min_mask_region_area=c.min_mask_region_area, output_mode="binary_mask")
        gen.predictor = _batched_predictor(self.model)
        return gen

    # ------------------------------------------------------------------ inference
    def embed(self, images: list[np.ndarray]):
        """SAM image embeddings of a batch (one encoder call): ``[N, C, h, w]`` plus each image's input size."""
        import torch

        enc = self.model.image_encoder
        xs, sizes = [], []
        for im in images:
            t = self._gen.predictor.transform.apply_image(im)  # SAM's own resize (longest side -> img_size)
            sizes.append(tuple(t.shape[:2]))
            x = torch.as_tensor(t, device=self.device).permute(2, 0, 1).contiguous()[None]
            xs.append(self.model.preprocess(x))  # normalise, pad to img_size x img_size
        feats = enc(torch.cat(xs))
        return feats, sizes

    def predict(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        if not hasattr(self, "_gen"):
            self._gen = self.generator()
        results: list[dict[str, Any] | LabelFailure] = [LabelFailure("not labelled")] * len(batch)
        ok = []
        for i, inp in enumerate(batch):
            im = inp.image
            if not (isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3
                    and min(im.shape[:2]) >= 1):
                results[i] = LabelFailure(f"image must be [H, W, 3] uint8, got "
                                          f"{getattr(im, 'dtype', type(im).__name__)} {getattr(im, 'shape', '')}")
            else:
                ok.append(i)
        if not ok:
            return results
        import torch

        feats, sizes = self.embed([batch[i].image for i in ok])  # the image encoder: autocast on a GPU
        feats = feats.float()
        # the prompt decoding runs in float32: its IoU / stability scores are compared with thresholds (and
        # segment-anything turns them into numpy arrays, which have no bfloat16)
        with torch.autocast(device_type=self.device.type, enabled=False):
            for j, i in enumerate(ok):
                im = batch[i].image
                self._gen.predictor.pending = (feats[j:j + 1], tuple(im.shape[:2]), sizes[j])
                anns = self._gen.generate(im)
                self._gen.predictor.pending = None
                results[i] = self.to_labels(anns, im.shape[:2])
        return results

    def to_labels(self, anns: list[dict], hw: tuple[int, int]) -> dict[str, Any]:
        anns = [a for a in anns if a["area"] > 0]
        anns.sort(key=lambda a: (-a["area"], *a["bbox"]))
        if self.config.max_instances:
            anns = anns[: self.config.max_instances]
        instances = []
        for a in anns:
            x, y, w, h = (round(v) for v in a["bbox"])
            instances.append({
                "polygons": mask_polygons(a["segmentation"]),
                "bbox_xyxy": [x, y, x + w, y + h],
                "area": int(a["area"]),
                "predicted_iou": round(float(a["predicted_iou"]), 6),
                "stability_score": round(float(a["stability_score"]), 6),
            })
        return {
            "sam_mask": {"height": int(hw[0]), "width": int(hw[1]), "instances": instances},
            "sam_edge": instance_edges([a["segmentation"] for a in anns], tuple(hw)),
        }
