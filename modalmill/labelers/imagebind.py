"""ImageBind-Huge image features: the teacher of 4M-21's ``tok_imagebind@224`` / ``tok_imagebind_global``.

ImageBind's vision encoder is the OpenCLIP ViT-H/14 architecture (32 blocks, width 1280, 16 heads, GELU,
pre-LayerNorm, CLS token first, learned positional embedding, LayerNorm eps 1e-6) with two differences in how
it is written down: (1) its patch stem is a 3-D convolution with kernel ``(2, 14, 14)`` applied to the image
repeated into two frames (``PadIm2Video(pad_type="repeat", ntimes=2)``), and (2) its modules live under other
names. modalmill builds the tower with open-clip-torch (``ViT-H-14``, LayerNorm eps set to ImageBind's 1e-6)
and converts the official checkpoint with :func:`imagebind_to_open_clip`.

4M-21 tokenizes the 1280-wide final tokens of this tower at 224 x 224 (16 x 16 patches) with ImageNet
mean/std input, computed on each crop of ``crop_settings`` (row c of ``imagebind`` [n_crops, 16, 16, 1280] and
``imagebind_global`` [n_crops, 1280] is crop c; see :func:`modalmill.labelers.dinov2.crop_images`): the patch
tokens for ``tok_imagebind@224`` and the CLS token for ``tok_imagebind_global``
(its tokenizer configs give 1280 channels for both). Whether 4M-21 took the tokens before or after the vision
head's LayerNorm is not published (its modified ImageBind is not part of ml-4m); modalmill applies the
LayerNorm by default (as for CLIP's ``ln_post`` and DINOv2's ``x_norm_*`` tokens), ``layernorm: false`` gives
the raw trunk output. ``global_embedding: embedding`` stores ImageBind's own joint-space image embedding
(head projection to 1024, L2-normalised) in ``imagebind_global`` instead of the CLS token.

Key conversion (ImageBind name -> open_clip ``VisionTransformer`` name):

==========================================================================  ===================================
``modality_preprocessors.vision.rgbt_stem.proj.1.weight`` [W, 3, 2, p, p]   ``conv1.weight`` [W, 3, p, p]: the
                                                                            kernel summed over its 2 frames
                                                                            (the frames are the same image)
``modality_preprocessors.vision.cls_token`` [1, 1, W]                       ``class_embedding`` [W]
``modality_preprocessors.vision.pos_embedding_helper.pos_embed`` [1, L, W]  ``positional_embedding`` [L, W]
``modality_trunks.vision.pre_transformer_layer.0.{weight,bias}``            ``ln_pre.*``
``modality_trunks.vision.blocks.N.norm_1.*`` / ``norm_2.*``                 ``transformer.resblocks.N.ln_1.*`` /
                                                                            ``ln_2.*``
``modality_trunks.vision.blocks.N.attn.{in_proj_weight,in_proj_bias,         the same names under
out_proj.weight,out_proj.bias}``                                            ``transformer.resblocks.N.attn.``
``modality_trunks.vision.blocks.N.mlp.fc1.*`` / ``mlp.fc2.*``               ``...resblocks.N.mlp.c_fc.*`` /
                                                                            ``mlp.c_proj.*``
``modality_heads.vision.0.{weight,bias}`` (LayerNorm)                       ``ln_post.*``
``modality_heads.vision.2.weight`` [D, W] (Linear, no bias)                 ``proj`` [W, D] (transposed)
==========================================================================  ===================================

The other modalities' weights in the official checkpoint (text, audio, depth, thermal, IMU) are ignored.
``modalmill convert-weights imagebind imagebind_huge.pth vision.safetensors`` writes the converted image
tower once (about half the size); both files load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..io.fetch import WeightsError
from .base import LabelFailure, Resources, register_labeler
from .clip import (
    NORMALIZATIONS,
    OpenClipConfig,
    OpenClipTowerLabeler,
    build_open_clip_visual,
    find_checkpoint,
    grid_of,
    open_clip_features,
    visual_state_dict,
)
from .dinov2 import predict_crops
from .state_dicts import load_into, load_state_dict
from .pins import Pin

__all__ = ["IMAGEBIND_LN_EPS", "ImageBindLabeler", "imagebind_to_open_clip", "open_clip_to_imagebind"]

IMAGEBIND_LN_EPS = 1e-6
_PRE = "modality_preprocessors.vision."
_TRUNK = "modality_trunks.vision."
_HEAD = "modality_heads.vision."
# ImageBind block-relative name -> open_clip ResidualAttentionBlock-relative name
_BLOCK = {
    "norm_1.weight": "ln_1.weight", "norm_1.bias": "ln_1.bias",
    "attn.in_proj_weight": "attn.in_proj_weight", "attn.in_proj_bias": "attn.in_proj_bias",
    "attn.out_proj.weight": "attn.out_proj.weight", "attn.out_proj.bias": "attn.out_proj.bias",
    "norm_2.weight": "ln_2.weight", "norm_2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
}
_BLOCK_KEY = re.compile(r"^" + re.escape(_TRUNK) + r"blocks\.(\d+)\.(.+)$")


def is_imagebind_state(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(("modality_preprocessors.", "modality_trunks.", "modality_heads.")) for k in state)


def imagebind_to_open_clip(state: Mapping[str, Any]) -> dict[str, Any]:
    """Convert an ImageBind checkpoint's vision weights to an open_clip ``VisionTransformer`` state dict.

    ``state``: the official ``imagebind_huge.pth`` state dict (all modalities; only ``*.vision.*`` keys are
    used). Returns ``{open_clip name: tensor}`` without the ``visual.`` prefix, for a ViT built with LayerNorm
    eps 1e-6. A vision key that has no open_clip counterpart (layer scale, attention bias_kv, ...) or a missing
    one is a :class:`WeightsError`.
    """
    vision = {k: v for k, v in state.items() if k.startswith((_PRE, _TRUNK, _HEAD))}
    if not vision:
        raise WeightsError("no ImageBind vision weights in the checkpoint (expected keys "
                           f"{_PRE}*, {_TRUNK}*, {_HEAD}*)")
    used: set[str] = set()

    def take(key: str):
        if key not in vision:
            raise WeightsError(f"ImageBind checkpoint: missing vision weight {key!r}")
        used.add(key)
        return vision[key]

    stem = take(_PRE + "rgbt_stem.proj.1.weight")
    if stem.ndim != 5:
        raise WeightsError(f"ImageBind checkpoint: {_PRE}rgbt_stem.proj.1.weight should be a 3-D conv kernel "
                           f"[W, 3, T, p, p], got shape {tuple(stem.shape)}")
    width = stem.shape[0]
    out: dict[str, Any] = {
        # PadIm2Video repeats the image into T identical frames; a 3-D conv over identical frames is the 2-D conv
        # with the kernel summed over time
        "conv1.weight": stem.sum(dim=2),
        "class_embedding": take(_PRE + "cls_token").reshape(width),
        "positional_embedding": take(_PRE + "pos_embedding_helper.pos_embed").reshape(-1, width),
        "ln_pre.weight": take(_TRUNK + "pre_transformer_layer.0.weight"),
        "ln_pre.bias": take(_TRUNK + "pre_transformer_layer.0.bias"),
        "ln_post.weight": take(_HEAD + "0.weight"),
        "ln_post.bias": take(_HEAD + "0.bias"),
        "proj": take(_HEAD + "2.weight").t().contiguous(),
    }
    blocks = sorted({int(m.group(1)) for k in vision if (m := _BLOCK_KEY.match(k))})
    if blocks != list(range(len(blocks))):
        raise WeightsError(f"ImageBind checkpoint: vision blocks are not numbered 0..N-1: {blocks[:8]}...")
    for i in blocks:
        for src, dst in _BLOCK.items():
            out[f"transformer.resblocks.{i}.{dst}"] = take(f"{_TRUNK}blocks.{i}.{src}")
    left = sorted(set(vision) - used)
    if left:
        raise WeightsError(f"ImageBind checkpoint: vision weights with no open_clip counterpart: {left[:5]}")
    return out


def open_clip_to_imagebind(visual_state: Mapping[str, Any], frames: int = 2) -> dict[str, Any]:
    """The inverse of :func:`imagebind_to_open_clip`: an open_clip ViT image tower in ImageBind's vision names.

    The 2-D patch kernel is spread evenly over ``frames`` (2, ImageBind's kernel) so that summing it back
    gives it exactly. Used to test the conversion and to export a tower in ImageBind's layout.
    """
    if frames < 1:
        raise ValueError("frames must be >= 1")
    conv = visual_state["conv1.weight"]
    out = {
        _PRE + "rgbt_stem.proj.1.weight": (conv / frames).unsqueeze(2).repeat(1, 1, frames, 1, 1).contiguous(),
        _PRE + "cls_token": visual_state["class_embedding"].reshape(1, 1, -1),
        _PRE + "pos_embedding_helper.pos_embed": visual_state["positional_embedding"].unsqueeze(0),
        _TRUNK + "pre_transformer_layer.0.weight": visual_state["ln_pre.weight"],
        _TRUNK + "pre_transformer_layer.0.bias": visual_state["ln_pre.bias"],
        _HEAD + "0.weight": visual_state["ln_post.weight"],
        _HEAD + "0.bias": visual_state["ln_post.bias"],
        _HEAD + "2.weight": visual_state["proj"].t().contiguous(),
    }
    inverse = {dst: src for src, dst in _BLOCK.items()}
    pat = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
    for k, v in visual_state.items():
        m = pat.match(k)
        if m:
            if m.group(2) not in inverse:
                raise ValueError(f"{k}: no ImageBind counterpart (layer scale or a custom block?)")
            out[f"{_TRUNK}blocks.{m.group(1)}.{inverse[m.group(2)]}"] = v
    return out


@register_labeler
class ImageBindLabeler(OpenClipTowerLabeler):
    """ImageBind-Huge vision encoder (open_clip ViT-H-14): per crop, ``imagebind`` [n_crops, 16, 16, 1280] and
    ``imagebind_global`` [n_crops, 1280].

    Input: every row of the crop settings, cut, bicubic-resized to 224 and flipped as the row says, ImageNet
    mean/std as 4M-21 (``normalize: clip`` for ImageBind's own CLIP statistics).
    """

    name = "imagebind"
    version = "2"  # 2: one row per crop_settings row (1 stored crop 0 only)
    outputs = ("imagebind", "imagebind_global")
    architecture = ("ImageBind-Huge vision encoder ViT-H/14 (open_clip ViT-H-14, LayerNorm eps 1e-6), "
                    "final tokens after the head LayerNorm; CLS token as the global feature")
    weights = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
    weights_pin = Pin(sha256="d6f6c22bedcc90708448d5d2fbb7b2db9c73f505dc89bd0b2e09b23af1b62157", size=4803584173,
                      source="the LFS pointers of three Hugging Face mirrors of imagebind_huge.pth, and a project "
                      "that verified the official download (Meta publishes no checksum)")
    weights_help = ("download imagebind_huge.pth (CC-BY-NC 4.0) from "
                    "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth and pass its local path or an s3:// "
                    "copy as weights (the full multimodal checkpoint works: its vision weights are converted on load), "
                    "or a file written by `modalmill convert-weights imagebind SRC DST`")
    license = "CC-BY-NC-4.0 (ImageBind weights: non-commercial)"
    default_resources = Resources(num_cpus=1, num_gpus=0.5, memory_mb=8000)
    default_batch_size = 4
    description = ("ImageBind-H/14 patch features [n_crops, 16, 16, 1280] and CLS feature [n_crops, 1280] at 224, "
                   "one row per crop (4M-21's teacher)")

    @dataclass(frozen=True)
    class Config(OpenClipConfig):
        arch: str = "ViT-H-14"
        layernorm: bool = True  # apply the vision head's LayerNorm to the tokens (False: raw trunk output)
        global_embedding: str = "cls"  # cls: the 1280-d CLS token (4M-21) | embedding: the 1024-d joint embedding

        def __post_init__(self):
            super().__post_init__()
            if self.global_embedding not in ("cls", "embedding"):
                raise ValueError(f"global_embedding must be 'cls' or 'embedding', got {self.global_embedding!r}")

    @staticmethod
    def open_clip_state(path: str, where: str) -> dict:
        """The image tower's open_clip state dict from an ImageBind checkpoint or an already converted one."""
        state = load_state_dict(path)
        if is_imagebind_state(state):
            try:
                return imagebind_to_open_clip(state)
            except WeightsError as e:
                raise WeightsError(f"{where}: {path}: {e}") from None
        return visual_state_dict(state)

    @classmethod
    def convert_weights(cls, src: str, dst: str) -> str:
        """Write the image tower of ImageBind checkpoint ``src`` in open_clip names to ``dst`` (.safetensors,
        local or s3://); ``src`` is a local path or s3:// URL. Returns ``dst``."""
        from safetensors.torch import save

        from ..io import storage
        from ..io.fetch import resolve

        if not dst.endswith(".safetensors"):
            raise ValueError(f"{dst}: the converted weights are written as .safetensors; give a .safetensors path")
        where = f"labeler {cls.name!r}"
        path = find_checkpoint(resolve(src, expected=f"an ImageBind checkpoint for {where}",
                                       how_to_get=cls.weights_help), where=where, how_to_get=cls.weights_help)
        state = {k: v.contiguous() for k, v in cls.open_clip_state(path, where).items()}
        storage.write_bytes(dst, save(state, metadata={"format": "pt", "converted_from": "ImageBind vision tower"}))
        return dst

    def build(self, path: str):
        where = f"labeler {self.name!r}"
        visual = build_open_clip_visual(self.config.arch, vision_overrides={"norm_kwargs": {"eps": IMAGEBIND_LN_EPS}},
                                        where=where)
        ckpt = find_checkpoint(path, where=where, how_to_get=self.weights_help)
        load_into(visual, self.open_clip_state(ckpt, where),
                  where=f"{where} ({self.config.arch} image tower) from {ckpt}")
        return visual

    def predict(self, batch: list) -> list[dict[str, Any] | LabelFailure]:
        import torch.nn.functional as F

        mean, std = NORMALIZATIONS[self.config.normalize]
        visual = self.model

        def forward(images):
            x = self.to_tensor(images, size=tuple(visual.image_size), mean=mean, std=std)
            tokens, cls_token, embedding = open_clip_features(visual, x, layernorm=self.config.layernorm)
            glob = cls_token if self.config.global_embedding == "cls" else F.normalize(embedding.float(), dim=-1)
            gh, gw = grid_of(visual)
            return {"imagebind": tokens.float().reshape(len(images), gh, gw, -1).cpu().numpy(),
                    "imagebind_global": glob.float().cpu().numpy()}

        return predict_crops(batch, forward, "ImageBind")
