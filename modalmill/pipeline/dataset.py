"""The trainer-side loader: stream an output root (local or ``s3://``) as aligned multimodal samples.

``load_dataset(root, modalities=[...])`` returns a :class:`ModalDataset`, a PyTorch ``IterableDataset`` built
as a webdataset pipeline::

    shard list (completed shards only) -> shuffle(seed, epoch) -> split by rank -> split by DataLoader worker
    -> zip the modality tars of each shard in order (alignment check) -> [sample shuffle buffer] -> decode

**Which shards.** Only shards with a completion marker (``_modalmill/shards/shard-N.json``) are read, so a
shard that is still being written (or failed) never reaches a trainer. Every requested modality must be in
every marker; otherwise construction fails with a list of the shards that lack it.

**Alignment.** As in 4M's loader, shard N of every requested modality is opened and the tars are zipped in
order; the key at each position must be the same in every tar and equal the marker's key list. On divergence
(or a tar that ends early) iteration raises :class:`AlignmentError` naming the shard, the position and the keys
(4M skips such a shard silently; here it is an error: run ``modalmill check ROOT``).

**Order and splitting.** With ``shuffle_shards`` (default) the shard order is a permutation seeded by
``(seed, epoch)``; call :meth:`ModalDataset.set_epoch` before each epoch (it reaches DataLoader workers when
they are re-created each epoch, i.e. ``persistent_workers=False``). Shards are then dealt round-robin to the
``world_size`` ranks and, within a rank, to the DataLoader workers: every shard is read by exactly one worker of
one rank per epoch. ``rank``/``world_size`` default to ``torch.distributed`` when it is initialised, else to the
``RANK``/``WORLD_SIZE`` environment variables, else 0/1. ``shuffle_buffer=N`` adds webdataset's sample
shuffle buffer (seeded by seed, epoch, rank and worker).

**What a sample is.** A dict with ``__key__`` (the sample key), ``__shard__`` (``"shard-00003"``) and one entry
per requested modality, decoded with the modality registry's codec and converted as follows:

========================================== =========================================================
kind                                        value
========================================== =========================================================
``rgb`` and pixel labels                    ``torch.Tensor`` **CHW**, dtype as stored: ``rgb``/``normal``
                                            uint8 ``[3, H, W]``; ``depth`` uint16 ``[1, H, W]``;
                                            ``semseg_coco``/edges uint8 ``[1, H, W]``
``tok_*``                                   ``torch.long`` ``[n_crops, n_tokens]`` (stored as int16)
feature maps (``clip``, ``dinov2``, ...)    ``torch.float16`` ``[h, w, C]`` (layout as stored)
global embeddings                           ``torch.float16`` ``[C]``
``crop_settings``                           ``torch.long`` ``[n_crops, 5]`` (top, left, height, width, hflip)
``t5_caption``                              ``{"emb": float16 tensor, "mask_valid": bool tensor}``
JSON / text (caption, det, metadata, ...)   the Python object (``json.loads``)
========================================== =========================================================

Images differ in size between samples, so batch with a collate function that crops (``crop_settings``) or
use ``DataLoader(batch_size=None)``. ``decode=False`` yields each modality's raw member bytes instead.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.tariterators import group_by_keys, tar_file_expander

from ..schemas.modalities import IMAGE, PIXEL, TOKENS, ModalitySpec, get_modality
from . import manifest, storage
from .check import accepted_exts, decode_member

logger = logging.getLogger(__name__)

__all__ = ["AlignmentError", "ModalDataset", "load_dataset", "to_torch"]


class AlignmentError(RuntimeError):
    """The modality tars of a shard do not hold the same keys in the same order."""


@dataclass(frozen=True)
class ShardRef:
    name: str  # "shard-00003"
    keys: tuple[str, ...]  # the marker's key list


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        d_rank, d_world = 0, 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            d_rank, d_world = dist.get_rank(), dist.get_world_size()
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            try:
                d_rank, d_world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            except ValueError:
                raise ValueError(f"RANK={os.environ['RANK']!r} / WORLD_SIZE={os.environ['WORLD_SIZE']!r} "
                                 "are not integers") from None
        rank = d_rank if rank is None else rank
        world_size = d_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size); got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def to_torch(spec: ModalitySpec, value: Any) -> Any:
    """A decoded label as the loader yields it (see the module docstring's table)."""
    if isinstance(value, dict):
        return {k: to_torch(spec, v) for k, v in value.items()}
    if not isinstance(value, np.ndarray) or value.dtype == object:
        return value
    if spec.kind in (IMAGE, PIXEL):
        return _tensor(value[None] if value.ndim == 2 else value.transpose(2, 0, 1))
    if spec.kind == TOKENS or spec.name == "crop_settings":
        return torch.from_numpy(value.astype(np.int64))
    return _tensor(value)


def _tensor(arr: np.ndarray) -> torch.Tensor:
    arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # PIL's arrays are read-only


def _modality_stream(url: str, stack: ExitStack) -> Iterator[dict]:
    """webdataset samples ({"__key__", ext: bytes}) of one tar, opened through storage.open_read."""
    stream = stack.enter_context(storage.open_read(url))
    files = tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
    return group_by_keys(files)


class ModalDataset(IterableDataset):
    """Aligned multimodal samples of a modalmill output; see the module docstring."""

    def __init__(self, root: str, modalities: list[str] | tuple[str, ...], *, shuffle_shards: bool = True,
                 seed: int = 0, epoch: int = 0, rank: int | None = None, world_size: int | None = None,
                 shuffle_buffer: int = 0, decode: bool = True):
        super().__init__()
        if isinstance(modalities, str):
            modalities = [m.strip() for m in modalities.split(",") if m.strip()]
        self.modalities = list(dict.fromkeys(modalities))
        if not self.modalities:
            raise ValueError("load_dataset needs at least one modality")
        self.specs = {}
        for m in self.modalities:
            try:
                self.specs[m] = get_modality(m)
            except KeyError as e:
                raise ValueError(e.args[0]) from None
        self.root = root
        self.shuffle_shards, self.seed, self.epoch = bool(shuffle_shards), int(seed), int(epoch)
        self.shuffle_buffer, self.decode = int(shuffle_buffer), bool(decode)
        self.rank, self.world_size = _resolve_rank(rank, world_size)

        markers = manifest.list_markers(root)
        if not markers:
            raise FileNotFoundError(f"{root}: no completed shards (no {manifest.META_DIR}/shards/*.json markers); "
                                    f"`modalmill status {root}` says what is pending")
        missing: dict[str, list[str]] = {}
        for name, mk in sorted(markers.items()):
            for m in self.modalities:
                if m not in mk.get("modalities", {}):
                    missing.setdefault(m, []).append(name)
        if missing:
            parts = [f"{m} missing in {len(s)} of {len(markers)} shard(s): {', '.join(s[:8])}"
                     + (f" ... (+{len(s) - 8})" if len(s) > 8 else "") for m, s in missing.items()]
            raise ValueError(f"{root}: requested modalities are not in every completed shard: " + "; ".join(parts)
                             + " (add them with `modalmill run JOB.yaml --only ...`)")
        self.shards = [ShardRef(name, tuple(mk.get("keys", []))) for name, mk in sorted(markers.items())]

    # ------------------------------------------------------------------ order
    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the shard order (and the sample shuffle buffer)."""
        self.epoch = int(epoch)

    def shard_order(self, epoch: int | None = None) -> list[ShardRef]:
        """All completed shards in this epoch's order (the same on every rank)."""
        order = list(self.shards)
        if self.shuffle_shards:
            random.Random(f"modalmill:{self.seed}:{self.epoch if epoch is None else epoch}").shuffle(order)
        return order

    def rank_shards(self, epoch: int | None = None) -> list[ShardRef]:
        """The shards this rank reads in this epoch."""
        return list(islice(self.shard_order(epoch), self.rank, None, self.world_size))

    @property
    def total_samples(self) -> int:
        """Samples in all completed shards (all ranks together)."""
        return sum(len(s.keys) for s in self.shards)

    def num_samples(self, epoch: int | None = None) -> int:
        """Samples this rank yields in this epoch."""
        return sum(len(s.keys) for s in self.rank_shards(epoch))

    def __repr__(self) -> str:
        return (f"ModalDataset({self.root!r}, modalities={self.modalities}, shards={len(self.shards)}, "
                f"samples={self.total_samples}, rank={self.rank}/{self.world_size}, epoch={self.epoch})")

    # ------------------------------------------------------------------ pipeline stages
    def _shard_source(self) -> Iterator[ShardRef]:
        return iter(self.shard_order())

    def _split_by_rank(self, src: Iterator[ShardRef]) -> Iterator[ShardRef]:
        return islice(src, self.rank, None, self.world_size)

    def _zip_shards(self, src: Iterator[ShardRef]) -> Iterator[dict]:
        for shard in src:
            yield from self._zip_one(shard)

    def _zip_one(self, shard: ShardRef) -> Iterator[dict]:
        urls = {m: storage.join(self.root, m, f"{shard.name}.tar") for m in self.modalities}
        with ExitStack() as stack:
            streams = {m: _modality_stream(url, stack) for m, url in urls.items()}
            pos = 0
            while True:
                row = {m: self._next(urls[m], it) for m, it in streams.items()}
                expected = shard.keys[pos] if pos < len(shard.keys) else None
                keys = {m: (s["__key__"] if s is not None else None) for m, s in row.items()}
                if all(k is None for k in keys.values()) and expected is None:
                    return
                if any(k != expected for k in keys.values()):
                    shown = ", ".join(f"{m}={k!r}" if k is not None else f"{m}=<end of tar>" for m, k in keys.items())
                    marker = repr(expected) if expected is not None else "<end>"
                    raise AlignmentError(f"{self.root}: {shard.name}, position {pos}: keys diverge across modalities "
                                         f"({shown}; marker {marker}); run `modalmill check {self.root}`")
                sample: dict[str, Any] = {"__key__": expected, "__shard__": shard.name}
                for m, s in row.items():
                    sample[m] = self._pick_member(m, shard, s)
                yield sample
                pos += 1

    @staticmethod
    def _next(url: str, it: Iterator[dict]) -> dict | None:
        try:
            return next(it, None)
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as e:  # webdataset re-raises tar errors with extra args; name the tar
            first = e.args[0] if e.args else e
            raise OSError(f"{url}: corrupt or truncated tar: {first}") from e

    def _pick_member(self, m: str, shard: ShardRef, s: dict) -> tuple[str, bytes]:
        exts = [e for e in s if not e.startswith("__")]
        for ext in accepted_exts(self.specs[m]):
            if ext in exts:
                return ext, s[ext]
        raise ValueError(f"{self.root}: {m}/{shard.name}.tar, key {s['__key__']!r}: no member with extension "
                         f".{self.specs[m].ext} (found .{', .'.join(exts)})")

    def _decode_sample(self, sample: dict) -> dict:
        out = {"__key__": sample["__key__"], "__shard__": sample["__shard__"]}
        for m in self.modalities:
            ext, data = sample[m]
            if not self.decode:
                out[m] = data
                continue
            spec = self.specs[m]
            try:
                value = decode_member(spec, ext, data)
            except Exception as e:  # name the member whatever the codec raised
                raise ValueError(f"{self.root}: {m}/{sample['__shard__']}.tar, key {sample['__key__']!r}: cannot "
                                 f"decode the .{ext} member: {e}") from e
            out[m] = to_torch(spec, value)
        return out

    def _pipeline(self) -> wds.DataPipeline:
        stages: list[Any] = [self._shard_source, self._split_by_rank, wds.split_by_worker, self._zip_shards]
        if self.shuffle_buffer > 0:
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
            rng = random.Random(f"modalmill-samples:{self.seed}:{self.epoch}:{self.rank}:{worker}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        stages.append(wds.map(self._decode_sample))
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[dict]:
        if not self.rank_shards():
            logger.warning("%s: rank %d of %d gets no shard this epoch (%d shards)", self.root, self.rank,
                           self.world_size, len(self.shards))
        return iter(self._pipeline())


def load_dataset(root: str, modalities: list[str] | tuple[str, ...] | str, *, shuffle_shards: bool = True,
                 seed: int = 0, epoch: int = 0, rank: int | None = None, world_size: int | None = None,
                 shuffle_buffer: int = 0, decode: bool = True) -> ModalDataset:
    """Stream the completed shards of the output ``root`` (local path or ``s3://`` URL) as aligned samples.

    ``modalities``: the modality folders to read (a list, or a comma-separated string). See the
    :mod:`modalmill.pipeline.dataset` docstring for ordering, splitting and what a sample holds.
    """
    return ModalDataset(root, modalities, shuffle_shards=shuffle_shards, seed=seed, epoch=epoch, rank=rank,
                        world_size=world_size, shuffle_buffer=shuffle_buffer, decode=decode)
