"""Out of memory in a model labeler: free the cache, split the batch, retry down to one sample, remember the size.

A model actor (``pipeline.execute.LabelerActor``) runs every batch through one :class:`BatchLimiter`. When the
labeler raises an out-of-memory error (:func:`is_oom`: ``torch.cuda.OutOfMemoryError``/``torch.OutOfMemoryError``,
the CPU allocator's ``RuntimeError`` "DefaultCPUAllocator: can't allocate memory", a ``MemoryError``), the limiter
frees what it can (:func:`free_memory`: ``gc`` and, with CUDA, ``torch.cuda.empty_cache()``), splits the batch in
halves and retries each; a sample that runs out of memory alone becomes a ``LabelFailure`` whose reason starts with
``oom:`` (the manifest records it, stage ``label:<labeler>``). The largest part that then succeeded becomes the
actor's batch limit for the rest of the run: later batches are cut to it before they reach the model, and the
first time the limit is lowered the actor says so (one line on stderr). One large photo in a batch of 16 thus
costs a limit of 8, not 1.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable

from .base import LabelFailure

_CPU_OOM = ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory", "out of memory")


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` says the device (GPU or CPU) ran out of memory."""
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None:
        types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t)
        if types and isinstance(e, types):
            return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _CPU_OOM)


def free_memory() -> None:
    """Drop what the failed attempt left behind: Python garbage, and CUDA's cached blocks when CUDA is in use."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class BatchLimiter:
    """Runs batches through a labeler, splitting on out-of-memory and keeping the batch size that fits."""

    def __init__(self, name: str, say: Callable[[str], None] | None = None):
        self.name = name
        self.limit: int | None = None  # None: batches go through whole
        self.said = False
        self.say = say or (lambda line: print(f"modalmill: {line}", file=sys.stderr, flush=True))

    def run(self, fn: Callable[[list], list], batch: list) -> list:
        """``fn(batch)``, in parts of at most :attr:`limit`; one result per item, ``LabelFailure('oom: ...')`` for
        an item that runs out of memory alone. Other errors propagate."""
        size = self.limit or max(1, len(batch))
        if len(batch) <= size:
            return self._part(fn, batch)  # as given: the labeler may rely on its type (``Prepared``)
        out: list = []
        for i in range(0, len(batch), size):
            out += self._part(fn, _slice(batch, i, i + size))
        return out

    def _part(self, fn: Callable[[list], list], part: list) -> list:
        self._fitted, self._failed = 0, 0  # in this part: the largest size that went through, and that failed
        results = self._fit(fn, part)
        if self._failed and self._fitted and (self.limit is None or self._fitted < self.limit):
            self.limit = self._fitted
            if not self.said:
                self.said = True
                self.say(f"labeler {self.name}: out of memory on a batch of {len(part)}; batches of at most "
                         f"{self.limit} from now on (this worker, for the rest of the run)")
        return results

    def _fit(self, fn: Callable[[list], list], part: list) -> list:
        try:
            results = list(fn(part))
            self._fitted = max(self._fitted, len(part))
            return results
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled here
            if not is_oom(e):
                raise
            free_memory()
            if len(part) == 1:  # too big alone (a huge photo): recorded; the batch limit is not lowered for it
                lines = str(e).strip().splitlines()
                return [LabelFailure(f"oom: {type(e).__name__}: {lines[0] if lines else ''}"[:500])]
            self._failed = max(self._failed, len(part))
        mid = (len(part) + 1) // 2
        return self._fit(fn, _slice(part, 0, mid)) + self._fit(fn, _slice(part, mid, len(part)))


def _slice(batch: list, start: int, stop: int) -> list:
    """``batch[start:stop]`` of the batch's own type (a sliced ``Prepared`` would be a plain list)."""
    part = batch[start:stop]
    return part if type(part) is type(batch) else type(batch)(part)
