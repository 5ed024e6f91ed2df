"""MediaPipe labelers with real weights that install offline: 2D body keypoints and person masks.

The ``mediapipe==0.10.21`` wheel ships its models (later releases download them at run time), so these two
labelers give real labels on a machine that reaches nothing but the package registry. They are an optional
extra, ``pip install 'modalmill[mediapipe]'``:

- mediapipe 0.10.21 declares ``numpy<2`` and ``protobuf<5``; pip resolves the whole modalmill stack with it
  (numpy 1.26, protobuf 4.25, an older opentelemetry-proto that accepts it, OpenCV 4.11), and Ray's
  dashboard and Jobs API work at protobuf 4.25 (checked: a job submitted to a Ray 2.60 head in such an
  environment). It cannot go into an environment that already has numpy 2 / protobuf >= 5 without breaking
  ``pip check``, and at protobuf 7 its legacy solutions fail at run time (``FieldDescriptor.label`` is gone).
- ``mediapipe`` is imported only when a labeler is set up; without it, set-up fails with a one-line error
  saying how to install it. The registry entries (``modalmill labelers``) need no mediapipe.

Labelers (stateful: one MediaPipe graph per Ray actor, CPU, TFLite/XNNPACK):

- ``mediapipe_pose`` -> ``pose_keypoints`` (JSON)::

    {"height": H, "width": W, "people": [{"keypoints": [[x, y, z, visibility], ...33]}]}

  MediaPipe Pose (BlazePose GHUM full: ``pose_detection.tflite`` + ``pose_landmark_full.tflite``) in static
  image mode finds at most ONE person per image (the legacy solution is single-person); ``people`` is empty
  when none is found. x, y are pixels of the stored rgb image (landmarks of occluded or out-of-frame joints
  can lie outside it), z is MediaPipe's depth relative to the hip midpoint in the same pixel scale as x
  (MediaPipe gives it in units of the image width), visibility in [0, 1]. The 33 landmarks are BlazePose's
  (0 nose ... 11/12 shoulders, 23/24 hips, 31/32 foot index; :data:`POSE_LANDMARKS`).
- ``mediapipe_person_mask`` -> ``person_mask`` (uint8 ``[H, W]``, 0 / 255): MediaPipe Selfie Segmentation
  (``selfie_segmentation.tflite``, the general 256x256 model, or the landscape 144x256 one), every person of
  the image, thresholded at ``threshold``. It is made for people near the camera; small, far figures are
  often missed.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.fetch import WeightsError
from ..io.hashes import files_hash
from .base import LabelFailure, LabelInput, Resources, register_labeler
from .model import ModelLabeler
from .modelfree import _image_problem

__all__ = ["POSE_LANDMARKS", "MediaPipePersonMaskLabeler", "MediaPipePoseLabeler", "mediapipe_model_files"]

MEDIAPIPE_VERSION = "0.10.21"
INSTALL_HINT = ("pip install 'modalmill[mediapipe]' (mediapipe==0.10.21, which ships its models; it needs "
                "numpy<2 and protobuf<5, so use a fresh environment)")

POSE_LANDMARKS = (
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye", "right_eye_outer",
    "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_pinky", "right_pinky", "left_index", "right_index",
    "left_thumb", "right_thumb", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
    "left_heel", "right_heel", "left_foot_index", "right_foot_index",
)

_POSE_FILES = ("modules/pose_detection/pose_detection.tflite", "modules/pose_landmark/pose_landmark_full.tflite")
_SEG_FILES = {0: ("modules/selfie_segmentation/selfie_segmentation.tflite",),
              1: ("modules/selfie_segmentation/selfie_segmentation_landscape.tflite",)}


def mediapipe_model_files(relative: tuple[str, ...]) -> list[str]:
    """Absolute paths of model files inside the installed mediapipe package (found without importing it)."""
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"mediapipe is not installed: {INSTALL_HINT}")
    root = next(iter(spec.submodule_search_locations))
    files = [os.path.join(root, r) for r in relative]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise WeightsError(f"the installed mediapipe has no {', '.join(os.path.basename(m) for m in missing)} "
                           f"(only mediapipe=={MEDIAPIPE_VERSION} ships its models): {INSTALL_HINT}")
    return files


def _import_mediapipe():
    try:
        import mediapipe as mp
    except ImportError as e:
        raise WeightsError(f"cannot import mediapipe ({e}): {INSTALL_HINT}") from None
    return mp


class _MediaPipeLabeler(ModelLabeler):
    """Shared set-up: the bundled model files are the weights (their hash goes into the manifest)."""

    model_files: tuple[str, ...] = ()
    license = "Apache-2.0 (MediaPipe code and bundled models)"
    default_resources = Resources(num_cpus=1, num_gpus=0, memory_mb=1000)
    default_batch_size = 16

    def files(self) -> tuple[str, ...]:
        return self.model_files

    def preflight(self) -> str:
        """The bundled model files found (and hashed), without importing mediapipe's graph runtime."""
        if self.config.weights is not None:
            raise WeightsError(f"labeler {self.name!r} uses the models bundled in mediapipe=={MEDIAPIPE_VERSION}; "
                               f"leave `weights` unset (got {self.config.weights!r})")
        return files_hash(mediapipe_model_files(self.files()))

    def setup(self) -> None:
        self._checkpoint = self.preflight()
        files = mediapipe_model_files(self.files())
        self.mp = _import_mediapipe()
        self.model = self.build(files[0])

    def process_batch(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        if self.model is None:
            self.setup()
        return self.predict(batch)  # no torch, no autocast: MediaPipe runs its own TFLite graph

    def predict(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        out: list[dict[str, Any] | LabelFailure] = []
        for inp in batch:
            problem = _image_problem(inp.image)
            out.append(LabelFailure(problem) if problem else self.label(np.ascontiguousarray(inp.image)))
        return out

    def label(self, image: np.ndarray) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class _CommonConfig:
    weights: str | None = None  # must stay None: the models bundled in the wheel are used
    device: str = "cpu"
    dtype: str = "float32"


@register_labeler
class MediaPipePoseLabeler(_MediaPipeLabeler):
    """MediaPipe Pose (BlazePose GHUM full), single person: 33 2D keypoints."""

    name = "mediapipe_pose"
    version = "1"
    outputs = ("pose_keypoints",)
    architecture = "MediaPipe Pose (BlazePose detector + GHUM full landmark model, TFLite), single person"
    weights = f"bundled in mediapipe=={MEDIAPIPE_VERSION}: " + ", ".join(os.path.basename(f) for f in _POSE_FILES)
    weights_help = INSTALL_HINT
    model_files = _POSE_FILES
    input_size = 256  # the landmark model's input (the detector's is 224)
    mean = (0.5, 0.5, 0.5)  # MediaPipe maps pixels to [-1, 1] inside its graph
    std = (0.5, 0.5, 0.5)
    description = "MediaPipe Pose: 33 body keypoints of (at most) one person (optional extra modalmill[mediapipe])"

    @dataclass(frozen=True)
    class Config(_CommonConfig):
        min_detection_confidence: float = 0.5

        def __post_init__(self):
            if not (0.0 <= float(self.min_detection_confidence) <= 1.0):
                raise ValueError(f"min_detection_confidence must lie in [0, 1], got "
                                 f"{self.min_detection_confidence!r}")
            if self.device != "cpu":
                raise ValueError(f"MediaPipe labelers run on the CPU; device must be 'cpu', got {self.device!r}")

    def build(self, path: str):
        return self.mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1, smooth_landmarks=False,
                                           enable_segmentation=False,
                                           min_detection_confidence=float(self.config.min_detection_confidence))

    def label(self, image: np.ndarray) -> dict[str, Any]:
        h, w = image.shape[:2]
        res = self.model.process(image)
        people = []
        if res.pose_landmarks is not None:
            lm = np.array([(p.x, p.y, p.z, p.visibility) for p in res.pose_landmarks.landmark], dtype=np.float64)
            kp = np.stack([lm[:, 0] * w, lm[:, 1] * h, lm[:, 2] * w, np.clip(lm[:, 3], 0.0, 1.0)], axis=1)
            people.append({"keypoints": np.round(kp, 3).tolist()})
        return {"pose_keypoints": {"height": int(h), "width": int(w), "people": people}}


@register_labeler
class MediaPipePersonMaskLabeler(_MediaPipeLabeler):
    """MediaPipe Selfie Segmentation: a binary mask of the people in the image."""

    name = "mediapipe_person_mask"
    version = "1"
    outputs = ("person_mask",)
    architecture = "MediaPipe Selfie Segmentation (MobileNetV3-style segmenter, TFLite), general or landscape model"
    weights = (f"bundled in mediapipe=={MEDIAPIPE_VERSION}: selfie_segmentation.tflite / "
               "selfie_segmentation_landscape.tflite")
    weights_help = INSTALL_HINT
    input_size = (256, 256)  # general model; landscape: 144x256
    mean = (0.0, 0.0, 0.0)  # MediaPipe maps pixels to [0, 1] inside its graph
    std = (1.0, 1.0, 1.0)
    description = "MediaPipe Selfie Segmentation person mask 0/255 (optional extra modalmill[mediapipe])"

    @dataclass(frozen=True)
    class Config(_CommonConfig):
        model_selection: int = 0  # 0: general (256x256), 1: landscape (144x256)
        threshold: float = 0.5  # person probability at or above which a pixel is 255

        def __post_init__(self):
            if self.model_selection not in (0, 1) or isinstance(self.model_selection, bool):
                raise ValueError(f"model_selection must be 0 (general) or 1 (landscape), got "
                                 f"{self.model_selection!r}")
            if not (0.0 < float(self.threshold) <= 1.0):
                raise ValueError(f"threshold must lie in (0, 1], got {self.threshold!r}")
            if self.device != "cpu":
                raise ValueError(f"MediaPipe labelers run on the CPU; device must be 'cpu', got {self.device!r}")

    def files(self) -> tuple[str, ...]:
        return _SEG_FILES[self.config.model_selection]

    def build(self, path: str):
        return self.mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=self.config.model_selection)

    def label(self, image: np.ndarray) -> dict[str, Any]:
        prob = self.model.process(image).segmentation_mask
        mask = (np.asarray(prob) >= float(self.config.threshold)).astype(np.uint8) * np.uint8(255)
        return {"person_mask": mask}
