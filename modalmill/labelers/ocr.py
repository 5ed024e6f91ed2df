"""RapidOCR: text detection and recognition with real weights that install offline.

The ``rapidocr`` wheel ships PaddleOCR's PP-OCRv6 small text detector (DB) and recogniser (CTC) and PP-OCR's
text-line orientation classifier as ONNX files, run by ``onnxruntime``; both are dependencies of modalmill, so
every installation (and every test run) has one real-weight model labeler. The bundled files are passed to
rapidocr by path, so it never downloads anything, and their content hash is the labeler's checkpoint id.

- ``rapidocr`` -> ``ocr`` (JSON; not a 4M-21 modality)::

    {"height": H, "width": W, "lines": [{"polygon": [[x, y] x 4], "text": "...", "score": s}]}

  One entry per text line found, in rapidocr's reading order: the line's corners (clockwise from top-left, pixels
  of the stored rgb image), the recognised text and the recogniser's confidence in [0, 1]. Lines scoring below
  ``min_score`` are dropped; ``lines`` is empty for an image without text.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.fetch import WeightsError
from ..io.hashes import files_hash
from .base import LabelFailure, LabelInput, Resources, assigned_cpus, register_labeler
from .model import ModelLabeler
from .modelfree import _image_problem

__all__ = ["RapidOCRLabeler", "rapidocr_model_files"]

RAPIDOCR_VERSION = "3.10.0"
INSTALL_HINT = f"pip install rapidocr=={RAPIDOCR_VERSION} onnxruntime (modalmill's own dependencies)"
# inside the rapidocr package: detector, recogniser, orientation classifier
MODEL_FILES = ("models/PP-OCRv6_det_small.onnx", "models/PP-OCRv6_rec_small.onnx",
               "models/ch_ppocr_mobile_v2.0_cls_mobile.onnx")


def rapidocr_model_files() -> list[str]:
    """Absolute paths of the ONNX models bundled in the installed rapidocr (found without importing it)."""
    spec = importlib.util.find_spec("rapidocr")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"rapidocr is not installed: {INSTALL_HINT}")
    root = next(iter(spec.submodule_search_locations))
    files = [os.path.join(root, r) for r in MODEL_FILES]
    missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if missing:
        raise WeightsError(f"the installed rapidocr has no {', '.join(missing)} (rapidocr=={RAPIDOCR_VERSION} "
                           f"ships them): {INSTALL_HINT}")
    return files


@register_labeler
class RapidOCRLabeler(ModelLabeler):
    """PP-OCRv6 text lines (detector + orientation classifier + recogniser), ONNX on the CPU."""

    name = "rapidocr"
    version = "1"
    outputs = ("ocr",)
    architecture = ("PaddleOCR PP-OCRv6 small: DB text detector, PP-OCR text-line orientation classifier and CTC "
                    "text recogniser (ONNX, run by onnxruntime through rapidocr)")
    weights = f"bundled in rapidocr=={RAPIDOCR_VERSION}: " + ", ".join(os.path.basename(f) for f in MODEL_FILES)
    weights_help = INSTALL_HINT
    license = "Apache-2.0 (rapidocr code and the PaddleOCR models it bundles)"
    default_resources = Resources(num_cpus=1, num_gpus=0, memory_mb=1000)
    default_batch_size = 8
    input_size = 736  # the detector resizes the shorter side to at least 736 px (limit_type min), keeping aspect
    mean = (0.5, 0.5, 0.5)  # detector and recogniser map pixels to [-1, 1]
    std = (0.5, 0.5, 0.5)
    description = "RapidOCR (PP-OCRv6) text lines: polygon, text, score; real weights bundled in rapidocr"

    @dataclass(frozen=True)
    class Config:
        weights: str | None = None  # must stay None: the models bundled in the wheel are used
        device: str = "cpu"
        dtype: str = "float32"
        min_score: float = 0.5  # recognition confidence below which a line is dropped
        threads: int = 0  # onnxruntime threads per actor; 0: the CPUs Ray gave the actor

        def __post_init__(self):
            if not 0.0 <= float(self.min_score) <= 1.0:
                raise ValueError(f"min_score must lie in [0, 1], got {self.min_score!r}")
            if self.device != "cpu":
                raise ValueError(f"the rapidocr labeler runs on the CPU; device must be 'cpu', got {self.device!r}")
            if int(self.threads) < 0:
                raise ValueError(f"threads must be >= 0, got {self.threads!r}")

    def preflight(self) -> str:
        """The bundled model files found (and hashed), without starting onnxruntime."""
        if self.config.weights is not None:
            raise WeightsError(f"labeler {self.name!r} uses the models bundled in rapidocr=={RAPIDOCR_VERSION}; "
                               f"leave `weights` unset (got {self.config.weights!r})")
        return files_hash(rapidocr_model_files())

    def setup(self) -> None:
        self._checkpoint = self.preflight()
        files = rapidocr_model_files()
        self.model = self.build(files)

    def build(self, files: list[str]):
        try:
            from rapidocr import RapidOCR
        except ImportError as e:
            raise WeightsError(f"cannot import rapidocr ({e}): {INSTALL_HINT}") from None
        threads = int(self.config.threads) or assigned_cpus()
        det, rec, cls = files
        return RapidOCR(params={
            "Global.log_level": "error",  # not a warning for every image without text
            "Global.text_score": float(self.config.min_score),
            "Det.model_path": det, "Rec.model_path": rec, "Cls.model_path": cls,
            "EngineConfig.onnxruntime.intra_op_num_threads": threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        })

    def process_batch(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        if self.model is None:
            self.setup()
        return self.predict(batch)  # no torch: onnxruntime runs the graphs

    def predict(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        out: list[dict[str, Any] | LabelFailure] = []
        for inp in batch:
            problem = _image_problem(inp.image)
            out.append(LabelFailure(problem) if problem else {"ocr": self.read(inp.image)})
        return out

    def read(self, rgb: np.ndarray) -> dict[str, Any]:
        h, w = rgb.shape[:2]
        res = self.model(np.ascontiguousarray(rgb[:, :, ::-1]))  # rapidocr takes arrays as BGR
        lines = []
        if res.txts is not None:
            for poly, text, score in zip(np.asarray(res.boxes, dtype=np.float64), res.txts, res.scores):
                if float(score) < float(self.config.min_score):
                    continue
                lines.append({"polygon": np.round(poly.reshape(4, 2), 1).tolist(), "text": str(text),
                              "score": round(float(np.clip(score, 0.0, 1.0)), 5)})
        return {"height": int(h), "width": int(w), "lines": lines}
