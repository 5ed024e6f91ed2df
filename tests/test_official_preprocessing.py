"""The model labelers preprocess (and post-process) as the official inference code does, shown numerically.

Reference numbers: tests/fixtures/official_preprocessing/, made ONCE by scripts/make_official_preprocessing_fixtures.py
running the official code (facebookresearch/dinov2, DepthAnything/Depth-Anything-V2, EPFL-VILAB/omnidata,
transformers' own DETR / Mask2Former image processors, segment-anything) with the tiny random weights of
tests/tiny_models.py on a 2:1 photo (96 x 192). Each fixture records a sha256 of the weights it was made with;
the tests rebuild the same seeded weights, load them through the labelers' real loading paths and refuse to
compare against a fixture of other weights. Each test also shows that the previous preprocessing (square
squash / longest side 800 / transformers' position interpolation) would fail the same comparison.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modalmill.labelers.base import LabelInput, get_labeler
from modalmill.labelers.depth import depth_to_uint16, dpt_forward, normals_to_uint8
from modalmill.labelers.sam import instance_edges
from tests.tiny_models import (TEST_SETTINGS, save_official_omnidata, save_tiny_depth_anything, save_tiny_detr,
                               save_tiny_dinov2, save_tiny_mask2former, save_tiny_sam)

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "official_preprocessing")


@pytest.fixture(scope="module")
def ref():
    with open(os.path.join(FIX, "meta.json")) as f:
        meta = json.load(f)
    arrays = dict(np.load(os.path.join(FIX, "official.npz")))
    photo = np.asarray(Image.open(os.path.join(FIX, meta["photo"])).convert("RGB"))
    assert photo.shape[:2] == tuple(meta["photo_hw"]) and photo.shape[1] == 2 * photo.shape[0]  # a 2:1 photo
    return meta, arrays, photo


def weights_sha256(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def same_weights(meta_entry: dict, state: dict) -> None:
    assert weights_sha256(state) == meta_entry["weights_sha256"], \
        "the tiny weights changed since the fixture was made: rerun scripts/make_official_preprocessing_fixtures.py"


def labeler(name: str, weights: str, **settings):
    lab = get_labeler(name)({**TEST_SETTINGS.get(name, {}), **settings, "weights": weights, "device": "cpu"})
    lab.setup()
    return lab


def inp(image: np.ndarray, crops=None) -> LabelInput:
    crops = np.zeros((1, 5), np.int64) if crops is None else np.asarray([crops], np.int64)
    return LabelInput(key="k", image=image, original_size=image.shape[1::-1], crops=crops)


# ---------------------------------------------------------------------- DINOv2


def test_dinov2_position_interpolation_is_the_official_hub_models(ref, tmp_path):
    meta, arrays, photo = ref
    m = meta["dinov2"]
    lab = labeler("dinov2", save_tiny_dinov2(str(tmp_path / "d")), input_size=m["input_size"])
    same_weights(m, lab.model.state_dict())
    (out,) = lab.process_batch([inp(photo, m["crop0"])])  # one crop row: the centre square
    want_patch, want_cls = arrays["dinov2_patch"], arrays["dinov2_cls"]
    patch, cls = out["dinov2"][0], out["dinov2_global"][0]  # row 0: the features of crop 0
    assert patch.shape == want_patch.shape  # 16 x 16 patches of a 4 x 4 position grid: interpolated
    # stored as float16: 2^-11 relative rounding of values of size ~1-3
    err = max(np.abs(patch.astype(np.float32) - want_patch).max(), np.abs(cls.astype(np.float32) - want_cls).max())
    assert err < 4e-3, err
    # float32 features before the float16 storage: 1e-5 (the official forward on the same input tensor)
    x = lab.to_tensor(list(lab.prepare([inp(photo, m["crop0"])])[0]), size=m["input_size"])
    with torch.inference_mode():
        hidden = lab.model(pixel_values=x).last_hidden_state[0]
        assert np.abs(hidden[1:].reshape(want_patch.shape).numpy() - want_patch).max() < 1e-5
        assert np.abs(hidden[0].numpy() - want_cls).max() < 1e-5
        # transformers' own interpolation (resize to the target grid) is not the official one: far off
        emb = lab.model.embeddings
        del emb.interpolate_pos_encoding  # back to the class' method
        theirs = lab.model(pixel_values=x).last_hidden_state[0]
    assert np.abs(theirs[1:].reshape(want_patch.shape).numpy() - want_patch).max() > 100 * 1e-5


# ---------------------------------------------------------------------- Depth Anything V2


def test_depth_anything_is_infer_image(ref, tmp_path):
    meta, arrays, photo = ref
    m = meta["depth_anything"]
    lab = labeler("depth_anything", save_tiny_depth_anything(str(tmp_path / "da")), input_size=m["input_size"])
    same_weights(m, lab.model.state_dict())
    # the model input: image2tensor's keep-aspect, multiple-of-14, cv2-bicubic resize and normalisation
    x = lab.model_input(photo)
    assert list(x.shape[-2:]) == m["input_hw"] == [56, 112]
    assert np.abs(x - arrays["depth_anything_input"]).max() < 1e-5
    # the disparity at the image's size: the network (official DINOv2 position interpolation) + infer_image's
    # align_corners=True resize
    with torch.inference_mode():
        (disp,) = lab.disparities([photo])
    want = arrays["depth_anything_depth"]
    assert disp.shape == want.shape == photo.shape[:2]
    scale = float(np.abs(want).max())
    tol = 1e-5 * max(1.0, scale)
    assert np.abs(disp.numpy() - want).max() < tol
    # the stored label is that disparity converted to depth and min/max-normalised
    (out,) = lab.process_batch([inp(photo)])
    t = torch.from_numpy(want)
    expect = depth_to_uint16(1.0 / (t / t.max()).clamp(min=lab.config.disparity_floor))
    # tolerance: a 1e-5 relative disparity difference moves a depth of range 1 .. 1.62 by ~2 of 65535 steps; 8
    # leaves room for other CPUs' float sums, and is far below what a wrong interpolation gives (below)
    assert np.abs(out["depth"].astype(np.int64) - expect.astype(np.int64)).max() <= 8
    # the squashed square input of before is another input altogether
    squashed = lab.to_tensor([photo], size=m["input_size"], mean=lab.mean, std=lab.std)
    assert tuple(squashed.shape[-2:]) != tuple(x.shape[-2:])
    # the tiny model's disparity depends on its input (std ~0.1 around 1), so the wrong interpolations fail: the
    # output resized without align_corners, and transformers' own position-embedding interpolation
    assert want.std() > 0.01
    with torch.inference_mode():
        raw = lab.raw_predictions([photo])[0]
        off = torch.nn.functional.interpolate(raw[None, None], size=photo.shape[:2], mode="bilinear",
                                              align_corners=False)[0, 0]
        assert np.abs(off.numpy() - want).max() > 100 * tol
        emb = lab.model.backbone.embeddings
        del emb.interpolate_pos_encoding  # back to the class' method (resize to the target grid)
        (theirs,) = lab.disparities([photo])
    assert np.abs(theirs.numpy() - want).max() > 100 * tol


# ---------------------------------------------------------------------- Omnidata DPT-Hybrid


@pytest.mark.parametrize("task,channels", [("depth", 1), ("normal", 3)])
def test_omnidata_runs_the_official_model_on_the_whole_image_and_agrees_on_the_centre_crop(ref, tmp_path, task,
                                                                                            channels):
    meta, arrays, photo = ref
    m = meta[f"omnidata_{task}"]
    lab = labeler(f"omnidata_{task}", save_official_omnidata(str(tmp_path / "o.ckpt"), channels))
    same_weights(m, lab.model.state_dict())  # loaded from Omnidata's own Lightning layout through the converter
    size = m["input_size"]
    with torch.inference_mode():
        (out,) = lab.raw_predictions([photo])
    # 1. the whole image at the aspect-preserving size (the demo's Resize without its CenterCrop) gives what
    #    Omnidata's own DPTDepthModel (forward_flex: interpolated position embeddings) gives on it
    full = arrays[f"omnidata_{task}_full"].reshape(channels, *m["full_input_hw"])
    assert list(out.shape[-2:]) == m["full_input_hw"] == [size, 2 * size]
    assert np.abs(out.numpy() - full).max() < 1e-5
    # 2. the demo's own centre crop, given to the labeler, gives the demo's output exactly: same resize, same
    #    normalisation, same network
    resized = np.asarray(Image.fromarray(photo).resize((2 * size, size), Image.BILINEAR))
    crop = arrays[f"omnidata_{task}_crop"].reshape(channels, size, size)
    with torch.inference_mode():
        (alone,) = lab.raw_predictions([resized[:, size // 2: size // 2 + size]])
    assert np.abs(alone.numpy() - crop).max() < 1e-5
    # 3. on the centre-crop region the whole-image label agrees with the demo's crop output up to what the extra
    #    context changes (the ViT attends globally: the crop sees 4 x 4 patches, the whole image 4 x 8). Measured
    #    with these weights (docs/labelers.md): correlation 0.86 (depth) / 0.84 (normal), mean |diff| 0.0035 /
    #    0.0058 against a spread (std) of 0.0084 / 0.0152. The previous square squash does far worse on the same
    #    region (correlation 0.15 / 0.57, mean |diff| 0.0082 / 0.0107): the bounds below separate the two.
    centre = out.numpy()[:, :, size // 2: size // 2 + size]
    with torch.inference_mode():
        sq = dpt_forward(lab.model, lab.to_tensor([photo], size=size)).float().clamp(0, 1)
    sq = sq if sq.ndim == 4 else sq[:, None]
    sq = F.interpolate(F.interpolate(sq, size=photo.shape[:2], mode="bilinear"), size=(size, 2 * size),
                       mode="bilinear")[0, :, :, size // 2: size // 2 + size].numpy()

    def agreement(a):
        return float(np.corrcoef(a.ravel(), crop.ravel())[0, 1]), float(np.abs(a - crop).mean())

    (corr, mad), (sq_corr, sq_mad) = agreement(centre), agreement(sq)
    assert corr > 0.8 and mad < 0.6 * float(crop.std()), (corr, mad, float(crop.std()))
    assert sq_corr < corr - 0.2 and sq_mad > 1.5 * mad, (sq_corr, sq_mad)
    # 4. the stored label: depth min/max-normalised; normals stored as the demo stores them (ToPILImage: x*255
    #    truncated, no renormalisation), after the bilinear resize to the stored image
    (label,) = lab.process_batch([inp(photo)])
    up = F.interpolate(torch.from_numpy(full)[None], size=photo.shape[:2], mode="bilinear")[0]
    if task == "depth":
        expect = depth_to_uint16(up[0])
        assert np.abs(label["depth"].astype(np.int64) - expect.astype(np.int64)).max() <= 1
    else:
        expect = normals_to_uint8(up)
        diff = np.abs(label["normal"].astype(np.int64) - expect.astype(np.int64))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # float noise may cross a truncation step
        # the storage rule is the demo's own: its PNG of the crop is normals_to_uint8 of its prediction
        assert np.array_equal(normals_to_uint8(torch.from_numpy(crop)), arrays["omnidata_normal_crop_png"])
        # not unit vectors: what Omnidata predicted, clamped
        n = label["normal"].astype(np.float64) / 255 * 2 - 1
        assert np.abs(np.linalg.norm(n, axis=-1) - 1).max() > 0.1


# ---------------------------------------------------------------------- Mask2Former, DETR


def test_mask2former_input_is_its_image_processors(ref, tmp_path):
    meta, arrays, photo = ref
    m = meta["mask2former"]
    lab = labeler("mask2former_coco", save_tiny_mask2former(str(tmp_path / "m")), input_size=800, max_size=1333)
    same_weights(m, lab.model.state_dict())
    from modalmill.labelers.semseg import processor_batches
    ((idx, x, mask),) = list(processor_batches(lab, [photo], 800, 1333, 32))
    # shorter side 800 would make the longer 1600 > 1333: 666 x 1333, then up to multiples of 32
    assert list(x.shape[-2:]) == m["input_hw"] == [672, 1344] and bool(mask.all())
    assert np.abs(x[0, :, ::16, ::16].numpy() - arrays["mask2former_pixels_sub16"]).max() < 1e-5
    with torch.inference_mode():
        ((cls, masks, hw),) = lab.raw_predictions([photo])
    assert list(hw) == m["input_hw"] and list(masks.shape[-2:]) == m["mask_logits_hw"]
    assert np.abs(cls.numpy() - arrays["mask2former_class_logits"]).max() < 1e-4
    assert np.abs(masks[:, ::8, ::8].numpy() - arrays["mask2former_mask_logits_sub8"]).max() < 1e-4
    (label,) = lab.process_batch([inp(photo)])
    assert label["semseg_coco"].shape == photo.shape[:2]
    # the previous input (longest side 800 -> 400 x 800, 0.36x the pixels) is not the processor's
    assert 400 * 800 / (672 * 1344) < 0.4


def test_detr_input_is_its_image_processors(ref, tmp_path):
    meta, arrays, photo = ref
    m = meta["detr"]
    lab = labeler("detr_coco", save_tiny_detr(str(tmp_path / "d")), input_size=800, max_size=1333)
    same_weights(m, lab.model.state_dict())
    from modalmill.labelers.semseg import processor_batches, processor_size
    ((idx, x, mask),) = list(processor_batches(lab, [photo], 800, 1333))
    assert list(x.shape[-2:]) == m["input_hw"] == [666, 1333]
    assert np.abs(x[0, :, ::16, ::16].numpy() - arrays["detr_pixels_sub16"]).max() < 1e-5
    with torch.inference_mode():
        ((logits, boxes),) = lab.raw_predictions([photo])
    assert np.abs(logits.numpy() - arrays["detr_logits"]).max() < 1e-4
    assert np.abs(boxes.numpy() - arrays["detr_boxes"]).max() < 1e-5
    # the det record is DETR's post-processing of those outputs
    from modalmill.labelers.detection import DETR_COCO_LABELS, detections_from_logits
    (label,) = lab.process_batch([inp(photo)])
    c = lab.config
    assert label["det"] == {**detections_from_logits(torch.from_numpy(arrays["detr_logits"]),
                                                     torch.from_numpy(arrays["detr_boxes"]), DETR_COCO_LABELS,
                                                     min_score=c.min_score, top_k=c.top_k, decimals=c.decimals),
                            # the record carries the detector's own thresholds (docs/labelers.md)
                            "score_threshold": 0.8, "person_score_threshold": 0.7}
    # the sizes rule on other shapes too (portrait, small, square, within the cap), as the processor computes it
    from transformers import DetrImageProcessorPil
    proc = DetrImageProcessorPil()
    for hw in [(192, 96), (30, 40), (500, 500), (600, 900), (1000, 3000)]:
        got = proc(images=[np.zeros((*hw, 3), np.uint8)], return_tensors="pt")["pixel_values"].shape[-2:]
        assert processor_size(*hw, 800, 1333) == tuple(got), hw


# ---------------------------------------------------------------------- SAM


def test_sam_is_float32_by_default_and_gives_the_official_generators_masks(ref, tmp_path):
    meta, arrays, photo = ref
    m = meta["sam"]
    cls = get_labeler("sam")
    assert cls.Config().dtype == "float32"
    weights = save_tiny_sam(str(tmp_path / "sam.pth"))
    lab = labeler("sam", weights, **m["settings"])
    same_weights(m, torch.load(weights, weights_only=True))
    lab.device = torch.device("cuda")  # what an actor on a GPU has: still no autocast unless dtype asks for it
    assert isinstance(lab.autocast(), contextlib.nullcontext)
    lab.device = torch.device("cpu")
    (out,) = lab.process_batch([inp(photo)])
    got = out["sam_mask"]["instances"]
    want = m["masks"]
    assert len(got) == len(want) == m["n_masks"] > 1
    # Tolerances: float32 sums differ between CPUs (an AMD and an Intel host gave areas 12514 and 12513 for the
    # same mask), so a mask's area may differ by AREA_TOL pixels (0.1 % of the largest mask, at least 2), a box
    # side by 1 pixel, the scores by 1e-4, and the edge maps in at most 0.2 % of the pixels
    area_tol = max(2, int(0.001 * max(w["area"] for w in want)))
    for g, w in zip(got, want):
        x, y, bw, bh = w["bbox_xywh"]
        assert abs(g["area"] - w["area"]) <= area_tol, (g["area"], w["area"])
        assert np.abs(np.array(g["bbox_xyxy"]) - np.array([x, y, x + bw, y + bh])).max() <= 1
        assert abs(g["predicted_iou"] - w["predicted_iou"]) < 1e-4
        assert abs(g["stability_score"] - w["stability_score"]) < 1e-4
    masks = np.unpackbits(arrays["sam_masks_packed"], axis=1)[:, :photo.shape[0] * photo.shape[1]]
    masks = masks.reshape(-1, *photo.shape[:2]).astype(bool)
    assert np.mean(out["sam_edge"] != instance_edges(list(masks), photo.shape[:2])) <= 0.002
