"""CLIP patch features and image embedding: the teacher of 4M's ``tok_clip@224``.

4M trains its CLIP tokenizer on OpenAI CLIP ViT-B/16's image tower at 224 x 224 (``clip.load("ViT-B/16")``):
the final-layer patch tokens after ``ln_post`` and **after** the projection, ``ln_post(x)[:, 1:] @ proj``
(14 x 14 x 512), with the input normalised by the ImageNet mean/std (its tokenizer configs set
``imagenet_default_mean_and_std``). modalmill builds the same network with open-clip-torch
(``ViT-B-16-quickgelu``: OpenAI's weights need QuickGELU) and loads open_clip's copy of OpenAI's weights.

The teacher runs on every row of the sample's ``crop_settings`` (cut, resized, flipped as 4M does; see
:func:`modalmill.labelers.dinov2.crop_images`). Outputs, row c from crop c: ``clip`` ``[n_crops, 14, 14, 512]``
float16 (the projected patch tokens; ``project_tokens: false`` gives the 768-wide tokens before the projection)
and ``clip_global`` ``[n_crops, 512]`` float16, the image embedding (``ln_post(cls) @ proj``, not
L2-normalised). ``normalize: clip`` feeds the model CLIP's own mean/std instead.

The open_clip helpers here (building an image tower cheaply, finding and loading a checkpoint strictly) are
shared with :mod:`modalmill.labelers.imagebind`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..io.fetch import WeightsError
from .base import LabelFailure, LabelInput, Prepared, Resources, register_labeler
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD, predict_crops, prepare_crops
from .model import ModelConfig, ModelLabeler
from .state_dicts import load_into, load_state_dict
from .pins import Pin

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "CLIPLabeler",
    "build_open_clip_visual",
    "find_checkpoint",
    "open_clip_features",
    "visual_state_dict",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)}

# checkpoint file names tried in a weights directory, in order (open_clip's hub layout first; a timm-format
# model.safetensors next to them has other key names and is only used when nothing else is there)
_CKPT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
               "pytorch_model.bin")
_CKPT_EXTS = (".safetensors", ".pt", ".pth", ".bin")


# ---------------------------------------------------------------------- open_clip helpers


def build_open_clip_visual(arch: str, *, vision_overrides: dict | None = None, where: str = "open_clip"):
    """The image tower of open_clip architecture ``arch``, with uninitialised weights on the CPU.

    ``arch`` is a built-in open_clip model name (``ViT-B-16-quickgelu``, ``ViT-H-14``, ...) or the path of an
    open_clip model-config JSON file (``{"embed_dim", "vision_cfg", "text_cfg", ...}``), which is registered
    with ``open_clip.add_model_config`` under its file stem. ``vision_overrides`` update the ``vision_cfg``.
    The model is created with ``open_clip.create_model(name, pretrained=None)`` on the meta device (nothing is
    initialised: a random ViT-H would take ~30 s on a CPU) and then materialised empty, so the caller MUST
    fill every weight (:func:`modalmill.labelers.state_dicts.load_into` with ``strict=True``).
    """
    import open_clip
    import torch

    name = arch
    if arch.endswith(".json"):
        if not os.path.isfile(arch):
            raise WeightsError(f"{where}: no open_clip model config at {arch!r}")
        open_clip.add_model_config(arch)
        name = os.path.splitext(os.path.basename(arch))[0]
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"{where}: unknown open_clip architecture {arch!r} (a name from open_clip.list_models() "
                         "or the path of a model-config .json)")
    kwargs = {}
    if vision_overrides:
        kwargs["vision_cfg"] = {**cfg["vision_cfg"], **vision_overrides}
    with torch.device("meta"):
        model = open_clip.create_model(name, pretrained=None, device="meta", **kwargs)
    visual = model.visual
    del model
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "proj"):
        raise ValueError(f"{where}: {arch!r} is not an open_clip VisionTransformer architecture")
    if {n for n, _ in visual.named_buffers()} - set(visual.state_dict()):
        raise ValueError(f"{where}: {arch!r} has non-persistent buffers; it cannot be built without initialisation")
    return visual.to_empty(device="cpu")


def open_clip_image_size(arch: str) -> tuple[int, int]:
    """The input size of open_clip architecture ``arch`` (a name or a model-config .json), read from its config
    file without importing open_clip (and torch): the shard task resizes to it."""
    import importlib.util
    import json

    if arch.endswith(".json"):
        path = arch
    else:
        spec = importlib.util.find_spec("open_clip")
        path = os.path.join(list(spec.submodule_search_locations)[0], "model_configs", f"{arch}.json")
    try:
        with open(path) as f:
            size = json.load(f)["vision_cfg"].get("image_size", 224)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"open_clip architecture {arch!r}: cannot read its input size from {path}: {e}") from None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def find_checkpoint(path: str, *, where: str, how_to_get: str = "") -> str:
    """The checkpoint file at ``path``: the file itself, or the open_clip-style file in a directory."""
    if os.path.isfile(path):
        return path
    get = f" Get it: {how_to_get}." if how_to_get else ""
    if os.path.isdir(path):
        for n in _CKPT_NAMES:
            if os.path.isfile(os.path.join(path, n)):
                return os.path.join(path, n)
        files = sorted(f for f in os.listdir(path) if f.endswith(_CKPT_EXTS))
        if len(files) == 1:
            return os.path.join(path, files[0])
        raise WeightsError(f"{where}: no single checkpoint file in {path} (looked for {', '.join(_CKPT_NAMES)}"
                           f"{'; found ' + ', '.join(files) if files else ''}).{get}")
    raise WeightsError(f"{where}: weights not found at {path!r}.{get}")


def visual_state_dict(state: dict) -> dict:
    """The image-tower part of an open_clip state dict: ``visual.*`` keys without the prefix (a DDP ``module.``
    prefix is dropped first); a state dict without ``visual.`` keys is taken to be an image tower already."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return dict(state)


def open_clip_features(visual, x, *, layernorm: bool = True):
    """Final-layer tokens of an open_clip ViT: ``(patch_tokens [B, N, W], cls_token [B, W], image_embedding [B, D])``.

    ``layernorm``: apply the tower's final LayerNorm (``ln_post``) to the tokens. The image embedding is
    ``ln_post(cls) @ proj`` as open_clip's ``encode_image`` computes it (not L2-normalised).
    """
    out = visual.forward_intermediates(x, indices=1, normalize_intermediates=layernorm, output_fmt="NLC",
                                       output_extra_tokens=True)
    return out["image_intermediates"][0], out["image_intermediates_prefix"][0][:, 0], out["image_features"]


def grid_of(visual) -> tuple[int, int]:
    return tuple(int(g) for g in visual.grid_size)


# ---------------------------------------------------------------------- the labeler


@dataclass(frozen=True)
class OpenClipConfig(ModelConfig):
    """The settings of every open_clip image tower labeler (CLIP, ImageBind)."""

    # float32 by default: 4M computed the features its tokenizers were trained on in float32 (the teacher runs
    # outside run_training_vqvae's autocast; save_vq_tokens has none); bf16 changes token ids (docs/labelers.md)
    dtype: str = "float32"
    arch: str = "ViT-B-16-quickgelu"  # open_clip model name, or the path of an open_clip model-config .json
    normalize: str = "imagenet"  # imagenet: as 4M's tokenizers were trained | clip: OpenAI CLIP's mean/std

    def __post_init__(self):
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")


class OpenClipTowerLabeler(ModelLabeler):
    """An open_clip image tower run on the stored crops, each resized to the tower's input size."""

    Config = OpenClipConfig
    input_size = 224
    mean = IMAGENET_MEAN  # 4M's teachers were run on ImageNet-normalised crops (config normalize: clip to change)
    std = IMAGENET_STD

    def prepare(self, batch: list[LabelInput]) -> Prepared:
        return prepare_crops(batch, open_clip_image_size(self.config.arch))

    def crop_side(self) -> int | None:
        return max(open_clip_image_size(self.config.arch))  # reads only the crops, resized (crop_images)


@register_labeler
class CLIPLabeler(OpenClipTowerLabeler):
    """OpenAI CLIP ViT-B/16 image tower (open_clip): per crop, ``clip`` [n_crops, 14, 14, 512] and ``clip_global``
    [n_crops, 512], float16.

    Input: every row of the crop settings, cut, bicubic-resized to the tower's input size (224) and flipped as
    the row says, ImageNet mean/std as 4M (``normalize: clip`` for CLIP's own statistics).
    """

    name = "clip"
    version = "2"  # 2: one row per crop_settings row (1 stored crop 0 only)
    outputs = ("clip", "clip_global")
    architecture = "OpenAI CLIP ViT-B/16 image tower (open_clip ViT-B-16-quickgelu), ln_post patch tokens @ proj"
    weights = "timm/vit_base_patch16_clip_224.openai"
    weights_pin = Pin(note="no published sha256 of its weights file was found; the hub's own checksum checks "
                          "the download")
    weights_help = ("open_clip's copy of OpenAI's CLIP ViT-B/16 weights, the model-hub repo "
                    "timm/vit_base_patch16_clip_224.openai (open_clip_model.safetensors), or any open_clip state dict "
                    "(.safetensors, or a weights-only torch file) of the configured arch; OpenAI's TorchScript "
                    "ViT-B-16.pt archive is not accepted")
    license = "MIT (OpenAI CLIP weights)"
    default_resources = Resources(num_cpus=1, num_gpus=0.25, memory_mb=3000)
    default_batch_size = 8
    description = ("CLIP ViT-B/16 projected patch features [n_crops, 14, 14, 512] and image embedding [n_crops, 512] "
                   "at 224, one row per crop (4M's teacher)")

    @dataclass(frozen=True)
    class Config(OpenClipConfig):
        project_tokens: bool = True  # patch tokens after the projection (4M, 512-d) or before it (768-d)

    def build(self, path: str):
        where = f"labeler {self.name!r}"
        visual = build_open_clip_visual(self.config.arch, where=where)
        ckpt = find_checkpoint(path, where=where, how_to_get=self.weights_help)
        load_into(visual, visual_state_dict(load_state_dict(ckpt)),
                  where=f"{where} ({self.config.arch} image tower) from {ckpt}")
        return visual

    def predict(self, batch: list) -> list[dict[str, Any] | LabelFailure]:
        mean, std = NORMALIZATIONS[self.config.normalize]
        visual = self.model

        def forward(images):
            x = self.to_tensor(images, size=tuple(visual.image_size), mean=mean, std=std)
            tokens, _, embedding = open_clip_features(visual, x)
            if self.config.project_tokens and visual.proj is not None:
                tokens = tokens @ visual.proj
            gh, gw = grid_of(visual)
            return {"clip": tokens.float().reshape(len(images), gh, gw, -1).cpu().numpy(),
                    "clip_global": embedding.float().cpu().numpy()}

        return predict_crops(batch, forward, "CLIP")
