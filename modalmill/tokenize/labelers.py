"""Tokenizers as derived, stateful labelers: ``X`` (+ its crop_settings) -> ``tok_X@224``.

One labeler per token modality of 4M (``tok_rgb``, ``tok_canny_edge``, ``tok_semseg``, ``tok_dinov2_global``,
...), registered by name. Each ``requires`` its source modality (nothing extra for ``rgb``: the stored image is
the input), runs in a Ray actor pool (``stateful``) and is configured with the tokenizer ``checkpoint`` to use:
a tokenizer in 4M's hub layout (config.json + model.safetensors): a model-hub id such as
``EPFL-VILAB/4M_tokenizers_rgb_16k_224-448``, or a local or ``s3://`` folder (4M's own, or one written by
``modalmill train-tokenizer``).

For every sample it prepares each crop of the sample's ``crop_settings`` from the decoded source label exactly as
4M's ``save_vq_tokens.py`` does (:mod:`modalmill.tokenize.fourm_inputs`; per-crop labels such as teacher
features are indexed by the crop's row; this is ``prepare``, which runs in the shard task, needing only the
checkpoint's config), tokenizes all crops of the batch with the encoder + quantizer under
``torch.inference_mode()`` in float32 and returns ``{"tok_X@224": int16 [n_crops, n_tokens]}``.
``config_hash()`` contains the checkpoint's content hash, so tokens made with another checkpoint are stale (the
pipeline asks for ``--force``); ``checkpoint_id()`` is that hash.

Two tokenizers write into 4M's own files instead of a ``tok_*`` folder: ``tok_sam_instance`` (``sam_mask`` ->
``sam_instance``: per crop the instances' contours in the 224 crop, 16 ids and a box each) and ``tok_human_poses``
(``human_poses`` rewritten with ``pose_tokenized``, 8 ids per person).

Global embeddings are tokenized per crop, from the teacher's vector of that crop (row c of the stored
``[n_crops, C]`` label), as 4M does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..labelers.base import LabelFailure, LabelInput, Labeler, Prepared, Resources, register_labeler
from ..schemas.modalities import TOKEN_MODALITIES, get_modality


@dataclass(frozen=True)
class TokenizerConfig:
    checkpoint: str = ""  # a 4M-format tokenizer: hub id, local or s3:// folder (config.json + model.safetensors)
    resample: str = "bilinear"  # 4M tokenizers: PIL resampling of image crops (save_vq_tokens' --resample_mode)
    device: str = "auto"  # auto (cuda when the actor has a GPU) | cpu | cuda | cuda:N  (not part of the hash)
    crops_per_forward: int = 64  # encoder batch size (not part of the hash)


class TokenizerLabeler(Labeler):
    version = "1"
    stateful = True
    Config = TokenizerConfig
    default_resources = Resources(num_cpus=1, num_gpus=0)
    default_batch_size = 8
    license = "yours (a tokenizer trained with `modalmill train-tokenizer`)"
    source: ClassVar[str] = ""  # the stored modality the labeler reads
    tokenizer_modality: ClassVar[str] = ""  # the tokenizer's own modality (its checkpoint's "modality"); = source

    @classmethod
    def tok_modality(cls) -> str:
        return cls.tokenizer_modality or cls.source

    def __init__(self, config: Any = None):
        super().__init__(config)
        self.model = None
        self.adapter = None
        self.device = None
        self.tokenizer_config: dict | None = None

    # ------------------------------------------------------------------ identity
    def _need_checkpoint(self) -> str:
        if not self.config.checkpoint:
            m = self.tok_modality()
            raise ValueError(f"labeler {self.name!r} needs a tokenizer checkpoint: train one with `modalmill "
                             f"train-tokenizer --modality {m} --data OUT` and pass --tokenizer {m}=PATH")
        return self.config.checkpoint

    def config_hash(self) -> str:
        from .checkpoint import checkpoint_hash

        ident = {"labeler": self.name, "version": self.version, "checkpoint": checkpoint_hash(self._need_checkpoint())}
        if self.config.resample != "bilinear":  # (bilinear tokens keep the hash they always had)
            ident["resample"] = self.config.resample
        blob = json.dumps(ident, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def checkpoint_id(self) -> str:
        from .checkpoint import checkpoint_hash

        return checkpoint_hash(self.config.checkpoint) if self.config.checkpoint else ""

    def preflight(self) -> str:
        """The checkpoint found and its config read (config.json and the safetensors header, no model built): a
        folder that is not a 4M-format tokenizer, or a tokenizer of another modality, is a one-line
        ``WeightsError`` here, on the driver, before any actor starts."""
        from ..io.fetch import WeightsError
        from .checkpoint import checkpoint_hash, read_config
        from .fourm import FourMSpec

        try:
            location = self._need_checkpoint()
        except ValueError as e:
            raise WeightsError(str(e)) from None
        try:
            cfg = read_config(location)
            if not ({"enc_type", "quant_type"} & set(cfg)) or "model_type" in cfg:  # e.g. a transformers model
                raise ValueError("its config.json holds no 4M tokenizer arguments (enc_type, quant_type, ...)")
            FourMSpec.of(cfg)
        except WeightsError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. no config.json, or one that is not a 4M tokenizer's
            raise WeightsError(f"{location}: not a 4M-format tokenizer (config.json + model.safetensors): "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        tm = self.tok_modality()
        mine = (cfg.get("modalmill") or {}).get("modality")
        if mine and mine != tm and {mine, tm} != {"canny_edge", "sam_edge"}:  # 4M: one edge tokenizer for both
            raise WeightsError(f"{location}: a tokenizer for {mine!r}, not {tm!r} (labeler {self.name!r})")
        return checkpoint_hash(location)

    # ------------------------------------------------------------------ lifecycle
    def setup(self) -> None:
        """Load the encoder + quantizer of the 4M-format tokenizer and 4M's preprocessing of the source."""
        import torch

        from .checkpoint import load_tokenizer
        from .fourm_inputs import fourm_input_for
        from .train import vocab_and_tokens

        dev = self.config.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        if self.device.type == "cuda":  # identical tokens on every GPU: no TF32 shortcuts
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        model, cfg = load_tokenizer(self._need_checkpoint(), self.device, with_decoder=False)
        out, tm = self.outputs[0], self.tok_modality()
        vocab, n_tokens, _ = vocab_and_tokens(tm)
        mine = (cfg.get("modalmill") or {}).get("modality")
        if mine and mine != tm and {mine, tm} != {"canny_edge", "sam_edge"}:  # 4M: one edge tokenizer for both
            raise ValueError(f"{self.config.checkpoint}: a tokenizer for {mine!r}, not {tm!r}")
        if model.n_tokens != n_tokens or model.codebook_size > vocab:
            raise ValueError(f"{self.config.checkpoint}: makes {model.n_tokens} tokens from {model.codebook_size} "
                             f"codes; {out} needs {n_tokens} tokens from at most {vocab}")
        self.model, self.tokenizer_config = model, cfg
        self.adapter = fourm_input_for(tm, model, self.config.resample)

    def _adapter(self):
        """4M's preprocessing for the checkpoint; needs only its config.json (``prepare`` runs without the model)."""
        if self.adapter is None:
            from .checkpoint import read_config
            from .fourm import FourMSpec
            from .fourm_inputs import fourm_input_for

            spec = FourMSpec.of(read_config(self._need_checkpoint()))
            self.adapter = fourm_input_for(self.tok_modality(), spec, self.config.resample)
        return self.adapter

    def _crops_of(self, inp: LabelInput) -> np.ndarray:
        adapter = self._adapter()
        label = inp.image if self.source == "rgb" else inp.labels[self.source]
        hw = inp.image.shape[:2]
        if adapter.kind == "vector":
            return adapter.prepare(label, None, hw).unsqueeze(0).numpy()
        if getattr(adapter, "per_crop", False):  # 4M tokenizers: crop i of per-crop labels is their row i
            return np.stack([adapter.prepare(label, crop, hw, i).numpy() for i, crop in enumerate(inp.crops)])
        return np.stack([adapter.prepare(label, crop, hw).numpy() for crop in inp.crops])

    def prepare(self, batch: list[LabelInput]) -> Prepared:
        """Per sample ``(inputs [k, ...] float32, n_crops)`` in the tokenizer's input space, or a LabelFailure."""
        if type(self).process_batch is not TokenizerLabeler.process_batch:
            return batch  # a subclass with its own process_batch prepares its inputs itself
        out = Prepared()
        for inp in batch:
            try:
                out.append((self._crops_of(inp), len(inp.crops)))
            except (ValueError, KeyError) as e:
                out.append(LabelFailure(f"{self.source}: {e}"))
        return out

    def process_batch(self, batch: list) -> list[dict[str, Any] | LabelFailure]:
        import torch

        prepared = batch if isinstance(batch, Prepared) else self.prepare(batch)
        if self.model is None:
            self.setup()
        flat = [p[0] for p in prepared if not isinstance(p, LabelFailure)]
        flat = torch.from_numpy(np.concatenate(flat)) if flat else []
        ids = _encode_all(self.model, self.adapter, flat, self.device, self.config.crops_per_forward)
        dtype = get_modality(self.outputs[0]).dtype
        out: list[dict[str, Any] | LabelFailure] = []
        pos = 0
        for p in prepared:
            if isinstance(p, LabelFailure):
                out.append(p)
                continue
            k, n_crops = len(p[0]), p[1]
            arr = ids[pos:pos + k].astype(dtype)
            pos += k
            if self.adapter.kind == "vector":
                arr = np.repeat(arr, n_crops, axis=0)
            out.append({self.outputs[0]: np.ascontiguousarray(arr)})
        return out


def load_plugins_once() -> bool:
    """Load the installed plugins (they may register token modalities); False when they were loaded already."""
    from ..schemas.plugins import load_plugins, plugins_loaded

    if plugins_loaded():
        return False
    load_plugins()
    return True


def __getattr__(name: str):
    """A tokenizer labeler class made for a plugin's token modality (``TokGrayscaleLabeler``) exists in this module
    only after the plugin registered it; a Ray worker unpickling the class by name loads the plugins first."""
    if name.startswith("Tok") and name.endswith("Labeler") and load_plugins_once() and name in globals():
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _labeler_name(token_modality: str) -> str:
    return token_modality.split("@", 1)[0]


TOKENIZER_LABELERS: dict[str, type[TokenizerLabeler]] = {}  # token modality -> labeler class

def _make_tokenizer_labeler(tok: str, src: str, vocab: int, n: int) -> type[TokenizerLabeler]:
    name = _labeler_name(tok)
    cls_name = "".join(part.capitalize() for part in name.split("_")) + "Labeler"
    cls = type(cls_name, (TokenizerLabeler,), {
        "__module__": __name__, "__qualname__": cls_name, "name": name, "outputs": (tok,),
        "requires": () if src == "rgb" else (src,), "source": src,
        "description": f"{src} -> {tok} ({n} tokens per crop, vocab <= {vocab}) with a trained tokenizer",
    })
    globals()[cls_name] = register_labeler(cls)
    TOKENIZER_LABELERS[tok] = cls
    return cls


for _tok, (_src, _vocab, _n) in TOKEN_MODALITIES.items():
    _make_tokenizer_labeler(_tok, _src, _vocab, _n)


def register_token_modality(tok: str, source: str, vocab_size: int, n_tokens: int,
                            kind: str | None = None) -> type[TokenizerLabeler]:
    """A token modality for a modality 4M does not have (a plugin's pixel modality, e.g. ``tok_grayscale@224`` of
    ``grayscale``): registers its spec and its tokenizer labeler, so ``train-tokenizer`` and ``tokenize`` handle
    it like 4M's own. The source is preprocessed as 4M preprocesses images (crop, resize, to [-1, 1]): a
    1-channel map as a grey map (``kind`` "gray": trained with MSE, measured by mse and psnr; ``kind="edge"`` for
    a binary edge map: BCE, edge f1), a 3-channel one like rgb. A plugin calls this when it is imported (its
    ``modalmill.labelers`` entry point), which modalmill does in every process it starts. Idempotent."""
    from ..schemas.modalities import get_modality
    from ..schemas.modalities import register_token_modality as register_spec
    from .fourm_inputs import KINDS

    spec = get_modality(source)
    if source not in KINDS:
        channels = spec.shape[2] if len(spec.shape) == 3 else 1
        if spec.kind not in ("pixel", "image") or channels not in (1, 3):
            raise ValueError(f"{source}: only 1- or 3-channel pixel modalities can get a 4M image tokenizer")
        allowed = ("gray", "edge") if channels == 1 else ("rgb",)
        if kind is not None and kind not in allowed:
            raise ValueError(f"{source}: a {channels}-channel map is tokenized as {' or '.join(allowed)}, not {kind!r}")
        KINDS[source] = kind or allowed[0]
    register_spec(tok, source, vocab_size, n_tokens)
    return TOKENIZER_LABELERS.get(tok) or _make_tokenizer_labeler(tok, source, vocab_size, n_tokens)


def _encode_all(model, adapter, items, device, step: int):
    """Token ids ``[len(items), n_tokens]`` (int64 numpy) of targets (a list of tensors, or one stacked tensor),
    ``step`` per forward pass."""
    import torch

    if len(items) == 0:
        return np.zeros((0, model.n_tokens), dtype=np.int64)
    out = []
    step = max(1, int(step))
    with torch.inference_mode():
        for i in range(0, len(items), step):
            chunk = items[i:i + step]
            x = adapter.to_input((chunk if isinstance(chunk, torch.Tensor) else torch.stack(chunk)).to(device))
            out.append((model.encode_ids(x) if hasattr(model, "encode_ids") else model.encode(x)).cpu())
    return torch.cat(out).numpy()


@register_labeler
class SamInstanceTokenizer(TokenizerLabeler):
    """``sam_mask`` (+ crop_settings) -> 4M's ``sam_instance`` file with the SAM-instance tokenizer.

    Per crop of the sample's ``crop_settings``: the instances cut to the crop resized to 224x224 (flipped with the
    crop; tiny ones dropped; see :func:`modalmill.tokenize.adapters.crop_instances`), each encoded from its 64x64
    in-box mask into 16 ids. The value is an object array ``[n_crops]`` of dicts ``{"points": per instance a list
    of int32 OpenCV contours (P, 1, 2) (x, y) in the 224 crop, largest first; "token_ids": int16 [N, 16];
    "bbox": int32 [N, 4] = ymin, xmin, ymax, xmax in crop pixels}`` (instances in the ``sam_mask`` order)."""

    name = "tok_sam_instance"
    outputs = ("sam_instance",)
    requires = ("sam_mask",)
    source = "sam_mask"
    tokenizer_modality = "sam_instance"
    description = ("sam_mask -> sam_instance (per crop: contours in the 224 crop, 16 token ids and a box per "
                   "instance) with a trained SAM-instance tokenizer")

    def prepare(self, batch: list[LabelInput]) -> Prepared:
        """Per sample: its crops' instances (contours, boxes) and their 64x64 in-box masks as the tokenizer's
        targets (float32 numpy), or a LabelFailure; made in the shard task, so the actor only encodes."""
        adapter = self._adapter()
        out = Prepared()
        for inp in batch:
            try:
                crops = [adapter.instances(inp.labels["sam_mask"], crop, inp.image.shape[:2]) for crop in inp.crops]
            except (ValueError, KeyError, TypeError) as e:
                out.append(LabelFailure(f"sam_mask: {e}"))
                continue
            masks = [adapter.prepare(inst.pop("mask")).numpy() for insts in crops for inst in insts]
            out.append((crops, masks))
        return out

    def process_batch(self, batch: list) -> list[dict[str, Any] | LabelFailure]:
        import torch

        per_sample = batch if isinstance(batch, Prepared) else self.prepare(batch)
        if self.model is None:
            self.setup()
        masks = [torch.from_numpy(m) for p in per_sample if not isinstance(p, LabelFailure) for m in p[1]]
        ids = _encode_all(self.model, self.adapter, masks, self.device, self.config.crops_per_forward)
        out: list[dict[str, Any] | LabelFailure] = []
        pos = 0
        for p in per_sample:
            if isinstance(p, LabelFailure):
                out.append(p)
                continue
            crops = p[0]
            value = np.empty(len(crops), dtype=object)
            for c, insts in enumerate(crops):
                n = len(insts)
                value[c] = {"points": [list(inst["contours"]) for inst in insts],
                            "token_ids": np.ascontiguousarray(ids[pos:pos + n].astype(np.int16)).reshape(n, -1),
                            "bbox": np.stack([inst["bbox"] for inst in insts]).astype(np.int32).reshape(n, 4)}
                pos += n
            out.append({"sam_instance": value})
        return out


@register_labeler
class PoseTokenizer(TokenizerLabeler):
    """``human_poses`` -> ``human_poses`` with ``pose_tokenized`` filled: the 8 pose-tokenizer ids of every
    person's 207-d body pose (4M's layout: one list per person, in the label's person order). The rest of the
    label is kept as stored; ``[]`` (no people) stays ``[]``. The file is rewritten in place (``--only
    human_poses``), and its producer becomes this labeler."""

    name = "tok_human_poses"
    outputs = ("human_poses",)
    requires = ("human_poses",)
    source = "human_poses"
    tokenizer_modality = "human_poses"
    description = "human_poses -> human_poses with pose_tokenized (8 ids per person) from a trained pose tokenizer"

    def process_batch(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        import torch

        from .adapters import body_poses

        if self.model is None:
            self.setup()
        poses: list[list | LabelFailure] = []
        for inp in batch:
            try:
                poses.append(body_poses(inp.labels["human_poses"]))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                poses.append(LabelFailure(f"human_poses: {e}"))
        flat = [torch.from_numpy(p) for ps in poses if not isinstance(ps, LabelFailure) for p in ps]
        ids = _encode_all(self.model, self.adapter, flat, self.device, self.config.crops_per_forward)
        out: list[dict[str, Any] | LabelFailure] = []
        pos = 0
        for inp, ps in zip(batch, poses):
            if isinstance(ps, LabelFailure):
                out.append(ps)
                continue
            value = inp.labels["human_poses"]
            tokens = [[int(t) for t in row] for row in ids[pos:pos + len(ps)]]
            pos += len(ps)
            if not ps:
                out.append({"human_poses": value})
            elif not isinstance(value, dict):
                out.append(LabelFailure("human_poses: expected 4M's dict of per-person lists"))
            else:
                out.append({"human_poses": {**value, "pose_tokenized": tokens}})
        return out


# tokens stored inside another modality's file (4M's sam_instance token_ids, human_poses' pose_tokenized)
TOKENIZER_LABELERS["sam_instance"] = SamInstanceTokenizer
TOKENIZER_LABELERS["human_poses"] = PoseTokenizer


def in_place(cls: type[TokenizerLabeler]) -> bool:
    """Whether the labeler rewrites the modality it reads (the pose tokenizer: ``human_poses``)."""
    return cls.outputs[0] in cls.requires


def labeler_for_token_modality(name: str) -> type[TokenizerLabeler]:
    """The tokenizer labeler for a token modality, its labeler name or its source modality (a plugin's token
    modality included: the installed plugins are loaded on a miss)."""
    for attempt in range(2):
        for tok, cls in TOKENIZER_LABELERS.items():
            if name in (tok, cls.name, cls.source) or (cls.source == "semseg_coco" and name == "semseg"):
                return cls
        if attempt == 0 and not load_plugins_once():
            break
    raise KeyError(f"no tokenizer writes {name!r}; token modalities: {', '.join(TOKENIZER_LABELERS)}")
