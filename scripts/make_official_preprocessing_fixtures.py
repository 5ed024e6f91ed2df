"""Reference fixtures for tests/test_official_preprocessing.py, made by running the OFFICIAL inference code.

Every model here has the tiny random weights of tests/tiny_models.py (seeded, so the tests rebuild exactly the
same tensors; each fixture records a sha256 of the weights and the test refuses to compare against a fixture
made from other weights). Each model sees the same 2:1 photo (``photo_2to1.png``, 96 x 192, a crop of
scikit-image's ``chelsea``), preprocessed and post-processed by the official code:

- Omnidata DPT-Hybrid depth / normals (EPFL-VILAB/omnidata ``omnidata_tools/torch/demo.py``): the demo's
  transforms (``Resize(size, BILINEAR)`` of the shorter side, ``CenterCrop(size)``, ``ToTensor``, depth:
  ``Normalize(0.5, 0.5)``), Omnidata's own ``DPTDepthModel`` (MiDaS ``forward_vit`` / ``forward_flex`` with its
  position-embedding interpolation, fusion blocks and head) built at the tiny size on a timm R50+ViT hybrid,
  ``.clamp(0, 1)``, and for normals the demo's stored PNG (``ToPILImage``). Also the same official model on
  the whole image resized by the demo's ``Resize`` alone (no centre crop), i.e. at the aspect-preserving size.
- Depth Anything V2 (DepthAnything/Depth-Anything-V2 ``depth_anything_v2/dpt.py``): ``image2tensor`` (its
  ``Resize`` keep-aspect lower-bound multiple-of-14, cv2 INTER_CUBIC, ``NormalizeImage``, ``PrepareForNet``),
  the network as transformers' port with the official DINOv2 ``interpolate_pos_encoding`` of that repo bound in,
  and ``infer_image``'s bilinear (align_corners=True) resize back to the image.
- DINOv2 (facebookresearch/dinov2): the official ``DinoVisionTransformer`` as ``hub.backbones.dinov2_vitb14``
  builds it (interpolate_offset 0.1, interpolate_antialias False), at the tiny size, with the tiny transformers
  checkpoint's tensors; ``forward_features`` on crop 0 (the centre square) made into the network input by the
  official ``make_classification_eval_transform`` (``dinov2/data/transforms.py``) at 224: bicubic resize, ImageNet
  mean/std.
- Mask2Former, DETR: transformers' own image processors (``Mask2FormerImageProcessorPil``,
  ``DetrImageProcessorPil``, defaults: shortest edge 800, longest at most 1333) and the tiny models.
- SAM (segment-anything, installed): the model built by segment-anything's own ``_build_sam`` at the tiny size
  (:func:`official_tiny_sam`), ``SamAutomaticMaskGenerator.generate`` in float32 with the tests' settings.

Rerun (from a modalmill checkout, with the official trees extracted, e.g. through the ``fetch`` tool and
``git -C <mirror> show HEAD:<file>`` for their .py files; timm, cv2 and segment-anything come from modalmill's venv,
nothing is installed)::

    PYTHONPATH=$PWD /work/main/.venv/bin/python scripts/make_official_preprocessing_fixtures.py \\
        --dinov2 /work/ref/src/facebookresearch+dinov2 \\
        --depth-anything /work/ref/src/DepthAnything+Depth-Anything-V2 \\
        --omnidata /work/ref/src/EPFL-VILAB+omnidata \\
        --out tests/fixtures/official_preprocessing \\
        --commits b8931f7bf91576930313be2c6d6af376033b35f0 a561b849ebae10a6f5ef49e26c83cbbcd36c71bf \\
                  f69ff3aedf983cb34c490a0afd0d29fdd83f6a1c

(the commits of the trees used for the committed fixtures; they are written into ``meta.json``). The run takes
about 20 s on two CPU cores. Regenerate whenever tests/tiny_models.py changes a model used here: the test
checks each fixture's ``weights_sha256`` against the weights it rebuilds and says so.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

PHOTO = "photo_2to1.png"
SAM_SETTINGS = {"box_nms_thresh": 1.0}  # on top of tests/tiny_models.py TEST_SETTINGS["sam"]: no NMS, all 48 masks


def weights_sha256(state: dict) -> str:
    """sha256 over a state dict's names and float32 values (sorted by name): identifies the tiny weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def make_photo(out: str) -> np.ndarray:
    from PIL import Image
    from skimage import data

    im = data.chelsea()[37:262, 0:450]  # 225 x 450: 2:1
    im = np.asarray(Image.fromarray(im).resize((192, 96), Image.LANCZOS))
    Image.fromarray(im).save(os.path.join(out, PHOTO))
    return im


def git_head(path: str, given: str | None) -> str:
    """The official tree's commit: given on the command line (an extracted archive has no .git), else git's."""
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (extracted tree)"


# ---------------------------------------------------------------------- Omnidata


def omnidata(root: str, photo: np.ndarray) -> tuple[dict, dict]:
    from PIL import Image
    from timm.layers import StdConv2dSame
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer_hybrid import _create_vision_transformer_hybrid
    from torchvision import transforms

    from modalmill.labelers.depth import transformers_to_omnidata
    from tests.tiny_models import tiny_dpt, tiny_dpt_config

    sys.path.insert(0, os.path.join(root, "omnidata_tools", "torch"))
    from modules.midas import blocks as mblocks
    from modules.midas import dpt_depth
    from modules.midas import vit as mvit

    cfg = tiny_dpt_config()
    size = int(cfg.image_size)
    bb_cfg = cfg.backbone_config

    def tiny_encoder(backbone, features, use_pretrained, groups=1, expand=False, exportable=True, hooks=None,
                     use_vit_only=False, use_readout="ignore"):
        # Omnidata's _make_encoder('vitb_rn50_384') at the tiny size: timm's R50+ViT hybrid (as
        # timm.create_model('vit_base_resnet50_384') builds it, minus ImageNet weights) and the official
        # _make_vit_b_rn50_backbone / _make_scratch with the tiny widths
        bb = ResNetV2(layers=tuple(bb_cfg.depths), channels=tuple(bb_cfg.hidden_sizes), num_classes=0,
                      global_pool="", in_chans=3, preact=False, stem_type="same", stem_chs=bb_cfg.embedding_size,
                      conv_layer=functools.partial(StdConv2dSame, eps=1e-8))
        model = _create_vision_transformer_hybrid(
            "vit_base_r50_s16_384", backbone=bb, pretrained=False, embed_dim=cfg.hidden_size,
            depth=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
            mlp_ratio=cfg.intermediate_size / cfg.hidden_size, img_size=size, num_classes=10)
        pretrained = mvit._make_vit_b_rn50_backbone(
            model, features=list(cfg.neck_hidden_sizes), size=[size, size], hooks=list(cfg.backbone_out_indices),
            vit_features=cfg.hidden_size, use_readout=use_readout)
        scratch = mblocks._make_scratch(list(cfg.neck_hidden_sizes), features, groups=groups, expand=expand)
        return pretrained, scratch

    dpt_depth._make_encoder = tiny_encoder
    pil = Image.fromarray(photo)
    arrays, meta = {}, {}
    for task, channels in (("depth", 1), ("normal", 3)):
        hf = tiny_dpt(channels)
        model = dpt_depth.DPTDepthModel(backbone="vitb_rn50_384", num_channels=channels,
                                        features=cfg.fusion_hidden_size).eval()
        state = transformers_to_omnidata(hf.state_dict(), lightning_prefix=False)
        state["pretrained.model.head.weight"] = torch.zeros(10, cfg.hidden_size)  # timm's unused classifier
        state["pretrained.model.head.bias"] = torch.zeros(10)
        model.load_state_dict(state, strict=True)
        # demo.py's transforms, verbatim (get_transform('rgb', image_size=None) is ToTensor)
        tail = [transforms.ToTensor()] + ([transforms.Normalize(mean=0.5, std=0.5)] if task == "depth" else [])
        crop_t = transforms.Compose([transforms.Resize(size, interpolation=Image.BILINEAR),
                                     transforms.CenterCrop(size), *tail])
        full_t = transforms.Compose([transforms.Resize(size, interpolation=Image.BILINEAR), *tail])
        with torch.no_grad():
            crop = model(crop_t(pil)[:3].unsqueeze(0)).clamp(min=0, max=1)
            full = model(full_t(pil)[:3].unsqueeze(0)).clamp(min=0, max=1)
        arrays[f"omnidata_{task}_crop"] = crop[0].numpy().astype(np.float32)
        arrays[f"omnidata_{task}_full"] = full[0].numpy().astype(np.float32)
        if task == "normal":  # what the demo writes: trans_topil(output[0]).save(...)
            arrays["omnidata_normal_crop_png"] = np.asarray(transforms.ToPILImage()(crop[0]))
        meta[f"omnidata_{task}"] = {"weights_sha256": weights_sha256(hf.state_dict()), "input_size": size,
                                    "full_input_hw": list(full_t(pil).shape[-2:])}
    sys.path.remove(os.path.join(root, "omnidata_tools", "torch"))
    return arrays, meta


# ---------------------------------------------------------------------- Depth Anything V2


def depth_anything(root: str, photo: np.ndarray, input_size: int) -> tuple[dict, dict]:
    import cv2
    import torch.nn.functional as F
    from transformers import AutoModelForDepthEstimation

    from tests.tiny_models import save_tiny_depth_anything

    sys.path.insert(0, root)
    from depth_anything_v2.dinov2 import DinoVisionTransformer
    from depth_anything_v2.dpt import DepthAnythingV2

    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForDepthEstimation.from_pretrained(save_tiny_depth_anything(os.path.join(tmp, "da")),
                                                            local_files_only=True).eval()
    emb = model.backbone.embeddings

    class Shim:  # the attributes the official interpolate_pos_encoding reads (DINOv2(...) in that repo's dinov2.py)
        pos_embed = emb.position_embeddings
        patch_size = 14
        interpolate_offset = 0.1
        interpolate_antialias = False

    emb.interpolate_pos_encoding = lambda x, h, w: DinoVisionTransformer.interpolate_pos_encoding(Shim, x, h, w)
    bgr = cv2.cvtColor(photo, cv2.COLOR_RGB2BGR)  # infer_image expects cv2.imread's BGR
    image, (h, w) = DepthAnythingV2.image2tensor(None, bgr, input_size)
    image = image.cpu()
    with torch.no_grad():
        depth = model(pixel_values=image).predicted_depth  # [1, h', w'] (the official forward's squeeze(1))
        depth = F.interpolate(depth[:, None], (h, w), mode="bilinear", align_corners=True)[0, 0]
    sys.path.remove(root)
    return ({"depth_anything_input": image[0].numpy(), "depth_anything_depth": depth.numpy()},
            {"depth_anything": {"weights_sha256": weights_sha256(model.state_dict()), "input_size": input_size,
                                "input_hw": list(image.shape[-2:])}})


# ---------------------------------------------------------------------- DINOv2


def dinov2(root: str, photo: np.ndarray, input_size: int) -> tuple[dict, dict]:
    from PIL import Image
    from transformers import Dinov2Model

    from tests.tiny_models import save_tiny_dinov2

    os.environ["XFORMERS_DISABLED"] = "1"
    sys.path.insert(0, root)
    from dinov2.models.vision_transformer import DinoVisionTransformer

    with tempfile.TemporaryDirectory() as tmp:
        hf = Dinov2Model.from_pretrained(save_tiny_dinov2(os.path.join(tmp, "d")), local_files_only=True).eval()
    c = hf.config
    # as dinov2/hub/backbones.py's _make_dinov2_model builds dinov2_vitb14, at the tiny size
    model = DinoVisionTransformer(img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.hidden_size,
                                  depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
                                  mlp_ratio=c.mlp_ratio, init_values=c.layerscale_value, ffn_layer="mlp",
                                  block_chunks=0, num_register_tokens=0, interpolate_antialias=False,
                                  interpolate_offset=0.1).eval()
    s = hf.state_dict()
    new = {"cls_token": s["embeddings.cls_token"], "pos_embed": s["embeddings.position_embeddings"],
           "mask_token": s["embeddings.mask_token"][None] if s["embeddings.mask_token"].ndim == 2
           else s["embeddings.mask_token"],
           "patch_embed.proj.weight": s["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": s["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": s["layernorm.weight"], "norm.bias": s["layernorm.bias"]}
    for i in range(c.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for wb in ("weight", "bias"):
            new[f"blocks.{i}.norm1.{wb}"] = s[p + f"norm1.{wb}"]
            new[f"blocks.{i}.norm2.{wb}"] = s[p + f"norm2.{wb}"]
            new[f"blocks.{i}.attn.qkv.{wb}"] = torch.cat([s[p + f"attention.{n}_proj.{wb}"] for n in "qkv"])
            new[f"blocks.{i}.attn.proj.{wb}"] = s[p + f"attention.o_proj.{wb}"]
            new[f"blocks.{i}.mlp.fc1.{wb}"] = s[p + f"mlp.fc1.{wb}"]
            new[f"blocks.{i}.mlp.fc2.{wb}"] = s[p + f"mlp.fc2.{wb}"]
        new[f"blocks.{i}.ls1.gamma"] = s[p + "layer_scale1.lambda1"]
        new[f"blocks.{i}.ls2.gamma"] = s[p + "layer_scale2.lambda1"]
    mask = model.state_dict()["mask_token"]
    new["mask_token"] = new["mask_token"].reshape(mask.shape)
    model.load_state_dict(new, strict=True)
    # crop 0 = the centre square of the 2:1 photo, to the network input by the official evaluation transform
    # (dinov2/data/transforms.py: Resize(bicubic) -> CenterCrop -> ToTensor -> ImageNet Normalize), at 224
    from dinov2.data.transforms import make_classification_eval_transform

    h, w = photo.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    region = photo[top:top + side, left:left + side]
    x = make_classification_eval_transform(resize_size=input_size, crop_size=input_size)(Image.fromarray(region))[None]
    with torch.no_grad():
        out = model.forward_features(x)
    sys.path.remove(root)
    g = input_size // c.patch_size
    return ({"dinov2_patch": out["x_norm_patchtokens"][0].reshape(g, g, -1).numpy(),
             "dinov2_cls": out["x_norm_clstoken"][0].numpy()},
            {"dinov2": {"weights_sha256": weights_sha256(hf.state_dict()), "input_size": input_size,
                        "crop0": [top, left, side, side, 0]}})


# ---------------------------------------------------------------------- Mask2Former, DETR, SAM


def mask2former_detr(photo: np.ndarray) -> tuple[dict, dict]:
    from transformers import DetrImageProcessorPil, Mask2FormerImageProcessorPil

    from tests.tiny_models import tiny_detr, tiny_mask2former

    arrays, meta = {}, {}
    m2f = tiny_mask2former()
    inp = Mask2FormerImageProcessorPil()(images=[photo], return_tensors="pt")
    with torch.no_grad():
        out = m2f(pixel_values=inp["pixel_values"], pixel_mask=inp["pixel_mask"])
    arrays["mask2former_pixels_sub16"] = inp["pixel_values"][0, :, ::16, ::16].numpy()
    arrays["mask2former_class_logits"] = out.class_queries_logits[0].numpy()
    arrays["mask2former_mask_logits_sub8"] = out.masks_queries_logits[0, :, ::8, ::8].numpy()
    meta["mask2former"] = {"weights_sha256": weights_sha256(m2f.state_dict()),
                           "input_hw": list(inp["pixel_values"].shape[-2:]),
                           "mask_logits_hw": list(out.masks_queries_logits.shape[-2:]),
                           "processor": "transformers Mask2FormerImageProcessorPil() defaults"}
    detr = tiny_detr()
    inp = DetrImageProcessorPil()(images=[photo], return_tensors="pt")
    with torch.no_grad():
        out = detr(pixel_values=inp["pixel_values"], pixel_mask=inp["pixel_mask"])
    arrays["detr_pixels_sub16"] = inp["pixel_values"][0, :, ::16, ::16].numpy()
    arrays["detr_logits"] = out.logits[0].numpy()
    arrays["detr_boxes"] = out.pred_boxes[0].numpy()
    meta["detr"] = {"weights_sha256": weights_sha256(detr.state_dict()),
                    "input_hw": list(inp["pixel_values"].shape[-2:]),
                    "processor": "transformers DetrImageProcessorPil() defaults"}
    return arrays, meta


def official_tiny_sam(tiny: dict):
    """segment-anything's own ``build_sam._build_sam`` (the builder of sam_model_registry), run with the tiny
    encoder's sizes: its module-level ``ImageEncoderViT`` / ``PromptEncoder`` see the tiny image size and window
    in place of the hard-coded 1024 / 14; everything else (prompt dim 256, mask decoder, pixel mean/std, rel-pos,
    qkv bias) is the official builder's."""
    import importlib

    official = importlib.import_module("segment_anything.build_sam")  # the module (the package re-exports a function)

    size, grid = tiny["img_size"], tiny["img_size"] // 16
    real_encoder, real_prompt = official.ImageEncoderViT, official.PromptEncoder

    def encoder(**kw):
        return real_encoder(**{**kw, "img_size": size, "window_size": tiny["window_size"]})

    def prompt(**kw):
        return real_prompt(**{**kw, "image_embedding_size": (grid, grid), "input_image_size": (size, size)})

    official.ImageEncoderViT, official.PromptEncoder = encoder, prompt
    try:
        return official._build_sam(encoder_embed_dim=tiny["embed_dim"], encoder_depth=tiny["depth"],
                                   encoder_num_heads=tiny["num_heads"],
                                   encoder_global_attn_indexes=list(tiny["global_attn_indexes"]))
    finally:
        official.ImageEncoderViT, official.PromptEncoder = real_encoder, real_prompt


def sam(photo: np.ndarray, settings: dict) -> tuple[dict, dict]:
    from segment_anything import SamAutomaticMaskGenerator

    from tests.tiny_models import SAM_TINY, save_tiny_sam

    with tempfile.TemporaryDirectory() as tmp:
        state = torch.load(save_tiny_sam(os.path.join(tmp, "sam.pth")), weights_only=True)
    model = official_tiny_sam(SAM_TINY)
    model.load_state_dict(state, strict=True)  # modalmill's tiny state dict fits the official model exactly
    model.eval()
    keys = ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh")
    gen = SamAutomaticMaskGenerator(model, output_mode="binary_mask", **{k: settings[k] for k in keys})
    with torch.no_grad():
        anns = gen.generate(photo)
    anns.sort(key=lambda a: (-a["area"], *a["bbox"]))
    masks = np.stack([a["segmentation"] for a in anns]) if anns else np.zeros((0, *photo.shape[:2]), bool)
    return ({"sam_masks_packed": np.packbits(masks.reshape(len(anns), -1), axis=1)},
            {"sam": {"weights_sha256": weights_sha256(state), "settings": {k: settings[k] for k in keys},
                     "n_masks": len(anns), "hw": list(photo.shape[:2]),
                     "masks": [{"area": int(a["area"]), "bbox_xywh": [int(v) for v in a["bbox"]],
                                "predicted_iou": float(a["predicted_iou"]),
                                "stability_score": float(a["stability_score"])} for a in anns]}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dinov2", required=True, help="facebookresearch/dinov2 tree")
    ap.add_argument("--depth-anything", required=True, help="DepthAnything/Depth-Anything-V2 tree")
    ap.add_argument("--omnidata", required=True, help="EPFL-VILAB/omnidata tree")
    ap.add_argument("--out", default="tests/fixtures/official_preprocessing")
    ap.add_argument("--commits", nargs=3, metavar=("DINOV2", "DEPTH_ANYTHING", "OMNIDATA"),
                    help="the commits of the three trees (recorded in meta.json)")
    a = ap.parse_args()
    from tests.tiny_models import TEST_SETTINGS

    torch.set_num_threads(2)
    os.makedirs(a.out, exist_ok=True)
    photo = make_photo(a.out)
    commits = a.commits or [None] * 3
    arrays: dict = {}
    meta: dict = {"photo": PHOTO, "photo_hw": list(photo.shape[:2]),
                  "official": {"facebookresearch/dinov2": git_head(a.dinov2, commits[0]),
                               "DepthAnything/Depth-Anything-V2": git_head(a.depth_anything, commits[1]),
                               "EPFL-VILAB/omnidata": git_head(a.omnidata, commits[2])},
                  "versions": {"torch": torch.__version__}}
    import timm
    import transformers
    meta["versions"].update(timm=timm.__version__, transformers=transformers.__version__)
    for part in (lambda: omnidata(a.omnidata, photo),
                 lambda: depth_anything(a.depth_anything, photo, TEST_SETTINGS["depth_anything"]["input_size"]),
                 lambda: dinov2(a.dinov2, photo, 224),
                 lambda: mask2former_detr(photo),
                 lambda: sam(photo, {**TEST_SETTINGS["sam"], **SAM_SETTINGS})):
        arr, m = part()
        arrays.update(arr)
        meta.update(m)
    np.savez_compressed(os.path.join(a.out, "official.npz"), **arrays)
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    print(json.dumps({k: (list(v.shape), str(v.dtype)) for k, v in arrays.items()}, indent=1))


if __name__ == "__main__":
    main()
