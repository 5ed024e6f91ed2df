"""modalmill-grayscale: an example of a third-party labeler that adds a new modality to modalmill.

The ``grayscale`` modality is the luminance of the stored ``rgb`` image, an 8-bit greyscale PNG at the stored
image's size (a pixel modality, so it shares the crops of every other pixel modality). modalmill finds the
labeler through the ``modalmill.labelers`` entry point declared in pyproject.toml; importing this module
registers the modality's spec and the labeler, after which every modalmill command knows both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modalmill.labelers import Labeler, register_labeler
from modalmill.schemas import ModalitySpec, register_modality
from modalmill.schemas.modalities import PIXEL
from modalmill.tokenize.labelers import register_token_modality

__all__ = ["GRAYSCALE", "LUMA_WEIGHTS", "TOK_GRAYSCALE", "GrayscaleLabeler"]

# 1. The modality: its folder name, kind, member extension (png, jpg, npy, json or npz: the codec), dtype and
#    symbolic shape. Every record is validated against it before it is written, and `modalmill check` decodes
#    and validates stored members with it.
GRAYSCALE = register_modality(ModalitySpec(
    name="grayscale", kind=PIXEL, ext="png", dtype="uint8", shape=("H", "W"),
    description="luminance of the stored rgb (ITU-R BT.601 or BT.709 weights), 8-bit greyscale PNG"))

LUMA_WEIGHTS = {"bt601": (0.299, 0.587, 0.114), "bt709": (0.2126, 0.7152, 0.0722)}


# 2. The labeler: a name, the modalities it writes, a frozen Config (hashed into the manifest), and
#    process_batch returning one {modality: value} dict (or a LabelFailure) per input, in order.
@register_labeler
class GrayscaleLabeler(Labeler):
    """Luminance of the stored rgb image, one weighted sum of R, G and B per pixel."""

    name = "grayscale"
    version = "1"
    outputs = ("grayscale",)
    description = "luminance of the stored rgb, 8-bit PNG (example plugin: modalmill-grayscale)"
    default_batch_size = 32

    @dataclass(frozen=True)
    class Config:
        standard: str = "bt601"  # which luma weights: bt601 (as PIL's convert("L")) or bt709

        def __post_init__(self):
            if self.standard not in LUMA_WEIGHTS:
                raise ValueError(f"standard must be one of {sorted(LUMA_WEIGHTS)}, got {self.standard!r}")

    def process_batch(self, batch):
        weights = np.asarray(LUMA_WEIGHTS[self.config.standard], dtype=np.float32)
        return [{"grayscale": np.clip(np.rint(inp.image.astype(np.float32) @ weights), 0, 255).astype(np.uint8)}
                for inp in batch]


# 3. Optional: its token modality, so that `modalmill train-tokenizer --modality grayscale` and `modalmill tokenize
#    -m grayscale` handle it like 4M's own pixel modalities (196 tokens per 224x224 crop from at most 8192 codes).
#    modalmill imports this module in every process it starts (the entry point), Ray workers included.
TOK_GRAYSCALE = "tok_grayscale@224"
register_token_modality(TOK_GRAYSCALE, "grayscale", vocab_size=8192, n_tokens=196)
