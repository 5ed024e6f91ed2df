"""Aligned crop settings exactly as 4M defines them.

Per sample an int64 array ``[n_crops, 5]`` of ``(top, left, height, width, hflip)`` in pixels of the stored
rgb image. Crop 0 is the centre square crop (side = the shorter image side), never flipped. Crops 1..n-1
are random resized crops drawn as torchvision's ``RandomResizedCrop.get_params`` draws them (area scale in
``(scale_min, 1)``, log-uniform aspect ratio in ``(3/4, 4/3)``, ten tries, then a centre crop clamped to
the ratio range), flipped with probability 0.5.

The random stream is seeded from ``(seed, key)`` alone, so a sample's crops do not depend on its shard,
its position or the worker that made them: any later run that adds a modality recomputes (or reads)
the very same crops.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CropConfig:
    n_crops: int = 1
    scale_min: float = 0.8  # 4M's save_vq_tokens.py default min crop scale for pre-tokenised crops
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5

    def __post_init__(self):
        if self.n_crops < 1:
            raise ValueError(f"crops.n_crops must be >= 1, got {self.n_crops}")
        if not 0 < self.scale_min <= 1:
            raise ValueError(f"crops.scale_min must lie in (0, 1], got {self.scale_min}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"crops.ratio must be (low, high) with 0 < low <= high, got {self.ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"crops.flip_prob must lie in [0, 1], got {self.flip_prob}")


def _rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{int(seed)}\0{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def centre_crop(height: int, width: int) -> tuple[int, int, int, int]:
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def random_resized_crop(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # fallback: whole image clamped to the ratio range, centred
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


def make_crop_settings(key: str, height: int, width: int, config: CropConfig, seed: int) -> np.ndarray:
    """The ``[n_crops, 5]`` crop settings of one sample."""
    out = np.zeros((config.n_crops, 5), dtype=np.int64)
    out[0, :4] = centre_crop(height, width)
    if config.n_crops > 1:
        rng = _rng(seed, key)
        for i in range(1, config.n_crops):
            out[i, :4] = random_resized_crop(rng, height, width, (config.scale_min, 1.0), config.ratio)
            out[i, 4] = int(rng.random() < config.flip_prob)
    return out


def validate_crop_settings(crops: np.ndarray, height: int, width: int) -> None:
    """Raise ValueError when a crop lies outside a ``height`` x ``width`` image."""
    if crops.ndim != 2 or crops.shape[1] != 5:
        raise ValueError(f"crop settings must have shape [n_crops, 5], got {crops.shape}")
    top, left, h, w, flip = crops.T
    if (top < 0).any() or (left < 0).any() or (h < 1).any() or (w < 1).any():
        raise ValueError(f"crop settings out of range: {crops.tolist()}")
    if (top + h > height).any() or (left + w > width).any() or not np.isin(flip, (0, 1)).all():
        raise ValueError(f"crop settings outside the {height}x{width} image: {crops.tolist()}")
