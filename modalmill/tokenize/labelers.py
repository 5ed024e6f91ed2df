"""Tokenizers as derived, stateful labelers: ``X`` (+ its crop_settings) -> ``tok_X@224``.

One labeler per token modality of 4M (``tok_rgb``, ``tok_canny_edge``, ``tok_semseg``, ``tok_dinov2_global``,
...), registered by name. Each ``requires`` its source modality (nothing extra for ``rgb``: the stored image is
the input), runs in a Ray actor pool (``stateful``) and is configured with the tokenizer ``checkpoint`` to use
(a local path or ``s3://``, the directory written by ``modalmill train-tokenizer`` or its ``model.safetensors``).

For every sample it cuts each crop of the sample's ``crop_settings`` out of the decoded source label, flips and
resizes it to the tokenizer's input size exactly as training did (:mod:`modalmill.tokenize.adapters`), encodes
all crops of the batch under ``torch.inference_mode()`` in float32 and returns ``{"tok_X@224": int16
[n_crops, n_tokens]}``. ``config_hash()`` contains the checkpoint's content hash, so tokens made with another
checkpoint are stale (the pipeline asks for ``--force``); ``checkpoint_id()`` is that hash.

Global embeddings have no geometry: every crop row of ``tok_*_global`` holds the tokens of the sample's one
stored vector (4M computes the teacher per crop; modalmill stores one global vector per image).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..labelers.base import LabelFailure, LabelInput, Labeler, Resources, register_labeler
from ..schemas.modalities import TOKEN_MODALITIES, get_modality


@dataclass(frozen=True)
class TokenizerConfig:
    checkpoint: str = ""  # local path or s3:// of a tokenizer trained by `modalmill train-tokenizer`
    device: str = "auto"  # auto (cuda when the actor has a GPU) | cpu | cuda | cuda:N  (not part of the hash)
    crops_per_forward: int = 64  # encoder batch size (not part of the hash)


class TokenizerLabeler(Labeler):
    version = "1"
    stateful = True
    Config = TokenizerConfig
    default_resources = Resources(num_cpus=1, num_gpus=0)
    default_batch_size = 8
    license = "yours (a tokenizer trained with `modalmill train-tokenizer`)"
    source: ClassVar[str] = ""

    def __init__(self, config: Any = None):
        super().__init__(config)
        self.model = None
        self.adapter = None
        self.device = None
        self.tokenizer_config: dict | None = None

    # ------------------------------------------------------------------ identity
    def _need_checkpoint(self) -> str:
        if not self.config.checkpoint:
            raise ValueError(f"labeler {self.name!r} needs a tokenizer checkpoint: train one with `modalmill "
                             f"train-tokenizer --modality {self.source} --data OUT` and pass "
                             f"--tokenizer {self.source}=PATH")
        return self.config.checkpoint

    def config_hash(self) -> str:
        from .checkpoint import checkpoint_hash

        blob = json.dumps({"labeler": self.name, "version": self.version,
                           "checkpoint": checkpoint_hash(self._need_checkpoint())}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def checkpoint_id(self) -> str:
        from .checkpoint import checkpoint_hash

        return checkpoint_hash(self.config.checkpoint) if self.config.checkpoint else ""

    # ------------------------------------------------------------------ lifecycle
    def setup(self) -> None:
        import torch

        from .adapters import adapter_for
        from .checkpoint import load_tokenizer

        dev = self.config.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        if self.device.type == "cuda":  # identical tokens on every GPU: no TF32 shortcuts
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        model, cfg = load_tokenizer(self._need_checkpoint(), self.device)
        out = self.outputs[0]
        spec = get_modality(out)
        if cfg.get("modality") != self.source:
            raise ValueError(f"{self.config.checkpoint}: a tokenizer for {cfg.get('modality')!r}, not {self.source!r}")
        if model.n_tokens != spec.n_tokens or model.quantizer.codebook_size > spec.vocab_size:
            raise ValueError(f"{self.config.checkpoint}: makes {model.n_tokens} tokens from "
                             f"{model.quantizer.codebook_size} codes; {out} needs {spec.n_tokens} tokens from at "
                             f"most {spec.vocab_size}")
        self.model, self.tokenizer_config = model, cfg
        self.adapter = adapter_for(self.source, cfg["model"].get("in_channels"))

    def _crops_of(self, inp: LabelInput) -> list:
        label = inp.image if self.source == "rgb" else inp.labels[self.source]
        hw = inp.image.shape[:2]
        if self.adapter.kind == "vector":
            return [self.adapter.prepare(label, None, hw)]
        return [self.adapter.prepare(label, crop, hw) for crop in inp.crops]

    def process_batch(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        import torch

        if self.model is None:
            self.setup()
        prepared: list[list | LabelFailure] = []
        for inp in batch:
            try:
                prepared.append(self._crops_of(inp))
            except (ValueError, KeyError) as e:
                prepared.append(LabelFailure(f"{self.source}: {e}"))
        flat = [t for p in prepared if not isinstance(p, LabelFailure) for t in p]
        tokens = []
        step = max(1, int(self.config.crops_per_forward))
        with torch.inference_mode():
            for i in range(0, len(flat), step):
                x = self.adapter.to_input(torch.stack(flat[i:i + step]).to(self.device))
                tokens.append(self.model.encode(x).cpu())
        ids = torch.cat(tokens).numpy() if tokens else np.zeros((0, 0))
        dtype = get_modality(self.outputs[0]).dtype
        out: list[dict[str, Any] | LabelFailure] = []
        pos = 0
        for inp, p in zip(batch, prepared):
            if isinstance(p, LabelFailure):
                out.append(p)
                continue
            arr = ids[pos:pos + len(p)].astype(dtype)
            pos += len(p)
            if self.adapter.kind == "vector":
                arr = np.repeat(arr, len(inp.crops), axis=0)
            out.append({self.outputs[0]: np.ascontiguousarray(arr)})
        return out


def _labeler_name(token_modality: str) -> str:
    return token_modality.split("@", 1)[0]


TOKENIZER_LABELERS: dict[str, type[TokenizerLabeler]] = {}  # token modality -> labeler class

for _tok, (_src, _vocab, _n) in TOKEN_MODALITIES.items():
    _name = _labeler_name(_tok)
    _cls_name = "".join(part.capitalize() for part in _name.split("_")) + "Labeler"
    _cls = type(_cls_name, (TokenizerLabeler,), {
        "__module__": __name__, "__qualname__": _cls_name, "name": _name, "outputs": (_tok,),
        "requires": () if _src == "rgb" else (_src,), "source": _src,
        "description": f"{_src} -> {_tok} ({_n} tokens per crop, vocab <= {_vocab}) with a trained tokenizer",
    })
    globals()[_cls_name] = register_labeler(_cls)
    TOKENIZER_LABELERS[_tok] = _cls


def labeler_for_token_modality(name: str) -> type[TokenizerLabeler]:
    """The tokenizer labeler for a token modality, its labeler name or its source modality."""
    for tok, cls in TOKENIZER_LABELERS.items():
        if name in (tok, cls.name, cls.source) or (cls.source == "semseg_coco" and name == "semseg"):
            return cls
    raise KeyError(f"no tokenizer writes {name!r}; token modalities: {', '.join(TOKENIZER_LABELERS)}")
