"""The trainer-side loader: stream an output root (local or ``s3://``) as aligned multimodal samples.

``load_dataset(root, modalities=[...])`` returns a :class:`ModalDataset`, a PyTorch ``IterableDataset`` built
as a webdataset pipeline::

    shard list (completed shards only) -> shuffle(seed, epoch) -> split by rank -> split by DataLoader worker
    -> zip the modality tars of each shard in order (alignment check) -> [sample shuffle buffer] -> decode

**Which shards.** Only shards with a done completion marker (``_modalmill/shards/shard-N.json``) whose tars are
listed with the sizes the marker recorded are read, so a shard that is still being written, failed, or torn (a
pending marker, or a tar missing or of another size: see ``modalmill.io.commit``) never reaches a trainer; torn
shards are left out with a warning that names them (a rerun of the job redoes them). A tar of the recorded size
whose ETag or mtime differs (a copy that did not keep mtimes, or a rewrite) is read: the alignment check below
stops at its first key that is not the marker's. Every requested modality must be in
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
feature maps (``clip``, ``dinov2``, ...)    ``torch.float16`` ``[n_crops, h, w, C]``: row c is the teacher
                                            run on crop c of ``crop_settings``
global embeddings                           ``torch.float16`` ``[n_crops, C]`` (row c from crop c)
``crop_settings``                           ``torch.long`` ``[n_crops, 5]`` (top, left, height, width, hflip)
``t5_caption``                              ``{"emb": float16 tensor, "mask_valid": bool tensor}``
JSON / text (caption, det, metadata, ...)   the Python object (``json.loads``); with ``text_tokenizer``
                                            see below
``sam_instance``                            the stored object array; with ``text_tokenizer`` see below
========================================== =========================================================

Images differ in size between samples: to batch them, pass ``transform=FourMCrops(size=224)`` (one
``crop_settings`` row per sample applied to every pixel modality, as 4M's loader does;
:mod:`modalmill.dataset.transforms`) and ``collate_fn=collate`` to the DataLoader, or use
``DataLoader(batch_size=None)``. ``decode=False`` yields each modality's raw member bytes instead.

**Text-like modalities as token ids** (``text_tokenizer=``: a ``tokenizers.Tokenizer``, the path of a
``text_tokenizer.json`` or of a directory holding one, local or ``s3://``, or ``True`` for the one
``modalmill train-tokenizer --modality caption --data ROOT`` writes to ``ROOT/_modalmill/tokenizers/text``). Each
of ``caption``, ``det``, ``metadata``, ``color_palette``, ``human_poses`` and ``sam_instance`` that is requested
is serialised to 4M-21's text sequence (:func:`modalmill.tokenize.text_tokenizer.serialise_label`, following fourm's
``modality_transforms.py``) and encoded as 4M's masking does (``ids + [EOS]``, no ``[SOS]``;
:func:`~modalmill.tokenize.text_tokenizer.encode_sequence`). The sample then holds:

========================= ==================================================================================
key                       value
========================= ==================================================================================
``<modality>``            ``torch.long`` 1-D token ids (``text_max_tokens``: an int or ``{modality: int}``
                          cuts them by 4M's rule; default: not cut)
``<modality>.text``       the serialised sequence 4M's transform returns: a ``str``, for ``metadata`` a list
                          of ``v1=<id> v0=<bin>`` chunks (what fourm's chunked span masking takes)
``<modality>.raw``        the decoded label, as without ``text_tokenizer``
``__crop__``              (when ``crop`` is set) the ``crop_settings`` row used: crop the image modalities
                          with ``crop_settings[__crop__]`` and take row ``__crop__`` of every ``tok_*``
                          (``__crop_row__``: that row, ``torch.long [5]``; with or without ``text_tokenizer``)
========================= ==================================================================================

``crop``: None (default) serialises in the frame of the whole stored image (``sam_instance``, which only exists
per crop, uses crop 0, the centre crop); an int picks that row of ``crop_settings`` for every sample; ``"random"``
picks a row per sample as 4M's ``PreTokenizedImageAugmenter`` does. With a crop, ``det`` boxes are cut to it and
flipped with it, ``human_poses`` boxes cut to it (4M does not flip them), the ``caption`` list entry of that crop
and the ``sam_instance`` entry of that crop are used. ``crop_settings`` (and, for ``det`` with a crop and for
``human_poses``, the stored ``rgb``, of which only the size is read) are read alongside even when not requested.

``text_augment`` (default True) makes 4M's random choices: metadata chunk order, colour palette size 1..7, the
order of the human-pose groups, the SAM-instance order, a caption drawn when there are fewer captions than crops;
``det`` keeps 4M's distance-to-origin order and 0.6 score threshold. Every random choice, and the ``"random"``
crop, is seeded by ``(seed, epoch, key)`` (and the modality), so it does not depend on the worker, the rank or the
shard order: two passes with the same seed and epoch yield the same ids. ``text_augment=False`` gives canonical
sequences (metadata in id order, 7 colours, fixed group order).
"""

from __future__ import annotations

import io
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
from ..tokenize.text_tokenizer import TEXT_MODALITIES
from ..io import index, manifest, storage
from ..io.tars import accepted_exts, decode_member
from ..io.where import compile_where, needed_modalities, record_of

logger = logging.getLogger(__name__)

__all__ = ["AlignmentError", "ModalDataset", "load_dataset", "to_torch"]


class AlignmentError(RuntimeError):
    """The modality tars of a shard do not hold the same keys in the same order."""


@dataclass(frozen=True)
class ShardRef:
    name: str  # "shard-00003"
    n_samples: int  # the marker's sample count
    keys: tuple[str, ...] | None = None  # the marker's key list; None: read from the marker when the shard is read


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
    arr = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)  # (keeps a 0-d scalar 0-d)
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
                 shuffle_buffer: int = 0, decode: bool = True, text_tokenizer: Any = None,
                 crop: int | str | None = None, text_augment: bool = True,
                 text_max_tokens: int | dict[str, int] | None = None, transform: Any = None,
                 where: str | None = None):
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
        self.root, self.transform = root, transform
        self.shuffle_shards, self.seed, self.epoch = bool(shuffle_shards), int(seed), int(epoch)
        self.shuffle_buffer, self.decode = int(shuffle_buffer), bool(decode)
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.crop = _check_crop(crop)
        wanted = getattr(transform, "loader_crop", None)  # a FourMCrops: the loader picks its row (seeded)
        if wanted is not None:
            if self.crop is not None and self.crop != wanted:
                raise ValueError(f"crop={crop!r} and the transform's crop ({transform!r}) disagree: give one")
            self.crop = _check_crop(wanted)
        self.text_augment = bool(text_augment)
        self._set_text_tokenizer(text_tokenizer, text_max_tokens)
        # modalities read alongside the requested ones (not yielded unless requested)
        needed: dict[str, str] = {}
        if self.crop is not None:
            needed["crop_settings"] = f"crop={self.crop!r}"
        if any(m == "human_poses" or (m == "det" and self.crop is not None) for m in self.text_modalities):
            needed["rgb"] = "the stored rgb's size (human_poses boxes, det with a crop)"
        self.where = compile_where(where) if where is not None else None
        self._where_mods = needed_modalities(self.where) if self.where is not None else []
        for m in self._where_mods:
            needed.setdefault(m, f"where={self.where.text!r}")
        self._aux = {m: why for m, why in needed.items() if m not in self.modalities}
        self._read = self.modalities + list(self._aux)
        for m in self._aux:
            self.specs[m] = get_modality(m)

        # the shard index (listings + a snapshot the runs keep): no marker is read here unless the index lacks it,
        # and key lists are read by the worker that opens the shard, so start-up does not grow with samples
        # torn shards (pending, a tar missing or of another size) are left out; a tar of the recorded size whose ETag
        # or mtime differs is read, and the key-by-key check below stops at the first sample that does not align
        scanned = index.scan(root, with_manifests=False, tags=False)
        markers = scanned.markers
        if scanned.torn:
            shown = "; ".join(f"{s}: {why}" for s, why in list(scanned.torn.items())[:8])
            more = f" ... (+{len(scanned.torn) - 8})" if len(scanned.torn) > 8 else ""
            logger.warning("%s: leaving out %d torn shard(s) (rerun the job to redo them): %s%s", root,
                        len(scanned.torn), shown, more)
        if not markers:
            raise FileNotFoundError(f"{root}: no completed shards (no {manifest.META_DIR}/shards/*.json markers); "
                                    f"`modalmill status {root}` says what is pending")
        missing: dict[str, list[str]] = {}
        for name, mk in sorted(markers.items()):
            for m in self._read:
                if m not in mk.modalities:
                    missing.setdefault(m, []).append(name)
        if missing:
            parts = [f"{m}{f' (read for {self._aux[m]})' if m in self._aux else ''} missing in {len(s)} of "
                     f"{len(markers)} shard(s): {', '.join(s[:8])}"
                     + (f" ... (+{len(s) - 8})" if len(s) > 8 else "") for m, s in missing.items()]
            raise ValueError(f"{root}: requested modalities are not in every completed shard: " + "; ".join(parts)
                             + " (add them with `modalmill run JOB.yaml --only ...`)")
        self.shards = [ShardRef(name, mk.n_samples) for name, mk in sorted(markers.items())]

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
        return sum(s.n_samples for s in self.shards)

    def num_samples(self, epoch: int | None = None) -> int:
        """Samples this rank yields in this epoch."""
        return sum(s.n_samples for s in self.rank_shards(epoch))

    def __repr__(self) -> str:
        tok = self.text_tokenizer
        text = f", text_tokenizer=<{tok.get_vocab_size()} tokens>, crop={self.crop!r}" if tok is not None else ""
        return (f"ModalDataset({self.root!r}, modalities={self.modalities}, shards={len(self.shards)}, "
                f"samples={self.total_samples}, rank={self.rank}/{self.world_size}, epoch={self.epoch}{text})")

    def __getstate__(self) -> dict:  # DataLoader workers (spawn) rebuild the tokenizer from its JSON
        state = dict(self.__dict__)
        state["_text_tok"] = None
        return state

    @property
    def text_tokenizer(self):
        """The ``tokenizers.Tokenizer`` text-like modalities are encoded with (None without one)."""
        if self._text_tok is None and self._text_tok_json is not None:
            from tokenizers import Tokenizer

            self._text_tok = Tokenizer.from_str(self._text_tok_json)
        return self._text_tok

    def _rng(self, purpose: str, key: str) -> random.Random:
        """Seeded by (seed, epoch, key, purpose) alone: the same on every worker and rank, in any shard order."""
        return random.Random(f"modalmill-{purpose}:{self.seed}:{self.epoch}:{key}")

    # ------------------------------------------------------------------ pipeline stages
    def _shard_source(self) -> Iterator[ShardRef]:
        return iter(self.shard_order())

    def _split_by_rank(self, src: Iterator[ShardRef]) -> Iterator[ShardRef]:
        return islice(src, self.rank, None, self.world_size)

    def _zip_shards(self, src: Iterator[ShardRef]) -> Iterator[dict]:
        for shard in src:
            yield from self._zip_one(shard)

    def _shard_keys(self, shard: ShardRef) -> tuple[str, ...]:
        if shard.keys is not None:
            return shard.keys
        marker = manifest.read_marker(self.root, shard.name)
        if marker is None:
            raise FileNotFoundError(f"{self.root}: {shard.name}'s marker disappeared after the dataset was built "
                                    f"(is a run rewriting this output?)")
        if marker.get("state") == "pending":
            raise RuntimeError(f"{self.root}: {shard.name} is being rewritten (its marker became pending after the "
                               f"dataset was built); wait for the run to finish and build the dataset again")
        return tuple(marker.get("keys", []))

    def _zip_one(self, shard: ShardRef) -> Iterator[dict]:
        order = self._shard_keys(shard)
        urls = {m: storage.join(self.root, m, f"{shard.name}.tar") for m in self._read}
        with ExitStack() as stack:
            streams = {m: _modality_stream(url, stack) for m, url in urls.items()}
            pos = 0
            while True:
                row = {m: self._next(urls[m], it) for m, it in streams.items()}
                expected = order[pos] if pos < len(order) else None
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
                if self.where is None or self._passes(sample):
                    yield sample
                pos += 1

    def _set_text_tokenizer(self, text_tokenizer: Any, text_max_tokens: int | dict[str, int] | None) -> None:
        """The text tokenizer (``text_tokenizer``: a tokenizer, a path, or True for the output's own) and the
        text-like modalities it serialises."""
        self._text_tok: Any = None
        self._text_tok_json: str | None = None
        self.text_modalities: list[str] = []
        self.text_max_tokens: dict[str, int | None] = {}
        if text_tokenizer is None or text_tokenizer is False:
            return
        if not self.decode:
            raise ValueError("text_tokenizer needs decode=True (decode=False yields the raw member bytes)")
        from ..tokenize.text_tokenizer import as_text_tokenizer

        if text_tokenizer is True:
            text_tokenizer = storage.join(self.root, manifest.META_DIR, "tokenizers", "text")
        self._text_tok = as_text_tokenizer(text_tokenizer)
        self._text_tok_json = self._text_tok.to_str()  # what DataLoader workers rebuild it from
        self.text_modalities = [m for m in self.modalities if m in TEXT_MODALITIES]
        self.text_max_tokens = _max_tokens(text_max_tokens, self.text_modalities)

    def _passes(self, sample: dict) -> bool:
        """``where`` on the sample's metadata fields and scalar modalities (decoded here, once)."""
        values = {m: self._decode_member(m, sample) for m in self._where_mods}
        return self.where(record_of(sample["__key__"], values))

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

    def _where(self, m: str, sample: dict) -> str:
        return f"{self.root}: {m}/{sample['__shard__']}.tar, key {sample['__key__']!r}"

    def _decode_member(self, m: str, sample: dict) -> Any:
        ext, data = sample[m]
        try:
            return decode_member(self.specs[m], ext, data)
        except Exception as e:  # name the member whatever the codec raised
            raise ValueError(f"{self._where(m, sample)}: cannot decode the .{ext} member: {e}") from e

    def _decode_sample(self, sample: dict) -> dict:
        out = {"__key__": sample["__key__"], "__shard__": sample["__shard__"]}
        if not self.decode:
            out.update((m, sample[m][1]) for m in self.modalities)
            return out
        decoded = {m: self._decode_member(m, sample) for m in self.modalities}
        for m in self.modalities:
            out[m] = to_torch(self.specs[m], decoded[m])
        if self.crop is None and not self.text_modalities:
            return self.transform(out) if self.transform is not None else out
        crop_row, crop_index = None, None
        if self.crop is not None:
            crops = decoded["crop_settings"] if "crop_settings" in decoded else self._decode_member("crop_settings",
                                                                                                     sample)
            crops = np.asarray(crops).reshape(-1, 5)
            if self.crop == "random":
                crop_index = self._rng("crop", sample["__key__"]).randrange(len(crops))
            elif self.crop >= len(crops):
                raise ValueError(f"{self._where('crop_settings', sample)}: crop={self.crop} but the sample has "
                                 f"{len(crops)} crop(s)")
            else:
                crop_index = self.crop
            crop_row = [int(c) for c in crops[crop_index]]
            out["__crop__"] = crop_index
            out["__crop_row__"] = torch.tensor(crop_row, dtype=torch.long)
        if self.text_modalities:
            self._add_text(out, decoded, sample, crop_row, crop_index)
        return self.transform(out) if self.transform is not None else out

    def _image_hw(self, decoded: dict, sample: dict) -> tuple[int, int]:
        if "rgb" in decoded:
            return tuple(np.asarray(decoded["rgb"]).shape[:2])
        from PIL import Image

        with Image.open(io.BytesIO(sample["rgb"][1])) as img:  # the header only: no pixels are decoded
            return img.height, img.width

    def _add_text(self, out: dict, decoded: dict, sample: dict, crop_row: list[int] | None,
                  crop_index: int | None) -> None:
        from ..tokenize.text_tokenizer import encode_sequence, serialise_label

        image_hw = self._image_hw(decoded, sample) if "rgb" in self._read else None
        tok = self.text_tokenizer
        for m in self.text_modalities:
            rng = self._rng(f"text:{m}", sample["__key__"]) if self.text_augment else None
            try:
                text = serialise_label(m, decoded[m], crop=crop_row, crop_index=crop_index, image_hw=image_hw,
                                       rng=rng)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise ValueError(f"{self._where(m, sample)}: cannot serialise the label to 4M's text sequence: "
                                 f"{e}") from e
            ids = encode_sequence(tok, text, self.text_max_tokens.get(m))
            out[f"{m}.raw"] = out[m]
            out[f"{m}.text"] = text
            out[m] = torch.tensor(ids, dtype=torch.long)

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
                 shuffle_buffer: int = 0, decode: bool = True, text_tokenizer: Any = None,
                 crop: int | str | None = None, text_augment: bool = True,
                 text_max_tokens: int | dict[str, int] | None = None, transform: Any = None,
                 where: str | None = None) -> ModalDataset:
    """Stream the completed shards of the output ``root`` (local path or ``s3://`` URL) as aligned samples.

    ``modalities``: the modality folders to read (a list, or a comma-separated string). ``text_tokenizer``
    (a ``tokenizers.Tokenizer``, a path, or True for ``ROOT/_modalmill/tokenizers/text``) turns the text-like
    modalities into 4M's token ids; ``crop`` (None, a row index, or ``"random"``) picks the ``crop_settings`` row
    they are serialised for. ``transform``: called on every decoded sample (in the DataLoader's workers);
    :class:`~modalmill.dataset.FourMCrops` crops and resizes every pixel modality with one crop row and picks the
    same row of every per-crop modality, so :func:`~modalmill.dataset.collate` can batch the samples. ``where``
    (``modalmill filter``'s expression, :mod:`modalmill.io.where`) skips the samples it does not hold for, on the
    fly (``num_samples`` still counts them all). See the :mod:`modalmill.dataset.loader` docstring for ordering,
    splitting and what a sample holds.
    """
    return ModalDataset(root, modalities, shuffle_shards=shuffle_shards, seed=seed, epoch=epoch, rank=rank,
                        world_size=world_size, shuffle_buffer=shuffle_buffer, decode=decode,
                        text_tokenizer=text_tokenizer, crop=crop, text_augment=text_augment,
                        text_max_tokens=text_max_tokens, transform=transform, where=where)


def _check_crop(crop: Any) -> int | str | None:
    if crop is None or crop == "random":
        return crop
    if isinstance(crop, (int, np.integer)) and not isinstance(crop, bool) and crop >= 0:
        return int(crop)
    raise ValueError(f"crop must be None, a crop_settings row index >= 0 or 'random', got {crop!r}")


def _max_tokens(value: Any, modalities: list[str]) -> dict[str, int | None]:
    if value is None or isinstance(value, int):
        limits = {m: value for m in modalities}
    elif isinstance(value, dict):
        unknown = sorted(set(value) - set(TEXT_MODALITIES))
        if unknown:
            raise ValueError(f"text_max_tokens: {', '.join(unknown)} not text-like ({', '.join(TEXT_MODALITIES)})")
        limits = {m: value.get(m) for m in modalities}
    else:
        raise ValueError(f"text_max_tokens must be an int or {{modality: int}}, got {value!r}")
    for m, n in limits.items():
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"text_max_tokens for {m} must be a positive int, got {n!r}")
    return limits
