"""DINOv2 patch features and global embedding: the teacher of 4M-21's ``tok_dinov2@224`` / ``tok_dinov2_global``.

4M-21 trains its DINOv2 tokenizers on the features of DINOv2 ViT-B/14 (``dinov2_vitb14``) at 224 x 224 input,
normalised with the ImageNet mean/std: the patch tokens after the final LayerNorm (``x_norm_patchtokens``,
16 x 16 x 768) and, for the global tokenizer, the CLS token after the final LayerNorm (``x_norm_clstoken``,
768). transformers' ``Dinov2Model`` computes the same network; its ``last_hidden_state`` is already the
final-LayerNorm output, so ``last_hidden_state[:, 0]`` is ``x_norm_clstoken`` and the rest (after any register
tokens) are ``x_norm_patchtokens``.

Which pixels: by default the features are computed on crop 0 of the sample's ``crop_settings`` (4M's centre
square crop, the crop that row 0 of every ``tok_*`` array is computed on), resized to ``input_size`` with
antialiased bicubic interpolation. ``region: full`` uses the whole stored image squashed to a square instead.

This module also holds two helpers the other transformers/open_clip feature labelers share:
:func:`region_images` (the pixels a feature labeler looks at) and :func:`load_pretrained` (transformers
``from_pretrained`` on a resolved local directory, with missing/mismatched weights turned into a
:class:`~modalmill.labelers.weights.WeightsError`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import LabelFailure, LabelInput, Prepared, Resources, register_labeler
from .model import ModelConfig, ModelLabeler
from .weights import WeightsError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "REGIONS",
    "DINOv2Labeler",
    "load_pretrained",
    "official_pos_interpolation",
    "prepare_regions",
    "region_images",
    "split_prepared",
    "split_regions",
    "to_float16",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REGIONS = ("crop0", "full")


# ---------------------------------------------------------------------- shared helpers


def check_region(region: str) -> None:
    if region not in REGIONS:
        raise ValueError(f"region must be one of {', '.join(REGIONS)}, got {region!r}")


def region_images(batch: list[LabelInput], region: str) -> list[np.ndarray | str]:
    """Per sample, the pixels a feature labeler sees: crop 0 of its crop settings (``crop0``) or the whole image.

    A sample whose crop does not fit its image gets a string (the reason) instead of an array.
    """
    out: list[np.ndarray | str] = []
    for inp in batch:
        img = inp.image
        if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
                and img.shape[0] > 0 and img.shape[1] > 0):
            out.append(f"image must be a non-empty [H, W, 3] uint8 array, got {getattr(img, 'shape', type(img))}")
            continue
        if region == "crop0":
            crops = np.asarray(inp.crops)
            if crops.ndim != 2 or crops.shape[0] < 1 or crops.shape[1] != 5:
                out.append(f"crop_settings must be [n_crops >= 1, 5], got shape {crops.shape}")
                continue
            top, left, h, w, flip = (int(v) for v in crops[0])
            if h < 1 or w < 1 or top < 0 or left < 0 or top + h > img.shape[0] or left + w > img.shape[1]:
                out.append(f"crop 0 {(top, left, h, w)} does not fit the image {img.shape[:2]}")
                continue
            img = img[top:top + h, left:left + w]
            if flip:
                img = img[:, ::-1]
        out.append(img)
    return out


def split_regions(batch: list[LabelInput], region: str) -> tuple[list, list[Any], list[int]]:
    """(region images, results with a LabelFailure where there is no usable region and None elsewhere, positions
    of the usable ones)."""
    images = region_images(batch, region)
    results: list[Any] = [LabelFailure(im) if isinstance(im, str) else None for im in images]
    return images, results, [i for i, im in enumerate(images) if not isinstance(im, str)]


def prepare_regions(batch: list[LabelInput], region: str, size: int | tuple[int, int]) -> Prepared:
    """The CPU side of a square-input feature labeler: per sample, its region (:func:`region_images`) resized to
    ``size`` as uint8 ``[H, W, 3]`` (PIL bicubic, antialiased when shrinking, like torchvision's ``Resize``), or a
    :class:`LabelFailure`. Runs in the shard task, so the model's process receives small uint8 arrays."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    out = Prepared()
    for im in region_images(batch, region):
        if isinstance(im, str):
            out.append(LabelFailure(im))
        elif im.shape[:2] == (h, w):
            out.append(np.ascontiguousarray(im))
        else:
            out.append(np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize((w, h), Image.BICUBIC)))
    return out


def split_prepared(items: list) -> tuple[list, list[Any], list[int]]:
    """Like :func:`split_regions` for the items :func:`prepare_regions` made."""
    results: list[Any] = [it if isinstance(it, LabelFailure) else None for it in items]
    return items, results, [i for i, it in enumerate(items) if not isinstance(it, LabelFailure)]


def to_float16(arr: np.ndarray) -> np.ndarray | None:
    """``arr`` as float16, or None when a value is not finite or does not fit float16."""
    arr = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all() or (arr.size and np.abs(arr).max() > np.finfo(np.float16).max):
        return None
    return arr.astype(np.float16)


def load_pretrained(loader: Any, path: str, *, where: str, how_to_get: str, model_types: tuple[str, ...] = (),
                    **kwargs):
    """``loader.from_pretrained(path)`` for a local save_pretrained directory, strictly.

    ``model_types``: the accepted ``config.model_type`` values (a checkpoint of another family is an error).
    Missing or mis-shaped weights are a :class:`WeightsError` (transformers would silently re-initialise them).
    """
    from transformers import AutoConfig

    get = f" Get it: {how_to_get}." if how_to_get else ""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise WeightsError(f"{where}: {path} is not a model directory (expected config.json + model.safetensors as "
                           f"written by save_pretrained, or a model-hub id).{get}")
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any config problem is a weights problem here
        raise WeightsError(f"{where}: cannot read {os.path.join(path, 'config.json')}: {_one_line(e)}.{get}") from None
    if model_types and cfg.model_type not in model_types:
        expected = " or ".join(model_types)
        raise WeightsError(f"{where}: {path} holds a {cfg.model_type!r} model, expected {expected}.{get}")
    try:
        model, info = loader.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{where}: cannot load the weights in {path}: {_one_line(e)}.{get}") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        parts = ([f"missing {len(missing)} weight(s), e.g. {missing[:5]}"] if missing else []) + (
            [f"{len(mismatched)} mis-shaped weight(s), e.g. {mismatched[:3]}"] if mismatched else [])
        raise WeightsError(f"{where}: the checkpoint in {path} does not fit the model: {'; '.join(parts)}.{get}")
    return model


def official_pos_interpolation(embeddings, *, offset: float = 0.1, antialias: bool = False) -> None:
    """Make transformers' DINOv2 ``embeddings`` interpolate their position embeddings as facebookresearch/dinov2 does.

    transformers resizes the ``M x M`` grid of position embeddings to the target grid ``(h0, w0)`` by size
    (bicubic, not antialiased). The official ``DinoVisionTransformer.interpolate_pos_encoding`` instead passes
    the scale factors ``((h0 + offset) / M, (w0 + offset) / M)`` (the "+0.1 kludge" of DINO), which places the
    samples differently; with ``offset`` 0 it resizes by size. The official hub models use offset 0.1 without
    antialiasing (``dinov2_vit{s,b,l,g}14``, hence 4M-21's ``dinov2_vitb14`` teacher and Depth Anything's
    backbone) and offset 0 with antialiasing (the ``*_reg`` models with registers). As in the official code the
    embeddings are returned unchanged when the token count and the grid already match and the input is square,
    interpolated in float32 and cast back to the tokens' dtype. Replaces ``embeddings.interpolate_pos_encoding``
    on this instance only.
    """
    import math
    import types

    import torch
    import torch.nn.functional as F

    def interpolate_pos_encoding(self, x, height: int, width: int):
        pos = self.position_embeddings
        n_patch, n_pos = x.shape[1] - 1, pos.shape[1] - 1
        if n_patch == n_pos and height == width:
            return pos
        pos32 = pos.float()
        dim = x.shape[-1]
        ph, pw = (self.patch_embeddings.patch_size if isinstance(self.patch_embeddings.patch_size, (tuple, list))
                  else (self.patch_embeddings.patch_size,) * 2)
        h0, w0 = height // ph, width // pw
        m = int(math.sqrt(n_pos))
        if m * m != n_pos:
            raise ValueError(f"position embeddings of {n_pos} patches are not a square grid")
        kwargs = ({"scale_factor": (float(h0 + offset) / m, float(w0 + offset) / m)} if offset
                  else {"size": (h0, w0)})
        grid = F.interpolate(pos32[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
                             antialias=antialias, **kwargs)
        if tuple(grid.shape[-2:]) != (h0, w0):
            raise ValueError(f"interpolated position grid {tuple(grid.shape[-2:])} is not {(h0, w0)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((pos32[:, :1], grid), dim=1).to(x.dtype)

    embeddings.interpolate_pos_encoding = types.MethodType(interpolate_pos_encoding, embeddings)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


# ---------------------------------------------------------------------- the labeler


@register_labeler
class DINOv2Labeler(ModelLabeler):
    """DINOv2 ViT-B/14 (transformers ``Dinov2Model``): ``dinov2`` [16, 16, 768] and ``dinov2_global`` [768], float16.

    Input: crop 0 of the crop settings (or the full image with ``region: full``), bicubic-resized to
    ``input_size`` (224: 16 x 16 patches, as 4M-21), ImageNet mean/std. Outputs: the final-LayerNorm patch
    tokens as a ``[input_size/14, input_size/14, C]`` map (row-major, as the patches lie in the image) and the
    final-LayerNorm CLS token (4M-21's ``DINOv2-B14-global``). Checkpoints with register tokens
    (``Dinov2WithRegistersModel``) work too; the registers are dropped. The position embeddings (a 37 x 37 grid
    in the released checkpoints) are interpolated to the input's grid as facebookresearch/dinov2 does
    (:func:`official_pos_interpolation`), so the features are those of 4M-21's ``torch.hub`` teacher.
    """

    name = "dinov2"
    version = "2"
    outputs = ("dinov2", "dinov2_global")
    architecture = "DINOv2 ViT-B/14 (transformers Dinov2Model), final-LayerNorm patch tokens + CLS token"
    weights = "facebook/dinov2-base"
    weights_help = ("the model-hub repo facebook/dinov2-base (config.json + model.safetensors), or any directory "
                    "written by Dinov2Model.save_pretrained, given as a local path, an s3:// prefix or a hub id")
    input_size = 224
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    license = "Apache-2.0 (DINOv2 weights)"
    default_resources = Resources(num_cpus=1, num_gpus=0.25, memory_mb=3000)
    default_batch_size = 32
    description = "DINOv2 ViT-B/14 patch features [16, 16, 768] and CLS embedding [768] at 224 (4M-21's teacher)"

    @dataclass(frozen=True)
    class Config(ModelConfig):
        region: str = "crop0"  # crop0: 4M's centre crop (crop_settings row 0) | full: the whole image, squashed
        input_size: int = 224  # square input side; a multiple of the patch size (14): 224 -> 16 x 16 patches

        def __post_init__(self):
            check_region(self.region)
            if self.input_size < 14 or self.input_size % 14:
                raise ValueError(f"input_size must be a positive multiple of 14, got {self.input_size}")

    def build(self, path: str):
        from transformers import AutoModel

        model = load_pretrained(AutoModel, path, where=f"labeler {self.name!r}", how_to_get=self.weights_help,
                                model_types=("dinov2", "dinov2_with_registers"))
        patch = model.config.patch_size
        if self.config.input_size % patch:
            raise WeightsError(f"labeler {self.name!r}: input_size {self.config.input_size} is not a multiple of the "
                               f"checkpoint's patch size {patch}")
        # the official hub models' position-embedding interpolation (dinov2_vitb14: offset 0.1, no antialias;
        # the *_reg models with registers: offset 0, antialiased), not transformers' resize-to-size
        registers = model.config.model_type == "dinov2_with_registers"
        official_pos_interpolation(model.embeddings, offset=0.0 if registers else 0.1, antialias=registers)
        return model

    def prepare(self, batch: list[LabelInput]) -> Prepared:
        return prepare_regions(batch, self.config.region, self.config.input_size)

    def predict(self, batch: list) -> list[dict[str, Any] | LabelFailure]:
        images, results, ok = split_prepared(batch)
        if not ok:
            return results
        size = self.config.input_size
        x = self.to_tensor([images[i] for i in ok], size=size)
        hidden = self.model(pixel_values=x).last_hidden_state  # [B, 1 + registers + N, C], final LayerNorm applied
        n_reg = int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        grid = size // self.model.config.patch_size
        patches = hidden[:, 1 + n_reg:].float().reshape(len(ok), grid, grid, -1).cpu().numpy()
        cls = hidden[:, 0].float().cpu().numpy()
        for j, i in enumerate(ok):
            fmap, glob = to_float16(patches[j]), to_float16(cls[j])
            results[i] = LabelFailure("DINOv2 features are not finite in float16") if fmap is None or glob is None \
                else {"dinov2": fmap, "dinov2_global": glob}
        return results
