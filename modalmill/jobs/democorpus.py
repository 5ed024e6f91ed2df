"""A small corpus of real photographs from scikit-image's bundled sample images, as webdataset tar shards.

Used by ``make demo``, the tests and the benchmarks. Every image is a real photo (or real scan) that ships
inside the scikit-image wheel, so it works offline. Variants (flips, crops, rescales, JPEG qualities) make
larger corpora at typical web sizes without repeating bytes.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera", "coins", "moon", "clock", "brick", "grass", "gravel", "colorwheel", "page")


def photos() -> dict[str, np.ndarray]:
    """The sample photographs as RGB uint8 arrays."""
    import skimage.data as data

    out = {}
    for name in PHOTOS:
        arr = getattr(data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        out[name] = np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    out["stereo_motorcycle"] = data.stereo_motorcycle()[0]
    return out


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def variant(arr: np.ndarray, i: int, size_range: tuple[int, int] | None = None) -> np.ndarray:
    """The i-th deterministic variant of a photo: crop, flip and (optionally) rescale to a web-like size."""
    rng = np.random.default_rng(i)
    h, w = arr.shape[:2]
    if i > 0:
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        arr = arr[top:top + ch, left:left + cw]
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
    if size_range is not None:
        target = int(rng.integers(size_range[0], size_range[1] + 1))
        scale = target / max(arr.shape[:2])
        img = Image.fromarray(np.ascontiguousarray(arr))
        arr = np.asarray(img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                    Image.BICUBIC))
    return np.ascontiguousarray(arr)


def write_shard(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write a webdataset tar: members ``<key>.<ext>`` grouped by sample."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def build_corpus(out_dir: str, n_shards: int = 2, per_shard: int = 9, size_range: tuple[int, int] | None = None,
                 quality: int = 90) -> list[str]:
    """Write ``n_shards`` tar shards of real-photo JPEGs (plus a .txt with the photo's name); returns their paths."""
    pics = photos()
    names = sorted(pics)
    paths = []
    n = 0
    for s in range(n_shards):
        samples = []
        for _ in range(per_shard):
            name = names[n % len(names)]
            arr = variant(pics[name], n // len(names), size_range)
            samples.append((f"{n:06d}", {"jpg": jpeg_bytes(arr, quality), "txt": name.replace("_", " ").encode()}))
            n += 1
        path = os.path.join(out_dir, f"shard-{s:05d}.tar")
        write_shard(path, samples)
        paths.append(path)
    return paths
