"""DINOv2 patch features and global embedding: the teacher of 4M-21's ``tok_dinov2@224`` / ``tok_dinov2_global``.

4M-21 trains its DINOv2 tokenizers on the features of DINOv2 ViT-B/14 (``dinov2_vitb14``) at 224 x 224 input,
normalised with the ImageNet mean/std: the patch tokens after the final LayerNorm (``x_norm_patchtokens``,
16 x 16 x 768) and, for the global tokenizer, the CLS token after the final LayerNorm (``x_norm_clstoken``,
768). transformers' ``Dinov2Model`` computes the same network; its ``last_hidden_state`` is already the
final-LayerNorm output, so ``last_hidden_state[:, 0]`` is ``x_norm_clstoken`` and the rest (after any register
tokens) are ``x_norm_patchtokens``.

Which pixels: the teacher runs on **every row** of the sample's ``crop_settings``, as 4M computes
feature-map tokens (``save_vq_tokens.py`` / ``run_training_vqvae.py``: each crop cut from the stored rgb with
``(top, left, height, width)``, resized to the teacher's input size with PIL's default (bicubic, antialiased)
resampling, then flipped when the row's flip flag is set, and only then normalised and fed to the teacher).
Row c of the stored arrays is crop c: ``dinov2`` ``[n_crops, 16, 16, 768]`` and ``dinov2_global``
``[n_crops, 768]``, so ``tok_dinov2@224`` row c is the tokenizer applied to the teacher's features of crop c.

This module also holds the helpers the other transformers/open_clip feature labelers share:
:func:`prepare_crops` / :func:`split_crops` (every crop of a sample at the teacher's input size),
:func:`region_images` (the caption labeler's pixels) and :func:`load_pretrained` (transformers
``from_pretrained`` on a resolved local directory, with missing/mismatched weights turned into a
:class:`~modalmill.io.fetch.WeightsError`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.fetch import WeightsError
from .base import LabelFailure, LabelInput, Prepared, Resources, register_labeler
from .model import ModelConfig, ModelLabeler
from .pins import Pin

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "REGIONS",
    "DINOv2Labeler",
    "load_pretrained",
    "crop_images",
    "predict_crops",
    "prepare_crops",
    "official_pos_interpolation",
    "region_images",
    "split_regions",
    "to_float16",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REGIONS = ("crop0", "full")


# ---------------------------------------------------------------------- shared helpers


def region_images(batch: list[LabelInput], region: str) -> list[np.ndarray | str]:
    """Per sample, the pixels the caption labeler sees: crop 0 of its crop settings (``crop0``) or the whole image.

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


def crop_images(inp: LabelInput, size: int | tuple[int, int]) -> np.ndarray | str:
    """Every row of ``inp.crops`` as the teacher sees it, 4M's way: cut ``(top, left, h, w)`` from the stored rgb,
    resize to ``size`` (PIL bicubic, antialiased when shrinking: PIL's default, which 4M's ``image_crop_and_resize``
    uses), then flip horizontally when the row's flip flag is 1. Returns uint8 ``[n_crops, H, W, 3]``, or the
    reason (a string) when the image or a crop is unusable. A reduced image (a draft decode, ``inp.stored_size``
    set) is cut at the crops mapped onto it (``inp.image_crops()``)."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    img = inp.image
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
            and img.shape[0] > 0 and img.shape[1] > 0):
        return f"image must be a non-empty [H, W, 3] uint8 array, got {getattr(img, 'shape', type(img))}"
    crops = np.asarray(inp.crops)
    if crops.ndim != 2 or crops.shape[0] < 1 or crops.shape[1] != 5:
        return f"crop_settings must be [n_crops >= 1, 5], got shape {crops.shape}"
    crops = inp.image_crops()
    out = np.empty((len(crops), h, w, 3), dtype=np.uint8)
    for c, row in enumerate(crops):
        top, left, ch, cw, flip = (int(v) for v in row)
        if ch < 1 or cw < 1 or top < 0 or left < 0 or top + ch > img.shape[0] or left + cw > img.shape[1]:
            return f"crop {c} {(top, left, ch, cw)} does not fit the image {img.shape[:2]}"
        cut = np.ascontiguousarray(img[top:top + ch, left:left + cw])
        if cut.shape[:2] != (h, w):
            cut = np.asarray(Image.fromarray(cut).resize((w, h), Image.BICUBIC))
        out[c] = cut[:, ::-1] if flip else cut
    return out


def prepare_crops(batch: list[LabelInput], size: int | tuple[int, int]) -> Prepared:
    """The CPU side of a feature labeler: per sample :func:`crop_images` (uint8 ``[n_crops, H, W, 3]``) or a
    :class:`LabelFailure`. Runs in the shard task, so the model's process receives small uint8 arrays."""
    out = Prepared()
    for inp in batch:
        got = crop_images(inp, size)
        out.append(LabelFailure(got) if isinstance(got, str) else got)
    return out


def predict_crops(items: list, forward, what: str) -> list[dict[str, Any] | LabelFailure]:
    """Run ``forward`` once over every crop of every prepared sample and regroup per sample.

    ``items``: what :func:`prepare_crops` made. ``forward(images)`` takes a list of uint8 ``[H, W, 3]`` crops and
    returns ``{modality: float array [n_images, ...]}``; each sample gets ``{modality: float16 [n_crops, ...]}``
    (row c = crop c), or a :class:`LabelFailure` when a value is not finite in float16."""
    results: list[Any] = [it if isinstance(it, LabelFailure) else None for it in items]
    ok = [i for i, it in enumerate(items) if not isinstance(it, LabelFailure)]
    if not ok:
        return results
    flat = [im for i in ok for im in items[i]]
    outputs = forward(flat)
    pos = 0
    for i in ok:
        n = len(items[i])
        values = {m: to_float16(arr[pos:pos + n]) for m, arr in outputs.items()}
        pos += n
        results[i] = (LabelFailure(f"{what} features are not finite in float16")
                      if any(v is None for v in values.values()) else values)
    return results


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
    """DINOv2 ViT-B/14 (transformers ``Dinov2Model``): per crop, ``dinov2`` [n_crops, 16, 16, 768] and
    ``dinov2_global`` [n_crops, 768], float16.

    Input: every row of the crop settings (:func:`crop_images`: cut, bicubic-resized to ``input_size`` (224:
    16 x 16 patches, as 4M-21), flipped as the row says), ImageNet mean/std. Outputs, row c from crop c: the
    final-LayerNorm patch tokens as a ``[input_size/14, input_size/14, C]`` map (row-major, as the patches lie in
    the crop) and the final-LayerNorm CLS token (4M-21's ``DINOv2-B14-global``). Checkpoints with register
    tokens (``Dinov2WithRegistersModel``) work too; the registers are dropped. ``batch_size`` counts samples:
    one forward pass sees ``batch_size x n_crops`` crops. The position embeddings (a 37 x 37 grid in the released
    checkpoints) are interpolated to the input's grid as facebookresearch/dinov2 does
    (:func:`official_pos_interpolation`), so the features are those of 4M-21's ``torch.hub`` teacher.
    """

    name = "dinov2"
    version = "3"  # 3: official position interpolation; 2: one row per crop_settings row (1 stored crop 0 only)
    outputs = ("dinov2", "dinov2_global")
    architecture = "DINOv2 ViT-B/14 (transformers Dinov2Model), final-LayerNorm patch tokens + CLS token"
    weights = "facebook/dinov2-base"
    weights_pin = Pin(sha256="d73036b56966966d07975d696bde331762f37297e2f095de8cea0040c3aa0841",
                      file="model.safetensors", source="the hub's LFS pointer of model.safetensors")
    weights_help = ("the model-hub repo facebook/dinov2-base (config.json + model.safetensors), or any directory "
                    "written by Dinov2Model.save_pretrained, given as a local path, an s3:// prefix or a hub id")
    input_size = 224
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    license = "Apache-2.0 (DINOv2 weights)"
    default_resources = Resources(num_cpus=1, num_gpus=0.25, memory_mb=3000)
    default_batch_size = 8
    description = ("DINOv2 ViT-B/14 patch features [n_crops, 16, 16, 768] and CLS embedding [n_crops, 768] at 224, "
                   "one row per crop (4M-21's teacher)")

    @dataclass(frozen=True)
    class Config(ModelConfig):
        # float32 by default: 4M computed the features its tokenizers were trained on in float32 (the teacher runs
        # outside run_training_vqvae's autocast; save_vq_tokens has none); bf16 changes token ids (docs/labelers.md)
        dtype: str = "float32"
        input_size: int = 224  # square input side; a multiple of the patch size (14): 224 -> 16 x 16 patches

        def __post_init__(self):
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
        return prepare_crops(batch, self.config.input_size)

    def crop_side(self) -> int | None:
        return self.config.input_size  # reads only the crops, each resized to input_size (crop_images)

    def predict(self, batch: list) -> list[dict[str, Any] | LabelFailure]:
        size = self.config.input_size

        def forward(images):
            x = self.to_tensor(images, size=size)
            hidden = self.model(pixel_values=x).last_hidden_state  # [B, 1 + registers + N, C], final LayerNorm
            n_reg = int(getattr(self.model.config, "num_register_tokens", 0) or 0)
            grid = size // self.model.config.patch_size
            return {"dinov2": hidden[:, 1 + n_reg:].float().reshape(len(images), grid, grid, -1).cpu().numpy(),
                    "dinov2_global": hidden[:, 0].float().cpu().numpy()}

        return predict_crops(batch, forward, "DINOv2")
