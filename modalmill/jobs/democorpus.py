"""A small corpus of real photographs from scikit-image's bundled sample images, as webdataset tar shards.

Used by ``make demo``, the tests and the benchmarks. Every image is a real photo (or real scan) that ships
inside the scikit-image wheel, so it works offline. Variants (flips, crops, rescales, JPEG qualities) make
larger corpora at typical web sizes without repeating bytes.

The shards are laid out as img2dataset writes image-text corpora: ``KEY.jpg``, ``KEY.txt`` (a short description of
the photo written by a person, :data:`DESCRIPTIONS`: the corpus' alt-text, which the demo stores as ``caption``)
and ``KEY.json`` (the source: where the photo comes from, its original size, the variant).
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera", "coins", "moon", "clock", "brick", "grass", "gravel", "colorwheel", "page")


# What each photo shows, written by hand after looking at it (worded to stay true for the cropped and flipped
# variants the corpus also holds).
DESCRIPTIONS = {
    "astronaut": "Portrait of a smiling astronaut in an orange flight suit, her helmet beside her, with an American "
                 "flag and a model of the space shuttle behind her.",
    "brick": "A grey brick wall laid in long rows, close up.",
    "camera": "Black and white photo of a man in a dark coat looking through a film camera on a tripod in a "
              "grassy field, with buildings far behind him.",
    "chelsea": "Close-up of a tabby cat's face with green eyes and a pink nose.",
    "clock": "A blurry grey picture of a small round wall clock against a plain grey background.",
    "coffee": "A red cup of espresso on a red saucer with a spoon, on a wooden table.",
    "coins": "Black and white photo of rows of old silver coins on a dark background.",
    "colorwheel": "A colour wheel: a disc with every hue around its edge fading to white in the centre, on black.",
    "grass": "Grey close-up texture of a patch of grass.",
    "gravel": "Grey close-up texture of loose gravel stones.",
    "hubble_deep_field": "Hubble deep field: hundreds of faint, colourful distant galaxies on a black sky.",
    "immunohistochemistry": "Microscope image of a tissue section stained brown and blue, with long curved bands of "
                            "cells.",
    "moon": "Grey close-up of the surface of the moon with small craters.",
    "page": "A scanned page of printed text about region-based segmentation with a line of code.",
    "retina": "A photo of the back of a human eye: the orange retina with red blood vessels spreading from the "
              "bright optic disc.",
    "rocket": "A rocket standing on its launch pad at dusk between tall lightning towers, lit by floodlights.",
    "stereo_motorcycle": "A red motorcycle parked in a garage with shelves and boxes behind it.",
}

# where each photo comes from (the json member's url field): scikit-image's data module, by function name
SOURCE_URL = "https://scikit-image.org/docs/stable/api/skimage.data.html#skimage.data.{name}"


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
    """Write ``n_shards`` tar shards of real-photo JPEGs, each with its description (``.txt``) and source
    (``.json``), as img2dataset lays them out; returns their paths."""
    import json

    pics = photos()
    names = sorted(pics)
    paths = []
    n = 0
    for s in range(n_shards):
        samples = []
        for _ in range(per_shard):
            name = names[n % len(names)]
            arr = variant(pics[name], n // len(names), size_range)
            h0, w0 = pics[name].shape[:2]
            source = {"key": f"{n:06d}", "url": SOURCE_URL.format(name=name),
                      "photo": name, "variant": n // len(names), "original_width": int(w0),
                      "original_height": int(h0), "width": int(arr.shape[1]), "height": int(arr.shape[0])}
            samples.append((f"{n:06d}", {"jpg": jpeg_bytes(arr, quality), "txt": DESCRIPTIONS[name].encode(),
                                         "json": json.dumps(source, sort_keys=True).encode()}))
            n += 1
        path = os.path.join(out_dir, f"shard-{s:05d}.tar")
        write_shard(path, samples)
        paths.append(path)
    return paths
