"""The Labeler interface and the name-keyed labeler registry.

A labeler turns the stored rgb image of a sample (plus, for derived labelers, labels of other modalities)
into labels of one or more output modalities. Its lifecycle follows NeMo Curator's stages:

- a frozen ``Config`` dataclass of settings (its hash goes into the manifest);
- declared :class:`Resources` (CPUs, GPUs, memory) that size the Ray actor pool it runs in;
- ``setup()``: load models once per worker;
- ``prepare(batch)`` (optional): the per-sample preprocessing that needs no model (cropping, resizing to the
  model's input size). For a labeler in an actor pool it runs where the batch is assembled (the shard task, on a
  CPU worker), overlapped with the model's work on the previous batch, so the model's process only runs the
  model and a batch travels as small uint8 arrays instead of whole images;
- ``process_batch(batch)``: one result per input sample, in order: a ``{modality: value}`` dict, or a
  :class:`LabelFailure` for a sample that cannot be labelled (the pipeline drops and records it). It accepts
  both the plain :class:`LabelInput` list and what ``prepare`` returned (a :class:`Prepared` list).

Third-party labelers register through the ``modalmill.labelers`` entry-point group (each entry point
names a Labeler subclass, or a module that registers some on import).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..schemas.modalities import get_modality
from ..schemas.plugins import load_plugins, plugins_complete


@dataclass(frozen=True)
class Resources:
    """What one worker of a labeler asks Ray for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_mb: int = 0  # 0: no reservation
    # Ray custom resources per worker, e.g. {"TPU": 1} or an accelerator a cluster declares with `ray start
    # --resources`; fractions pack several workers on one unit, as num_gpus does
    custom: dict[str, float] = field(default_factory=dict)

    def ray_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_mb:
            opts["memory"] = int(self.memory_mb) * 1024 * 1024
        if self.custom:
            opts["resources"] = {str(k): float(v) for k, v in self.custom.items()}
        return opts


def assigned_cpus() -> int:
    """Whole CPUs Ray gave the worker this runs in (at least 1); 1 outside a Ray worker. Never starts a Ray."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return 1
    try:
        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:  # noqa: BLE001 - a driver, not a worker
        cpus = 1.0
    return max(1, int(cpus))


@dataclass
class LabelInput:
    """One sample as a labeler sees it."""

    key: str
    image: np.ndarray  # [H, W, 3] uint8, the decoded stored rgb image (upright)
    original_size: tuple[int, int]  # (width, height) of the source image before any resize
    crops: np.ndarray  # [n_crops, 5] int64 crop settings of this sample
    labels: dict[str, Any] = field(default_factory=dict)  # other modalities' labels (derived labelers)
    source: dict[str, Any] | None = None  # the sample's source json (img2dataset json / parquet columns), if any
    # (width, height) of the stored rgb when ``image`` is a reduced copy of it (JPEG draft decoding, only for jobs
    # whose labelers all declare :meth:`Labeler.crop_side`); None: ``image`` is the stored rgb itself. ``crops``
    # are always in pixels of the stored rgb: :meth:`image_crops` maps them onto ``image``
    stored_size: tuple[int, int] | None = None

    def image_crops(self) -> np.ndarray:
        """``crops`` in pixels of ``image`` (the same array when ``image`` is the stored rgb itself): each box's
        edges scaled by image size / stored size and rounded, at least one pixel, inside the image."""
        crops = np.asarray(self.crops)
        if self.stored_size is None or crops.ndim != 2 or crops.shape[1] != 5:
            return crops
        (sw, sh), (ih, iw) = self.stored_size, self.image.shape[:2]
        if (sw, sh) == (iw, ih):
            return crops
        top, left, h, w, flip = (crops[:, i].astype(np.float64) for i in range(5))
        y0, x0 = np.round(top * ih / sh), np.round(left * iw / sw)
        y1, x1 = np.round((top + h) * ih / sh), np.round((left + w) * iw / sw)
        y0, x0 = np.clip(y0, 0, ih - 1), np.clip(x0, 0, iw - 1)
        h2, w2 = np.clip(y1 - y0, 1, ih - y0), np.clip(x1 - x0, 1, iw - x0)
        return np.stack([y0, x0, h2, w2, flip], axis=1).astype(np.int64)


@dataclass(frozen=True)
class LabelFailure:
    """A sample a labeler could not label; ``reason`` is one line."""

    reason: str


class Prepared(list):
    """What :meth:`Labeler.prepare` returns: one item per sample of the batch, in order (a labeler-specific
    model input, or a :class:`LabelFailure` for a sample that cannot be prepared)."""


@dataclass(frozen=True)
class EmptyConfig:
    pass


class Labeler:
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    outputs: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()  # modalities it reads besides rgb (derived labelers)
    Config: ClassVar[type] = EmptyConfig
    default_resources: ClassVar[Resources] = Resources()
    default_batch_size: ClassVar[int] = 16
    # stateless labelers run inside the shard task; stateful ones (models) in a Ray actor pool
    stateful: ClassVar[bool] = False
    description: ClassVar[str] = ""
    weights: ClassVar[str | None] = None  # default weights location (None: model-free)
    license: ClassVar[str] = "n/a (model-free)"
    quality: ClassVar[str] = ""  # a published accuracy figure of the default weights, with its source

    def __init__(self, config: Any = None):
        self.config = self.make_config(config)

    # ------------------------------------------------------------------ config
    @classmethod
    def make_config(cls, config: Any = None):
        if config is None:
            return cls.Config()
        if isinstance(config, cls.Config):
            return config
        if not isinstance(config, dict):
            raise TypeError(f"labeler {cls.name!r}: config must be a mapping, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"labeler {cls.name!r}: unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known)) or 'none'}"
            )
        try:
            return cls.Config(**config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"labeler {cls.name!r}: {e}") from None

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def config_hash(self) -> str:
        blob = json.dumps({"labeler": self.name, "version": self.version, "config": self.config_dict()},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ lifecycle
    def setup(self) -> None:
        """Load models and other state; called once per worker before the first batch."""

    def prepare(self, batch: list[LabelInput]) -> list:
        """Model-free preprocessing, run before the batch is sent to the labeler's worker (see the module
        docstring). Must not need :meth:`setup`; the default hands the batch on unchanged."""
        return batch

    def process_batch(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        raise NotImplementedError

    def crop_side(self) -> int | None:
        """The largest side, in pixels, of what this labeler reads of the image, or None (the default): it reads
        the stored rgb at its full resolution. A labeler that reads only the crops of its crop settings, each
        resized down to at most this side (a model's square input), through ``LabelInput.image_crops()`` (as
        :func:`modalmill.labelers.dinov2.crop_images` does), returns that side: when every labeler of a job does,
        shard tasks decode each JPEG at the smallest DCT scale (``draft``) at which every crop still has this
        many pixels a side, and hand the labelers that reduced image (``LabelInput.stored_size`` set)."""
        return None

    def checkpoint_id(self) -> str:
        """Content hash of the weights this labeler uses ('' for model-free labelers)."""
        return ""

    def device_key(self) -> str | None:
        """Which device of its node this labeler's batches run on, when Ray cannot tell: a labeler on a device that
        Ray counts only as a custom resource returns its index (e.g. ``"npu:1"``). None (the default): the GPUs Ray
        assigned it, or no device. ``workers: auto`` pools use it to measure each batch's share of its device."""
        return None

    def producer_extra(self) -> dict[str, Any]:
        """More facts the shard marker records about this labeler's outputs (imported ground truth: provenance
        and the source's digest); the manifest keeps its fixed producer fields only."""
        return {}

    def preflight(self) -> str:
        """Check, on the driver and without building any model, that the weights :meth:`setup` would load exist
        and look right; return the id :meth:`checkpoint_id` will have after set-up ('' for model-free labelers).
        Raises ``WeightsError`` (one line: what is missing, where, how to get it). Must be cheap for weights that
        did not change (see :func:`modalmill.io.hashes.cached_content_hash`)."""
        return ""


# ---------------------------------------------------------------------- registry

LABELERS: dict[str, type[Labeler]] = {}
_ENTRY_POINTS_LOADED = False


def register_labeler(cls: type[Labeler]) -> type[Labeler]:
    """Class decorator: add a Labeler subclass to the registry under ``cls.name``."""
    if not cls.name or not cls.outputs:
        raise ValueError(f"{cls.__name__}: a labeler needs a name and at least one output modality")
    for m in cls.outputs + cls.requires:
        get_modality(m)  # raises for an unknown modality
    existing = LABELERS.get(cls.name)
    if existing is not None and existing is not cls:
        if f"{existing.__module__}.{existing.__qualname__}" != f"{cls.__module__}.{cls.__qualname__}":
            taken = f"{existing.__module__}.{existing.__qualname__}"
            raise ValueError(f"labeler name {cls.name!r} is already taken by {taken}")
    LABELERS[cls.name] = cls
    return cls


def load_entry_points() -> None:
    """Import third-party labelers declared in the ``modalmill.labelers`` entry-point group (once per process, see
    :mod:`modalmill.schemas.plugins`) and register the Labeler classes they name."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    objs = load_plugins()
    _ENTRY_POINTS_LOADED = plugins_complete()  # else called while a plugin imports: register what is there so far
    for obj in objs:
        if isinstance(obj, type) and issubclass(obj, Labeler):
            register_labeler(obj)


def get_labeler(name: str) -> type[Labeler]:
    load_entry_points()
    try:
        return LABELERS[name]
    except KeyError:
        raise KeyError(f"unknown labeler {name!r}; known: {', '.join(sorted(LABELERS))}") from None


def labeler_for(modality: str) -> type[Labeler]:
    """The default labeler that produces ``modality`` (the first registered one; never one that needs it as input,
    such as the pose tokenizer, which rewrites ``human_poses`` in place)."""
    load_entry_points()
    for cls in LABELERS.values():
        if modality in cls.outputs and modality not in cls.requires:
            return cls
    raise KeyError(f"no labeler produces modality {modality!r}")
