"""4D-Humans / HMR 2.0: SMPL body pose, shape and camera of every detected person (``human_poses``).

The architecture is HMR 2.0's (shubham-goel/4D-Humans, ``hmr2/models``), written here with torch and timm:

- backbone: ViTPose-style ViT-H/16 on a 256x192 (HxW) person crop. Patch embedding is a 16x16 stride-16
  convolution with padding 2 (16x12 tokens), absolute positions (the class-token slot of ``pos_embed`` is
  added to every token, there is no class token), 32 pre-norm blocks (timm ``Block``: key names
  ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`` as in ViTPose), final ``last_norm``;
- head: the SMPL transformer decoder. One zero-valued query token (``token_embed``: Linear(1, 1024) plus a
  learned position) goes through 6 layers of pre-norm self-attention, cross-attention to the 192 image
  tokens (context 1280) and an MLP (8 heads x 64, MLP 1024); linear read-outs add to the mean SMPL
  parameters stored in the checkpoint: 24 joint rotations in the 6D representation (global orientation +
  23 body joints), 10 shape coefficients (betas) and the weak-perspective camera ``[s, tx, ty]`` of the crop;
  6D -> rotation matrices (Gram-Schmidt, vectorised). One iteration, as in the released model.

Input crops follow HMR 2.0's ``ViTDetDataset``: the person box (``det`` label, class ``person``, score >=
``score_threshold``, by default the detector's person threshold in the record) is grown to the 192:256 aspect ratio,
the square of its long side around the box centre is resampled to 256x256 (bilinear, black outside the image;
Gaussian pre-blur when the square is more than 2.2x the crop, sigma = (side / 512 - 1) / 2, as HMR 2.0 does) and its
central 192 columns are used, normalised with the ImageNet mean/std. All crops of a batch run through the model
together.

Output (4M's ``human_poses`` JSON, the layout fourm's ``HumanPoseTransform`` reads: one list per field, one
entry per person, people sorted by detection score): ``[]`` when no person is found, else::

    {"bbox_xyxy": [[x0, y0, x1, y1], ...],                 # person boxes, pixels (see bbox_frame)
     "pred_smpl_params": {"global_orient": [1x3x3, ...],   # rotation matrices
                          "body_pose": [23x3x3, ...], "betas": [[10], ...]},
     "pred_cam": [[s, tx, ty], ...]}                        # HMR 2.0's crop camera

``pose_tokenized`` (8 ids of 4M's pose tokenizer per person) is left out: the tokenize stage adds it.
``bbox_frame: stored`` (default) gives boxes in pixels of the stored rgb image, which is what 4M's trainer
divides by (it normalises ``bbox_xyxy`` by the size of the rgb image it loads); ``original`` scales them to
the source image's ``original_size``. No SMPL body-model file is needed: only the parameters are produced.

Weights: the official checkpoint is the PyTorch-Lightning file ``epoch=35-step=1000000.ckpt`` from 4D-Humans'
``hmr2_data.tar.gz``. It is read without unpickling any object (see :func:`read_lightning_state_dict`) and its
key names are converted by :func:`convert_hmr2_state_dict`; ``modalmill convert-weights hmr2 SRC DST`` writes
the converted weights (``.safetensors``, architecture in its metadata) once, so actors load them faster.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.fetch import WeightsError
from .base import LabelFailure, LabelInput, Resources, register_labeler
from .detection import det_thresholds
from .model import ModelConfig, ModelLabeler
from .sam import find_weights_file
from .state_dicts import load_into, load_state_dict, read_lightning_state_dict
from .pins import Pin

__all__ = ["HMR2_ARCHITECTURE", "Hmr2Labeler", "build_hmr2", "convert_checkpoint", "convert_hmr2_state_dict",
           "crop_boxes", "load_hmr2_weights", "read_lightning_state_dict", "rot6d_to_rotmat", "save_converted",
           "to_official_names"]

HMR2_DATA_URL = "https://people.eecs.berkeley.edu/~jathushan/projects/4dhumans/hmr2_data.tar.gz"
OFFICIAL_CKPT = "logs/train/multiruns/hmr2/0/checkpoints/epoch=35-step=1000000.ckpt"
ARCH_METADATA_KEY = "modalmill_hmr2_architecture"

# hmr2/models/backbones/vit.py (vit()) and hmr2/configs_hydra/experiment/hmr_vit_transformer.yaml
HMR2_ARCHITECTURE: dict[str, dict[str, Any]] = {
    "backbone": {"img_size": (256, 192), "patch_size": 16, "embed_dim": 1280, "depth": 32, "num_heads": 16,
                 "mlp_ratio": 4.0, "qkv_bias": True, "patch_padding": 2},
    "head": {"dim": 1024, "depth": 6, "heads": 8, "dim_head": 64, "mlp_dim": 1024, "context_dim": 1280,
             "num_joints": 23, "ief_iters": 1},
}
CROP_SIZE = 256  # HMR 2.0's MODEL.IMAGE_SIZE; the backbone sees its central 192 columns
BBOX_SHAPE = (192, 256)  # (w, h) aspect the person box is grown to (MODEL.BBOX_SHAPE)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------- architecture


def _modules():
    """The torch modules (defined lazily so that importing modalmill does not import torch)."""
    global _MODULES
    if "_MODULES" in globals():
        return _MODULES
    backbone = _backbone_class()
    head = _head_class(_decoder_layer_class())
    _MODULES = {"HMR2": _hmr2_class(backbone, head), "ViTPoseBackbone": backbone, "SMPLDecoderHead": head}
    return _MODULES


def _backbone_class():
    """HMR 2.0's image backbone: ViTPose's plain ViT (a padded patch embedding and timm's ``Block`` s)."""
    from functools import partial

    import torch
    from timm.models.vision_transformer import Block
    from torch import nn

    class PatchEmbed(nn.Module):
        def __init__(self, embed_dim: int, patch_size: int, padding: int):
            super().__init__()
            self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size, padding=padding)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class ViTPoseBackbone(nn.Module):
        """ViTPose's plain ViT as HMR 2.0 uses it: tokens [B, (H/16)*(W/16), C] of a 256x192 crop."""

        def __init__(self, img_size=(256, 192), patch_size=16, embed_dim=1280, depth=32, num_heads=16,
                     mlp_ratio=4.0, qkv_bias=True, patch_padding=2):
            super().__init__()
            n = (img_size[0] // patch_size) * (img_size[1] // patch_size)
            self.patch_embed = PatchEmbed(embed_dim, patch_size, patch_padding)
            self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
            norm = partial(nn.LayerNorm, eps=1e-6)
            self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm)
                                        for _ in range(depth))
            self.last_norm = norm(embed_dim)

        def forward(self, x):
            x = self.patch_embed(x)
            x = x + self.pos_embed[:, 1:] + self.pos_embed[:, :1]
            for blk in self.blocks:
                x = blk(x)
            return self.last_norm(x)

    return ViTPoseBackbone


def _decoder_layer_class():
    """One layer of HMR 2.0's pose transformer: self-attention, cross-attention to the image tokens, MLP."""
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        """Multi-head attention without q/k/v biases (HMR 2.0's pose transformer); ``context``: cross-attention."""

        def __init__(self, dim, heads, dim_head, context_dim=None):
            super().__init__()
            inner = heads * dim_head
            self.heads = heads
            self.cross = context_dim is not None
            if self.cross:
                self.q = nn.Linear(dim, inner, bias=False)
                self.kv = nn.Linear(context_dim, 2 * inner, bias=False)
            else:
                self.qkv = nn.Linear(dim, 3 * inner, bias=False)
            self.proj = nn.Linear(inner, dim)

        def forward(self, x, context=None):
            if self.cross:
                q, (k, v) = self.q(x), self.kv(context).chunk(2, dim=-1)
            else:
                q, k, v = self.qkv(x).chunk(3, dim=-1)
            q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v)
            return self.proj(out.transpose(1, 2).flatten(2))

    class DecoderLayer(nn.Module):
        def __init__(self, dim, heads, dim_head, mlp_dim, context_dim):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.self_attn = Attention(dim, heads, dim_head)
            self.norm2 = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, heads, dim_head, context_dim=context_dim)
            self.norm3 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential()
            self.mlp.add_module("fc1", nn.Linear(dim, mlp_dim))
            self.mlp.add_module("act", nn.GELU())
            self.mlp.add_module("fc2", nn.Linear(mlp_dim, dim))

        def forward(self, x, context):
            x = x + self.self_attn(self.norm1(x))
            x = x + self.cross_attn(self.norm2(x), context)
            return x + self.mlp(self.norm3(x))

    return DecoderLayer


def _head_class(DecoderLayer):
    """HMR 2.0's SMPL head: a transformer decoder of ``DecoderLayer`` s and the read-outs of the SMPL parameters."""
    import torch
    from torch import nn

    class SMPLDecoderHead(nn.Module):
        """HMR 2.0's SMPL transformer-decoder head: image tokens -> 24 rotations (6D), 10 betas, crop camera."""

        def __init__(self, dim=1024, depth=6, heads=8, dim_head=64, mlp_dim=1024, context_dim=1280, num_joints=23,
                     ief_iters=1):
            super().__init__()
            self.ief_iters = ief_iters
            npose = 6 * (num_joints + 1)
            self.token_embed = nn.Linear(1, dim)
            self.pos_embed = nn.Parameter(torch.zeros(1, 1, dim))
            self.layers = nn.ModuleList(DecoderLayer(dim, heads, dim_head, mlp_dim, context_dim) for _ in range(depth))
            self.dec_pose = nn.Linear(dim, npose)
            self.dec_shape = nn.Linear(dim, 10)
            self.dec_cam = nn.Linear(dim, 3)
            # the mean SMPL parameters the read-outs add to (HMR 2.0 loads them from smpl_mean_params.npz and
            # stores them in its checkpoint as buffers)
            self.register_buffer("init_pose", torch.zeros(1, npose))
            self.register_buffer("init_betas", torch.zeros(1, 10))
            self.register_buffer("init_cam", torch.zeros(1, 3))

        def forward(self, tokens):
            b = tokens.shape[0]
            pose, betas, cam = (t.expand(b, -1) for t in (self.init_pose, self.init_betas, self.init_cam))
            for _ in range(self.ief_iters):
                x = self.token_embed(tokens.new_zeros(b, 1, 1)) + self.pos_embed
                for layer in self.layers:
                    x = layer(x, tokens)
                x = x[:, 0]
                pose, betas, cam = self.dec_pose(x) + pose, self.dec_shape(x) + betas, self.dec_cam(x) + cam
            rot = rot6d_to_rotmat(pose).view(b, -1, 3, 3)
            return {"global_orient": rot[:, :1], "body_pose": rot[:, 1:], "betas": betas}, cam

    return SMPLDecoderHead


def _hmr2_class(ViTPoseBackbone, SMPLDecoderHead):
    """HMR 2.0: the backbone and the SMPL head, with the architecture they were built with."""
    import torch
    from torch import nn

    class HMR2(nn.Module):
        def __init__(self, architecture: dict | None = None):
            super().__init__()
            arch = architecture or HMR2_ARCHITECTURE
            bb = {**HMR2_ARCHITECTURE["backbone"], **arch.get("backbone", {})}
            bb["img_size"] = tuple(bb["img_size"])
            self.architecture = {"backbone": bb, "head": {**HMR2_ARCHITECTURE["head"], **arch.get("head", {})}}
            self.backbone = ViTPoseBackbone(**bb)
            self.head = SMPLDecoderHead(**self.architecture["head"])

        def forward(self, crops):
            """crops: [B, 3, 256, 192] normalised -> ({global_orient, body_pose, betas}, cam).

            Under GPU autocast only the backbone runs in reduced precision; the small head and the 6D ->
            rotation-matrix step run in float32, so the matrices stay orthonormal to ~1e-6."""
            tokens = self.backbone(crops)
            with torch.autocast(device_type=tokens.device.type, enabled=False):
                return self.head(tokens.float())

    return HMR2


def build_hmr2(architecture: dict | None = None):
    """An (untrained) HMR 2.0 module; ``architecture`` overrides parts of :data:`HMR2_ARCHITECTURE`."""
    return _modules()["HMR2"](architecture)


def rot6d_to_rotmat(x):
    """[..., 6] 6D rotations (two columns a1 = x[:3], a2 = x[3:]) -> [..., 3, 3] (Gram-Schmidt; Zhou et al. 2019).

    Works on any number of leading dims (HMR 2.0 feeds [B, 24 * 6] reshaped to [-1, 6]).
    """
    import torch
    import torch.nn.functional as F

    x = x.reshape(-1, 2, 3)
    b1 = F.normalize(x[:, 0], dim=-1)
    a2 = x[:, 1]
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-1)


# ---------------------------------------------------------------------- official checkpoint -> modalmill names

# official (4D-Humans HMR2 LightningModule state dict) -> modalmill (module above); applied in order, first match
_HEAD = r"smpl_head\."
_LAYER = _HEAD + r"transformer\.transformer\.layers\.(\d+)\."
_TO_OURS: list[tuple[str, str]] = [
    (r"backbone\.(.+)", r"backbone.\1"),  # ViTPose names are kept (timm Block uses the same)
    (_HEAD + r"transformer\.to_token_embedding\.(weight|bias)", r"head.token_embed.\1"),
    (_HEAD + r"transformer\.pos_embedding", r"head.pos_embed"),
    (_LAYER + r"0\.norm\.(weight|bias)", r"head.layers.\1.norm1.\2"),
    (_LAYER + r"0\.fn\.to_qkv\.weight", r"head.layers.\1.self_attn.qkv.weight"),
    (_LAYER + r"0\.fn\.to_out\.0\.(weight|bias)", r"head.layers.\1.self_attn.proj.\2"),
    (_LAYER + r"1\.norm\.(weight|bias)", r"head.layers.\1.norm2.\2"),
    (_LAYER + r"1\.fn\.to_q\.weight", r"head.layers.\1.cross_attn.q.weight"),
    (_LAYER + r"1\.fn\.to_kv\.weight", r"head.layers.\1.cross_attn.kv.weight"),
    (_LAYER + r"1\.fn\.to_out\.0\.(weight|bias)", r"head.layers.\1.cross_attn.proj.\2"),
    (_LAYER + r"2\.norm\.(weight|bias)", r"head.layers.\1.norm3.\2"),
    (_LAYER + r"2\.fn\.net\.0\.(weight|bias)", r"head.layers.\1.mlp.fc1.\2"),
    (_LAYER + r"2\.fn\.net\.3\.(weight|bias)", r"head.layers.\1.mlp.fc2.\2"),
    (_HEAD + r"decpose\.(weight|bias)", r"head.dec_pose.\1"),
    (_HEAD + r"decshape\.(weight|bias)", r"head.dec_shape.\1"),
    (_HEAD + r"deccam\.(weight|bias)", r"head.dec_cam.\1"),
    (_HEAD + r"init_body_pose", r"head.init_pose"),
    (_HEAD + r"init_betas", r"head.init_betas"),
    (_HEAD + r"init_cam", r"head.init_cam"),
]
# parts of the training module that inference does not use: the adversarial discriminator, the SMPL body model's
# buffers (its licence is separate; no mesh is made here), the loss modules, the ActNorm flag
_DROP = re.compile(r"^(discriminator\.|smpl\.|keypoint_3d_loss\.|keypoint_2d_loss\.|smpl_parameter_loss\.|"
                   r"initialized$)")


def convert_hmr2_state_dict(official: dict) -> dict:
    """4D-Humans' HMR2 state dict (official key names) -> a state dict of :func:`build_hmr2`'s module.

    ``backbone.*`` keeps its names; ``smpl_head.*`` is renamed by the table ``_TO_OURS`` (e.g.
    ``smpl_head.transformer.transformer.layers.3.1.fn.to_kv.weight`` -> ``head.layers.3.cross_attn.kv.weight``,
    ``smpl_head.decpose.weight`` -> ``head.dec_pose.weight``, ``smpl_head.init_body_pose`` -> ``head.init_pose``);
    the discriminator, the SMPL body model's buffers and the loss modules are dropped. A key that is neither
    mapped nor dropped is an error (the checkpoint is not HMR 2.0's).
    """
    out, unknown = {}, []
    for k, v in official.items():
        if _DROP.match(k):
            continue
        for pat, repl in _TO_OURS:
            if re.fullmatch(pat, k):
                out[re.sub(pat, repl, k)] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise WeightsError(f"not an HMR 2.0 checkpoint: {len(unknown)} unexpected key(s), e.g. {unknown[:5]}")
    if not any(k.startswith("head.") for k in out) or not any(k.startswith("backbone.") for k in out):
        raise WeightsError("not an HMR 2.0 checkpoint: no backbone.* and smpl_head.* weights")
    return out


_TO_OFFICIAL: list[tuple[str, str]] = [
    (r"head\.token_embed\.(weight|bias)", r"smpl_head.transformer.to_token_embedding.\1"),
    (r"head\.pos_embed", r"smpl_head.transformer.pos_embedding"),
    (r"head\.layers\.(\d+)\.norm1\.(weight|bias)", r"smpl_head.transformer.transformer.layers.\1.0.norm.\2"),
    (r"head\.layers\.(\d+)\.self_attn\.qkv\.weight", r"smpl_head.transformer.transformer.layers.\1.0.fn.to_qkv.weight"),
    (r"head\.layers\.(\d+)\.self_attn\.proj\.(weight|bias)",
     r"smpl_head.transformer.transformer.layers.\1.0.fn.to_out.0.\2"),
    (r"head\.layers\.(\d+)\.norm2\.(weight|bias)", r"smpl_head.transformer.transformer.layers.\1.1.norm.\2"),
    (r"head\.layers\.(\d+)\.cross_attn\.q\.weight", r"smpl_head.transformer.transformer.layers.\1.1.fn.to_q.weight"),
    (r"head\.layers\.(\d+)\.cross_attn\.kv\.weight", r"smpl_head.transformer.transformer.layers.\1.1.fn.to_kv.weight"),
    (r"head\.layers\.(\d+)\.cross_attn\.proj\.(weight|bias)",
     r"smpl_head.transformer.transformer.layers.\1.1.fn.to_out.0.\2"),
    (r"head\.layers\.(\d+)\.norm3\.(weight|bias)", r"smpl_head.transformer.transformer.layers.\1.2.norm.\2"),
    (r"head\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"smpl_head.transformer.transformer.layers.\1.2.fn.net.0.\2"),
    (r"head\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"smpl_head.transformer.transformer.layers.\1.2.fn.net.3.\2"),
    (r"head\.dec_pose\.(weight|bias)", r"smpl_head.decpose.\1"),
    (r"head\.dec_shape\.(weight|bias)", r"smpl_head.decshape.\1"),
    (r"head\.dec_cam\.(weight|bias)", r"smpl_head.deccam.\1"),
    (r"head\.init_pose", r"smpl_head.init_body_pose"),
    (r"head\.init_betas", r"smpl_head.init_betas"),
    (r"head\.init_cam", r"smpl_head.init_cam"),
    (r"backbone\.(.+)", r"backbone.\1"),
]


def to_official_names(ours: dict) -> dict:
    """The inverse of :func:`convert_hmr2_state_dict` (modalmill names -> 4D-Humans' names)."""
    out = {}
    for k, v in ours.items():
        for pat, repl in _TO_OFFICIAL:
            if re.fullmatch(pat, k):
                out[re.sub(pat, repl, k)] = v
                break
        else:
            raise KeyError(f"no official name for {k!r}")
    return out


def load_hmr2_weights(path: str) -> tuple[dict, dict | None]:
    """(state dict in modalmill's names, architecture or None for the official one) from any accepted file.

    Accepted: the official Lightning ``.ckpt``, a state dict in official names (``.pth``/``.safetensors``), or
    one written by :func:`save_converted` (modalmill names, architecture in the safetensors metadata).
    """
    arch = None
    if path.endswith(".ckpt"):
        state = read_lightning_state_dict(path)
    else:
        state = load_state_dict(path)
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            if ARCH_METADATA_KEY in meta:
                arch = json.loads(meta[ARCH_METADATA_KEY])
    if any(k.startswith("smpl_head.") for k in state):
        state = convert_hmr2_state_dict(state)
    return state, arch


def save_converted(state: dict, dst: str, architecture: dict | None = None) -> None:
    """Write a modalmill-named HMR 2.0 state dict as ``.safetensors`` with its architecture in the metadata."""
    from safetensors.torch import save_file

    arch = build_hmr2(architecture).architecture if architecture is not None else HMR2_ARCHITECTURE
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + ".tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp,
              metadata={ARCH_METADATA_KEY: json.dumps(arch, sort_keys=True, default=list)})
    os.replace(tmp, dst)


def convert_checkpoint(src: str, dst: str, architecture: dict | None = None) -> str:
    """An HMR 2.0 checkpoint (official ``.ckpt``, or official names in ``.pth``/``.safetensors``) -> ``dst``
    (``.safetensors``, modalmill's names, the architecture in its metadata). The weights are loaded strictly
    into the architecture (the official one unless given) before anything is written."""
    if not dst.endswith(".safetensors"):
        raise ValueError(f"{dst}: the converted weights are written as .safetensors")
    state, arch = load_hmr2_weights(src)
    arch = architecture or arch
    load_into(build_hmr2(arch), state, where=src)
    save_converted(state, dst, arch)
    return dst


# ---------------------------------------------------------------------- crops


def crop_boxes(boxes: np.ndarray, box_scale: float = 1.0) -> np.ndarray:
    """[N, 4] xyxy person boxes -> [N, 3] (cx, cy, side): HMR 2.0's square crop around each box.

    The box (times ``box_scale``) is grown to the 192:256 (w:h) aspect ratio (ViTDetDataset +
    expand_to_aspect_ratio) and the crop is the square of its longer side around the box centre.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    wh = (boxes[:, 2:] - boxes[:, :2]) * box_scale
    w, h = wh[:, 0], wh[:, 1]
    wt, ht = BBOX_SHAPE
    taller = h / np.maximum(w, 1e-9) >= ht / wt
    w_new = np.where(taller, np.maximum(h * wt / ht, w), w)
    h_new = np.where(taller, h, np.maximum(w * ht / wt, h))
    return np.stack([c[:, 0], c[:, 1], np.maximum(np.maximum(w_new, h_new), 1.0)], axis=1)


def _gaussian_blur(img, sigma: float):
    """Separable Gaussian blur of [1, 3, H, W] with edge replication (skimage.filters.gaussian's defaults)."""
    import torch
    import torch.nn.functional as F

    r = int(4.0 * sigma + 0.5)
    x = torch.arange(-r, r + 1, device=img.device, dtype=img.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    img = F.conv2d(F.pad(img, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(F.pad(img, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


# ---------------------------------------------------------------------- the labeler


@register_labeler
class Hmr2Labeler(ModelLabeler):
    """HMR 2.0 (4D-Humans) SMPL parameters of each person the detection labeler found."""

    name = "hmr2"
    version = "1"
    outputs = ("human_poses",)
    requires = ("det",)
    architecture = ("HMR 2.0: ViTPose ViT-H/16 backbone (256x192 crop) + SMPL transformer-decoder head "
                    "(6 layers, cross-attention to the image tokens, 6D rotations)")
    # the official checkpoint inside 4D-Humans' data tarball (the tarball is downloaded once, the member extracted)
    weights = f"{HMR2_DATA_URL}#{OFFICIAL_CKPT}"
    weights_pin = Pin(note="no published sha256 or size of hmr2_data.tar.gz was found (4D-Humans publishes none); "
                      "it is used as downloaded, its sha256 recorded in the weights cache and shown by `modalmill "
                      "weights`")
    weights_help = (f"the default downloads {HMR2_DATA_URL} (4D-Humans) and extracts {OFFICIAL_CKPT}; offline, "
                    "stage it with `modalmill weights fetch hmr2 --to DIR|s3://PREFIX`, or extract it yourself and "
                    "pass its path (or an s3:// URL) as the labeler's `weights`, or first convert it: `modalmill "
                    "convert-weights hmr2 SRC DST.safetensors`")
    input_size = (256, 192)
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    license = "MIT (4D-Humans code and HMR 2.0 weights; trained with SMPL, whose own licence applies to the body model)"
    default_resources = Resources(num_cpus=1, num_gpus=0.25, memory_mb=6000)
    default_batch_size = 8
    description = "4D-Humans HMR 2.0 SMPL pose/shape/camera per detected person (needs det)"

    @dataclass(frozen=True)
    class Config(ModelConfig):
        person_class: str = "person"  # det class_name taken as a person
        # det score needed; None: the detector's person threshold from the det record (comparable to HMR 2.0's
        # demo, which keeps ViTDet persons scoring > 0.5; D-FINE 0.4, DETR 0.7; see labelers/detection.py)
        score_threshold: float | None = None
        max_people: int = 0  # keep the highest-scoring N people per image; 0 = all
        box_scale: float = 1.0  # grow the person box before cropping (HMR 2.0's demo: 1.0)
        bbox_frame: str = "stored"  # stored: pixels of the stored rgb (what 4M reads) | original: source pixels
        crops_per_forward: int = 32  # crops per model call (memory bound; does not change results)

        def __post_init__(self):
            if self.score_threshold is not None and not (0.0 <= float(self.score_threshold) <= 1.0):
                raise ValueError(f"score_threshold must lie in [0, 1], got {self.score_threshold!r}")
            if self.bbox_frame not in ("stored", "original"):
                raise ValueError(f"bbox_frame must be 'stored' or 'original', got {self.bbox_frame!r}")
            if not (float(self.box_scale) > 0):
                raise ValueError(f"box_scale must be > 0, got {self.box_scale!r}")
            for f in ("max_people", "crops_per_forward"):
                v = getattr(self, f)
                if isinstance(v, bool) or not isinstance(v, int) or v < (0 if f == "max_people" else 1):
                    raise ValueError(f"{f} must be an integer >= {0 if f == 'max_people' else 1}, got {v!r}")

    # ------------------------------------------------------------------ weights
    def build(self, path: str):
        file = find_weights_file(path, (".ckpt", ".safetensors", ".pth", ".pt", ".bin"), "HMR 2.0 weights")
        state, arch = load_hmr2_weights(file)
        model = build_hmr2(arch)
        load_into(model, state, where=f"labeler {self.name!r} from {file}")
        return model

    @classmethod
    def convert_weights(cls, src: str, dst: str) -> str:
        """Official HMR 2.0 checkpoint (``.ckpt``) -> ``dst`` (.safetensors in modalmill's names); returns dst."""
        return convert_checkpoint(src, dst)

    # ------------------------------------------------------------------ inference
    def people(self, inp: LabelInput) -> tuple[np.ndarray, np.ndarray] | LabelFailure:
        """Person boxes (stored-rgb pixels, xyxy) and scores from the sample's det label, best first."""
        det = inp.labels.get("det")
        if not isinstance(det, dict) or not isinstance(det.get("instances"), list):
            return LabelFailure("hmr2 needs the sample's det label ({'instances': [...]}), found none")
        h, w = inp.image.shape[:2]
        cut = self.config.score_threshold
        cut = det_thresholds(det)[1] if cut is None else float(cut)
        rows = [(float(d["score"]), [float(c) for c in d["boxes"]]) for d in det["instances"]
                if d.get("class_name") == self.config.person_class and float(d["score"]) >= cut]
        rows.sort(key=lambda r: (-r[0], r[1]))
        if self.config.max_people:
            rows = rows[: self.config.max_people]
        boxes = np.array([r[1] for r in rows], dtype=np.float64).reshape(-1, 4) * np.array([w, h, w, h])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes[keep], np.array([r[0] for r in rows])[keep]

    def crops(self, image: np.ndarray, boxes: np.ndarray):
        """[N, 3, 256, 192] normalised person crops of one image (HMR 2.0's preprocessing), on the device."""
        import torch
        import torch.nn.functional as F

        h, w = image.shape[:2]
        # torch.tensor copies (stored images arrive read-only), straight onto the device
        img = torch.tensor(image, device=self.device).permute(2, 0, 1)[None].float()
        sq = crop_boxes(boxes, self.config.box_scale)
        side = CROP_SIZE
        out_h, out_w = self.input_size
        u = torch.arange(out_w, device=self.device, dtype=torch.float64) + (side - out_w) / 2 - side / 2
        v = torch.arange(out_h, device=self.device, dtype=torch.float64) + (side - out_h) / 2 - side / 2
        outs = []
        for cx, cy, s in sq:
            # cv2.warpAffine's mapping: output pixel (u, v) <- source centre + (u - 128, v - 128) * s / 256
            xs = cx + u * (s / side)
            ys = cy + v * (s / side)
            gx = (2 * xs + 1) / w - 1
            gy = (2 * ys + 1) / h - 1
            grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None].float()
            src = img
            factor = s / side / 2.0  # HMR 2.0 blurs when the crop downsamples by more than 2.2x
            if factor > 1.1:
                src = _gaussian_blur(img, (factor - 1) / 2)
            outs.append(F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
        x = torch.cat(outs) / 255.0
        m = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        sd = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (x - m) / sd

    def predict(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure | list]:
        import torch

        found = []
        for inp in batch:
            im = inp.image
            if not (isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3
                    and min(im.shape[:2]) >= 1):
                found.append(LabelFailure(f"image must be [H, W, 3] uint8, got {getattr(im, 'shape', type(im))}"))
            else:
                found.append(self.people(inp))
        crops, owners = [], []
        for i, (inp, f) in enumerate(zip(batch, found)):
            if not isinstance(f, LabelFailure) and len(f[0]):
                crops.append(self.crops(inp.image, f[0]))
                owners += [i] * len(f[0])
        params: dict[str, list] = {"global_orient": [], "body_pose": [], "betas": [], "cam": []}
        if crops:
            x = torch.cat(crops)
            for start in range(0, len(x), self.config.crops_per_forward):
                smpl, cam = self.model(x[start:start + self.config.crops_per_forward])
                for k in ("global_orient", "body_pose", "betas"):
                    params[k].append(smpl[k].float().cpu())
                params["cam"].append(cam.float().cpu())
        arrays = {k: torch.cat(v).numpy().astype(np.float64) if v else None for k, v in params.items()}
        owners_arr = np.array(owners)
        results: list[Any] = []
        for i, (inp, f) in enumerate(zip(batch, found)):
            if isinstance(f, LabelFailure):
                results.append(f)
                continue
            boxes, _ = f
            if not len(boxes):
                results.append({"human_poses": []})
                continue
            sel = owners_arr == i
            if self.config.bbox_frame == "original":
                h, w = inp.image.shape[:2]
                ow, oh = inp.original_size
                boxes = boxes * np.array([ow / w, oh / h, ow / w, oh / h])
            results.append({"human_poses": {
                "bbox_xyxy": _r(boxes),
                "pred_smpl_params": {"global_orient": _r(arrays["global_orient"][sel]),
                                     "body_pose": _r(arrays["body_pose"][sel]),
                                     "betas": _r(arrays["betas"][sel])},
                "pred_cam": _r(arrays["cam"][sel]),
            }})
        return results


def _r(a: np.ndarray, decimals: int = 6) -> list:
    """Rounded nested lists (compact, deterministic JSON)."""
    return np.round(np.asarray(a, dtype=np.float64), decimals).tolist()
