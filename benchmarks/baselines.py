"""What the pipeline is compared with: the same per-image work without modalmill's pipeline around it.

- :func:`plain_loop`: one Python process, one shard after another: the same reader, decode, crop settings,
  labelers' ``process_batch``, modality encoders and tar writer as a modalmill shard task, and nothing else
  (no Ray, no failure isolation, no manifests or markers). Its tars are byte-identical to modalmill's.
- :func:`ray_data_script`: what a user would write instead with Ray Data: ``read_webdataset`` ->
  ``map_batches`` with an actor pool doing the same per-image work -> ``write_webdataset``. Its actors size
  OpenCV's and torch's thread pools to their Ray CPUs exactly as modalmill's shard tasks do (``limit_threads``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from modalmill.labelers.base import LabelInput, get_labeler
from modalmill.io.crops import CropConfig, make_crop_settings
from modalmill.io.decode import DecodeConfig, decode_image
from modalmill.io.readers import iter_tar, pick_image_member, shard_name
from modalmill.io.writers import ShardWriterSet
from modalmill.schemas.modalities import get_modality

LABELERS = ("canny_edge", "color_palette", "metadata")


def make_labelers(names=LABELERS) -> list:
    out = []
    for name in names:
        lab = get_labeler(name)()
        lab.setup()
        out.append(lab)
    return out


def label_one_batch(labelers, batch: list[tuple[str, Any, np.ndarray]], write: tuple[str, ...]) -> list[dict]:
    """``batch`` of (key, DecodedImage, crops) -> one ``{modality: encoded bytes}`` per sample, as a shard
    task makes them (labelers in order, every output encoded by its modality's codec)."""
    inputs = [LabelInput(key=k, image=d.image, original_size=d.original_size, crops=c) for k, d, c in batch]
    payloads: list[dict[str, bytes]] = []
    for key, dec, crops in batch:
        p = {}
        if "rgb" in write:
            p["rgb"] = dec.stored_bytes
        if "crop_settings" in write:
            p["crop_settings"] = get_modality("crop_settings").encode(crops, key)
        payloads.append(p)
    for lab in labelers:
        results = lab.process_batch(inputs)
        for inp, res, p in zip(inputs, results, payloads):
            hw = inp.image.shape[:2]
            for m in lab.outputs:
                if m in write:
                    p[m] = get_modality(m).encode(res[m], inp.key, hw)
                inp.labels[m] = res[m]
    return payloads


def plain_loop(paths: list[str], out: str, write: tuple[str, ...], batch_size: int = 16,
               decode: DecodeConfig | None = None, crops: CropConfig | None = None, seed: int = 0) -> int:
    """Label ``paths`` (tar shards) into ``out`` in this process; returns the number of images written."""
    decode, crops = decode or DecodeConfig(), crops or CropConfig()
    labelers = make_labelers([n for n in LABELERS if n in write])
    n = 0

    def flush(batch: list, writers: ShardWriterSet) -> None:
        for (key, _, _), payload in zip(batch, label_one_batch(labelers, batch, write)):
            writers.write_sample(key, payload)
        batch.clear()

    for index, path in enumerate(paths):
        writers = ShardWriterSet(out, shard_name(index), {m: get_modality(m).ext for m in write})
        batch: list = []

        for raw in iter_tar(path):
            dec = decode_image(pick_image_member(raw.members)[1], decode)
            h, w = dec.image.shape[:2]
            batch.append((raw.key, dec, make_crop_settings(raw.key, h, w, crops, seed)))
            n += 1
            if len(batch) >= batch_size:
                flush(batch, writers)
        flush(batch, writers)
        writers.commit()
    return n


# ---------------------------------------------------------------------- Ray Data


class RayDataLabeling:
    """The map_batches UDF of the Ray Data script: decode, crops, labelers and encodes for a batch of rows."""

    def __init__(self, write: tuple[str, ...], decode: DecodeConfig | None = None, crops: CropConfig | None = None,
                 seed: int = 0):
        # Same thread settings as modalmill's shard tasks and actors: OpenCV and torch sized to this worker's Ray
        # CPUs (left at its default, OpenCV starts one thread per core in every actor)
        from modalmill.pipeline.execute import limit_threads

        self.threads = limit_threads()
        decode, crops = decode or DecodeConfig(), crops or CropConfig()
        self.write, self.decode, self.crops, self.seed = write, decode, crops, seed
        self.labelers = make_labelers([n for n in LABELERS if n in write])
        self.columns = {m: f"{m}.{get_modality(m).ext}" for m in write}

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = []
        for key, data in zip(rows["__key__"], rows["jpg"]):
            dec = decode_image(bytes(data), self.decode)
            h, w = dec.image.shape[:2]
            batch.append((str(key), dec, make_crop_settings(str(key), h, w, self.crops, self.seed)))
        payloads = label_one_batch(self.labelers, batch, self.write)
        out = {"__key__": np.array([k for k, _, _ in batch], dtype=object)}
        for m, col in self.columns.items():
            out[col] = np.array([p[m] for p in payloads], dtype=object)
        return out


def ray_data_script(paths: list[str], out: str, write: tuple[str, ...], workers: int = 2, batch_size: int = 16) -> None:
    """The straightforward Ray Data version (Ray must be initialised)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = ray.data.read_webdataset(paths, decoder=None)
    # Each actor asks for half a CPU: with num_cpus=1 the pool takes every CPU of a 2-CPU machine and Ray Data
    # 2.60 never schedules the read and write tasks (the job hangs, "backpressured: ResourceBudget").
    ds = ds.map_batches(RayDataLabeling, fn_constructor_args=(write,), batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=0.5)
    os.makedirs(out, exist_ok=True)
    ds.write_webdataset(out, encoder=None)


def ray_data_members(out: str) -> dict[str, dict[str, bytes]]:
    """{key: {modality: bytes}} of everything the Ray Data script wrote (for the same-work check)."""
    got: dict[str, dict[str, bytes]] = {}
    for fn in sorted(os.listdir(out)):
        if not fn.endswith(".tar"):
            continue
        for sample in iter_tar(os.path.join(out, fn)):
            got[sample.key] = {ext.split(".")[0]: data for ext, data in sample.members.items()}
    return got
