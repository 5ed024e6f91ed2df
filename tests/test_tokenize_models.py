"""Tokenizer models: encode -> decode shapes, and a short training beats a trivial baseline on held-out data."""

import numpy as np
import pytest
import torch

from modalmill.jobs.democorpus import photos
from modalmill.tokenize.adapters import (Adapter, FeatureMapAdapter, NormalAdapter, SemsegAdapter, adapter_for,
                                         body_poses, crop_label, instance_mask_in_box)
from modalmill.tokenize.models import MLPTokenizer, SpatialVQVAE, build_model
from modalmill.tokenize.train import check_config, default_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(model, adapter, make_batch, steps, lr=2e-3):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        target = make_batch(step)
        pred, q = model(adapter.to_input(target))
        loss = adapter.loss(pred, target) + q.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _held_out_vs_baseline(model, adapter, held):
    with torch.inference_mode():
        pred, _ = model(adapter.to_input(held))
    return adapter.summarise(adapter.metrics(pred, held)), adapter.summarise(adapter.metrics(adapter.baseline(held),
                                                                                            held))


def _crops(images, adapter, rng, n):
    out = []
    for _ in range(n):
        img = images[rng.integers(len(images))]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(adapter.prepare(img, np.array([top, left, side, side, rng.integers(2)]), (h, w)))
    return torch.stack(out)


def test_spatial_vqvae_on_real_photos_beats_the_mean_image():
    pics = photos()
    names = sorted(pics)
    train_imgs = [pics[n] for n in names[:-4]]
    held_imgs = [pics[n] for n in names[-4:]]
    adapter = Adapter("rgb", 3, 3, size=64)
    cfg = {"family": "spatial", "in_channels": 3, "out_channels": 3, "image_size": 64, "patch_size": 8, "dim": 64,
           "enc_depth": 1, "dec_depth": 1, "heads": 2, "post_mlp": True,
           "quantizer": {"type": "vq", "dim": 16, "codebook_size": 128, "decay": 0.9, "threshold_ema_dead_code": 1}}
    torch.manual_seed(0)
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    held = _crops(held_imgs, adapter, np.random.default_rng(1), 16)
    with torch.inference_mode():
        ids = model.eval().encode(adapter.to_input(held))
        assert ids.shape == (16, 64) and ids.dtype == torch.int64
        assert model.decode_indices(ids).shape == (16, 3, 64, 64)
    _train(model, adapter, lambda s: _crops(train_imgs, adapter, rng, 8), steps=120)
    after, base = _held_out_vs_baseline(model, adapter, held)
    assert after["mse"] < 0.8 * base["mse"], (after, base)


def test_class_map_tokenizer_one_hot_cross_entropy_beats_the_majority_class():
    pics = photos()
    from skimage.filters import gaussian

    grey = [gaussian(p.mean(axis=2), sigma=6) for p in pics.values()]  # region-like classes, not pixel noise
    maps = [np.digitize(g, np.quantile(g, [0.25, 0.5, 0.75])).astype(np.uint8) * 10 for g in grey]  # 4 classes
    adapter = SemsegAdapter("semseg_coco", size=64)
    cfg = {"family": "spatial", "in_channels": adapter.in_channels, "out_channels": adapter.out_channels,
           "image_size": 64, "patch_size": 8, "dim": 64, "enc_depth": 1, "dec_depth": 1, "heads": 2,
           "quantizer": {"type": "fsq", "levels": [8, 5, 5, 5]}}
    torch.manual_seed(0)
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    held = _crops(maps[-4:], adapter, np.random.default_rng(1), 12)
    assert held.dtype == torch.int64 and held.shape == (12, 1, 64, 64)
    assert adapter.to_input(held).shape == (12, 134, 64, 64)
    _train(model, adapter, lambda s: _crops(maps[:-4], adapter, rng, 8), steps=100)
    after, base = _held_out_vs_baseline(model, adapter, held)
    assert after["accuracy"] > base["accuracy"] + 0.1 and after["miou"] > base["miou"], (after, base)


def test_mlp_tokenizer_memcodes_on_global_vectors_beats_the_mean_vector():
    torch.manual_seed(0)
    basis = torch.randn(6, 48)

    def vectors(n, gen):
        return torch.nn.functional.normalize(torch.randn(n, 6, generator=gen) @ basis, dim=-1)

    cfg = default_config("dinov2_global", "tiny", in_channels=48)
    check_config(cfg)
    assert cfg["model"]["quantizer"]["type"] == "memcodes" and cfg["model"]["n_tokens"] == 16
    model = build_model(cfg["model"])
    assert isinstance(model, MLPTokenizer)
    adapter = adapter_for("dinov2_global", 48)
    g = torch.Generator().manual_seed(1)
    held = vectors(64, torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ids = model.eval().encode(held)
        assert ids.shape == (64, 16) and int(ids.max()) < 64
        assert model.decode_indices(ids).shape == (64, 48)
    _train(model, adapter, lambda s: vectors(32, g), steps=150)
    after, base = _held_out_vs_baseline(model, adapter, held)
    assert after["cosine"] > base["cosine"] + 0.2, (after, base)


_POSE_BASIS = np.random.default_rng(42).normal(scale=0.3, size=(4, 23 * 3))


def _rotations(n, rng):
    """Body poses with correlated joints (as real poses are): axis-angle vectors from 4 latent factors."""
    aa = (rng.normal(size=(n, 4)) @ _POSE_BASIS).reshape(n, 23, 3)
    angle = np.linalg.norm(aa, axis=-1, keepdims=True)[..., None]
    axis = aa / np.maximum(np.linalg.norm(aa, axis=-1, keepdims=True), 1e-9)
    k = np.zeros((n, 23, 3, 3))
    k[..., 0, 1], k[..., 0, 2], k[..., 1, 2] = -axis[..., 2], axis[..., 1], -axis[..., 0]
    k = k - np.swapaxes(k, -1, -2)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def test_pose_tokenizer_makes_8_tokens_from_1024_codes_and_reads_4m_human_poses():
    rng = np.random.default_rng(0)
    rots = _rotations(3, rng)
    value = {"bbox_xyxy": [[0, 0, 5, 5]] * 3, "pred_cam": [[1, 0, 0]] * 3,
             "pred_smpl_params": {"global_orient": [np.eye(3)[None].tolist()] * 3, "body_pose": rots.tolist(),
                                  "betas": [[0.0] * 10] * 3}}
    poses = body_poses(value)
    assert len(poses) == 3 and poses[0].shape == (207,)
    assert body_poses([]) == []
    cfg = default_config("human_poses", "base")
    assert cfg["vocab_size"] == 1024 and cfg["model"]["n_tokens"] == 8
    tiny = default_config("human_poses", "tiny")
    torch.manual_seed(0)
    model = build_model(tiny["model"])
    adapter = adapter_for("human_poses")
    held = torch.tensor(_rotations(32, np.random.default_rng(5)).reshape(32, -1), dtype=torch.float32)
    with torch.inference_mode():
        assert model.eval().encode(held).shape == (32, 8)
    # Memcodes' hard Gumbel sampling is noisy until the logits grow: it needs more steps than FSQ/VQ here
    _train(model, adapter, lambda s: torch.tensor(_rotations(32, rng).reshape(32, -1), dtype=torch.float32),
           steps=400)
    after, base = _held_out_vs_baseline(model, adapter, held)
    assert after["mse"] < 0.8 * base["mse"], (after, base)


def test_sam_instance_tokenizer_on_real_object_masks_beats_the_mean_mask():
    import cv2
    from skimage import data, filters, measure

    coins = data.coins()
    labels = measure.label(coins > filters.threshold_otsu(coins))
    masks = []
    for region in measure.regionprops(labels):
        if region.area < 80:
            continue
        m = (labels == region.label).astype(np.uint8)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        mask, bbox = instance_mask_in_box(max(contours, key=cv2.contourArea))
        assert mask.shape == (64, 64) and bbox[2] >= bbox[0]
        masks.append(mask)
    assert len(masks) >= 12
    cfg = default_config("sam_instance", "tiny")
    check_config(cfg)
    model = build_model(cfg["model"])
    assert isinstance(model, SpatialVQVAE) and model.n_tokens == 16
    adapter = adapter_for("sam_instance")
    all_masks = torch.stack([adapter.prepare(m) for m in masks])
    held, train = all_masks[:6], all_masks[6:]
    rng = np.random.default_rng(0)

    def batch(step):
        picks = train[torch.as_tensor(rng.integers(0, len(train), 8))]
        return torch.where(torch.as_tensor(rng.random(8) < 0.5)[:, None, None, None], picks.flip(-1), picks)

    _train(model, adapter, batch, steps=100)
    after, base = _held_out_vs_baseline(model, adapter, held)
    assert after["mse"] < base["mse"] and after["iou"] > 0.6, (after, base)


def test_crop_geometry_flips_normals_and_maps_crops_onto_feature_grids():
    normal = np.zeros((8, 8, 3), np.uint8)
    normal[..., 0] = 200  # x component > 0
    t = NormalAdapter("normal", 3, 3, size=8).prepare(normal, np.array([0, 0, 8, 8, 1]), (8, 8))
    assert torch.allclose(t[0], torch.full((8, 8), 1 - 200 / 255))
    # teacher features are stored per crop (the teacher ran on the crop, flipped included): crop c reads row c as is
    feats = np.random.default_rng(0).normal(size=(3, 16, 16, 5)).astype(np.float16)
    ad = FeatureMapAdapter("dinov2", 5, 5, size=16)
    crops = np.array([[0, 56, 224, 224, 0], [10, 0, 200, 300, 1], [0, 100, 100, 120, 0]])
    for c, crop in enumerate(crops):
        t = ad.prepare(crop_label("dinov2", feats, c, len(crops)), crop, (224, 336))
        assert torch.equal(t, torch.from_numpy(feats[c].astype(np.float32)).permute(2, 0, 1))  # no cut, no flip
    coarse = FeatureMapAdapter("dinov2", 5, 5, size=8).prepare(feats[0])  # another grid: resized bilinearly
    assert coarse.shape == (5, 8, 8)
    assert torch.allclose(coarse, torch.from_numpy(feats[0].astype(np.float32)).permute(2, 0, 1)
                          .reshape(5, 8, 2, 8, 2).mean(dim=(2, 4)), atol=1e-5)
    edge = np.zeros((100, 100), np.uint8)
    edge[:, 50] = 255
    e = adapter_for("canny_edge").prepare(edge, np.array([0, 0, 100, 100, 0]), (100, 100))
    assert set(torch.unique(e).tolist()) <= {0.0, 1.0}, "edges must be resized with nearest neighbours"
    with pytest.raises(ValueError, match="stored rgb"):
        adapter_for("canny_edge").prepare(edge, np.array([0, 0, 10, 10, 0]), (50, 50))


def test_configs_match_4m_token_counts_and_vocabularies():
    for source, tokens in (("rgb", 196), ("canny_edge", 196), ("semseg_coco", 196), ("depth", 196), ("clip", 196),
                           ("dinov2", 256), ("imagebind", 256), ("dinov2_global", 16)):
        cfg = default_config(source, "base", in_channels=768)
        check_config(cfg)
        m = cfg["model"]
        got = (m["image_size"] // m["patch_size"]) ** 2 if m["family"] == "spatial" else m["n_tokens"]
        assert got == tokens, source
    assert default_config("rgb", "base")["model"]["quantizer"]["codebook_size"] == 16384
    assert default_config("semseg_coco", "base")["model"]["quantizer"]["codebook_size"] == 4096
    bad = default_config("rgb", "tiny")
    bad["model"]["patch_size"] = 8
    with pytest.raises(ValueError, match="needs 196"):
        check_config(bad)
    bad = default_config("canny_edge", "tiny")
    bad["model"]["quantizer"]["codebook_size"] = 9000
    with pytest.raises(ValueError, match="more than the 8192"):
        check_config(bad)
