"""The base of every model labeler: weights, device, precision, batching and the frozen registry config.

A model labeler subclasses :class:`ModelLabeler`, declares its frozen registry entry as class attributes
(timm style: architecture, default ``weights`` location, ``input_size``, ``mean``/``std``, output
modalities, ``license``, ``default_resources``), gives its ``Config`` the common fields of
:class:`ModelConfig` (``weights``, ``device``, ``dtype``) plus its own, and implements two hooks:

- ``build(path)``: build the real architecture from the real package and load the weights found at the
  resolved local ``path`` (fetched by :mod:`modalmill.io.fetch`, loaded by :mod:`modalmill.labelers.state_dicts`:
  safetensors or weights-only torch);
- ``predict(batch)``: one result per item of the batch (called under ``torch.inference_mode()`` and, on a
  GPU, bf16/fp16 autocast when the config asks for it). The items are :class:`LabelInput` s, or what the
  labeler's own ``prepare`` made of them: labelers whose model sees fixed-size square crops (DINOv2, CLIP,
  ImageBind: every crop of the sample's crop settings) cut and resize them on the CPU side with
  :func:`modalmill.labelers.dinov2.prepare_crops`, so the model's process receives uint8 ``[n_crops, S, S, 3]``
  arrays and only normalises them on the device.

``setup()`` resolves the weights once per actor, builds the model, moves it to the device and records the
checkpoint's content hash (it goes into the manifest as ``checkpoint``). Out of memory (CUDA's, or the CPU
allocator's), the model's actor frees the cache, splits the batch and retries down to single samples, then keeps
the batch size that fitted (:mod:`modalmill.labelers.oom`); a sample that fails alone is recorded as ``oom``.
Batches that fail otherwise are split by the pipeline until the failing sample is isolated.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import LabelFailure, LabelInput, Labeler, Prepared, Resources
from .pins import Pin


@dataclass(frozen=True)
class ModelConfig:
    """The settings every model labeler has; subclass Configs repeat these three fields first."""

    weights: str | None = None  # local path, s3:// URL or hub id; None: the registry default
    device: str = "auto"  # auto (cuda when the actor has a GPU) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16 | float16


class ModelLabeler(Labeler):
    stateful = True
    default_resources = Resources(num_cpus=1, num_gpus=0)
    default_batch_size = 8
    Config = ModelConfig
    architecture: ClassVar[str] = ""
    weights: ClassVar[str | None] = None  # default weights location
    weights_pin: ClassVar[Pin | None] = None  # what is known of the default (sha256, size; or why no hash is known)
    weights_help: ClassVar[str] = ""  # where to get them (shown when missing)
    input_size: ClassVar[int | tuple[int, int] | None] = None
    mean: ClassVar[tuple[float, ...] | None] = None
    std: ClassVar[tuple[float, ...] | None] = None
    license: ClassVar[str] = ""

    def __init__(self, config: Any = None):
        super().__init__(config)
        self.model = None
        self.device = None
        self._checkpoint = ""

    # ------------------------------------------------------------------ hooks
    def build(self, path: str):
        """Build the model and load the weights at local ``path``; return the torch module (or a dict of them)."""
        raise NotImplementedError

    def predict(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        raise NotImplementedError

    # ------------------------------------------------------------------ machinery
    def weights_location(self) -> str:
        return self.config.weights or self.weights or ""

    def setup(self) -> None:
        import torch

        from ..io.fetch import resolve
        from ..io.hashes import content_hash

        path = resolve(self.weights_location(), expected=f"{self.architecture} weights for labeler {self.name!r}",
                       how_to_get=self.weights_help, pin=None if self.config.weights else self.weights_pin)
        self._checkpoint = content_hash(path)
        dev = self.config.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        self.model = self.build(path)
        for m in (self.model.values() if isinstance(self.model, dict) else [self.model]):
            if hasattr(m, "eval"):
                m.eval().to(self.device)

    def checkpoint_id(self) -> str:
        """Content hash of the weights (after setup); '' before."""
        return self._checkpoint

    def preflight(self) -> str:
        """The weights resolved as :meth:`setup` resolves them (an ``s3://`` copy is fetched only when its
        ETag/size/LastModified changed) and their content hash, remembered by file stat: what :meth:`setup` will
        record, without building the model. Weights that would have to be downloaded first (a hub id not in the
        local hub cache, when downloads are allowed) are left to the workers: '' (not known here)."""
        from ..io.fetch import needs_download, resolve
        from ..io.hashes import cached_content_hash

        location = self.weights_location()
        if needs_download(location):
            return ""
        pin = getattr(self, "weights_pin", None)  # a registry default's pin, where the registry has them
        kw = {"pin": pin} if pin is not None and not self.config.weights else {}
        path = resolve(location, expected=f"{self.architecture} weights for labeler {self.name!r}",
                       how_to_get=self.weights_help, **kw)
        return cached_content_hash(path)

    def autocast(self):
        import torch

        dtype = self.config.dtype
        if self.device is None or self.device.type != "cuda" or dtype in ("float32", "fp32"):
            return contextlib.nullcontext()
        amp = torch.float16 if dtype in ("float16", "fp16") else torch.bfloat16
        return torch.autocast(device_type="cuda", dtype=amp)

    def prepare(self, batch: list[LabelInput]) -> Prepared:
        return Prepared(batch)

    def process_batch(self, batch: list) -> list[dict[str, Any] | LabelFailure]:
        import torch

        items = batch if isinstance(batch, Prepared) else self.prepare(batch)
        if self.model is None:
            self.setup()
        with torch.inference_mode(), self.autocast():
            return self.predict(list(items))

    # ------------------------------------------------------------------ helpers for subclasses
    def to_tensor(self, images: list[np.ndarray], size: int | tuple[int, int] | None = None,
                  mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        """uint8 HWC images -> a normalised float NCHW batch on the device, resized (bicubic) to ``size``.

        The uint8 batch is moved to the device first and converted/resized there, so the host moves bytes.
        Images that already have the target size (e.g. made by ``prepare``) are not resized again.
        """
        import torch
        import torch.nn.functional as F

        size = size if size is not None else self.input_size
        mean = mean if mean is not None else self.mean
        std = std if std is not None else self.std
        shapes = {im.shape for im in images}
        if size is None and len(shapes) != 1:
            raise ValueError("images of different sizes need a target size")
        hw = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
        if len(shapes) == 1 and (hw is None or next(iter(shapes))[:2] == hw):  # one copy of the whole batch
            x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
        else:
            out = []
            for im in images:
                t = _borrow(np.ascontiguousarray(im)).to(self.device, non_blocking=True)
                t = t.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
                if hw is not None and tuple(t.shape[-2:]) != hw:
                    t = F.interpolate(t, size=hw, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
                out.append(t)
            x = torch.cat(out)
        if mean is not None and std is not None:
            m = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
            s = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
            x = (x - m) / s
        return x


def _borrow(arr: np.ndarray):
    """A tensor sharing ``arr``'s memory, read-only arrays included (images from Ray's object store are): callers
    only read it (the next step, ``.float()``, copies), so torch's not-writable warning does not apply."""
    import torch

    if arr.flags.writeable:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)
