"""Depth and surface-normal labelers: Omnidata DPT-Hybrid (4M-21's choice) and Depth Anything V2.

4M-21 pseudo-labelled ``depth`` and ``normal`` with the Omnidata v2 DPT-B-Hybrid models (ml-4m
``README_DATA.md``: "Omnidata DPT-B-Hybrid (v2)" for both). Both are the MiDaS DPT-Hybrid architecture
(timm ``vit_base_resnet50_384``: a ResNet-50 stem and three stages feeding a ViT-B/16, DPT reassemble + fusion
neck, a small convolutional head), which transformers implements as ``DPTForDepthEstimation`` with
``is_hybrid=True`` (a BiT backbone). The depth model has a 1-channel head, the normal model the same head with
3 output channels (``num_channels=3`` in Omnidata's ``DPTDepthModel``), built here from transformers' classes
by giving the head's last convolution 3 outputs.

Weights. The official files are PyTorch Lightning checkpoints (``omnidata_dpt_depth_v2.ckpt``,
``omnidata_dpt_normal_v2.ckpt``, https://zenodo.org/records/10447888) whose ``state_dict`` uses Omnidata's
(MiDaS') module names with a ``model.`` prefix. :func:`omnidata_to_transformers` renames them to
transformers' DPT names (and :func:`transformers_to_omnidata` back); the labelers accept either the official
file itself (converted in memory, the DPT-Hybrid configuration inferred from the tensor shapes by
:func:`omnidata_dpt_config`) or a directory written by ``modalmill convert-weights omnidata_depth SRC DST``
(``config.json`` + ``model.safetensors``). Only tensors are ever loaded (``torch.load(weights_only=True)``).

Outputs (validated by the modality registry):

Preprocessing follows each model's official inference code, except that the whole image is labelled: Omnidata's
demo resizes the shorter side to 384 (PIL bilinear) and centre-crops 384 x 384; here the longer side keeps the
aspect (a multiple of 32, as MiDaS' own inference of the same DPT-Hybrid) and the position embeddings are
interpolated as Omnidata's ``forward_flex`` does. Depth Anything V2 runs exactly as its ``infer_image`` (aspect
kept, multiples of 14, OpenCV bicubic). tests/test_official_preprocessing.py compares both with the official
code run on the same random weights (docs/labelers.md has the figures).

- ``depth``: uint16 ``[H, W]`` at the stored rgb's geometry. The prediction (made on the whole image at the
  model's input size) is resized back to ``H, W`` bilinearly, then normalised per image by its
  minimum and maximum to 0..65535 (``round(65535 * (d - min) / (max - min))``; a constant map becomes all 0).
  Larger values are farther away: 4M stores depth, not disparity. Omnidata predicts depth directly (its
  output is clamped to [0, 1] first, as in Omnidata's demo). Depth Anything predicts relative inverse depth
  (affine-invariant disparity ``s``); it is converted as ``depth = 1 / max(s / max(s), disparity_floor)``
  (so depth spans at most ``1 .. 1/disparity_floor``, far/sky pixels saturate) and then normalised the same
  way. 4M's loader standardises depth per image (robust mean/std), so only the ordering and relative spacing
  matter, not the absolute scale.
- ``normal``: uint8 ``[H, W, 3]``. Omnidata's output, clamped to [0, 1] as predicted, resized bilinearly to
  ``H, W`` and stored as Omnidata's demo stores it (``ToPILImage``: ``x * 255`` truncated to a byte), not
  renormalised to unit length: what 4M-21 trained on. A byte ``v`` decodes to ``2 v / 255 - 1``. The axes are
  Omnidata's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..io.fetch import WeightsError
from .base import LabelFailure, LabelInput, Resources, register_labeler
from .model import ModelConfig, ModelLabeler
from .state_dicts import load_into, load_state_dict
from .pins import Pin

__all__ = [
    "DepthAnythingLabeler",
    "OmnidataDepthLabeler",
    "OmnidataNormalLabeler",
    "depth_anything_input_hw",
    "depth_to_uint16",
    "dpt_forward",
    "dpt_input_hw",
    "image_problem",
    "split_usable",
    "load_pretrained",
    "normals_to_uint8",
    "omnidata_dpt_config",
    "omnidata_to_transformers",
    "resize_uint8",
    "transformers_to_omnidata",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ZENODO = "https://zenodo.org/records/10447888/files"
_ZENODO_PIN_SOURCE = ("the LFS pointers of two Hugging Face mirrors of the Zenodo file, and a project that verified "
                      "the Zenodo download (Zenodo itself lists an md5)")
def _omnidata_help(file: str, script: str, labeler: str) -> str:
    return (f"download {file} from https://zenodo.org/records/10447888 (EPFL-VILAB/omnidata tools/{script}) and set "
            f"weights to its path, or convert it once with `modalmill convert-weights {labeler} SRC DST` and set "
            "weights to DST")


OMNIDATA_LICENSE = ("Omnidata EULA: non-commercial research/education use only, no redistribution "
                    "(EPFL-VILAB/omnidata LICENSE, item 9 covers the model weights)")


# ---------------------------------------------------------------------- shared helpers


def image_problem(image: Any) -> str | None:
    """Why ``image`` is not a usable ``[H, W, 3]`` uint8 array (None when it is)."""
    from .modelfree import _image_problem

    return _image_problem(image)


def split_usable(batch: list[LabelInput]) -> tuple[list[Any], list[int]]:
    """(results with a LabelFailure at every unusable image and None elsewhere, positions of the usable ones)."""
    results: list[Any] = [None] * len(batch)
    ok = []
    for i, inp in enumerate(batch):
        problem = image_problem(inp.image)
        if problem:
            results[i] = LabelFailure(problem)
        else:
            ok.append(i)
    return results, ok


def load_pretrained(model_cls, path: str, *, model_type: str, where: str, how_to_get: str = "", **kwargs):
    """``model_cls.from_pretrained(path)`` offline, refusing anything but an exact fit.

    transformers loads a checkpoint of another model type, or one with missing or unexpected tensors, with a
    warning and randomly initialised weights; here each of those is a :class:`WeightsError` naming the path,
    what was expected and where to get it.
    """
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hint = f" Get it: {how_to_get}." if how_to_get else ""
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise WeightsError(f"{where}: expected a transformers model directory (config.json + model.safetensors) "
                           f"at {path!r}.{hint}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable config is a weights problem
        raise WeightsError(f"{where}: cannot read {os.path.join(path, 'config.json')} ({type(e).__name__}).{hint}") \
            from None
    if config.model_type != model_type:
        raise WeightsError(f"{where}: {path!r} holds a {config.model_type!r} model, expected {model_type!r}.{hint}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_cls.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{where}: checkpoint at {path!r} does not fit the model ({first[:300]}).{hint}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        parts = [f"{k.replace('_', ' ')}: {len(v)}, e.g. {[str(x) for x in v[:3]]}" for k, v in bad.items() if v]
        raise WeightsError(f"{where}: checkpoint at {path!r} does not fit the model ({'; '.join(parts)}).{hint}")
    return model


def depth_to_uint16(depth) -> np.ndarray:
    """A float ``[H, W]`` torch tensor (larger = farther) -> uint16 normalised by its min and max to 0..65535."""
    lo, hi = depth.min(), depth.max()
    span = hi - lo
    if not bool(span > 0):
        return np.zeros(tuple(depth.shape), np.uint16)
    scaled = ((depth - lo) / span * 65535.0).round_().clamp_(0, 65535)
    return scaled.to("cpu").numpy().astype(np.uint16)


def normals_to_uint8(normals) -> np.ndarray:
    """Omnidata's clamped normal prediction (float ``[3, H, W]`` in [0, 1]) -> uint8 ``[H, W, 3]``, as the official
    demo stores it: ``ToPILImage()(output)``, i.e. ``(x * 255)`` truncated to a byte (no renormalisation to unit
    length; value v decodes to the normal component ``2 v / 255 - 1``)."""
    import torch

    u8 = (normals.clamp(0.0, 1.0) * 255.0).to(torch.uint8)  # float -> uint8 truncates, as tensor.byte()
    return np.ascontiguousarray(u8.permute(1, 2, 0).to("cpu").numpy())


def resize_uint8(image: np.ndarray, hw: tuple[int, int], resample: str = "bilinear") -> np.ndarray:
    """PIL resize of a uint8 ``[H, W, 3]`` image to ``hw`` (what torchvision's ``Resize`` does to a PIL image and
    what transformers' PIL image processors do; PIL's filters are antialiased when shrinking)."""
    from PIL import Image

    if tuple(image.shape[:2]) == tuple(hw):
        return np.ascontiguousarray(image)
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((int(hw[1]), int(hw[0])), filters[resample]))


def dpt_input_hw(h: int, w: int, short: int, *, multiple: int = 32, max_aspect_ratio: float = 4.0) -> tuple[int, int]:
    """The aspect-preserving DPT input size of an ``h x w`` image: the shorter side ``short`` (Omnidata's demo
    resizes the shorter side to 384), the longer side the nearest multiple of ``multiple`` to ``short x aspect``
    (as MiDaS' own inference for the same DPT-Hybrid, ``keep_aspect_ratio`` + ``ensure_multiple_of=32``), at most
    ``max_aspect_ratio x short`` (more elongated images are squashed to that ratio)."""
    ratio = min(max(h, w) / max(1, min(h, w)), float(max_aspect_ratio))
    long_side = max(short, int(np.round(short * ratio / multiple)) * multiple)
    return (short, long_side) if h <= w else (long_side, short)


def dpt_forward(model, pixel_values):
    """``DPTForDepthEstimation``'s prediction at any input size (sides multiples of 32), hybrid models included.

    transformers' forward assumes a square patch grid for DPT-Hybrid (it passes no grid size to the neck and its
    hybrid embeddings refuse another input size unless told to interpolate), while the official MiDaS/Omnidata
    ``forward_flex`` interpolates the position embeddings (bilinear) to any grid. This is the same computation
    with the grid given: embeddings with interpolation (:func:`_interpolating_embeddings` is applied at build),
    the BiT activations plus the hooked ViT layers, the neck with ``(h / 16, w / 16)``, the head.
    """
    c = model.config
    out = model.dpt(pixel_values, output_hidden_states=True)
    hidden = out.hidden_states
    if c.is_hybrid:
        states = list(out.intermediate_activations) + [f for i, f in enumerate(hidden[1:])
                                                       if i in c.backbone_out_indices[2:]]
    else:
        states = [f for i, f in enumerate(hidden[1:]) if i in c.backbone_out_indices]
    ph, pw = pixel_values.shape[-2] // c.patch_size, pixel_values.shape[-1] // c.patch_size
    return model.head(model.neck(states, ph, pw))


def _interpolating_embeddings(model) -> None:
    """Let the (hybrid) DPT embeddings of ``model`` take any input size, interpolating the position embeddings
    as Omnidata's ``_resize_pos_embed`` does (bilinear, what transformers' ``_resize_pos_embed`` computes too)."""
    import functools

    emb = model.dpt.embeddings
    if "interpolate_pos_encoding" in type(emb).forward.__code__.co_varnames:
        emb.forward = functools.partial(type(emb).forward, emb, interpolate_pos_encoding=True)


def depth_anything_input_hw(h: int, w: int, size: int = 518, *, multiple: int = 14,
                            max_aspect_ratio: float = 4.0) -> tuple[int, int]:
    """Depth Anything V2's ``image2tensor`` size: its ``Resize(keep_aspect_ratio=True, ensure_multiple_of=14,
    resize_method='lower_bound')``: scale so that both sides are at least ``size``, each side rounded (half to
    even) to a multiple of 14 and raised to the next multiple when that falls below ``size``. Images more elongated
    than ``max_aspect_ratio`` are first treated as that ratio (bounds the longer side; not in the official code)."""
    if max(h, w) > max_aspect_ratio * min(h, w):
        h, w = (min(h, w), max_aspect_ratio * min(h, w)) if h <= w else (max_aspect_ratio * min(h, w), min(h, w))
    scale = max(size / h, size / w)

    def fit(x: float) -> int:
        y = int(np.round(x / multiple) * multiple)
        return int(np.ceil(x / multiple) * multiple) if y < size else y

    return fit(scale * h), fit(scale * w)


def _resize(pred, hw: tuple[int, int]):
    """Bilinear resize of a ``[C, h, w]`` float tensor to ``hw``."""
    import torch.nn.functional as F

    if tuple(pred.shape[-2:]) == tuple(hw):
        return pred
    return F.interpolate(pred[None], size=hw, mode="bilinear", align_corners=False)[0]


# ---------------------------------------------------------------------- Omnidata <-> transformers key names

# (Omnidata/MiDaS name, transformers DPT name). Placeholders: {i} ViT block, {s} BiT stage, {b} BiT block,
# {m} BiT block module, {p} weight|bias, {h} head layer, {j}/{c} residual unit/conv. {k} is the 1-based
# index of Omnidata's act_postprocess/layerK_rn/refinenetK; transformers uses {k0} = k - 1 for the reassemble
# stage and convs, and {r} = 4 - k for the fusion stage (refinenet4 runs first).
_RULES: tuple[tuple[str, str], ...] = (
    ("pretrained.model.cls_token", "dpt.embeddings.cls_token"),
    ("pretrained.model.pos_embed", "dpt.embeddings.position_embeddings"),
    ("pretrained.model.patch_embed.proj.{p}", "dpt.embeddings.projection.{p}"),
    ("pretrained.model.patch_embed.backbone.stem.conv.weight",
     "dpt.embeddings.backbone.bit.embedder.convolution.weight"),
    ("pretrained.model.patch_embed.backbone.stem.norm.{p}", "dpt.embeddings.backbone.bit.embedder.norm.{p}"),
    ("pretrained.model.patch_embed.backbone.stages.{s}.blocks.{b}.{m}.{p}",
     "dpt.embeddings.backbone.bit.encoder.stages.{s}.layers.{b}.{m}.{p}"),
    ("pretrained.model.blocks.{i}.norm1.{p}", "dpt.encoder.layer.{i}.layernorm_before.{p}"),
    ("pretrained.model.blocks.{i}.norm2.{p}", "dpt.encoder.layer.{i}.layernorm_after.{p}"),
    ("pretrained.model.blocks.{i}.attn.proj.{p}", "dpt.encoder.layer.{i}.attention.output.dense.{p}"),
    ("pretrained.model.blocks.{i}.mlp.fc1.{p}", "dpt.encoder.layer.{i}.intermediate.dense.{p}"),
    ("pretrained.model.blocks.{i}.mlp.fc2.{p}", "dpt.encoder.layer.{i}.output.dense.{p}"),
    ("pretrained.model.norm.{p}", "dpt.layernorm.{p}"),
    ("pretrained.act_postprocess{k}.0.project.0.{p}", "neck.reassemble_stage.readout_projects.{k0}.0.{p}"),
    ("pretrained.act_postprocess{k}.3.{p}", "neck.reassemble_stage.layers.{k0}.projection.{p}"),
    ("pretrained.act_postprocess{k}.4.{p}", "neck.reassemble_stage.layers.{k0}.resize.{p}"),
    ("scratch.layer{k}_rn.weight", "neck.convs.{k0}.weight"),
    ("scratch.refinenet{k}.out_conv.{p}", "neck.fusion_stage.layers.{r}.projection.{p}"),
    ("scratch.refinenet{k}.resConfUnit{j}.conv{c}.{p}",
     "neck.fusion_stage.layers.{r}.residual_layer{j}.convolution{c}.{p}"),
    ("scratch.output_conv.{h}.{p}", "head.head.{h}.{p}"),
)
# timm's ViT keeps its ImageNet classifier in the checkpoint; DPT never uses it.
_DROPPED = re.compile(r"^pretrained\.model\.head\.(weight|bias)$")
_QKV_OFFICIAL = "pretrained.model.blocks.{i}.attn.qkv.{p}"
_QKV_HF = "dpt.encoder.layer.{i}.attention.attention.{part}.{p}"
_QKV_PARTS = ("query", "key", "value")

_GROUP = {"p": r"weight|bias", "m": r"conv[123]|norm[123]|downsample\.conv|downsample\.norm",
          "part": r"query|key|value"}
# derived placeholders: name -> (source, forward, inverse)
_DERIVED: dict[str, tuple[str, Callable[[int], int], Callable[[int], int]]] = {
    "k0": ("k", lambda k: k - 1, lambda k0: k0 + 1),
    "r": ("k", lambda k: 4 - k, lambda r: 4 - r),
}


def _regex(template: str) -> re.Pattern:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>{_GROUP.get(m.group(1), r'[0-9]+')})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "$")


_FORWARD = [(_regex(o), h) for o, h in _RULES]
_BACKWARD = [(_regex(h), o) for o, h in _RULES]
_QKV_OFFICIAL_RE, _QKV_HF_RE = _regex(_QKV_OFFICIAL), _regex(_QKV_HF)


def _fill(template: str, groups: dict[str, str], forward: bool) -> str:
    values: dict[str, Any] = dict(groups)
    for name, (src, fwd, inv) in _DERIVED.items():
        if forward and src in groups:
            values[name] = fwd(int(groups[src]))
        elif not forward and name in groups:
            values[src] = inv(int(groups[name]))
    return template.format(**values)


def _rename(key: str, table) -> str | None:
    for pattern, template in table:
        m = pattern.match(key)
        if m:
            return _fill(template, m.groupdict(), forward=table is _FORWARD)
    return None


def is_omnidata_state(state: dict) -> bool:
    """True when ``state`` uses Omnidata's (MiDaS') names, with or without Lightning's ``model.`` prefix."""
    return any(k.startswith(("pretrained.", "model.pretrained.", "scratch.", "model.scratch.")) for k in state)


def omnidata_to_transformers(state: dict) -> dict:
    """Rename an Omnidata DPT-Hybrid state dict to transformers' ``DPTForDepthEstimation`` (hybrid) names.

    - strips the ``model.`` prefix of the Lightning checkpoint (as Omnidata's demo does with ``k[6:]``);
    - drops ``pretrained.model.head.*`` (timm's unused ImageNet classifier);
    - splits each ViT block's fused ``attn.qkv`` into transformers' ``query``/``key``/``value`` (rows in that
      order, as timm lays them out);
    - renames the rest one-to-one by :data:`_RULES` (BiT stem/stages, ViT blocks, reassemble ``act_postprocess``
      -> ``neck.reassemble_stage``, ``scratch.layerK_rn`` -> ``neck.convs.K-1``, ``scratch.refinenetK`` ->
      ``neck.fusion_stage.layers.4-K``, ``scratch.output_conv`` -> ``head.head``).

    A key that fits no rule raises :class:`WeightsError` (this is not an Omnidata DPT-Hybrid checkpoint).
    """
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    out: dict = {}
    unknown = []
    for key, value in state.items():
        if _DROPPED.match(key):
            continue
        m = _QKV_OFFICIAL_RE.match(key)
        if m:
            if value.shape[0] % 3:
                raise WeightsError(f"{key}: fused qkv has {value.shape[0]} rows, not a multiple of 3")
            for part, chunk in zip(_QKV_PARTS, value.chunk(3, dim=0)):
                out[_QKV_HF.format(i=m["i"], part=part, p=m["p"])] = chunk.clone()
            continue
        new = _rename(key, _FORWARD)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise WeightsError(f"not an Omnidata DPT-Hybrid checkpoint: {len(unknown)} key(s) fit no known name, "
                           f"e.g. {unknown[:5]}")
    return out


def transformers_to_omnidata(state: dict, *, lightning_prefix: bool = True) -> dict:
    """The inverse of :func:`omnidata_to_transformers`: transformers' DPT-Hybrid names -> Omnidata's names.

    ``query``/``key``/``value`` are concatenated back into ``attn.qkv``; with ``lightning_prefix`` every key
    gets the ``model.`` prefix of the official Lightning checkpoints.
    """
    out: dict = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    unknown = []
    for key, value in state.items():
        m = _QKV_HF_RE.match(key)
        if m:
            qkv.setdefault((m["i"], m["p"]), {})[m["part"]] = value
            continue
        new = _rename(key, _BACKWARD)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    import torch

    for (i, p), parts in qkv.items():
        if set(parts) != set(_QKV_PARTS):
            raise WeightsError(f"layer {i} {p}: needs query, key and value, got {sorted(parts)}")
        out[_QKV_OFFICIAL.format(i=i, p=p)] = torch.cat([parts[n] for n in _QKV_PARTS], dim=0)
    if unknown:
        raise WeightsError(f"not a transformers DPT-Hybrid state dict: {len(unknown)} key(s) fit no known name, "
                           f"e.g. {unknown[:5]}")
    return {("model." + k if lightning_prefix else k): v for k, v in out.items()}


def omnidata_dpt_config(state: dict):
    """The transformers ``DPTConfig`` of the DPT-Hybrid whose (transformers-named) ``state`` is given.

    Sizes are read off the tensors: ViT width (position embeddings), depth (blocks), MLP width, input size
    (16 x the position grid), BiT stem width, stage depths and widths, neck and fusion widths. What tensors
    cannot tell is fixed to the DPT-Hybrid architecture of MiDaS/Omnidata: 64-dimensional attention heads
    (ViT-B/16: 12 heads of 768), readout ``project``, reassemble factors (1, 1, 1, 0.5), ViT hooks at blocks
    3L/4 - 1 and L - 1 (8 and 11 of 12; the first two neck inputs are BiT stages 1 and 2), GroupNorm with 32
    groups and 'same' padding in BiT (timm's ``vit_base_resnet50_384``), LayerNorm eps 1e-6 (timm's ViT).
    """
    from transformers import DPTConfig

    def need(key):
        if key not in state:
            raise WeightsError(f"not a DPT-Hybrid state dict: no {key!r}")
        return state[key]

    pos = need("dpt.embeddings.position_embeddings")
    hidden = int(pos.shape[-1])
    grid = round((pos.shape[1] - 1) ** 0.5)
    if grid * grid != pos.shape[1] - 1:
        raise WeightsError(f"position embeddings {tuple(pos.shape)} are not a square grid plus a class token")
    n_layers = len({k.split(".")[3] for k in state if k.startswith("dpt.encoder.layer.")})
    prefix = "dpt.embeddings.backbone.bit.encoder.stages."
    stages = sorted({int(k.split(".")[6]) for k in state if k.startswith(prefix)})
    depths, widths = [], []
    for s in stages:
        prefix = f"dpt.embeddings.backbone.bit.encoder.stages.{s}.layers."
        depths.append(len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)}))
        widths.append(int(need(f"{prefix}0.conv3.weight").shape[0]))
    neck = [int(need(f"neck.convs.{k}.weight").shape[1]) for k in range(4)]
    fusion = int(need("neck.convs.0.weight").shape[0])
    if n_layers < 2 or len(stages) != 3:
        raise WeightsError(f"not a DPT-Hybrid state dict: {n_layers} ViT blocks, {len(stages)} BiT stages (need 3)")
    return DPTConfig(
        is_hybrid=True, hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=max(1, hidden // 64),
        intermediate_size=int(need("dpt.encoder.layer.0.intermediate.dense.weight").shape[0]),
        image_size=grid * 16, patch_size=16, layer_norm_eps=1e-6, qkv_bias=True, readout_type="project",
        backbone_out_indices=[0, 1, max(0, (3 * n_layers) // 4 - 1), n_layers - 1],
        reassemble_factors=[1, 1, 1, 0.5], neck_hidden_sizes=neck, fusion_hidden_size=fusion,
        use_batch_norm_in_fusion_residual=False, backbone_featmap_shape=[1, widths[-1], grid, grid],
        backbone_config={"model_type": "bit", "global_padding": "same", "layer_type": "bottleneck",
                         "depths": depths, "hidden_sizes": widths,
                         "embedding_size": int(
                             need("dpt.embeddings.backbone.bit.embedder.convolution.weight").shape[0]),
                         "num_groups": 32, "embedding_dynamic_padding": True,
                         "out_features": [f"stage{i + 1}" for i in range(len(stages))]},
    )


def build_dpt(config, out_channels: int):
    """transformers' ``DPTForDepthEstimation`` with ``out_channels`` outputs in the head's last convolution."""
    from torch import nn
    from transformers import DPTForDepthEstimation

    model = DPTForDepthEstimation(config)
    last = model.head.head[4]
    if last.out_channels != out_channels:
        model.head.head[4] = nn.Conv2d(last.in_channels, out_channels, kernel_size=1, stride=1, padding=0)
    return model


# ---------------------------------------------------------------------- Omnidata labelers

_CKPT_EXTS = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


class _OmnidataBase(ModelLabeler):
    """Shared loading for the two Omnidata DPT-Hybrid labelers (they differ in head width and outputs)."""

    out_channels: ClassVar[int] = 1
    official_file: ClassVar[str] = ""
    input_size = 384
    license = OMNIDATA_LICENSE
    default_resources = Resources(num_cpus=1, num_gpus=0.25, memory_mb=3072)
    default_batch_size = 16

    @dataclass(frozen=True)
    class Config(ModelConfig):
        max_aspect_ratio: float = 4.0  # longer input side at most this x the shorter (384); beyond, squashed

        def __post_init__(self):
            if not (self.max_aspect_ratio >= 1):
                raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio!r}")

    @classmethod
    def _state_and_config(cls, path: str):
        """(transformers-named state dict, DPTConfig) from an official file or a converted directory."""
        where = f"{cls.name} ({cls.architecture})"
        hint = f" Get it: {cls.weights_help}." if cls.weights_help else ""
        config = None
        if os.path.isdir(path):
            if os.path.exists(os.path.join(path, "config.json")):
                from transformers import DPTConfig

                config = DPTConfig.from_pretrained(path, local_files_only=True)
                if not config.is_hybrid:
                    raise WeightsError(f"{where}: {path!r} holds a DPT that is not DPT-Hybrid.{hint}")
            files = sorted(f for f in os.listdir(path) if f.endswith(_CKPT_EXTS))
            if not files:
                raise WeightsError(f"{where}: no weights file in {path!r} (expected model.safetensors or "
                                   f"{cls.official_file}).{hint}")
            path = os.path.join(path, "model.safetensors" if "model.safetensors" in files else files[0])
        state = load_state_dict(path)
        if is_omnidata_state(state):
            state = omnidata_to_transformers(state)
        head = state.get("head.head.4.weight")
        if head is None:
            raise WeightsError(f"{where}: {path!r} is not a DPT depth/normal checkpoint (no head.head.4 / "
                               f"scratch.output_conv.4).{hint}")
        if int(head.shape[0]) != cls.out_channels:
            raise WeightsError(f"{where}: {path!r} has a {int(head.shape[0])}-channel head, expected "
                               f"{cls.out_channels} ({cls.official_file}).{hint}")
        return state, (config if config is not None else omnidata_dpt_config(state))

    def build(self, path: str):
        state, config = self._state_and_config(path)
        model = build_dpt(config, self.out_channels)
        load_into(model, state, where=f"{self.name} ({path})")
        _interpolating_embeddings(model)
        return model

    @classmethod
    def convert_weights(cls, src: str, dst: str) -> str:
        """Convert an official Omnidata checkpoint into a transformers directory this labeler loads.

        Writes ``dst/config.json`` (the inferred ``DPTConfig``) and ``dst/model.safetensors`` (transformers
        names), after checking that the converted tensors load strictly into the model. Returns ``dst``.
        """
        from safetensors.torch import save_file

        state, config = cls._state_and_config(src)
        model = build_dpt(config, cls.out_channels)
        load_into(model, state, where=f"{cls.name} ({src})")
        os.makedirs(dst, exist_ok=True)
        config.save_pretrained(dst)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(dst, "model.safetensors"),
                  metadata={"format": "pt", "converted_from": os.path.basename(src), "labeler": cls.name})
        return dst

    def model_inputs(self, images: list[np.ndarray]) -> dict[tuple[int, int], list[int]]:
        """Positions of ``images`` grouped by their model input size (:func:`dpt_input_hw`)."""
        size = int(self.model.config.image_size)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            hw = dpt_input_hw(*im.shape[:2], size, max_aspect_ratio=self.config.max_aspect_ratio)
            groups.setdefault(hw, []).append(i)
        return groups

    def raw_predictions(self, images: list[np.ndarray]) -> list:
        """Omnidata's clamped output ``[C, h', w']`` per image, at its aspect-preserving model input size.

        Each image is resized as Omnidata's demo does (PIL bilinear, shorter side to the checkpoint's input size
        384) but not centre-cropped: the longer side keeps the aspect (:func:`dpt_input_hw`) and the position
        embeddings are interpolated as in Omnidata's ``forward_flex``, so the label covers the whole image.
        Images with the same input size run as one batch; each result is independent of the others.
        """
        outs: list = [None] * len(images)
        for hw, idx in self.model_inputs(images).items():
            x = self.to_tensor([resize_uint8(images[i], hw, "bilinear") for i in idx], size=hw)
            out = dpt_forward(self.model, x).float()
            if out.ndim == 3:
                out = out[:, None]
            out = out.clamp(0.0, 1.0)  # as in Omnidata's demo: model(x).clamp(min=0, max=1)
            for j, i in enumerate(idx):
                outs[i] = out[j]
        return outs

    def _forward(self, batch: list[LabelInput]):
        """(results with failures, valid positions, {position: clamped output [C, h', w']})."""
        results, ok = split_usable(batch)
        if not ok:
            return results, ok, {}
        outs = self.raw_predictions([batch[i].image for i in ok])
        return results, ok, dict(zip(ok, outs))

    predicted = ""  # what the head predicts, as failures name it ("depth", "normals")

    def predict(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        results, ok, out = self._forward(batch)
        for i in ok:
            pred = _resize(out[i], tuple(batch[i].image.shape[:2]))
            results[i] = (self.to_label(pred) if bool(pred.isfinite().all())
                          else LabelFailure(f"the model predicted non-finite {self.predicted}"))
        return results

    def to_label(self, pred) -> dict[str, Any]:
        """The label of one image from the clamped output ``[C, H, W]`` resized bilinearly to the image."""
        raise NotImplementedError


@register_labeler
class OmnidataDepthLabeler(_OmnidataBase):
    """Omnidata v2 DPT-Hybrid depth (4M-21's depth pseudo-labeler) -> ``depth`` uint16 [H, W].

    Input: the whole stored image resized as Omnidata's demo resizes it (PIL bilinear, shorter side to the
    checkpoint's input size, 384) but keeping its aspect instead of centre-cropping (:func:`dpt_input_hw`; the
    position embeddings are interpolated as in Omnidata's ``forward_flex``), scaled to [0, 1] and normalised with
    mean 0.5 / std 0.5 (Omnidata's depth transform). Output: clamped to [0, 1], resized bilinearly to H, W,
    normalised per image by min/max to 0..65535; larger = farther.
    """

    name = "omnidata_depth"
    version = "2"
    outputs = ("depth",)
    architecture = "DPT-Hybrid (ViT-B/16 on ResNet-50/BiT), transformers DPTForDepthEstimation, 1-channel head"
    weights = f"{_ZENODO}/omnidata_dpt_depth_v2.ckpt"
    weights_pin = Pin(sha256="a0fab23fee64aa9e4bbe0b520b18b196ea7594a7f719c1d8c10cf11dcb6e4a1e", size=1947430832,
                      source=_ZENODO_PIN_SOURCE)
    official_file = "omnidata_dpt_depth_v2.ckpt"
    weights_help = _omnidata_help(official_file, "download_depth_models.sh", "omnidata_depth")
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    out_channels = 1
    description = "Omnidata v2 DPT-Hybrid relative depth (4M-21's choice), per-image min/max to uint16, far = high"

    predicted = "depth"

    def to_label(self, pred) -> dict[str, Any]:
        return {"depth": depth_to_uint16(pred[0])}


@register_labeler
class OmnidataNormalLabeler(_OmnidataBase):
    """Omnidata v2 DPT-Hybrid surface normals (4M-21's normal pseudo-labeler) -> ``normal`` uint8 [H, W, 3].

    Input: as ``omnidata_depth`` (aspect kept, shorter side 384, PIL bilinear), scaled to [0, 1] without
    mean/std normalisation (Omnidata's normal transform is ``ToTensor`` only). Output: clamped to [0, 1] and
    resized bilinearly to H, W, then stored as the official demo stores it (``ToPILImage``: ``x * 255``
    truncated), not renormalised to unit length (4M-21's normals are Omnidata's stored outputs).
    """

    name = "omnidata_normal"
    version = "2"
    outputs = ("normal",)
    architecture = "DPT-Hybrid (ViT-B/16 on ResNet-50/BiT), transformers DPTForDepthEstimation, 3-channel head"
    weights = f"{_ZENODO}/omnidata_dpt_normal_v2.ckpt"
    weights_pin = Pin(sha256="38db3f7d952f48f900f0b32d6cce6749e41641045ebc5713cf29618f54aff3bb", size=1947430960,
                      source=_ZENODO_PIN_SOURCE)
    official_file = "omnidata_dpt_normal_v2.ckpt"
    weights_help = _omnidata_help(official_file, "download_surface_normal_models.sh", "omnidata_normal")
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)
    out_channels = 3
    description = "Omnidata v2 DPT-Hybrid surface normals (4M-21's choice), clamped prediction x 255 as stored"

    predicted = "normals"

    def to_label(self, pred) -> dict[str, Any]:
        return {"normal": normals_to_uint8(pred)}


# ---------------------------------------------------------------------- Depth Anything


@register_labeler
class DepthAnythingLabeler(ModelLabeler):
    """Depth Anything (V2) relative depth -> ``depth`` uint16 [H, W] (an alternative to ``omnidata_depth``).

    Input: as Depth Anything V2's ``infer_image``: the image keeps its aspect, both sides at least
    ``input_size`` and multiples of 14 (:func:`depth_anything_input_hw`), resized with OpenCV's bicubic
    interpolation on [0, 1] floats, ImageNet mean/std; the DINOv2 backbone interpolates its position embeddings
    as the official one (offset 0.1, not antialiased). The model predicts relative inverse depth ``s``
    (affine-invariant disparity); it is resized bilinearly (``align_corners=True``, as ``infer_image``) to H, W
    and converted to depth as ``1 / max(s / max(s), disparity_floor)`` (an image whose disparity is nowhere
    positive fails), then normalised per image by min/max to 0..65535, larger = farther.
    """

    name = "depth_anything"
    version = "2"
    outputs = ("depth",)
    architecture = "Depth Anything V2 (DINOv2 ViT-S/14 + DPT head), transformers AutoModelForDepthEstimation"
    weights = "depth-anything/Depth-Anything-V2-Small-hf"
    weights_pin = Pin(sha256="3152477ce0d8d6978d76b995120de97cb5b928701fd0f817769f59e249a16b70",
                      file="model.safetensors", source="the hub's LFS pointer of model.safetensors")
    weights_help = ("the hub id depth-anything/Depth-Anything-V2-Small-hf (online), or a local/s3:// copy of "
                    "that directory (config.json + model.safetensors)")
    input_size = 518
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    license = "Apache-2.0 (Depth-Anything-V2-Small; the Base/Large weights are CC-BY-NC-4.0)"
    default_resources = Resources(num_cpus=1, num_gpus=0.25, memory_mb=3072)
    default_batch_size = 16
    description = "Depth Anything V2 relative inverse depth converted to depth, per-image min/max to uint16"

    @dataclass(frozen=True)
    class Config(ModelConfig):
        input_size: int = 518  # shorter model-input side (aspect kept, sides multiples of 14), as infer_image
        disparity_floor: float = 0.05  # depth = 1 / max(disparity / max disparity, floor): depth spans <= 1/floor
        max_aspect_ratio: float = 4.0  # longer input side at most about this x the shorter; beyond, squashed

        def __post_init__(self):
            if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or self.input_size < 14 \
                    or self.input_size % 14:
                raise ValueError(f"input_size must be a positive multiple of 14, got {self.input_size!r}")
            if not (0 < self.disparity_floor <= 1):
                raise ValueError(f"disparity_floor must lie in (0, 1], got {self.disparity_floor!r}")
            if not (self.max_aspect_ratio >= 1):
                raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio!r}")

    def build(self, path: str):
        from transformers import AutoModelForDepthEstimation

        from .dinov2 import official_pos_interpolation

        model = load_pretrained(AutoModelForDepthEstimation, path, model_type="depth_anything",
                                where=f"{self.name} ({self.architecture})", how_to_get=self.weights_help)
        emb = getattr(getattr(model, "backbone", None), "embeddings", None)
        if emb is not None and hasattr(emb, "interpolate_pos_encoding"):
            # Depth Anything V2's own DINOv2 (depth_anything_v2/dinov2.py): interpolate_offset 0.1, no antialias
            official_pos_interpolation(emb, offset=0.1, antialias=False)
        return model

    def model_input(self, image: np.ndarray) -> np.ndarray:
        """One image as ``image2tensor`` makes it: float32 ``[3, h', w']`` (OpenCV bicubic on [0, 1] float64,
        ImageNet mean/std)."""
        import cv2

        h, w = depth_anything_input_hw(*image.shape[:2], self.config.input_size,
                                       max_aspect_ratio=self.config.max_aspect_ratio)
        x = cv2.resize(image.astype(np.float64) / 255.0, (w, h), interpolation=cv2.INTER_CUBIC)
        x = (x - np.asarray(self.mean)) / np.asarray(self.std)
        return np.ascontiguousarray(x.transpose(2, 0, 1)).astype(np.float32)

    def raw_predictions(self, images: list[np.ndarray]) -> list:
        """The model's disparity ``[h', w']`` per image, at its input size; same-size images run as one batch."""
        import torch

        inputs = [self.model_input(im) for im in images]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(tuple(x.shape), []).append(i)
        outs: list = [None] * len(images)
        for idx in groups.values():
            x = torch.from_numpy(np.stack([inputs[i] for i in idx])).to(self.device)
            disp = self.model(pixel_values=x).predicted_depth.float()
            for j, i in enumerate(idx):
                outs[i] = disp[j]
        return outs

    def disparities(self, images: list[np.ndarray]) -> list:
        """The disparity ``[H, W]`` of each image at its own size, as ``infer_image`` returns it (the model's output
        resized bilinearly with ``align_corners=True``)."""
        import torch.nn.functional as F

        return [F.interpolate(d[None, None], size=tuple(im.shape[:2]), mode="bilinear", align_corners=True)[0, 0]
                for d, im in zip(self.raw_predictions(images), images)]

    def predict(self, batch: list[LabelInput]) -> list[dict[str, Any] | LabelFailure]:
        results, ok = split_usable(batch)
        if not ok:
            return results
        disp = self.disparities([batch[i].image for i in ok])
        for s, i in zip(disp, ok):
            top = s.max()
            if not bool(s.isfinite().all()) or not bool(top > 0):
                results[i] = LabelFailure("the model predicted no positive finite disparity")
                continue
            depth = 1.0 / (s / top).clamp(min=self.config.disparity_floor)
            results[i] = {"depth": depth_to_uint16(depth)}
        return results
