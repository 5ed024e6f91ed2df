"""What a 4M tokenizer sees: ml-4m's per-modality preprocessing of one crop of a stored label.

4M pre-tokenizes every row ``(top, left, h, w, flip)`` of a sample's ``crop_settings`` (``save_vq_tokens.py``) with
the transforms of ``MODALITY_TRANSFORMS_DIVAE``: a PIL crop, a PIL resize to the tokenizer's input size
(``--resample_mode``: bilinear by default here; ``None`` means PIL's own default), a horizontal flip, then:

==============  ========================================================================================
rgb             RGB -> [0, 1] -> (x - 0.5) / 0.5, i.e. [-1, 1]
canny/sam edge  as rgb (the 0/255 map converted to RGB; a 1-channel tokenizer gets the first channel)
grey maps       a plugin's 1-channel map (kind ``gray``): preprocessed as the edge maps, trained as a picture
depth           16-bit depth / 65535, then standardised per crop with the 10 %-90 % truncated mean and variance
normal          as rgb, and the x component is mirrored (255 - v) when the crop is flipped
semseg          class ids + 1 (255 "unlabelled" wraps to 0), nearest resize, int64 ids for the class embedding
feature maps    the teacher's features of that crop ([h, w, C] -> [C, h, w]) as they are: no resize
global vectors  the teacher's global vector of that crop -> [C, 1, 1]
human poses     the 207-d body pose -> [207, 1, 1]
SAM instances   the 64 x 64 in-box instance mask, 0/1 -> [1, 64, 64]
==============  ========================================================================================

The image operations use Pillow and torchvision, the libraries 4M uses, in 4M's order, so the tensors (and
hence the token ids) are identical to 4M's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

# the stored modality -> the kind of preprocessing
KINDS = {"rgb": "rgb", "canny_edge": "edge", "sam_edge": "edge", "depth": "depth", "normal": "normal",
         "semseg_coco": "semseg", "semseg": "semseg", "clip": "feature", "dinov2": "feature", "imagebind": "feature",
         "clip_global": "global", "dinov2_global": "global", "imagebind_global": "global",
         "human_poses": "pose", "sam_instance": "mask", "sam_mask": "mask"}
# plugins add theirs with modalmill.tokenize.labelers.register_token_modality ("gray": a 1-channel map that is not
# binary, preprocessed like the edge maps but trained and measured as a picture)
RESAMPLE_MODES = ("bilinear", "bicubic", "nearest", "pil_default")


def _pil_resample(mode: str | None):
    from PIL import Image

    if mode in (None, "pil_default"):
        return None
    return {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST}[mode]


def _check_crop(crop, hw) -> tuple[int, int, int, int, bool]:
    top, left, h, w, flip = (int(v) for v in list(crop)[:5])
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > hw[0] or left + w > hw[1]:
        raise ValueError(f"crop {[top, left, h, w]} lies outside the {hw[0]}x{hw[1]} label")
    return top, left, h, w, bool(flip)


def truncated_standardise(depth: torch.Tensor, thresh: float = 0.1) -> torch.Tensor:
    """(depth - mean) / sqrt(var + 1e-6) with mean and (unbiased) variance of the middle 80 % of values."""
    s = torch.sort(depth.reshape(-1), dim=0)[0]
    s = s[int(thresh * s.shape[0]): int((1 - thresh) * s.shape[0])]
    return (depth - s.mean()) / torch.sqrt(s.var() + 1e-6)


@dataclass(frozen=True)
class FourMInput:
    """The input of a 4M-format tokenizer for one source modality.

    ``prepare(label, crop, image_hw, index)`` -> the model input of crop number ``index`` (float32, or int64 ids
    for semseg);
    ``to_input`` is the identity (the tensor already is the model input)."""

    source: str
    size: int = 224  # the tokenizer's input size (crops are resized to size x size)
    n_channels: int = 3
    resample: str = "bilinear"
    per_crop: ClassVar[bool] = True

    @property
    def kind(self) -> str:
        return KINDS[self.source]

    def _pil_crop(self, img, crop, hw, resample):
        import torchvision.transforms.functional as TF

        top, left, h, w, flip = _check_crop(crop, hw)
        img = TF.crop(img, top, left, h, w).resize((self.size, self.size), resample=resample)
        return img, flip

    def prepare(self, label: Any, crop=None, image_hw=None, index: int | None = None) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from PIL import Image

        kind = self.kind
        if kind in ("rgb", "edge", "gray", "normal", "depth", "semseg"):
            arr = np.asarray(label)
            if arr.shape[:2] != tuple(image_hw):
                raise ValueError(f"{self.source} label is {arr.shape[0]}x{arr.shape[1]}, the stored rgb is "
                                 f"{image_hw[0]}x{image_hw[1]}")
        if kind in ("rgb", "edge", "gray"):
            img = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
            img, flip = self._pil_crop(img, crop, image_hw, _pil_resample(self.resample))
            if flip:
                img = TF.hflip(img)
            x = TF.normalize(TF.to_tensor(img), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
            return x[:self.n_channels] if self.n_channels < 3 else x
        if kind == "normal":
            img = Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)))
            img, flip = self._pil_crop(img, crop, image_hw, _pil_resample(self.resample))
            if flip:
                flipped = np.array(TF.hflip(img))
                flipped[:, :, 0] = 255 - flipped[:, :, 0]
                img = Image.fromarray(flipped)
            return TF.normalize(TF.to_tensor(img), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        if kind == "depth":
            img = Image.fromarray(np.ascontiguousarray(arr.astype(np.uint16)))
            img, flip = self._pil_crop(img, crop, image_hw, _pil_resample(self.resample))
            if flip:
                img = TF.hflip(img)
            d = torch.Tensor(np.array(img) / (2 ** 16 - 1.0)).unsqueeze(0)
            return truncated_standardise(d)
        if kind == "semseg":
            img = Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8))).convert("P")
            img = Image.fromarray(np.asarray(img) + 1, mode="P")  # uint8: 255 (unlabelled) -> 0, c -> c + 1
            img, flip = self._pil_crop(img, crop, image_hw, _pil_resample("nearest"))
            if flip:
                img = TF.hflip(img)
            return TF.pil_to_tensor(img).to(torch.long).squeeze(0)
        if kind == "feature":
            f = np.asarray(label)
            if f.ndim != 4:
                raise ValueError(f"{self.source} must hold the features of each crop, [n_crops, h, w, C]; got "
                                 f"shape {f.shape} (labels written before per-crop features: run the labeler "
                                 f"again)")
            c = index
            if c is None or not 0 <= c < f.shape[0]:
                raise ValueError(f"{self.source}: no features for crop {c} (has {f.shape[0]})")
            return torch.from_numpy(np.ascontiguousarray(f[c], dtype=np.float32)).permute(2, 0, 1).contiguous()
        if kind == "global":
            v = np.asarray(label)
            if v.ndim != 2:
                raise ValueError(f"{self.source} must hold one vector per crop, [n_crops, C]; got shape {v.shape}")
            c = index
            if c is None or not 0 <= c < v.shape[0]:
                raise ValueError(f"{self.source}: no vector for crop {c} (has {v.shape[0]})")
            return torch.from_numpy(np.ascontiguousarray(v[c], dtype=np.float32))[:, None, None]
        if kind == "pose":
            v = torch.from_numpy(np.asarray(label, dtype=np.float32).reshape(-1).copy())
            if v.numel() != 207:
                raise ValueError(f"a body pose has 23 x 3 x 3 = 207 values, got {v.numel()}")
            return v[:, None, None]
        if kind == "mask":
            m = torch.as_tensor(np.asarray(label, dtype=np.float32))
            if tuple(m.shape) != (self.size, self.size):
                raise ValueError(f"instance masks must be {self.size}x{self.size}, got {tuple(m.shape)}")
            return m[None]
        raise ValueError(f"no 4M preprocessing for {self.source!r}")

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in ("pose", "global") and x.ndim == 2:  # [B, C] vectors -> [B, C, 1, 1]
            return x[:, :, None, None]
        return x

    def instances(self, label, crop, image_hw) -> list[dict]:
        """SAM instances of a ``sam_mask`` label inside one crop, with their in-box masks (see
        :func:`modalmill.tokenize.adapters.crop_instances`)."""
        from .adapters import crop_instances

        return crop_instances(label, crop, image_hw, 224, self.size)


def fourm_input_for(source: str, model, resample: str = "bilinear") -> FourMInput:
    """The preprocessing of ``source`` for a 4M-format tokenizer (a loaded model or its
    :class:`~modalmill.tokenize.fourm.FourMSpec`: input size, channels, kind)."""
    if source not in KINDS:
        from ..schemas.plugins import load_plugins, plugins_loaded

        if not plugins_loaded():
            load_plugins()  # a plugin's modality (register_token_modality) in a process that did not load them yet
    if source not in KINDS:
        raise ValueError(f"no 4M tokenizer input is defined for modality {source!r}")
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample mode {resample!r}: one of {', '.join(RESAMPLE_MODES)}")
    kind = KINDS[source]
    want = {"rgb": "image", "edge": "image", "gray": "image", "normal": "image", "depth": "image", "semseg": "class",
            "feature": "feature", "global": "vector", "pose": "vector", "mask": "image"}[kind]
    have = "vector" if model.is_global else ("class" if model.n_labels is not None else
                                             ("feature" if not model.patch_proj else "image"))
    if want != have:
        article = {"image": "an", "class": "a class-map", "feature": "a feature-map", "vector": "a global"}
        raise ValueError(f"{article[have]}{' image' if have == 'image' else ''} tokenizer cannot tokenize "
                         f"{source} (it needs {article[want]}{' image' if want == 'image' else ''} tokenizer)")
    if kind in ("rgb", "normal") and model.n_channels != 3:
        raise ValueError(f"{source} has 3 channels, the tokenizer takes {model.n_channels}")
    if kind in ("depth", "mask") and model.n_channels != 1:
        raise ValueError(f"{source} has 1 channel, the tokenizer takes {model.n_channels}")
    if kind in ("edge", "gray") and model.n_channels not in (1, 3):
        raise ValueError(f"{source}: a {kind} map tokenizer takes 1 or 3 channels, not {model.n_channels}")
    if kind == "pose" and model.n_channels != 207:
        raise ValueError(f"human_poses: the pose tokenizer takes 207-d body poses, not {model.n_channels}")
    return FourMInput(source, size=model.image_size, n_channels=model.n_channels, resample=resample)
