"""Streaming tokenizer training data from a modalmill output root (local or ``s3://``).

Only completed shards (with a marker) that hold the source modality are read. For every sample the source
label is read together with its ``crop_settings`` (and the stored ``rgb``, whose size maps crops onto teacher
feature maps) from the shard's tars in lockstep, and cut into crops resized to the tokenizer's input size by
4M's preprocessing (:mod:`modalmill.tokenize.fourm_inputs`) - the same code that writes tokens later. A crop
gives one item, except for the SAM-instance tokenizer (source ``sam_instance``, labels read from ``sam_mask``):
every instance left in the crop is one 64x64 mask in its own box; and body poses give one 207-d vector per person.

Held-out samples are chosen by key, deterministically (the ``ceil(fraction * n)`` keys with the smallest
sha256), so they are never trained on, whatever the number of workers. Training crops are, per draw, one of the
sample's stored crops (with probability ``stored_crop_prob``) or a fresh random resized crop (scale
``(min_crop_scale, 1)``, ratio 3/4..4/3, flipped with probability ``hflip_prob``). Shards are dealt to the
training workers round-robin (rank ``r`` of ``w`` reads shards ``r, r + w, ...``) and re-read every epoch.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from ..io import manifest
from ..io.crops import random_resized_crop
from ..io.readers import zip_output
from ..schemas.modalities import get_modality
from .adapters import body_poses


class DataError(ValueError):
    pass


# tokenizers whose training labels are stored under another modality: the SAM-instance tokenizer learns from the
# raw instances of `sam_mask` (4M's sam_instance file is what it writes)
STORED_LABELS = {"sam_instance": "sam_mask"}


@dataclass
class Sample:
    key: str
    labels: list[Any]  # one label per item (one for images/vectors; one per person for body poses)
    crops: np.ndarray  # [n_crops, 5]
    image_hw: tuple[int, int]


def _image_hw(jpeg: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        return im.height, im.width


def _key_rank(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class TokenizerData:
    """The shards and held-out keys of one source modality in an output root."""

    def __init__(self, root: str, source: str, holdout_fraction: float = 0.2):
        self.root, self.source = root, source
        self.label_modality = STORED_LABELS.get(source, source)
        markers = manifest.list_markers(root)
        if not markers:
            raise DataError(f"{root}: no completed shards (no markers under _modalmill/shards/)")
        need = {self.label_modality, "crop_settings"}
        self.shards = sorted(n for n, m in markers.items() if need <= set(m.get("modalities", {})))
        if not self.shards:
            have = sorted({k for m in markers.values() for k in m.get("modalities", {})})
            lab = self.label_modality
            raise DataError(f"{root}: no shard has {lab!r} (the output has {', '.join(have)}); label it first: "
                            f"modalmill label ... --only {lab}")
        keys = [k for n in self.shards for k in markers[n]["keys"]]
        # what the tokenizer trains on, by content: the shards used and the sha256 of each tar read
        digest = hashlib.sha256()
        for n in self.shards:
            for m in sorted(need | set(self.read_modalities())):
                digest.update(f"{n}/{m}:{markers[n]['modalities'].get(m, {}).get('sha256', '')}\n".encode())
        self.fingerprint = digest.hexdigest()
        n_hold = math.ceil(holdout_fraction * len(keys)) if holdout_fraction > 0 else 0
        if len(keys) >= 2:
            n_hold = min(max(n_hold, 1 if holdout_fraction > 0 else 0), len(keys) - 1)
        self.holdout = set(sorted(keys, key=_key_rank)[:n_hold])
        self.n_keys = len(keys)

    def read_modalities(self) -> list[str]:
        if self.source == "rgb":
            return ["rgb", "crop_settings"]
        if self.source in ("human_poses",) or get_modality(self.source).kind == "global":
            return [self.source, "crop_settings"]
        return [self.label_modality, "crop_settings", "rgb"]

    def samples(self, shard: str) -> Iterator[Sample]:
        mods = self.read_modalities()
        spec = get_modality(self.label_modality)
        for key, files in zip_output(self.root, shard, mods):
            crops = get_modality("crop_settings").decode(files["crop_settings"])
            if self.source == "rgb":
                img = get_modality("rgb").decode(files["rgb"])
                yield Sample(key, [img], crops, img.shape[:2])
                continue
            label = spec.decode(files[self.label_modality])
            if self.source == "human_poses":
                poses = body_poses(label)
                if poses:
                    yield Sample(key, poses, crops, (0, 0))
                continue
            hw = _image_hw(files["rgb"]) if "rgb" in files else (0, 0)
            yield Sample(key, [label], crops, hw)

    def first_label(self) -> Any:
        for shard in self.shards:
            for s in self.samples(shard):
                return s.labels[0]
        raise DataError(f"{self.root}: no {self.source!r} sample to train on")


def draw_crop(rng: random.Random, sample: Sample, stored_prob: float, min_scale: float,
              flip_prob: float) -> np.ndarray:
    if sample.image_hw == (0, 0) or rng.random() < stored_prob:
        i = rng.randrange(len(sample.crops))  # a stored crop carries its row number (per-crop labels)
        return np.append(np.asarray(sample.crops[i], dtype=np.int64)[:5], i)
    h, w = sample.image_hw
    nprng = np.random.default_rng(rng.getrandbits(64))
    top, left, ch, cw = random_resized_crop(nprng, h, w, (min_scale, 1.0), (3 / 4, 4 / 3))
    return np.array([top, left, ch, cw, int(rng.random() < flip_prob)], dtype=np.int64)


def train_batches(data: TokenizerData, adapter, *, batch_size: int, rank: int = 0, world: int = 1,
                  seed: int = 0, crops_per_sample: int = 2, stored_crop_prob: float = 0.5,
                  min_crop_scale: float = 0.8, hflip_prob: float = 0.5, shuffle_buffer: int = 256
                  ) -> Iterator[torch.Tensor]:
    """An endless stream of training batches (targets) for one worker."""
    shards = data.shards[rank::world] or [data.shards[rank % len(data.shards)]]
    rng = random.Random(f"{seed}/{rank}")
    buffer: list[torch.Tensor] = []
    epoch = 0
    while True:
        order = list(shards)
        rng.shuffle(order)
        produced = 0
        for shard in order:
            for s in data.samples(shard):
                if s.key in data.holdout:
                    continue
                for label in s.labels:
                    for _ in range(crops_per_sample):
                        crop = draw_crop(rng, s, stored_crop_prob, min_crop_scale, hflip_prob)
                        got = adapter.items(label, crop, s.image_hw)  # several per crop for SAM instances
                        buffer.extend(got)
                        produced += len(got)
                while len(buffer) >= max(shuffle_buffer, batch_size):
                    yield _pop_batch(buffer, batch_size, rng)
        if produced == 0:
            raise DataError(f"{data.root}: nothing to train the {data.source!r} tokenizer on: every sample is held "
                            f"out (lower holdout_fraction) or has no items (e.g. no SAM instances / people)")
        while len(buffer) >= batch_size:
            yield _pop_batch(buffer, batch_size, rng)
        epoch += 1


def _pop_batch(buffer: list, n: int, rng: random.Random) -> torch.Tensor:
    picks = sorted(rng.sample(range(len(buffer)), n), reverse=True)
    return torch.stack([buffer.pop(i) for i in picks])


def holdout_items(data: TokenizerData, adapter, max_items: int = 256) -> torch.Tensor:
    """Every stored crop of every held-out sample (deterministic order), as one tensor of targets."""
    items: list[torch.Tensor] = []
    for shard in data.shards:
        for s in data.samples(shard):
            if s.key not in data.holdout:
                continue
            for label in s.labels:
                for i, crop in enumerate(s.crops):
                    items.extend(adapter.items(label, np.append(np.asarray(crop, dtype=np.int64)[:5], i),
                                               s.image_hw))
                    if getattr(adapter, "kind", "") == "vector" and adapter.source == "human_poses":
                        break  # a body pose is the same in every crop
                    if len(items) >= max_items:
                        return torch.stack(items[:max_items])
    if not items:
        raise DataError(f"{data.root}: no held-out {data.source!r} samples (raise holdout_fraction)")
    return torch.stack(items)
