"""A corpus of real photographs with planted duplicates, as tar shards, and its ground truth.

Each of scikit-image's photographs (modalmill.jobs.democorpus.PHOTOS) is a *family*: the original (PNG), an exact
copy (the same pixels re-saved as PNG with other compression settings: other bytes, same pixels) and five
variants: JPEG quality 30, resized to 50%, the centre 90% crop, the horizontal mirror, a small colour shift
(+12, -8, +6 on R, G, B). Five more scikit-image images (not photographs of the same scenes) are unrelated
singletons. Keys are shuffled over the shards with a fixed seed, so families cross shard boundaries.
"""

from __future__ import annotations

import io
import itertools
import json
import os

import numpy as np
from PIL import Image

from modalmill.jobs.democorpus import photos, write_shard

VARIANTS = ("jpeg30", "half", "crop90", "hflip", "shift")
UNRELATED = ("cell", "text", "microaneurysms", "shepp_logan_phantom", "horse")


def _png(arr: np.ndarray, level: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=level)
    return buf.getvalue()


def _jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _variant(arr: np.ndarray, name: str) -> tuple[str, bytes]:
    h, w = arr.shape[:2]
    if name == "jpeg30":
        return "jpg", _jpeg(arr, 30)
    if name == "half":
        return "png", _png(np.asarray(Image.fromarray(arr).resize((w // 2, h // 2), Image.Resampling.BILINEAR)))
    if name == "crop90":
        top, left = int(round(h * 0.05)), int(round(w * 0.05))
        return "png", _png(arr[top:h - top, left:w - left])
    if name == "hflip":
        return "png", _png(np.ascontiguousarray(arr[:, ::-1]))
    if name == "shift":
        return "png", _png(np.clip(arr.astype(np.int16) + np.array([12, -8, 6]), 0, 255).astype(np.uint8))
    raise ValueError(name)


def _unrelated() -> dict[str, np.ndarray]:
    import skimage.data as data

    out = {}
    for name in UNRELATED:
        a = np.asarray(getattr(data, name)())
        if a.dtype != np.uint8:
            a = a.astype(np.float64)
            a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-9)).astype(np.uint8)
        out[name] = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
    return out


def build(out_dir: str, n_shards: int = 3, seed: int = 0) -> dict:
    """Write the corpus; returns {"family": {key: family or None}, "role": {key: role}}."""
    items = []  # (family, role, ext, bytes)
    for fam, arr in photos().items():
        items.append((fam, "original", "png", _png(arr, 6)))
        items.append((fam, "copy", "png", _png(arr, 1)))
        items.extend((fam, v, *_variant(arr, v)) for v in VARIANTS)
    items.extend((None, f"unrelated:{name}", "png", _png(a)) for name, a in _unrelated().items())
    order = np.random.default_rng(seed).permutation(len(items))
    os.makedirs(out_dir, exist_ok=True)
    family, role = {}, {}
    per = -(-len(items) // n_shards)
    for s in range(n_shards):
        samples = []
        for j, i in enumerate(order[s * per:(s + 1) * per]):
            fam, r, ext, data = items[i]
            key = f"{s:02d}{j:04d}"
            family[key], role[key] = fam, r
            samples.append((key, {ext: data, "json": json.dumps({"family": fam, "role": r}).encode()}))
        write_shard(os.path.join(out_dir, f"shard-{s:05d}.tar"), samples)
    return {"family": family, "role": role}


def true_pairs(family: dict, roles: dict, which: set[str]) -> set[tuple[str, str]]:
    """Pairs of keys of one family whose roles are both in ``which`` (sorted key order)."""
    by_family: dict[str, list[str]] = {}
    for k, f in family.items():
        if f is not None and roles[k] in which:
            by_family.setdefault(f, []).append(k)
    return {tuple(sorted(p)) for keys in by_family.values() for p in itertools.combinations(keys, 2)}


def predicted_pairs(table) -> set[tuple[str, str]]:
    """Every pair of keys that a dedup result puts in one group."""
    groups: dict[int, list[str]] = {}
    for g, k in zip(table.column("group").to_pylist(), table.column("key").to_pylist()):
        groups.setdefault(g, []).append(k)
    return {tuple(sorted(p)) for keys in groups.values() for p in itertools.combinations(keys, 2)}
