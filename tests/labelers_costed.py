"""Model labelers of known cost, for the pool-sizing tests: each holds its device share for a fixed time per image
(``time.sleep``: no CPU used) and writes a tiny array."""

import time
from dataclasses import dataclass

import numpy as np

from modalmill.labelers.base import Labeler, Resources, register_labeler
from modalmill.schemas.modalities import ARRAY, ModalitySpec, register_modality

for _name in ("test_costed_fast", "test_costed_slow"):
    register_modality(ModalitySpec(_name, ARRAY, "npy", "float16", (1,), "tests only: a labeler of known cost"))


@dataclass(frozen=True)
class CostConfig:
    ms_per_image: float = 1.0
    device: str = ""  # what device_key() names ("": None, as a labeler on a custom device that does not say)


class _Costed(Labeler):
    Config = CostConfig
    stateful = True
    default_batch_size = 4
    default_resources = Resources(num_cpus=0.0, custom={"dev": 0.5})

    def device_key(self):
        return self.config.device or None

    def process_batch(self, batch):
        time.sleep(self.config.ms_per_image * len(batch) / 1000)
        return [{self.outputs[0]: np.ones(1, np.float16)} for _ in batch]


@register_labeler
class CostedFast(_Costed):
    name = "test_costed_fast"
    outputs = ("test_costed_fast",)


@register_labeler
class CostedSlow(_Costed):
    name = "test_costed_slow"
    outputs = ("test_costed_slow",)
