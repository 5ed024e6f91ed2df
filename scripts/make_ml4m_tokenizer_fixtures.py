"""Make the 4M-tokenizer reference fixtures with apple/ml-4m's own code (tests/fixtures/ml4m_tokenizers/).

What it writes (all small; random-init weights, real photos from scikit-image):

- one folder per tokenizer in the hub layout (``config.json`` = the constructor arguments, as
  ``PyTorchModelHubMixin.save_pretrained(config=...)`` writes them, + ``model.safetensors``), built with ml-4m's
  classes: ``rgb`` (VQVAE, ViT encoder + lucid quantizer with normalised codes, post_mlp), ``edge`` (a DiVAE with
  a tiny patched-UNet diffusion decoder: tokenizing uses only its encoder and quantizer), ``depth`` (1 channel),
  ``normal``, ``semseg`` (class embedding, 134 labels; one-block width-32 ViTs: the folder stays under 2 MiB),
  ``dinov2`` (feature map, 1x1 projection, patch 14),
  ``dinov2_global`` (BottleneckMLP + memcodes, 16 heads), ``human_poses`` (BottleneckMLP + memcodes, 8 heads),
  ``sam_instance`` (64x64 masks, out_conv decoder);
- ``inputs.npz``: the stored labels of three photos (astronaut, chelsea, and a 2:1 cut of coffee) as modalmill
  stores them (rgb uint8, depth uint16, normal uint8 x3, canny edges uint8 0/255, semseg ids uint8 with 255),
  their ``crop_settings`` rows (top, left, h, w, flip; row 0 a centre crop, then random crops, some flipped),
  per-crop teacher features (float16 [n_crops, 16, 16, C]) and global vectors (float16 [n_crops, C]) from a
  fixed random "teacher" run by this script on each 224 crop, 207-d body poses and 40 SAM polygons of varied
  shapes and sizes (so that the ``sam_instance`` ids are many and a wrong mapping fails);
- ``ids.npz``: the token ids ml-4m gives, computed as ``save_vq_tokens.py`` does: for every crop row
  ``MODALITY_TRANSFORMS_DIVAE[task].preprocess -> image_augment(crop, flip, (224, 224), resample_mode) ->
  postprocess``, then ``model.tokenize``, int16 [n_crops, n_tokens]; bilinear resampling (``--resample_mode
  bilinear``) and, for ``rgb``, also PIL's default (``resample_mode None``: bicubic).

Rerun (needs a checkout of apple/ml-4m and its environment, see /work/ref/ml-4m/HOWTO.md)::

    cd /path/to/ml-4m && PYTHONPATH=$PWD HF_HUB_OFFLINE=1 /path/to/ml4m-venv/bin/python \\
        /path/to/modalmill/scripts/make_ml4m_tokenizer_fixtures.py /path/to/modalmill/tests/fixtures/ml4m_tokenizers

ml-4m names ViT sizes by builder functions in ``fourm.vq.models.vit_models``; this script registers the tiny
``vit_d<width>_l<depth>_h<heads>_enc|dec`` builders that modalmill understands (and a tiny ``unet_tiny``
diffusion decoder) in ml-4m's modules at run time; nothing in the ml-4m tree is changed.
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import torch
from PIL import Image

N_CROPS = 4
SIZE = 224
N_SAM = 40  # SAM instances (polygons) tokenized


def register_tiny_builders():
    import fourm.vq.models.unet.unet as unet
    import fourm.vq.models.vit_models as vm

    def vit(name):
        w, d, h, part = re.match(r"vit_d(\d+)_l(\d+)_h(\d+)_(enc|dec)", name).groups()
        cls = vm.ViTEncoder if part == "enc" else vm.ViTDecoder
        setattr(vm, name, lambda **kw: cls(dim_tokens=int(w), depth=int(d), num_heads=int(h), **kw))

    for name in ("vit_d64_l2_h4_enc", "vit_d64_l1_h4_dec", "vit_d32_l1_h2_enc", "vit_d32_l1_h2_dec"):
        vit(name)
    unet.unet_tiny = lambda **kw: unet.PatchedUNetCondCat(patch_size=4, model_channels=32, num_res_blocks=1,
                                                          attention_resolutions=[], channel_mult=(1,), **kw)


def photos():
    from skimage import data

    astro = np.asarray(Image.fromarray(data.astronaut()).resize((256, 256), Image.BILINEAR))
    cat = np.asarray(Image.fromarray(data.chelsea()).resize((300, 200), Image.BILINEAR))
    coffee = data.coffee()[50:350]  # 300 x 600 -> a 2:1 photo
    coffee = np.asarray(Image.fromarray(coffee).resize((320, 160), Image.BILINEAR))
    return {"astronaut": astro, "chelsea": cat, "coffee_2to1": coffee}


def crop_rows(h, w, rng):
    """Row 0: the centre square crop (4M's CenterCropImageAugmenter), then random crops (scale 0.2..1, ratio
    3/4..4/3), every other one flipped."""
    s = min(h, w)
    rows = [(int(round((h - s) / 2)), int(round((w - s) / 2)), s, s, 0)]
    while len(rows) < N_CROPS:
        area = h * w * rng.uniform(0.2, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            rows.append((int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw,
                         len(rows) % 2))
    return np.array(rows, dtype=np.int64)


def labels_of(rgb):
    import cv2

    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, 80, 160)
    blur = cv2.GaussianBlur(gray.astype(np.float32), (0, 0), 3)
    depth = (blur / 255.0 * 60000 + 2000).astype(np.uint16)
    gx, gy = cv2.Sobel(blur, cv2.CV_32F, 1, 0), cv2.Sobel(blur, cv2.CV_32F, 0, 1)
    n = np.stack([-gx, -gy, np.full_like(gx, 8.0)], -1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    normal = np.round((n + 1) / 2 * 255).astype(np.uint8)
    semseg = (gray // 2).astype(np.uint8)  # ids 0..127
    semseg[gray > 250] = 255  # unlabelled
    return {"depth": depth, "normal": normal, "canny_edge": edges, "semseg_coco": semseg}


def main(out_dir):
    from fourm.data.modality_info import MODALITY_TRANSFORMS_DIVAE
    from fourm.vq.vqvae import VQVAE, DiVAE

    register_tiny_builders()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    os.makedirs(out_dir, exist_ok=True)

    common = dict(image_size=SIZE, patch_size=16, quant_type="lucid", latent_dim=32, norm_codes=True,
                  sync_codebook=False, enc_type="vit_d64_l2_h4_enc", dec_type="vit_d64_l1_h4_dec")
    cfgs = {
        "rgb": (VQVAE, dict(common, n_channels=3, codebook_size=256, post_mlp=True)),
        "edge": (DiVAE, dict(common, n_channels=3, codebook_size=128, post_mlp=True, dec_type="unet_tiny",
                             beta_schedule="linear", prediction_type="sample", num_train_timesteps=1000,
                             clip_sample=True)),
        "depth": (VQVAE, dict(common, n_channels=1, codebook_size=128)),
        "normal": (VQVAE, dict(common, n_channels=3, codebook_size=128)),
        # one-block width-32 ViTs and a 4x4-patch decoder head keep the 134-class file under 2 MiB
        "semseg": (VQVAE, dict(common, n_channels=8, n_labels=134, codebook_size=128, post_mlp=True,
                               patch_size_dec=4, enc_type="vit_d32_l1_h2_enc", dec_type="vit_d32_l1_h2_dec")),
        "dinov2": (VQVAE, dict(common, n_channels=32, patch_size=14, patch_proj=False, codebook_size=128,
                               post_mlp=True)),
        "dinov2_global": (VQVAE, dict(image_size=SIZE, n_channels=32, enc_type="BottleneckMLP/B_2-Wi_64",
                                      dec_type="BottleneckMLP/B_2-Wi_64", quant_type="memcodes", codebook_size=128,
                                      num_codebooks=16, latent_dim=64, sync_codebook=False)),
        "human_poses": (VQVAE, dict(image_size=SIZE, n_channels=207, enc_type="BottleneckMLP/B_2-Wi_64",
                                    dec_type="BottleneckMLP/B_2-Wi_64", quant_type="memcodes", codebook_size=64,
                                    num_codebooks=8, latent_dim=64, sync_codebook=False)),
        "sam_instance": (VQVAE, dict(common, image_size=64, n_channels=1, codebook_size=64, out_conv=True,
                                     enc_type="vit_d32_l1_h2_enc", dec_type="vit_d32_l1_h2_dec")),
    }
    models = {}
    for name, (cls, cfg) in cfgs.items():
        m = cls(**cfg)
        m.save_pretrained(os.path.join(out_dir, name), config=cfg)
        m2 = cls.from_pretrained(os.path.join(out_dir, name)).eval()  # what a user of the hub folder gets
        models[name] = m2

    teacher = torch.Generator().manual_seed(1)
    t_proj = torch.randn(3 * 14 * 14, 32, generator=teacher) / 20  # a fixed random "teacher": patchify + linear

    def teach(x224):  # [B, 3, 224, 224] in [-1, 1] -> ([B, 32, 16, 16] map, [B, 32] global)
        p = x224.unfold(2, 14, 14).unfold(3, 14, 14)  # B 3 16 16 14 14
        p = p.permute(0, 2, 3, 1, 4, 5).reshape(x224.shape[0], 16, 16, -1)
        f = (p @ t_proj).permute(0, 3, 1, 2)
        return f.half().float(), f.mean(dim=(2, 3)).half().float()

    inputs, ids = {}, {}
    T = MODALITY_TRANSFORMS_DIVAE
    task_of = {"rgb": "rgb", "edge": "canny_edge", "depth": "depth", "normal": "normal", "semseg": "semseg_coco"}
    with torch.no_grad():
        for pname, rgb in photos().items():
            h, w = rgb.shape[:2]
            crops = crop_rows(h, w, rng)
            labels = labels_of(rgb)
            inputs[f"{pname}/rgb"] = rgb
            inputs[f"{pname}/crop_settings"] = crops
            for k, v in labels.items():
                inputs[f"{pname}/{k}"] = v
            pil = {"rgb": Image.fromarray(rgb), "canny_edge": Image.fromarray(labels["canny_edge"]),
                   "depth": Image.fromarray(labels["depth"]), "normal": Image.fromarray(labels["normal"]),
                   "semseg_coco": Image.fromarray(labels["semseg_coco"])}
            for tok, task in task_of.items():
                modes = ["bilinear", None] if tok == "rgb" else ["bilinear"]
                for mode in modes:
                    xs = []
                    for top, left, ch, cw, flip in crops:
                        im = T[task].preprocess(pil[task].copy())
                        im = T[task].image_augment(im, (top, left, ch, cw), bool(flip), None, (SIZE, SIZE), None, mode)
                        xs.append(T[task].postprocess(im))
                    x = torch.stack(xs)
                    key = f"{pname}/{tok}" + ("" if mode == "bilinear" else "@pil_default")
                    ids[key] = models[tok].tokenize(x).reshape(len(crops), -1).numpy().astype(np.int16)
                    if mode == "bilinear":  # the encoder's latents too: a closer check of the preprocessing
                        m = models[tok]
                        lat = m.quant_proj(m.encoder(m.prepare_input(x)))
                        ids[f"{pname}/{tok}@latents"] = lat.numpy().astype(np.float16)
                    if tok == "rgb" and mode == "bilinear":
                        fmap, glob = teach(x)
            # per-crop teacher features as modalmill stores them (float16), tokenized as save_vq_tokens does
            inputs[f"{pname}/dinov2"] = fmap.permute(0, 2, 3, 1).numpy().astype(np.float16)
            inputs[f"{pname}/dinov2_global"] = glob.numpy().astype(np.float16)
            ids[f"{pname}/dinov2"] = models["dinov2"].tokenize(fmap).reshape(len(crops), -1).numpy().astype(np.int16)
            g = models["dinov2_global"].tokenize(glob[:, :, None, None])
            if g.size(-1) == 1:
                g = g.squeeze(2)
            ids[f"{pname}/dinov2_global"] = g.reshape(len(crops), -1).numpy().astype(np.int16)

        # human poses: 207-d body poses (23 rotation matrices) -> [B, 207, 1, 1] as run_training_vqvae feeds them
        rot = torch.linalg.qr(torch.randn(5, 23, 3, 3, generator=teacher))[0]
        poses = rot.reshape(5, 207).float()
        inputs["poses"] = poses.numpy()
        pt = models["human_poses"].tokenize(poses[:, :, None, None])
        ids["poses"] = pt.reshape(5, -1).numpy().astype(np.int16)

        # SAM instances: polygons (x, y) in a 224 crop -> ml-4m's 64x64 in-box masks -> ids
        from fourm.data.modality_transforms import SAMInstanceTransform

        sam = SAMInstanceTransform(mask_size=64, max_instance_n=None)
        polys = []
        for _i in range(N_SAM):  # varied shapes and sizes, so that the ids are many (a wrong mapping shows)
            cx, cy = rng.uniform(30, 194, 2)
            n = int(rng.integers(3, 14))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = rng.uniform(4, 80, n) * rng.uniform(0.3, 1.0)
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], -1)
            polys.append(np.clip(np.round(pts), 0, 223).astype(np.int32)[:, None, :])
        masks, bboxes, valid = sam.get_binary_masks(polys)
        inputs["sam_polygons"] = np.array([len(p) for p in polys], dtype=np.int64)
        inputs["sam_points"] = np.concatenate([p[:, 0] for p in polys]).astype(np.int32)
        inputs["sam_masks"] = masks.astype(np.uint8)
        inputs["sam_bboxes"] = bboxes.astype(np.float32)
        x = torch.from_numpy(masks).float()[:, None]  # instance masks in [0, 1], as run_training_vqvae feeds them
        ids["sam_instance"] = models["sam_instance"].tokenize(x).reshape(len(polys), -1).numpy().astype(np.int16)

    np.savez_compressed(os.path.join(out_dir, "inputs.npz"), **inputs)
    np.savez_compressed(os.path.join(out_dir, "ids.npz"), **ids)
    for k, v in sorted(ids.items()):
        print(f"{k:32s} {v.shape} distinct ids {len(np.unique(v))}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/ml4m_tokenizers")
