"""A scalar modality (shape ``()``: one number per sample) and the labeler that writes it, for tests only (imported by
the tests that use it, and by Ray workers when they unpickle the labeler)."""

from __future__ import annotations

import numpy as np

from modalmill.labelers.base import Labeler, register_labeler
from modalmill.schemas.modalities import ARRAY, ModalitySpec, register_modality

BRIGHTNESS = register_modality(ModalitySpec("test_brightness", ARRAY, "npy", "float32", (),
                                            "mean brightness of the stored rgb in [0, 1], one number per sample"))


@register_labeler
class Brightness(Labeler):
    """Writes the mean brightness of the stored rgb as a 0-d float32 array."""

    name = "test_brightness"
    outputs = ("test_brightness",)

    def process_batch(self, batch):
        return [{"test_brightness": np.asarray(inp.image.mean() / 255.0, dtype=np.float32)} for inp in batch]
