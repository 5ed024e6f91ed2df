"""Benchmark 4's model labeler: a stand-in for a crop-reading model such as DINOv2, as cheap as possible on the CPU.

``bench_crop_model`` runs in an actor pool (a model labeler) and reads what DINOv2 reads: every crop of the crop
settings cut from the stored rgb and resized to 224 x 224 by :func:`modalmill.labelers.dinov2.crop_images` in its
``prepare`` (on the shard task's CPU), so it declares ``crop_side`` 224 and shard tasks decode 12-megapixel JPEGs
reduced (JPEG draft). Its "model" is a fixed random projection of each crop's 16 x 16-pixel means to 8 values (a
few milliseconds of numpy a batch), so the figures are the pipeline's memory, not a model's. Its actor asks for no
CPU (``num_cpus: 0``), as a model on an accelerator leaves the CPUs to the shard tasks.

A module of its own (not ``__main__``): Ray workers import it by name, which registers its modality there too.
"""

from __future__ import annotations

import numpy as np

from modalmill.labelers.base import LabelFailure, Labeler, Prepared, Resources, register_labeler
from modalmill.labelers.dinov2 import prepare_crops
from modalmill.schemas.modalities import ARRAY, ModalitySpec, register_modality

NAME = "bench_crop_model"
SIDE = 224

register_modality(ModalitySpec(NAME, ARRAY, "npy", "float16", (8,),
                               "benchmark only: a fixed random projection of the 224x224 crops' 16x16 means"))


@register_labeler
class CropModel(Labeler):
    name = NAME
    outputs = (NAME,)
    stateful = True
    default_batch_size = 16
    default_resources = Resources(num_cpus=0.0)
    description = "benchmark only: reads 224x224 crops as DINOv2 does; a random projection stands in for the model"

    def setup(self) -> None:
        self.weights = np.random.default_rng(0).standard_normal((3 * (SIDE // 16) ** 2, 8)).astype(np.float32)

    def crop_side(self) -> int | None:
        return SIDE

    def prepare(self, batch) -> Prepared:
        return prepare_crops(batch, SIDE)

    def process_batch(self, batch) -> list:
        items = batch if isinstance(batch, Prepared) else self.prepare(batch)
        out = []
        for it in items:
            if isinstance(it, LabelFailure):
                out.append(it)
                continue
            pooled = it.reshape(len(it), SIDE // 16, 16, SIDE // 16, 16, 3).mean(axis=(2, 4)) / 255.0
            out.append({NAME: (pooled.reshape(len(it), -1) @ self.weights).mean(axis=0).astype(np.float16)})
        return out
