"""Quality scores by models: LAION's aesthetic predictor and watermark detector, and DataComp's CLIP score.

They fill 4M-21's ``metadata`` fields ``aesthetic_score`` (id 20) and ``watermark_score`` (id 19) for corpora that
do not carry them (COYO-700M does: :mod:`modalmill.io.scores`), and are what LAION, DataComp and COYO filter on.
Each writes a scalar modality of its own (``aesthetic_score``, ``watermark_score``: float32, one per sample, on the
stored image); the ``metadata_quality`` derived labeler (:mod:`modalmill.labelers.derived`) copies them into
``metadata``, where a score the input carries wins.

- :class:`LaionAestheticLabeler` (``laion_aesthetic``): LAION's improved aesthetic predictor v2
  (github.com/christophschuhmann/improved-aesthetic-predictor, ``sac+logos+ava1-l14-linearMSE.pth``, the score
  COYO calls ``aesthetic_score_laion_v2``): an MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations, dropout
  inactive at inference) on the L2-normalised OpenAI CLIP ViT-L/14 image embedding, with CLIP's preprocessing
  (shorter side resized to 224 bicubic, centre crop 224, CLIP's mean/std). The score is clipped to 0..10.
- :class:`LaionWatermarkLabeler` (``laion_watermark``): LAION-5B's watermark detector
  (github.com/LAION-AI/LAION-5B-WatermarkDetection, ``models/watermark_model_v1.pt``): timm ``efficientnet_b3a``
  whose classifier is replaced by ``Linear(1536, 625) - ReLU - Dropout(0.3) - Linear(625, 256) - ReLU -
  Linear(256, 2)``, on the image resized to 256 x 256 (bilinear) with ImageNet's mean/std; the score is the
  softmax probability of class 0 ("watermark"), as their ``example_use.py`` reads it.

- :class:`ClipScoreLabeler` (``clip_score``): DataComp's CLIP score, the cosine similarity of the OpenAI CLIP
  ViT-L/14 image embedding (CLIP's preprocessing) and the embedding of the sample's caption (its first
  ``caption`` entry), written as the scalar modality ``clip_score`` (-1..1).

Weights: the CLIP tower from the model hub (open_clip's copy of OpenAI's ViT-L/14), the aesthetic head and the
watermark network from their repositories at pinned commits (the head's sha256 computed from the file in the
repository; the watermark file is stored out of line there, so its hash is recorded on first download). Tests use
tiny random configurations of the same classes (an open_clip config JSON, a timm ``test_efficientnet``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.fetch import WeightsError, resolve
from .base import LabelFailure, LabelInput, Prepared, Resources, register_labeler
from .clip import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_open_clip_visual, find_checkpoint, open_clip_features,
                   open_clip_image_size, visual_state_dict)
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD
from .model import ModelConfig, ModelLabeler
from .pins import Pin
from .state_dicts import load_into, load_state_dict

__all__ = ["AESTHETIC_HEAD_URL", "ClipScoreLabeler", "LaionAestheticLabeler", "LaionWatermarkLabeler", "aesthetic_head",
           "watermark_net"]

AESTHETIC_HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/"
                      "6934dd81792f086e613a121dbce43082cb8be85e/sac+logos+ava1-l14-linearMSE.pth")
AESTHETIC_HEAD_PIN = Pin(sha256="21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0", size=3714759,
                         source="computed from the file in the repository at commit 6934dd8")
WATERMARK_URL = ("https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/"
                 "d8786e32b8a46bd1c254826dae51f54ab5b1e9e4/models/watermark_model_v1.pt")
WATERMARK_PIN = Pin(note="no published sha256: the file is stored out of line in the repository (git blob "
                         "09db4ad1b059bccc2be67380d321b67f0e9288e9 at commit d8786e3); its sha256 is recorded in the "
                         "cache on first download")


def aesthetic_head(dim: int = 768):
    """LAION's aesthetic MLP (state-dict keys ``layers.{0,2,4,6,7}.*``, as the released .pth)."""
    import torch.nn as nn

    class AestheticHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)

    return AestheticHead()


def watermark_net(arch: str = "efficientnet_b3a"):
    """LAION's watermark detector: timm ``arch`` (no pretrained weights) with their classifier head."""
    import timm
    import torch.nn as nn

    model = timm.create_model(arch, pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(nn.Linear(model.num_features, 625), nn.ReLU(), nn.Dropout(p=0.3),
                                     nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2))
    return model


def _resize_centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """CLIP's preprocessing on uint8: shorter side to ``size`` (bicubic), then the centre ``size`` x ``size``."""
    from PIL import Image

    h, w = image.shape[:2]
    # torchvision's Resize(size): the shorter side becomes size, the longer int(size * long / short)
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)))


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


@dataclass(frozen=True)
class ClipL14Config(ModelConfig):
    arch: str = "ViT-L-14-quickgelu"  # open_clip model name, or the path of an open_clip model-config .json


class OpenAIClipL14Labeler(ModelLabeler):
    """The weights and resources of the labelers on OpenAI's CLIP ViT-L/14 (open_clip's copy on the model hub)."""

    Config = ClipL14Config
    weights = "timm/vit_large_patch14_clip_224.openai"
    weights_pin = Pin(note="no published sha256 of its weights file was found; the hub's own checksum checks "
                          "the download")
    default_resources = Resources(num_cpus=1, num_gpus=0.25, memory_mb=4000)
    default_batch_size = 16

    def prepare(self, batch: list[LabelInput]) -> Prepared:
        size = open_clip_image_size(self.config.arch)[0]
        return Prepared(_resize_centre_crop(inp.image, size) for inp in batch)

    def unit_embeddings(self, visual, batch: list):
        """The image tower's embeddings of prepared crops, scaled to unit length (what LAION's heads read)."""
        x = self.to_tensor(batch, size=tuple(visual.image_size), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
        emb = open_clip_features(visual, x)[2].float()
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@register_labeler
class LaionAestheticLabeler(OpenAIClipL14Labeler):
    """LAION's aesthetic predictor v2 on CLIP ViT-L/14: ``aesthetic_score`` (float32, 0..10) per sample."""

    name = "laion_aesthetic"
    version = "1"
    outputs = ("aesthetic_score",)
    architecture = "OpenAI CLIP ViT-L/14 image tower (open_clip ViT-L-14-quickgelu) + LAION aesthetic MLP v2"
    weights_help = ("open_clip's copy of OpenAI's CLIP ViT-L/14 (the model-hub repo timm/vit_large_patch14_clip_"
                    "224.openai) or any open_clip state dict of the configured arch; the head: config 'head'")
    license = "MIT (OpenAI CLIP weights); Apache-2.0 (LAION aesthetic predictor)"
    description = "LAION aesthetic predictor v2 (CLIP ViT-L/14 + MLP): aesthetic_score 0..10 per sample"

    @dataclass(frozen=True)
    class Config(ClipL14Config):
        head: str | None = None  # the aesthetic MLP's weights (None: LAION's v2 file, pinned)

    def build(self, path: str):
        where = f"labeler {self.name!r}"
        visual = build_open_clip_visual(self.config.arch, where=where)
        ckpt = find_checkpoint(path, where=where, how_to_get=self.weights_help)
        load_into(visual, visual_state_dict(load_state_dict(ckpt)), where=f"{where} ({self.config.arch}) from {ckpt}")
        head_path = resolve(self.config.head or AESTHETIC_HEAD_URL, expected="LAION aesthetic MLP weights",
                            pin=None if self.config.head else AESTHETIC_HEAD_PIN)
        head = aesthetic_head(int(visual.output_dim))
        load_into(head, load_state_dict(head_path), where=f"{where} aesthetic head from {head_path}")
        return {"visual": visual, "head": head}

    def predict(self, batch: list) -> list[dict[str, Any] | LabelFailure]:
        visual, head = self.model["visual"], self.model["head"]
        emb = self.unit_embeddings(visual, batch)
        scores = head(emb).float().reshape(-1).cpu().numpy()
        return [{"aesthetic_score": np.array(min(max(float(s), 0.0), 10.0), np.float32)} for s in scores]


@register_labeler
class LaionWatermarkLabeler(ModelLabeler):
    """LAION-5B's watermark detector (timm EfficientNet-B3a): ``watermark_score`` (float32, 0..1) per sample."""

    name = "laion_watermark"
    version = "1"
    outputs = ("watermark_score",)
    architecture = "LAION-5B watermark detector (timm efficientnet_b3a + 3-layer classifier)"
    weights = WATERMARK_URL
    weights_pin = WATERMARK_PIN
    weights_help = "LAION-AI/LAION-5B-WatermarkDetection's models/watermark_model_v1.pt (a torch state dict)"
    license = "MIT (LAION-5B-WatermarkDetection)"
    input_size = 256
    default_resources = Resources(num_cpus=1, num_gpus=0.25, memory_mb=2000)
    default_batch_size = 16
    description = "LAION-5B watermark detector (EfficientNet-B3a): watermark_score 0..1 per sample"

    @dataclass(frozen=True)
    class Config(ModelConfig):
        arch: str = "efficientnet_b3a"  # the timm backbone (its num_features feeds LAION's head)

    def build(self, path: str):
        where = f"labeler {self.name!r}"
        if not path:
            raise WeightsError(f"{where}: no weights")
        model = watermark_net(self.config.arch)
        state = load_state_dict(path)
        if isinstance(state.get("weights"), dict):  # their training script's {'weights': state_dict} layout
            state = state["weights"]
        load_into(model, state, where=f"{where} ({self.config.arch}) from {path}")
        return model

    def prepare(self, batch: list[LabelInput]) -> Prepared:
        return Prepared(_resize(inp.image, self.input_size) for inp in batch)

    def predict(self, batch: list) -> list[dict[str, Any] | LabelFailure]:
        import torch

        x = self.to_tensor(batch, size=(self.input_size, self.input_size), mean=IMAGENET_MEAN, std=IMAGENET_STD)
        prob = torch.softmax(self.model(x).float(), dim=1)[:, 0].cpu().numpy()
        return [{"watermark_score": np.array(float(p), np.float32)} for p in prob]


def _caption_text(caption: Any) -> str:
    items = caption if isinstance(caption, list) else [caption]
    first = items[0] if items else ""
    return first.get("caption", "") if isinstance(first, dict) else str(first)


@register_labeler
class ClipScoreLabeler(OpenAIClipL14Labeler):
    """DataComp's CLIP score: the cosine similarity of the OpenAI CLIP ViT-L/14 image and caption embeddings
    (``clip_score``, float32 in -1..1, one per sample; the caption is the sample's first ``caption`` entry)."""

    name = "clip_score"
    version = "1"
    outputs = ("clip_score",)
    requires = ("caption",)
    architecture = "OpenAI CLIP ViT-L/14 (open_clip ViT-L-14-quickgelu), image and text towers"
    weights_help = ("open_clip's copy of OpenAI's CLIP ViT-L/14 (model-hub repo timm/vit_large_patch14_clip_224."
                    "openai) or any whole open_clip state dict (both towers) of the configured arch")
    license = "MIT (OpenAI CLIP weights)"
    description = "DataComp's CLIP score: CLIP ViT-L/14 image-caption cosine similarity per sample"

    def build(self, path: str):
        import open_clip

        where = f"labeler {self.name!r}"
        build_open_clip_visual(self.config.arch, where=where)  # registers a config .json; checks the arch
        name = self.config.arch[:-5].rsplit("/", 1)[-1] if self.config.arch.endswith(".json") else self.config.arch
        # built on the CPU, initialised: the text tower's causal mask is a non-persistent buffer that no state dict
        # holds (an uninitialised meta-device build would leave it empty)
        model = open_clip.create_model(name, pretrained=None)
        ckpt = find_checkpoint(path, where=where, how_to_get=self.weights_help)
        state = load_state_dict(ckpt)
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        load_into(model, state, where=f"{where} ({self.config.arch}) from {ckpt}")
        self._tokenizer = open_clip.get_tokenizer(name)
        return model

    def prepare(self, batch: list[LabelInput]) -> Prepared:
        size = open_clip_image_size(self.config.arch)[0]
        return Prepared((_resize_centre_crop(inp.image, size), _caption_text(inp.labels.get("caption", "")))
                        for inp in batch)

    def predict(self, batch: list) -> list[dict[str, Any] | LabelFailure]:
        model = self.model
        x = self.to_tensor([im for im, _ in batch], size=tuple(model.visual.image_size), mean=OPENAI_CLIP_MEAN,
                           std=OPENAI_CLIP_STD)
        img = model.encode_image(x).float()
        txt = model.encode_text(self._tokenizer([t for _, t in batch]).to(self.device)).float()
        img = img / img.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        txt = txt / txt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = (img * txt).sum(dim=-1).clamp(-1, 1).cpu().numpy()
        return [{"clip_score": np.array(float(c), np.float32)} for c in cos]
