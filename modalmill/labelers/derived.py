"""4M-21 metadata derived from other modalities: the rest of the ``metadata`` fields.

The model-free ``metadata`` labeler (:class:`modalmill.labelers.modelfree.MetadataLabeler`) computes what the
image alone gives. The fields below need other modalities' labels, so they are computed once those exist
(in the same job, or later with ``--only metadata``); the image statistics are recomputed by calling the
model-free labeler, so a derived ``metadata`` record is a superset of the model-free one with identical
values for the shared fields.

Design: the pipeline hands a labeler exactly the modalities its class attribute ``requires`` lists, and a
labeler computes a field only from what it requires (never from whatever else happens to be in the job),
so the same sample gets the same record in a full run and in an ``--only`` run. One class therefore serves
one combination of inputs. :class:`DerivedMetadataLabeler` is the implementation; three variants are
registered, and :func:`derived_metadata_labeler` makes (and registers) one for any other combination:

==============================  ==========================================  =========================================
labeler                         requires                                    adds (to the image statistics)
==============================  ==========================================  =========================================
``metadata_derived``            semseg_coco, det                            n_coco_instances, coco_instance_diversity,
                                                                            n_humans, occlusion_score,
                                                                            semantic_diversity, walkability, objectness
``metadata_derived_geometry``   semseg_coco, det, normal                    the above + geometric_complexity
``metadata_derived_full``       semseg_coco, det, normal, caption           the above + caption_n_chars,
                                                                            caption_n_words, caption_n_sentences
``metadata_derived_4m21``       semseg_coco, det, normal, caption,          the above + n_sam_instances: every
                                sam_mask                                    4M-21 field modalmill computes
``metadata_quality``            aesthetic_score, watermark_score            aesthetic_score, watermark_score (a score
                                                                            the input carries wins)
==============================  ==========================================  =========================================

Pick one in the job spec (``labelers: {metadata_derived_geometry: {}}``) and run ``--only metadata --force``
on an output that already has the required modalities (``--force`` because the stored ``metadata`` was made
by another labeler), or list ``metadata`` after the modalities it needs in a full run.

Definitions (4M-21 publishes the metadata names and the trainer's binning ranges, not the formulas; these are
standard choices, and every value is clipped into 4M's range, ``METADATA_RANGES``):

From ``det`` (instances with ``score >= det_threshold``; by default the box threshold the record's detector
wrote, comparable to 4M-21's ViTDet-H >= 0.6, or 0.6 for a record without one; see ``labelers/detection.py``):

- ``n_coco_instances``: their number.
- ``coco_instance_diversity``: the number of distinct class names among them.
- ``n_humans``: the number of them whose class is ``person``.
- ``occlusion_score`` (0..0.25): the fraction of the area covered by at least one box that is covered by two
  or more, ``area(boxes overlapping) / area(union of boxes)`` (exact, from the normalised boxes); 0 with fewer
  than two boxes. It measures how much the detected objects overlap in the image plane, i.e. how much of them
  can be hidden behind each other. Clipped to 4M's maximum 0.25.

From ``semseg_coco`` (over the labelled pixels, i.e. those not 255; 0 when none is labelled):

- ``semantic_diversity``: the number of distinct class ids present.
- ``objectness`` (0..1): the fraction of pixels of a COCO *thing* class (ids 0..79).
- ``walkability`` (0..1): the fraction of pixels of a surface one can walk on, the COCO-panoptic stuff
  classes :data:`WALKABLE_CLASSES`: floor-wood, floor-other-merged, rug-merged, pavement-merged, road,
  playingfield, platform, stairs, grass-merged, dirt-merged, sand, gravel, snow.

From ``normal``:

- ``geometric_complexity`` (0..0.75): the spherical variance of the surface normals, ``1 - |mean(n)|`` over
  all pixels with ``n`` the stored normal mapped back from 0..255 to [-1, 1] and renormalised to unit length
  (Mardia & Jupp, *Directional Statistics*, 2000, sec. 9.2.1). 0 for a single plane; normals spread evenly
  over the visible hemisphere give 0.5. Clipped to 4M's maximum 0.75.

From ``caption`` (its first entry: a string, or ``{"caption": str}``):

- ``caption_n_chars``: the number of characters; ``caption_n_words``: the number of whitespace-separated
  words; ``caption_n_sentences``: the number of non-blank pieces left by splitting at runs of ``.``, ``!``
  or ``?``. An empty caption list gives zeros.

From ``sam_mask`` (the SAM labeler's raw instances, before the tokenize stage crops them):

- ``n_sam_instances``: the number of instances SAM's automatic mask generator kept for the whole stored image
  (after its own IoU/stability/NMS filtering, the instances 4M's ``sam_instance`` modality is made from).

Counts are ints; fractions are rounded to ``decimals`` places. ``watermark_score`` and
``aesthetic_score`` come from the input when the corpus carries them (``input_scores``, as the model-free
labeler reads them: :mod:`modalmill.io.scores`); the scoring models are :mod:`modalmill.labelers.quality`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..schemas.modalities import get_modality
from .base import Labeler, LabelFailure, LabelInput, register_labeler
from ..io.scores import DEFAULT_INPUT_SCORES
from .modelfree import MetadataLabeler, _clip_round, checked_input_scores, metadata_config_dict
from .semseg import COCO_PANOPTIC_CLASSES, N_COCO_THINGS, UNLABELLED

__all__ = [
    "SOURCES",
    "WALKABLE_CLASSES",
    "DerivedMetadataLabeler",
    "caption_stats",
    "derived_metadata_labeler",
    "det_stats",
    "geometric_complexity",
    "occlusion_score",
    "sam_stats",
    "semseg_stats",
]

WALKABLE_CLASSES: tuple[str, ...] = (
    "floor-wood", "floor-other-merged", "rug-merged", "pavement-merged", "road", "playingfield", "platform",
    "stairs", "grass-merged", "dirt-merged", "sand", "gravel", "snow",
)
_WALKABLE_IDS = np.array([COCO_PANOPTIC_CLASSES.index(c) for c in WALKABLE_CLASSES])

# which modality each derived field is computed from
SOURCES: dict[str, tuple[str, ...]] = {
    "det": ("n_coco_instances", "coco_instance_diversity", "n_humans", "occlusion_score"),
    "semseg_coco": ("semantic_diversity", "objectness", "walkability"),
    "normal": ("geometric_complexity",),
    "caption": ("caption_n_chars", "caption_n_words", "caption_n_sentences"),
    "sam_mask": ("n_sam_instances",),
    "aesthetic_score": ("aesthetic_score",),  # the scalar modalities of labelers/quality.py
    "watermark_score": ("watermark_score",),
}
SCORES = ("aesthetic_score", "watermark_score")  # an input's own score (io/scores.py) wins over the model's


# ---------------------------------------------------------------------- the formulas


def occlusion_score(boxes: np.ndarray) -> float:
    """``area(covered by >= 2 boxes) / area(covered by >= 1)`` for ``[N, 4]`` (xmin, ymin, xmax, ymax) boxes.

    Exact: the plane is cut at every box edge and each cell's coverage is counted with a 2-D difference array.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    if len(boxes) < 2:
        return 0.0
    xs, ys = np.unique(boxes[:, [0, 2]]), np.unique(boxes[:, [1, 3]])
    x0, x1 = np.searchsorted(xs, boxes[:, 0]), np.searchsorted(xs, boxes[:, 2])
    y0, y1 = np.searchsorted(ys, boxes[:, 1]), np.searchsorted(ys, boxes[:, 3])
    diff = np.zeros((len(ys) + 1, len(xs) + 1), np.int64)
    np.add.at(diff, (y0, x0), 1)
    np.add.at(diff, (y0, x1), -1)
    np.add.at(diff, (y1, x0), -1)
    np.add.at(diff, (y1, x1), 1)
    cover = diff.cumsum(0).cumsum(1)[:-2, :-2]  # [len(ys) - 1, len(xs) - 1] cells
    area = np.outer(np.diff(ys), np.diff(xs))
    union = float(area[cover >= 1].sum())
    return float(area[cover >= 2].sum()) / union if union > 0 else 0.0


def det_stats(det: Any, threshold: float | None = None) -> dict[str, float]:
    """n_coco_instances, coco_instance_diversity, n_humans and occlusion_score of a ``det`` record (instances
    scoring at least ``threshold``; None: the record's detector's box threshold)."""
    if threshold is None:
        from .detection import det_thresholds

        threshold = det_thresholds(det)[0]
    kept = [inst for inst in det["instances"] if float(inst["score"]) >= threshold]
    boxes = np.array([inst["boxes"] for inst in kept], dtype=np.float64).reshape(-1, 4)
    return {
        "n_coco_instances": len(kept),
        "coco_instance_diversity": len({inst["class_name"] for inst in kept}),
        "n_humans": sum(1 for inst in kept if inst["class_name"] == "person"),
        "occlusion_score": occlusion_score(boxes),
    }


def semseg_stats(semseg: np.ndarray) -> dict[str, float]:
    """semantic_diversity, objectness and walkability of a ``semseg_coco`` map."""
    counts = np.bincount(np.asarray(semseg, dtype=np.uint8).ravel(), minlength=256)
    counts[UNLABELLED] = 0
    n = int(counts.sum())
    if n == 0:
        return {"semantic_diversity": 0, "objectness": 0.0, "walkability": 0.0}
    return {
        "semantic_diversity": int(np.count_nonzero(counts)),
        "objectness": float(counts[:N_COCO_THINGS].sum()) / n,
        "walkability": float(counts[_WALKABLE_IDS].sum()) / n,
    }


def geometric_complexity(normal: np.ndarray) -> float:
    """Spherical variance ``1 - |mean unit normal|`` of a stored ``normal`` map (uint8 [H, W, 3])."""
    n = np.asarray(normal, dtype=np.float64).reshape(-1, 3) / 127.5 - 1.0
    norm = np.linalg.norm(n, axis=1)
    n = n[norm > 1e-6] / norm[norm > 1e-6, None]
    if not len(n):
        return 0.0
    return float(1.0 - np.linalg.norm(n.mean(axis=0)))


_SENTENCE_END = re.compile(r"[.!?]+")


def caption_stats(caption: Any) -> dict[str, int]:
    """caption_n_chars, caption_n_words, caption_n_sentences of a caption label's first entry."""
    items = caption if isinstance(caption, list) else [caption]
    first = items[0] if items else ""
    text = first.get("caption", "") if isinstance(first, dict) else str(first)
    return {
        "caption_n_chars": len(text),
        "caption_n_words": len(text.split()),
        "caption_n_sentences": sum(1 for piece in _SENTENCE_END.split(text) if piece.strip()),
    }


def sam_stats(sam_mask: Any) -> int:
    """n_sam_instances of a ``sam_mask`` record: its number of instances."""
    instances = sam_mask["instances"]
    if not isinstance(instances, list):
        raise TypeError(f"sam_mask instances must be a list, got {type(instances).__name__}")
    return len(instances)


# ---------------------------------------------------------------------- the labeler


class DerivedMetadataLabeler(Labeler):
    """Image-statistics metadata plus the fields derived from the modalities in ``requires``.

    Not registered itself: the registered variants and :func:`derived_metadata_labeler` subclass it with a
    ``name`` and ``requires``. See the module docstring for every definition.
    """

    version = "1"
    outputs = ("metadata",)
    requires: tuple[str, ...] = ()
    default_batch_size = 32
    license = "n/a (model-free; derived from other modalities)"

    @dataclass(frozen=True)
    class Config:
        decimals: int = 4  # float values are rounded to this many decimal places
        det_threshold: float | None = None  # det instances with score >= this count (None: the detector's own)
        # metadata field -> source json column read from the input (io/scores.py); {} reads none
        input_scores: Any = DEFAULT_INPUT_SCORES

        def __post_init__(self):
            object.__setattr__(self, "input_scores", checked_input_scores(self.input_scores))
            if isinstance(self.decimals, bool) or not isinstance(self.decimals, int) or not 0 <= self.decimals <= 12:
                raise ValueError(f"decimals must be an int in [0, 12], got {self.decimals!r}")
            if self.det_threshold is not None and not (0 <= self.det_threshold <= 1):
                raise ValueError(f"det_threshold must lie in [0, 1], got {self.det_threshold!r}")

    def config_dict(self) -> dict[str, Any]:
        return metadata_config_dict(self.config)

    def setup(self) -> None:
        self._stats = MetadataLabeler({"decimals": self.config.decimals, "input_scores": self.config.input_scores})

    def derived(self, labels: dict[str, Any]) -> dict[str, float]:
        """The derived fields (unclipped, unrounded) from the required modalities' labels."""
        out: dict[str, float] = {}
        if "det" in self.requires:
            out.update(det_stats(labels["det"], self.config.det_threshold))
        if "semseg_coco" in self.requires:
            out.update(semseg_stats(labels["semseg_coco"]))
        if "normal" in self.requires:
            out["geometric_complexity"] = geometric_complexity(labels["normal"])
        if "caption" in self.requires:
            out.update(caption_stats(labels["caption"]))
        if "sam_mask" in self.requires:
            out["n_sam_instances"] = sam_stats(labels["sam_mask"])
        for score in SCORES:
            if score in self.requires:
                out[score] = float(np.asarray(labels[score], dtype=np.float64).reshape(-1)[0])
        return out

    def process_batch(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        if not hasattr(self, "_stats"):
            self.setup()
        results: list[dict[str, Any] | LabelFailure] = []
        for inp, base in zip(batch, self._stats.process_batch(batch)):
            if isinstance(base, LabelFailure):
                results.append(base)
                continue
            missing = [m for m in self.requires if m not in inp.labels]
            if missing:
                results.append(LabelFailure(f"{self.name} needs the {', '.join(missing)} label(s), which this "
                                            "sample lacks"))
                continue
            try:
                derived = self.derived(inp.labels)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                results.append(LabelFailure(f"{self.name}: unreadable input label ({type(e).__name__}: {e})"[:500]))
                continue
            meta = dict(base["metadata"])
            for name, value in derived.items():
                if name in SCORES and name in meta:  # the input carried this score
                    continue
                meta[name] = int(value) if isinstance(value, (int, np.integer)) else \
                    _clip_round(name, value, self.config.decimals)
            results.append({"metadata": meta})
        return results


def derived_metadata_labeler(name: str, requires: tuple[str, ...] | list[str], register: bool = True,
                             description: str = "") -> type[DerivedMetadataLabeler]:
    """A :class:`DerivedMetadataLabeler` named ``name`` that reads ``requires`` (any of det, semseg_coco,
    normal, caption, sam_mask), registered under ``name`` unless ``register`` is False."""
    requires = tuple(dict.fromkeys(requires))
    unknown = [m for m in requires if m not in SOURCES]
    if not requires or unknown:
        raise ValueError(f"derived metadata can be computed from {sorted(SOURCES)}; got {list(requires)}")
    for m in requires:
        get_modality(m)
    fields = [f for m in requires for f in SOURCES[m]]
    qualname = "".join(part.capitalize() for part in re.split(r"[^0-9A-Za-z]+", name) if part)
    cls = type(qualname, (DerivedMetadataLabeler,), {
        "__module__": __name__,
        "__qualname__": qualname,
        "__doc__": f"4M-21 metadata: image statistics + {', '.join(fields)} (from {', '.join(requires)}).",
        "name": name,
        "requires": requires,
        "description": description or f"image-statistics metadata + {', '.join(fields)} (needs {', '.join(requires)})",
    })
    return register_labeler(cls) if register else cls


MetadataDerived = derived_metadata_labeler("metadata_derived", ("semseg_coco", "det"))
MetadataDerivedGeometry = derived_metadata_labeler("metadata_derived_geometry", ("semseg_coco", "det", "normal"))
MetadataDerivedFull = derived_metadata_labeler("metadata_derived_full", ("semseg_coco", "det", "normal", "caption"))
MetadataDerived4M21 = derived_metadata_labeler("metadata_derived_4m21",
                                               ("semseg_coco", "det", "normal", "caption", "sam_mask"))
MetadataQuality = derived_metadata_labeler("metadata_quality", ("aesthetic_score", "watermark_score"),
                                           description="image-statistics metadata + aesthetic_score and "
                                                       "watermark_score (the input's, else LAION's models')")
