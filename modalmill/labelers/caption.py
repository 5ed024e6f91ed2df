"""Captions and their T5 embeddings: ``caption`` (an image-to-text model) and ``t5_caption`` (T5-XXL encoder).

``caption``: 4M and 4M-21 train on the captions that come with their image-text corpora (CC12M, COYO); ml-4m's
pseudo-labelling table lists no captioner. For corpora without text, modalmill writes model captions with
BLIP (``Salesforce/blip-image-captioning-large``) by default; any transformers image-to-text model whose
processor takes images (+ an optional text prompt) and whose ``generate`` takes ``pixel_values`` (BLIP,
BLIP-2, GIT, ...) can be selected with ``weights``. Generation is deterministic (greedy or beam search, no
sampling, a fixed token budget). The labeler returns one caption per sample; the pipeline stores 4M's caption
JSON, a list with that caption once per ``crop_settings`` row (4M's ``CaptionTransform(aligned_captions=True)``
picks entry i for crop i; see ``schemas.modalities.captions_for_crops``). Captions that come with the corpus (its
alt-text, which is what 4M trained on) are read from the input instead: the job's ``text.caption_source``.

``t5_caption``: 4M-21's ``t5_caption`` modality holds the T5-XXL encoder states of the caption
(``google/t5-v1_1-xxl``, ``T5EncoderModel``): an npz with ``emb`` ``[N, L, C]`` float16 (C = 4096 for XXL)
and ``mask_valid`` ``[N, L]`` bool, one row per caption in the sample's caption list (N = 1 when every entry is the
same text, as for one caption repeated per crop row: 4M's ``CaptionEmbTransform`` uses a single sequence for every
crop, and it is stored once instead of once per crop), at most 77 tokens (the
``max_tokens`` 4M-21 reads), padded to the longest caption of the sample with zeros where ``mask_valid`` is
False. It ``requires`` the ``caption`` modality: it runs after the captioner in the same job, or later on an
existing output with ``--only t5_caption`` (reading the stored captions).
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import LabelFailure, LabelInput, Resources, register_labeler
from .dinov2 import load_pretrained, split_regions
from .model import ModelConfig, ModelLabeler
from .pins import Pin

__all__ = ["CaptionLabeler", "T5CaptionLabeler", "caption_texts"]


def caption_texts(value: Any) -> list[str] | str:
    """The caption strings of a ``caption`` label (a string, or a list of strings / ``{"caption": str}``), or a
    one-line reason why there are none."""
    items = value if isinstance(value, list) else [value]
    texts = []
    for i, c in enumerate(items):
        text = c.get("caption") if isinstance(c, dict) else c
        if not isinstance(text, str):
            return f"caption entry {i} is not a string or {{'caption': str}}: {type(text).__name__}"
        texts.append(text)
    if not texts:
        return "the sample has no caption to embed"
    return texts


# ---------------------------------------------------------------------- captioner


_T5_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")


@register_labeler
class CaptionLabeler(ModelLabeler):
    """Image captions with BLIP-large (or another transformers image-to-text model): ``caption`` = ``[str]``.

    Input: the whole stored image (``region: crop0`` for crop 0 of the crop settings), resized and normalised
    as the checkpoint's image processor says (BLIP-large: 384 x 384, CLIP mean/std), on the device when the
    processor is a plain resize + rescale + normalise, else by the processor itself.
    """

    name = "caption"
    version = "1"
    outputs = ("caption",)
    architecture = "BLIP ViT-L captioning model (transformers BlipForConditionalGeneration; any image-to-text model)"
    weights = "Salesforce/blip-image-captioning-large"
    weights_pin = Pin(note="no published sha256 of its weights file was found; the hub's own checksum checks "
                          "the download")
    weights_help = ("the model-hub repo Salesforce/blip-image-captioning-large (model + processor files), or any "
                    "directory holding an image-to-text model and its processor (save_pretrained of both), given as "
                    "a local path, an s3:// prefix or a hub id")
    input_size = 384
    mean = (0.48145466, 0.4578275, 0.40821073)
    std = (0.26862954, 0.26130258, 0.27577711)
    license = "BSD-3-Clause (BLIP weights)"
    default_resources = Resources(num_cpus=1, num_gpus=0.5, memory_mb=6000)
    default_batch_size = 16
    description = "image captions (BLIP-large by default), deterministic beam search; JSON list of strings"

    @dataclass(frozen=True)
    class Config(ModelConfig):
        max_new_tokens: int = 30  # token budget per caption
        min_new_tokens: int = 5  # at least this many tokens (BLIP's captioning setting)
        num_beams: int = 3  # 1: greedy decoding; never sampling
        repetition_penalty: float = 1.0  # 1.0: none
        prompt: str = ""  # optional text prefix (BLIP conditional captioning, e.g. "a photography of")
        region: str = "full"  # full: the whole stored image | crop0: crop 0 of the crop settings

        def __post_init__(self):
            if self.region not in ("full", "crop0"):
                raise ValueError(f"region must be 'full' or 'crop0', got {self.region!r}")
            if self.max_new_tokens < 1 or self.num_beams < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
                raise ValueError("need max_new_tokens >= 1, num_beams >= 1 and 0 <= min_new_tokens <= max_new_tokens")

    def build(self, path: str):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from ..io.fetch import WeightsError

        where = f"labeler {self.name!r}"
        model = load_pretrained(AutoModelForImageTextToText, path, where=where, how_to_get=self.weights_help)
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"{where}: no usable processor (image processor + tokenizer) in {path}: "
                               f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}. "
                               f"Get it: {self.weights_help}.") from None
        self._device_preprocess = _simple_image_processor(getattr(self.processor, "image_processor", None))
        return model

    def _pixel_values(self, images: list[np.ndarray]):
        spec = self._device_preprocess
        if spec is not None:
            size, mean, std = spec
            return self.to_tensor(images, size=size, mean=mean, std=std)
        inputs = self.processor(images=images, return_tensors="pt")
        return inputs["pixel_values"].to(self.device)

    def predict(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        images, results, ok = split_regions(batch, self.config.region)
        if not ok:
            return results
        pixel_values = self._pixel_values([images[i] for i in ok])
        kwargs: dict[str, Any] = {}
        if self.config.prompt:
            enc = self.processor.tokenizer([self.config.prompt] * len(ok), return_tensors="pt")
            kwargs = {"input_ids": enc["input_ids"].to(self.device),
                      "attention_mask": enc["attention_mask"].to(self.device)}
        dtype = next(self.model.parameters()).dtype
        out = self.model.generate(pixel_values=pixel_values.to(dtype), do_sample=False, num_beams=self.config.num_beams,
                                  max_new_tokens=self.config.max_new_tokens, min_new_tokens=self.config.min_new_tokens,
                                  repetition_penalty=self.config.repetition_penalty, **kwargs)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        for j, i in enumerate(ok):
            results[i] = {"caption": [" ".join(texts[j].split())]}
        return results


def _simple_image_processor(ip) -> tuple[tuple[int, int], tuple, tuple] | None:
    """(size, mean, std) when ``ip`` only resizes (bicubic) to a fixed size, rescales by 1/255 and normalises
    (BLIP's processor), so the same can be done on the device; None for anything else (crops, padding, tiling)."""
    import dataclasses

    if ip is None:
        return None
    size = getattr(ip, "size", None)
    if hasattr(size, "keys"):
        size = dict(size)
    elif dataclasses.is_dataclass(size):  # transformers' SizeDict
        size = dataclasses.asdict(size)
    else:
        return None
    size = {k: v for k, v in size.items() if v is not None}
    if set(size) != {"height", "width"}:
        return None
    try:
        bicubic = int(getattr(ip, "resample", -1)) == 3  # PIL / transformers BICUBIC
        rescale = abs(float(getattr(ip, "rescale_factor", 0)) - 1 / 255) < 1e-9
    except (TypeError, ValueError):
        return None
    if not (bicubic and rescale and getattr(ip, "do_resize", False) and getattr(ip, "do_rescale", False)
            and getattr(ip, "do_normalize", False)):
        return None
    if getattr(ip, "do_center_crop", False) or getattr(ip, "do_pad", False):
        return None
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return None
    return (int(size["height"]), int(size["width"])), tuple(float(m) for m in mean), tuple(float(s) for s in std)


# ---------------------------------------------------------------------- T5 caption embeddings


@register_labeler
class T5CaptionLabeler(ModelLabeler):
    """T5 v1.1 XXL encoder states of each caption: ``t5_caption`` npz {emb [N, L, 4096] f16, mask_valid [N, L]}."""

    name = "t5_caption"
    version = "1"
    outputs = ("t5_caption",)
    requires = ("caption",)
    architecture = "T5 v1.1 XXL encoder (transformers T5EncoderModel), last hidden state"
    weights = "google/t5-v1_1-xxl"
    weights_pin = Pin(note="no published sha256 of its weights file was found; the hub's own checksum checks "
                          "the download")
    weights_help = ("the model-hub repo google/t5-v1_1-xxl (config, weights and spiece.model tokenizer; only the "
                    "encoder is loaded), or any directory written by T5EncoderModel/T5Model.save_pretrained plus its "
                    "tokenizer, given as a local path, an s3:// prefix or a hub id")
    input_size = None  # text input
    mean = None
    std = None
    license = "Apache-2.0 (T5 v1.1 weights)"
    default_resources = Resources(num_cpus=1, num_gpus=1, memory_mb=24000)
    default_batch_size = 32
    description = "T5-XXL encoder embeddings of the captions (4M-21's t5_caption), npz emb float16 + mask_valid"

    @dataclass(frozen=True)
    class Config(ModelConfig):
        max_length: int = 77  # tokens per caption, </s> included (4M-21 reads at most 77)

        def __post_init__(self):
            if self.max_length < 1:
                raise ValueError(f"max_length must be >= 1, got {self.max_length}")

    def build(self, path: str):
        import torch
        from transformers import AutoTokenizer, T5EncoderModel

        from ..io.fetch import WeightsError

        where = f"labeler {self.name!r}"
        dtype = {"float16": torch.float16, "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(self.config.dtype)
        if dtype is None:  # auto
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model = load_pretrained(T5EncoderModel, path, where=where, how_to_get=self.weights_help,
                                model_types=("t5", "umt5", "mt5"), dtype=dtype)
        try:
            if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in _T5_TOKENIZER_FILES):
                # transformers 5 would build an empty tokenizer from the config alone: refuse instead
                raise FileNotFoundError(f"none of {', '.join(_T5_TOKENIZER_FILES)} is there")
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"{where}: no usable tokenizer (spiece.model or tokenizer.json) in {path}: "
                               f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}. "
                               f"Get it: {self.weights_help}.") from None
        return model

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()  # the weights are already in the compute dtype

    def predict(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        results: list[Any] = []
        texts: list[str] = []
        rows: list[tuple[int, int]] = []  # per sample: (first row, number of captions) in ``texts``
        for inp in batch:
            if "caption" not in inp.labels:
                results.append(LabelFailure("no caption label for this sample"))
                rows.append((0, 0))
                continue
            t = caption_texts(inp.labels["caption"])
            if isinstance(t, str):
                results.append(LabelFailure(t))
                rows.append((0, 0))
                continue
            if len(set(t)) == 1:
                t = t[:1]  # one caption for every crop row: one sequence, which 4M uses for any crop
            rows.append((len(texts), len(t)))
            texts.extend(t)
            results.append(None)
        if not texts:
            return results
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.config.max_length,
                             return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # zeros where there is no token
        hidden, mask = hidden.cpu().numpy(), mask.bool().cpu().numpy()
        for s, (start, n) in enumerate(rows):
            if results[s] is not None:
                continue
            m = mask[start:start + n]
            length = max(1, int(m.sum(axis=1).max()))
            emb = hidden[start:start + n, :length]
            if not np.isfinite(emb).all() or np.abs(emb).max() > np.finfo(np.float16).max:
                results[s] = LabelFailure("T5 embeddings are not finite in float16")
                continue
            results[s] = {"t5_caption": {"emb": emb.astype(np.float16), "mask_valid": m[:, :length].copy()}}
        return results
