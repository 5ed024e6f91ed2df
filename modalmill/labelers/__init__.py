"""Labelers: one module per model family, all registered by name in :data:`LABELERS`.

The tokenizer labelers (``tok_*``, :mod:`modalmill.tokenize.labelers`) sit a layer above and register the way a
third-party plugin does: through the ``modalmill.labelers`` entry point group (``pyproject.toml``), which
:func:`get_labeler`, :func:`labeler_for` and :func:`load_entry_points` load."""

from .base import (LABELERS, LabelFailure, LabelInput, Labeler, Resources, get_labeler, labeler_for,
                   load_entry_points, register_labeler)
from . import modelfree  # noqa: F401  (registers the model-free labelers)
from . import depth  # noqa: F401  (Omnidata depth + normals, Depth Anything)
from . import semseg  # noqa: F401  (Mask2Former COCO-panoptic semseg)
from . import detection  # noqa: F401  (DETR COCO boxes)
from . import derived  # noqa: F401  (metadata derived from other modalities)
from . import dinov2  # noqa: F401  (DINOv2 ViT-B/14 features)
from . import clip  # noqa: F401  (CLIP ViT-B/16 features)
from . import imagebind  # noqa: F401  (ImageBind-H/14 features)
from . import caption  # noqa: F401  (BLIP captions, T5-XXL caption embeddings)
from . import quality  # noqa: F401  (LAION aesthetic predictor and watermark detector)
from . import nsfw  # noqa: F401  (LAION CLIP-based NSFW detector, converted from its Keras SavedModel)
from . import sam  # noqa: F401  (SAM ViT-H instances + instance edges)
from . import humans  # noqa: F401  (4D-Humans HMR 2.0 SMPL poses of detected people)
from . import mediapipe_labelers  # noqa: F401  (MediaPipe pose keypoints, person masks: optional extra)
from . import ocr  # noqa: F401  (RapidOCR PP-OCRv6 text lines: real weights bundled in rapidocr)
from . import imported  # noqa: F401  (ground truth brought by `modalmill import`; last: never a default labeler)

__all__ = ["LABELERS", "LabelFailure", "LabelInput", "Labeler", "Resources", "get_labeler", "labeler_for",
           "load_entry_points", "register_labeler"]
