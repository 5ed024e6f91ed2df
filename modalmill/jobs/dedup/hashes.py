"""Per-image fingerprints for deduplication: the digest of the decoded pixels and the 64-bit perceptual hash.

- :func:`pixel_digest`: SHA-256 of the image's shape and its decoded uint8 RGB pixels (first 16 bytes, hex).
  Two samples share it exactly when their stored images decode to the same pixels, whatever container or
  metadata the files had.
- :func:`phash`: the DCT perceptual hash of Zauner (2010, "Implementation and benchmarking of perceptual image
  hash functions"), as the ``imagehash`` library computes it: the grey image (PIL ``L``) resized to 32x32 with
  Lanczos, the 2-D DCT-II, the 8x8 lowest frequencies, each bit ``coefficient > median of the 64``. Written
  here on :func:`scipy.fft.dct` (scipy is already a dependency through scikit-image) so it also gives the hash
  of the horizontally flipped image cheaply; that and the hash of the centre crop are queried as well
  (:func:`phash_triple`).
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

__all__ = ["hamming", "centre_crop", "phash", "phash_triple", "pixel_digest", "popcount64"]


def pixel_digest(image: np.ndarray) -> str:
    """Hex digest (128 bits of SHA-256) of an ``[H, W, 3]`` uint8 image's shape and pixels."""
    arr = np.ascontiguousarray(image, dtype=np.uint8)
    h = hashlib.sha256(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()[:32]


def _bits_to_u64(bits: np.ndarray) -> int:
    out = 0
    for b in bits.ravel():
        out = (out << 1) | int(bool(b))
    return out


def _dct_lowfreq(grey32: np.ndarray) -> np.ndarray:
    from scipy.fft import dct

    return dct(dct(grey32, axis=0, type=2), axis=1, type=2)[:8, :8]


def _grey32(image: np.ndarray) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("L")
    return np.asarray(img.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)


def phash(image: np.ndarray) -> int:
    """The 64-bit DCT perceptual hash of an ``[H, W, 3]`` uint8 image, as an int (row-major bits, MSB first)."""
    low = _dct_lowfreq(_grey32(image))
    return _bits_to_u64(low > np.median(low))


CENTRE = 0.9  # the centre crop whose hash is also queried


def centre_crop(image: np.ndarray, fraction: float = CENTRE) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = int(round(h * (1 - fraction) / 2)), int(round(w * (1 - fraction) / 2))
    return image[top:max(top + 1, h - top), left:max(left + 1, w - left)]


def phash_triple(image: np.ndarray) -> tuple[int, int, int]:
    """(phash of the image, of its horizontal mirror, of its centre 90% crop).

    The first is indexed; the other two are queried as well, so a mirrored copy, and a copy cut to the centre
    90% (in either direction: the crop's hash meets the original's centre-crop hash) are found although plain
    pHash moves by 20-30 bits under those edits (measured on scikit-image's photographs; tests/test_dedup.py)."""
    grey = _grey32(image)
    out = []
    for g in (grey, grey[:, ::-1]):
        low = _dct_lowfreq(np.ascontiguousarray(g))
        out.append(_bits_to_u64(low > np.median(low)))
    return out[0], out[1], phash(centre_crop(image))


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Bits set in each element of a uint64 array."""
    x = np.asarray(x, dtype=np.uint64)
    flat = np.ascontiguousarray(x.reshape(-1))
    return _POP8[flat.view(np.uint8).reshape(-1, 8)].sum(axis=-1, dtype=np.int64).reshape(x.shape)


def hamming(a, b) -> np.ndarray:
    """Hamming distances between uint64 hashes (broadcast)."""
    return popcount64(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))
