"""A ready training transform: one crop of every sample, as 4M's loader makes it, and a collate that batches it.

Stored images and pixel labels keep the native size of each photo, so ``DataLoader(load_dataset(...),
batch_size=4)`` cannot stack them. 4M's own loader (``fourm/data``: ``PreTokenizedImageAugmenter`` and the
``image_augment`` of each modality transform) picks one row ``(top, left, h, w, hflip)`` of a sample's
``crop_settings`` (at random, or row 0 with ``no_aug``), crops every pixel modality with it (PIL), resizes the crop
to the training size, flips it when the row says so (for surface normals the x component is mirrored as well,
``255 - x``), and takes the same row of every pre-tokenized modality. :class:`FourMCrops` does that to the
samples of :func:`~modalmill.dataset.load_dataset`::

    ds = load_dataset(out, ["rgb", "crop_settings", "depth", "tok_rgb@224", "caption"],
                      transform=FourMCrops(size=224, crop="random"))
    loader = DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=2)

What one transformed sample holds (``__crop__``: the row used):

=================================== ===============================================================================
``rgb``, pixel labels               ``[C, size, size]`` in the stored dtype (uint8; depth uint16): crop, resize,
                                    flip. Resampling: ``resample`` (default ``"bicubic"``, PIL's default, which is
                                    what 4M's loader uses) for rgb, depth and normals; nearest for label maps
                                    (semseg, masks, edges and any other pixel modality), as 4M's ``SemsegTransform``
                                    and ``MaskTransform``
``tok_*``                           ``torch.long`` ``[n_tokens]``: row ``__crop__``
feature maps, global embeddings     row ``__crop__`` (``[h, w, C]``, ``[C]``): they were computed per crop
``crop_settings``                   the row used, ``torch.long [5]``
anything else (text, JSON, ...)     unchanged (with ``text_tokenizer`` the loader already serialised it for this
                                    crop: the loader's ``crop`` and the transform's are the same row)
=================================== ===============================================================================

``tests/fixtures/fourm_crops`` (made by ml-4m's own ``RGBTransform``, ``NormalTransform`` and ``SemsegTransform``,
``scripts/make_4m_crop_fixture.py``) checks that the crops equal 4M's. Values are not normalised (4M's
per-modality normalisation, e.g. ImageNet mean/std for rgb, is the trainer's choice). :func:`collate` stacks
every tensor whose shape agrees across the batch and keeps the rest (text, JSON, token ids of varying length) as
lists.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ..schemas.modalities import FEATURE_MAP, GLOBAL, IMAGE, PIXEL, TOKENS, get_modality

# pixel modalities resampled like the photograph; every other pixel modality is a label map (nearest)
CONTINUOUS = ("rgb", "depth", "normal")
RESAMPLE = ("bicubic", "bilinear", "nearest")


def _pil_filter(name: str):
    from PIL import Image

    return {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST}[name]


def crop_pixels(value: torch.Tensor | np.ndarray, row, size: int, resample: str, mirror_x: bool = False
                ) -> torch.Tensor:
    """Crop a CHW (or HW) label with ``row = (top, left, h, w, hflip)``, resize it to ``size`` x ``size`` with
    PIL (``resample``: bicubic / bilinear / nearest) and flip it when ``hflip``; ``mirror_x``: also mirror the
    first channel (``255 - x``, surface normals). Returns ``[C, size, size]`` in the input's dtype."""
    from PIL import Image

    arr = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    hwc = arr[..., None] if arr.ndim == 2 else arr.transpose(1, 2, 0)
    top, left, h, w, flip = (int(v) for v in list(row)[:5])
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > hwc.shape[0] or left + w > hwc.shape[1]:
        raise ValueError(f"crop {[top, left, h, w]} lies outside the {hwc.shape[0]}x{hwc.shape[1]} label")
    channels = []
    for c in range(hwc.shape[2]):  # one channel at a time: PIL resamples uint8 and 16-bit maps alike
        plane = hwc[top:top + h, left:left + w, c]
        img = Image.fromarray(plane.astype(np.int32) if plane.dtype == np.uint16 else plane)
        img = img.resize((size, size), resample=_pil_filter(resample))
        out = np.asarray(img)
        if arr.dtype == np.uint16:
            out = np.clip(out, 0, 65535)
        channels.append(out.astype(arr.dtype))
    res = np.stack(channels, 0)
    if flip:
        res = res[:, :, ::-1]
        if mirror_x:
            res = res.copy()
            res[0] = np.iinfo(res.dtype).max - res[0]
    return torch.from_numpy(np.ascontiguousarray(res))


class FourMCrops:
    """Crop every pixel modality of a sample with one ``crop_settings`` row, resize it to ``size`` and take the
    same row of every per-crop modality (see the module docstring).

    ``crop``: ``"random"`` (a row per sample, as 4M's ``PreTokenizedImageAugmenter``), ``"center"`` (row 0, the
    centre crop, as 4M's ``no_aug``) or a row index. Given to ``load_dataset(transform=...)``, the loader makes
    the choice (seeded by seed, epoch and key, so text serialised for the crop agrees); used on its own, a
    ``"random"`` row is drawn from ``random.Random(seed)``. ``resample``: how rgb, depth and normals are resized
    (``"bicubic"``, PIL's default and 4M's; or ``"bilinear"``, ``"nearest"``); label maps are always nearest.
    ``interpolation``: per-modality overrides, e.g. ``{"my_heatmap": "bilinear"}``."""

    def __init__(self, size: int = 224, crop: int | str = "random", resample: str = "bicubic",
                 interpolation: dict[str, str] | None = None, seed: int = 0):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not (crop in ("random", "center") or (isinstance(crop, int) and not isinstance(crop, bool) and crop >= 0)):
            raise ValueError(f"crop must be 'random', 'center' or a crop_settings row index >= 0, got {crop!r}")
        for name, mode in {"resample": resample, **(interpolation or {})}.items():
            if mode not in RESAMPLE:
                raise ValueError(f"{name}: resampling must be one of {', '.join(RESAMPLE)}, got {mode!r}")
        self.size, self.crop, self.resample = size, crop, resample
        self.interpolation = dict(interpolation or {})
        self.rng = random.Random(seed)

    @property
    def loader_crop(self) -> int | str:
        """The loader's ``crop`` argument for this choice."""
        return 0 if self.crop == "center" else self.crop

    def __repr__(self) -> str:
        return f"FourMCrops(size={self.size}, crop={self.crop!r}, resample={self.resample!r})"

    def _row(self, sample: dict) -> tuple[int, list[int]]:
        if "__crop__" in sample and "__crop_row__" in sample:  # chosen by the loader
            return int(sample["__crop__"]), [int(v) for v in sample["__crop_row__"]]
        if "crop_settings" not in sample:
            raise ValueError(f"sample {sample.get('__key__')!r}: FourMCrops needs crop_settings (request it, or "
                             f"pass the transform to load_dataset(transform=...))")
        crops = np.asarray(sample["crop_settings"]).reshape(-1, 5)
        if self.crop == "random":
            index = self.rng.randrange(len(crops))
        else:
            index = int(self.loader_crop)
            if index >= len(crops):
                raise ValueError(f"sample {sample.get('__key__')!r}: crop={index} but it has {len(crops)} crop(s)")
        return index, [int(v) for v in crops[index]]

    def resample_for(self, name: str) -> str:
        if name in self.interpolation:
            return self.interpolation[name]
        return self.resample if name in CONTINUOUS else "nearest"

    def __call__(self, sample: dict) -> dict:
        index, row = self._row(sample)
        out: dict[str, Any] = {}
        for name, value in sample.items():
            if name.startswith("__") or "." in name:  # keys, and the loader's text extras (``caption.raw``)
                out[name] = value
                continue
            out[name] = self._one(name, value, index, row, sample)
        out["__crop__"] = index
        out.pop("__crop_row__", None)
        return out

    def _one(self, name: str, value: Any, index: int, row: list[int], sample: dict) -> Any:
        try:
            spec = get_modality(name)
        except KeyError:
            return value
        if name == "crop_settings":
            return torch.tensor(row, dtype=torch.long)
        if spec.kind in (IMAGE, PIXEL) and isinstance(value, (torch.Tensor, np.ndarray)):
            return crop_pixels(value, row, self.size, self.resample_for(name), mirror_x=name == "normal")
        if spec.kind in (TOKENS, FEATURE_MAP, GLOBAL) and isinstance(value, torch.Tensor) and value.ndim >= 2:
            if index >= value.shape[0]:
                raise ValueError(f"sample {sample.get('__key__')!r}: {name} has {value.shape[0]} row(s), crop "
                                 f"{index} asked for")
            return value[index]
        return value


def collate(samples: list[dict]) -> dict:
    """Batch transformed samples: tensors whose shape agrees across the batch are stacked, ints become a tensor,
    everything else (text, JSON, token ids of varying length, keys) is kept as a list in sample order."""
    if not samples:
        return {}
    out: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            out[name] = torch.stack(values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[name] = torch.tensor(values, dtype=torch.long)
        else:
            out[name] = values
    return out
