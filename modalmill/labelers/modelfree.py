"""Model-free labelers: Canny edges, k-means colour palettes and image-statistics metadata.

They need no weights and no GPU, run inside the shard task (``stateful = False``), and are pure functions of
the stored rgb image (plus ``original_size`` for metadata): the same input gives byte-identical output, and
any randomness (k-means initialisation) is seeded from the image content and the config, never from global
state. Everything is vectorised with numpy/OpenCV.

Inputs are :class:`~modalmill.labelers.base.LabelInput` with ``image`` the decoded stored rgb image,
``[H, W, 3]`` uint8, upright. A sample whose image is not such an array (wrong dtype, channels, or an empty
side) gets a :class:`~modalmill.labelers.base.LabelFailure` instead of an exception.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ..io.scores import DEFAULT_INPUT_SCORES, input_scores, normalise_mapping
from ..schemas.modalities import METADATA_RANGES
from .base import Labeler, LabelFailure, LabelInput, register_labeler

__all__ = ["CannyEdgeLabeler", "ColorPaletteLabeler", "MetadataLabeler"]


# ---------------------------------------------------------------------- helpers


def _image_problem(image: Any) -> str | None:
    """Why ``image`` is not a usable ``[H, W, 3]`` uint8 array, or None when it is."""
    if not isinstance(image, np.ndarray):
        return f"image must be a numpy array, got {type(image).__name__}"
    if image.dtype != np.uint8:
        return f"image must be uint8, got {image.dtype}"
    if image.ndim != 3 or image.shape[2] != 3:
        return f"image must be [H, W, 3], got shape {tuple(image.shape)}"
    if image.shape[0] < 1 or image.shape[1] < 1:
        return f"image is empty: shape {tuple(image.shape)}"
    return None


def _grey_u8(image: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma as uint8 (OpenCV's RGB2GRAY, the same weights as PIL's 'L')."""
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


# ---------------------------------------------------------------------- canny_edge


@register_labeler
class CannyEdgeLabeler(Labeler):
    """OpenCV Canny edges of the BT.601 greyscale image, ``[H, W]`` uint8 with values 0 / 255.

    Pipeline: grey = BT.601 luma (``cv2.COLOR_RGB2GRAY``) -> optional Gaussian blur (``blur_sigma``, kernel
    size derived from sigma by OpenCV, default border) -> ``cv2.Canny(grey, low, high, apertureSize,
    L2gradient)``.

    Thresholds: fixed by default, ``low_threshold=100`` / ``high_threshold=200`` with no blur (the widely used
    ControlNet "canny" convention). With ``auto=True`` the fixed thresholds are ignored and derived from the
    median grey level ``v`` of the (blurred) image: ``low = max(0, (1 - auto_sigma) * v)``,
    ``high = min(255, (1 + auto_sigma) * v)`` (the usual "auto Canny" heuristic). Note that with
    ``aperture_size`` 5 or 7 OpenCV's Sobel gradients are larger, so the same thresholds find more edges.
    """

    name = "canny_edge"
    version = "1"
    outputs = ("canny_edge",)
    default_batch_size = 32
    description = "OpenCV Canny edge map of the greyscale image (0/255), at the stored rgb geometry"

    @dataclass(frozen=True)
    class Config:
        low_threshold: float = 100.0  # hysteresis low threshold (ignored when auto)
        high_threshold: float = 200.0  # hysteresis high threshold (ignored when auto)
        auto: bool = False  # derive the thresholds from the median grey level instead
        auto_sigma: float = 0.33  # auto: thresholds are (1 -/+ auto_sigma) * median
        blur_sigma: float = 0.0  # Gaussian blur sigma (pixels) before Canny; 0 = no blur
        aperture_size: int = 3  # Sobel aperture: 3, 5 or 7
        l2_gradient: bool = False  # True: L2 gradient magnitude; False: OpenCV's default L1

        def __post_init__(self):
            if isinstance(self.aperture_size, bool) or self.aperture_size not in (3, 5, 7):
                raise ValueError(f"aperture_size must be 3, 5 or 7, got {self.aperture_size!r}")
            if not (0 <= self.low_threshold <= self.high_threshold):
                raise ValueError(f"need 0 <= low_threshold <= high_threshold, got "
                                 f"{self.low_threshold!r}, {self.high_threshold!r}")
            if not (0 <= self.auto_sigma <= 1):
                raise ValueError(f"auto_sigma must lie in [0, 1], got {self.auto_sigma!r}")
            if not (self.blur_sigma >= 0):
                raise ValueError(f"blur_sigma must be >= 0, got {self.blur_sigma!r}")

    def edges(self, image: np.ndarray) -> np.ndarray:
        c = self.config
        grey = _grey_u8(image)
        if c.blur_sigma > 0:
            grey = cv2.GaussianBlur(grey, (0, 0), sigmaX=float(c.blur_sigma), sigmaY=float(c.blur_sigma))
        if c.auto:
            v = float(np.median(grey))
            low, high = max(0.0, (1.0 - c.auto_sigma) * v), min(255.0, (1.0 + c.auto_sigma) * v)
        else:
            low, high = float(c.low_threshold), float(c.high_threshold)
        out = cv2.Canny(grey, low, high, apertureSize=int(c.aperture_size), L2gradient=bool(c.l2_gradient))
        return np.ascontiguousarray(out, dtype=np.uint8)

    def process_batch(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        results: list[dict[str, Any] | LabelFailure] = []
        for inp in batch:
            problem = _image_problem(inp.image)
            results.append(LabelFailure(problem) if problem else {"canny_edge": self.edges(inp.image)})
        return results


# ---------------------------------------------------------------------- color_palette

_PALETTE_KS = tuple(range(1, 8))


def _grid_sample(image: np.ndarray, max_side: int) -> np.ndarray:
    """Pixels at the centres of a grid of at most ``max_side`` x ``max_side`` cells, ``[N, 3]`` uint8.

    Nearest sampling (no averaging), so every sample is a colour that occurs in the image.
    """
    h, w = image.shape[:2]
    nh, nw = min(h, max_side), min(w, max_side)
    rows = ((np.arange(nh) + 0.5) * (h / nh)).astype(np.intp)
    cols = ((np.arange(nw) + 0.5) * (w / nw)).astype(np.intp)
    return image[np.ix_(rows, cols)].reshape(-1, 3)


def _kmeans_seed(colors: np.ndarray, counts: np.ndarray, seed: int, k: int) -> int:
    """A 31-bit RNG seed from the image's sampled colours, the config seed and k."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(colors, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(counts, dtype=np.int64).tobytes())
    h.update(f"|{int(seed)}|{int(k)}".encode())
    return int.from_bytes(h.digest()[:4], "little") & 0x7FFFFFFF


def _ordered_triples(centres: np.ndarray, sizes: np.ndarray, k: int) -> list[int]:
    """Round to ints, order by size (largest first; ties by colour), pad to k by repeating; flat list."""
    rgb = np.clip(np.rint(np.asarray(centres, dtype=np.float64)), 0, 255).astype(np.int64)
    order = np.lexsort((rgb[:, 2], rgb[:, 1], rgb[:, 0], -np.asarray(sizes, dtype=np.float64)))
    rgb = rgb[order]
    if len(rgb) < k:
        rgb = rgb[np.arange(k) % len(rgb)]
    return [int(v) for v in rgb[:k].ravel()]


@register_labeler
class ColorPaletteLabeler(Labeler):
    """k-means colour palettes for k = 1..7 in 4M's JSON layout.

    Output: ``[{"1": [r, g, b], "2": [r, g, b, r, g, b], ..., "7": [...]}]``: for each k a flat list of k RGB
    triples (ints 0..255), ordered by cluster size (number of sampled pixels), largest first; ties by colour.

    Method: the image is sampled on a grid of at most ``max_side`` x ``max_side`` cells (nearest sampling, the
    pixel at each cell's centre, so only colours present in the image enter; 4096 pixels by default).
    ``cv2.kmeans`` clusters the samples in RGB (float32) with k-means++ seeding (``KMEANS_PP_CENTERS``),
    ``n_init`` attempts (the most compact wins), stopping after ``max_iter`` iterations or when no centre
    moves more than ``tol``. Before each call OpenCV's RNG is seeded (``cv2.setRNGSeed``, thread-local) with a
    hash of the sampled colours, ``seed`` and k, so the palette is a function of the image alone. Centres
    are rounded to ints. When the image has no more than k distinct sampled colours the palette is exactly
    those colours, repeated in size order to make k triples (a flat image gives k copies of its colour).
    """

    name = "color_palette"
    version = "1"
    outputs = ("color_palette",)
    default_batch_size = 32
    description = "k-means RGB colour palettes for k = 1..7 (4M's color_palette JSON), largest cluster first"

    @dataclass(frozen=True)
    class Config:
        max_side: int = 64  # sample grid side: at most max_side x max_side pixels enter k-means
        n_init: int = 3  # k-means++ attempts per k (cv2.kmeans "attempts"); the most compact wins
        max_iter: int = 50  # k-means iterations per attempt, at most
        tol: float = 0.1  # stop when no centre moves more than this (RGB units)
        seed: int = 0  # mixed with the hash of the image's colours to seed OpenCV's RNG

        def __post_init__(self):
            for f in ("max_side", "n_init", "max_iter"):
                v = getattr(self, f)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{f} must be an int >= 1, got {v!r}")
            if not (self.tol >= 0):
                raise ValueError(f"tol must be >= 0, got {self.tol!r}")
            if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
                raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    def palette(self, image: np.ndarray) -> dict[str, list[int]]:
        c = self.config
        px = _grid_sample(image, c.max_side)
        colors, counts = np.unique(px, axis=0, return_counts=True)
        samples = np.ascontiguousarray(px, dtype=np.float32)
        criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, int(c.max_iter), float(c.tol))
        out: dict[str, list[int]] = {}
        for k in _PALETTE_KS:
            if len(colors) <= k:
                centres, sizes = colors, counts
            else:
                cv2.setRNGSeed(_kmeans_seed(colors, counts, c.seed, k))
                _, labels, centres = cv2.kmeans(samples, k, None, criteria, int(c.n_init), cv2.KMEANS_PP_CENTERS)
                sizes = np.bincount(labels.ravel(), minlength=k)
                keep = sizes > 0  # OpenCV re-seeds empty clusters; this is a guard only
                centres, sizes = centres[keep], sizes[keep]
            out[str(k)] = _ordered_triples(centres, sizes, k)
        return out

    def process_batch(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        results: list[dict[str, Any] | LabelFailure] = []
        for inp in batch:
            problem = _image_problem(inp.image)
            results.append(LabelFailure(problem) if problem else {"color_palette": [self.palette(inp.image)]})
        return results


# ---------------------------------------------------------------------- metadata


_LUMA1000 = (299, 587, 114)  # ITU-R BT.601 luma weights x 1000: integers, so luma sums stay exact
_RG = (1, -1, 0)  # rg = R - G
_YB2 = (1, 1, -2)  # 2 * yb = R + G - 2 B
_MOMENT_CHUNK = 1 << 18  # pixels per step of _pixel_moments (bounds its memory at ~8 MiB)
_M = np.arange(256, dtype=np.float64)
# HSV saturation of a pixel from its (max, min) channel values, indexed by max * 256 + min
_SATURATION = np.where(_M[:, None] > 0, 255.0 * (_M[:, None] - _M[None, :]) / np.maximum(_M[:, None], 1.0),
                       0.0).ravel()


def _pixel_moments(image: np.ndarray) -> tuple[list[list[int]], list[int], np.ndarray]:
    """Exact pixel moments of an [H, W, 3] uint8 image: the 3x3 matrix of channel cross-product sums
    (sum R*R, sum R*G, ...), the channel sums, and the 65536-bin histogram of max * 256 + min per pixel.

    Sums of products are taken with one float64 matrix product per chunk of pixels (with a column of ones for
    the plain sums): every product and partial sum is an integer below 2^53, so they are exact.
    """
    flat = np.ascontiguousarray(image).reshape(-1, 3)
    gram = np.zeros((4, 4))
    sat_hist = np.zeros(65536, np.int64)
    buf = np.ones((min(len(flat), _MOMENT_CHUNK), 4))
    for start in range(0, len(flat), _MOMENT_CHUNK):
        c = flat[start:start + _MOMENT_CHUNK]
        x = buf[:len(c)]
        x[:, :3] = c
        gram += x.T @ x
        r, g, b = c[:, 0], c[:, 1], c[:, 2]
        idx = np.maximum(np.maximum(r, g), b).astype(np.intp)
        idx <<= 8
        idx |= np.minimum(np.minimum(r, g), b)
        sat_hist += np.bincount(idx, minlength=65536)
    return [[int(v) for v in row[:3]] for row in gram[:3]], [int(v) for v in gram[3, :3]], sat_hist


def _clip_round(name: str, value: float, decimals: int) -> float:
    lo, hi = METADATA_RANGES[name]
    v = min(max(float(value), lo), hi)
    return round(v, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0


def checked_input_scores(mapping: Any) -> tuple[tuple[str, str], ...]:
    """A metadata labeler's ``input_scores`` as sorted pairs; only 4M-21 metadata fields may be filled."""
    pairs = normalise_mapping(mapping)
    unknown = [f for f, _ in pairs if f not in METADATA_RANGES]
    if unknown:
        raise ValueError(f"input_scores: {', '.join(unknown)} not 4M-21 metadata field(s) (4M's loader would "
                         f"refuse them); known: {', '.join(METADATA_RANGES)}")
    return pairs


def metadata_config_dict(config: Any) -> dict[str, Any]:
    """The config as hashed: ``input_scores`` is left out when it is the default, so outputs made before the
    setting existed keep their config hash (the default reads the COYO columns, which those corpora lacked)."""
    d = dataclasses.asdict(config)
    if tuple(map(tuple, d.get("input_scores", ()))) == DEFAULT_INPUT_SCORES:
        d.pop("input_scores")
    return d


@register_labeler
class MetadataLabeler(Labeler):
    """4M-21 metadata that needs no other modality, as a flat ``{name: number}`` dict.

    With R, G, B the float channels of the stored rgb image (0..255) and N its pixel count:

    - ``original_width``, ``original_height``: ``LabelInput.original_size`` (the source image before any
      resize), ints.
    - ``brightness`` (0..255): mean of the ITU-R BT.601 luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (the
      weights of OpenCV's RGB2GRAY and PIL's 'L'), computed exactly (see ``stats``).
    - ``contrast`` (0..127): RMS contrast, the population standard deviation of Y (Peli 1990, "Contrast in
      complex images", JOSA A 7(10)). Its maximum is 127.5 (half black, half white), clipped to 4M's 127.
    - ``saturation`` (0..255): mean of the HSV saturation in OpenCV's 8-bit convention,
      ``S = 255 * (max(R,G,B) - min(R,G,B)) / max(R,G,B)`` (0 where max = 0), in float64.
    - ``colorfulness`` (0..150): Hasler & Süsstrunk, "Measuring colourfulness in natural images", SPIE Human
      Vision and Electronic Imaging VIII, 2003: ``rg = R - G``, ``yb = (R + G) / 2 - B``,
      ``M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)`` (population stds), clipped
      to 4M's 150 (saturated two-colour images can exceed it).
    - ``entropy`` (0..10 bits): Shannon entropy ``-sum p_i log2 p_i`` of the 256-bin histogram of the 8-bit
      BT.601 grey image (rounded luma, ``cv2.COLOR_RGB2GRAY``); at most 8 bits.

    - ``aesthetic_score``, ``watermark_score``: from the sample's source json when the corpus carries them
      (``input_scores``, default COYO-700M's ``aesthetic_score_laion_v2`` and ``watermark_score`` columns; see
      :mod:`modalmill.io.scores`); the model labelers in :mod:`modalmill.labelers.quality` compute them otherwise.

    Floats are clipped into 4M's ranges (``METADATA_RANGES``) and rounded to ``decimals`` places.
    A sample whose ``original_size`` is not two positive integers fails with a LabelFailure.
    """

    name = "metadata"
    version = "1"
    outputs = ("metadata",)
    default_batch_size = 32
    description = ("image-statistics metadata: original size, brightness, contrast, saturation, colorfulness, "
                   "entropy (4M-21 names and ranges)")

    @dataclass(frozen=True)
    class Config:
        decimals: int = 4  # float values are rounded to this many decimal places
        # metadata field -> source json column read from the input (io/scores.py); {} reads none
        input_scores: Any = DEFAULT_INPUT_SCORES

        def __post_init__(self):
            if isinstance(self.decimals, bool) or not isinstance(self.decimals, int) or not 0 <= self.decimals <= 12:
                raise ValueError(f"decimals must be an int in [0, 12], got {self.decimals!r}")
            object.__setattr__(self, "input_scores", checked_input_scores(self.input_scores))

    def config_dict(self) -> dict[str, Any]:
        return metadata_config_dict(self.config)

    @staticmethod
    def _original_size(size: Any) -> tuple[int, int] | None:
        try:
            w, h = size
        except (TypeError, ValueError):
            return None
        out = []
        for v in (w, h):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 1 <= int(v) <= 1e9:
                return None
            out.append(int(v))
        return out[0], out[1]

    def stats(self, image: np.ndarray) -> dict[str, float]:
        """The image statistics, unclipped and unrounded.

        Every statistic but the entropy is a function of the pixel count N, the channel sums and the 3x3
        matrix of channel cross-products, plus (saturation) the histogram of per-pixel (max, min) pairs.
        These are exact integers (:func:`_pixel_moments`), so means and population variances are computed
        exactly from them (``var = (N * sum(x^2) - sum(x)^2) / N^2`` in integer arithmetic) and converted to
        float once: no float64 copy of the image and no per-pixel float work.
        """
        n = image.shape[0] * image.shape[1]
        gram, sums, sat_hist = _pixel_moments(image)

        def total(w):  # sum over pixels of w . (R, G, B)
            return sum(a * s for a, s in zip(w, sums))

        def var(w):  # population variance of w . (R, G, B)
            sq = sum(w[i] * w[j] * gram[i][j] for i in range(3) for j in range(3))
            return (n * sq - total(w) ** 2) / (n * n)

        mean_rg, mean_yb = total(_RG) / n, total(_YB2) / (2 * n)
        colorfulness = math.sqrt(var(_RG) + var(_YB2) / 4) + 0.3 * math.sqrt(mean_rg ** 2 + mean_yb ** 2)
        hist = np.bincount(_grey_u8(image).ravel(), minlength=256).astype(np.float64)
        p = hist[hist > 0] / hist.sum()
        entropy = max(0.0, float(-(p * np.log2(p)).sum()))
        return {
            "brightness": total(_LUMA1000) / (1000 * n),
            "contrast": math.sqrt(var(_LUMA1000) / 1e6),
            "saturation": float(sat_hist @ _SATURATION) / n,
            "colorfulness": float(colorfulness),
            "entropy": entropy,
        }

    def process_batch(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        results: list[dict[str, Any] | LabelFailure] = []
        for inp in batch:
            problem = _image_problem(inp.image)
            if problem:
                results.append(LabelFailure(problem))
                continue
            size = self._original_size(inp.original_size)
            if size is None:
                results.append(LabelFailure(f"original_size must be two positive ints (width, height), "
                                            f"got {inp.original_size!r}"))
                continue
            meta: dict[str, Any] = {"original_width": size[0], "original_height": size[1]}
            for name, value in self.stats(inp.image).items():
                meta[name] = _clip_round(name, value, self.config.decimals)
            for name, value in input_scores(inp.source, self.config.input_scores).items():
                meta[name] = _clip_round(name, value, self.config.decimals)
            results.append({"metadata": meta})
        return results
