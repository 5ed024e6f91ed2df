"""HMR 2.0 (4D-Humans) labeler: a tiny random configuration of the architecture, saved and loaded through the
real paths (converted safetensors, official-named state dicts, a Lightning checkpoint read without
unpickling objects), checked against a plain re-statement of 4D-Humans' forward pass on official key names,
HMR 2.0's person crop against OpenCV's warpAffine, 6D rotations, and run inside the Ray pipeline after a
test-only detector (in the same job, and again with ``--only`` reading the stored ``det``)."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modalmill.jobs.runner import EXIT_OK
from modalmill.labelers import LabelFailure, LabelInput, get_labeler, humans
from modalmill.labelers.base import Labeler, register_labeler
from modalmill.labelers.humans import IMAGENET_MEAN, IMAGENET_STD, build_hmr2, rot6d_to_rotmat, to_official_names
from modalmill.labelers.model import ModelLabeler
from modalmill.io.fetch import WeightsError
from modalmill.io.hashes import content_hash
from modalmill.io import manifest
from modalmill.schemas import RecordError, get_modality
from tests.tiny_models import HMR2_TINY as TINY
from tests.tiny_models import save_tiny_hmr2, tiny_hmr2

CPU = {"num_cpus": 0.25, "num_gpus": 0, "memory_mb": 0}


class CfgNode(dict):
    """Stands for yacs' CfgNode, which 4D-Humans pickles into its checkpoint's hyper_parameters."""


@register_labeler
class PersonBoxes(Labeler):
    """Test-only detector: fixed boxes by key. Key % 3 == 0: no person above 0.5; == 1: one; == 2: two."""

    name = "test_person_boxes"
    outputs = ("det",)

    def process_batch(self, batch):
        out = []
        for inp in batch:
            k = int(inp.key) % 3
            inst = [{"boxes": [0.2, 0.1, 0.7, 0.95], "class_name": "person", "score": 0.9}] if k else []
            inst += [{"boxes": [0.6, 0.1, 0.9, 0.5], "class_name": "cup", "score": 0.95},
                     {"boxes": [0.0, 0.0, 0.2, 0.3], "class_name": "person", "score": 0.2}]
            if k == 2:
                inst.append({"boxes": [0.5, 0.4, 0.8, 0.9], "class_name": "person", "score": 0.6})
            out.append({"det": {"instances": inst}})
        return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_hmr2()
    return model, save_tiny_hmr2(tmp_path_factory.mktemp("hmr2") / "hmr2_tiny.safetensors", model)


def _inp(image, det, key="k", original_size=None):
    h, w = image.shape[:2]
    return LabelInput(key=key, image=image, original_size=original_size or (w, h),
                      crops=np.array([[0, 0, min(h, w), min(h, w), 0]]), labels={"det": det})


def _photo(name="astronaut"):
    from skimage import data

    return np.ascontiguousarray(getattr(data, name)())


# ---------------------------------------------------------------------- registry entry


def test_registry_entry_is_complete_and_frozen():
    cls = get_labeler("hmr2")
    assert issubclass(cls, ModelLabeler) and cls.stateful
    assert cls.outputs == ("human_poses",) and cls.requires == ("det",)
    for attr in ("architecture", "weights", "weights_help", "license", "description"):
        assert isinstance(getattr(cls, attr), str) and getattr(cls, attr), attr
    # the default: the official checkpoint, a member of 4D-Humans' data tarball (downloaded once, member extracted)
    assert cls.weights.endswith("hmr2_data.tar.gz#logs/train/multiruns/hmr2/0/checkpoints/epoch=35-step=1000000.ckpt")
    assert "epoch=35-step=1000000.ckpt" in cls.weights_help and cls.weights_pin.sha256 is None
    assert "no published sha256" in cls.weights_pin.note
    assert cls.input_size == (256, 192) and cls.mean == IMAGENET_MEAN and cls.std == IMAGENET_STD
    r = cls.default_resources
    assert r.num_cpus >= 1 and 0 < r.num_gpus <= 1 and r.memory_mb > 0 and cls.default_batch_size >= 1
    assert cls.Config.__dataclass_params__.frozen
    fields = dataclasses.fields(cls.Config)
    assert [(f.name, f.default) for f in fields[:3]] == [("weights", None), ("device", "auto"), ("dtype", "auto")]
    c = cls.Config()
    assert (c.person_class, c.score_threshold, c.box_scale, c.bbox_frame) == ("person", None, 1.0, "stored")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.score_threshold = 0.1  # type: ignore[misc]
    assert cls(dataclasses.asdict(c)).config_hash() == cls().config_hash()
    for bad, match in (({"bbox_frame": "crop"}, "bbox_frame"), ({"score_threshold": 2}, "score_threshold"),
                       ({"max_people": -1}, "max_people"), ({"box_scale": 0}, "box_scale"), ({"x": 1}, "unknown")):
        with pytest.raises(ValueError, match=match):
            cls.make_config(bad)


def test_cli_lists_it():
    from click.testing import CliRunner

    from modalmill.cli import main

    out = CliRunner().invoke(main, ["labelers", "--wide"]).output
    line = next(ln for ln in out.splitlines() if ln.startswith("hmr2 "))
    assert "human_poses" in line and "hmr2_data.tar.gz" in line and "MIT" in line and "gpu=0.25" in line


# ---------------------------------------------------------------------- official names and checkpoints


def test_official_key_names_round_trip(tiny):
    model, _ = tiny
    ours = model.state_dict()
    official = to_official_names(ours)
    # 4D-Humans' names (hmr2/models/backbones/vit.py, heads/smpl_head.py, components/pose_transformer.py)
    for key in ("backbone.patch_embed.proj.weight", "backbone.pos_embed", "backbone.blocks.1.attn.qkv.bias",
                "backbone.blocks.0.mlp.fc2.weight", "backbone.last_norm.weight",
                "smpl_head.transformer.to_token_embedding.weight", "smpl_head.transformer.pos_embedding",
                "smpl_head.transformer.transformer.layers.1.0.fn.to_qkv.weight",
                "smpl_head.transformer.transformer.layers.0.1.fn.to_kv.weight",
                "smpl_head.transformer.transformer.layers.0.1.fn.to_q.weight",
                "smpl_head.transformer.transformer.layers.0.1.fn.to_out.0.bias",
                "smpl_head.transformer.transformer.layers.1.2.fn.net.3.weight",
                "smpl_head.transformer.transformer.layers.1.2.norm.bias", "smpl_head.decpose.weight",
                "smpl_head.decshape.bias", "smpl_head.deccam.weight", "smpl_head.init_body_pose",
                "smpl_head.init_betas", "smpl_head.init_cam"):
        assert key in official, key
    assert len(official) == len(ours)
    # what the training module holds besides: dropped by the converter
    extra = {"discriminator.D_conv1.weight": torch.zeros(1), "smpl.shapedirs": torch.zeros(1),
             "smpl.J_regressor_extra": torch.zeros(1), "initialized": torch.tensor(True)}
    back = humans.convert_hmr2_state_dict({**official, **extra})
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    fresh = build_hmr2(TINY)
    fresh.load_state_dict(back, strict=True)
    with pytest.raises(WeightsError, match="unexpected key"):
        humans.convert_hmr2_state_dict({**official, "smpl_head.something_new.weight": torch.zeros(1)})
    with pytest.raises(KeyError):
        to_official_names({"head.unknown": torch.zeros(1)})


def _reference_forward(sd, crops, arch):
    """4D-Humans' HMR 2.0 forward (ViTPose ViT + SMPL transformer-decoder head), re-stated with plain tensor ops
    on the OFFICIAL key names, independently of modalmill's modules."""
    bb, hd = arch["backbone"], arch["head"]
    b = crops.shape[0]
    x = F.conv2d(crops, sd["backbone.patch_embed.proj.weight"], sd["backbone.patch_embed.proj.bias"], stride=16,
                 padding=2).flatten(2).transpose(1, 2)
    x = x + sd["backbone.pos_embed"][:, 1:] + sd["backbone.pos_embed"][:, :1]

    def ln(t, name, eps):
        return F.layer_norm(t, t.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)

    def lin(t, name, bias=True):
        return F.linear(t, sd[name + ".weight"], sd[name + ".bias"] if bias else None)

    def attend(q, k, v, heads):
        q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        a = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return (a @ v).transpose(1, 2).reshape(b, q.shape[2], -1)

    for i in range(bb["depth"]):
        p = f"backbone.blocks.{i}."
        q, k, v = lin(ln(x, p + "norm1", 1e-6), p + "attn.qkv").chunk(3, -1)
        x = x + lin(attend(q, k, v, bb["num_heads"]), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2", 1e-6), p + "mlp.fc1")), p + "mlp.fc2")
    ctx = ln(x, "backbone.last_norm", 1e-6)
    t = lin(torch.zeros(b, 1, 1), "smpl_head.transformer.to_token_embedding")
    t = t + sd["smpl_head.transformer.pos_embedding"][:, :1]
    for i in range(hd["depth"]):
        p = f"smpl_head.transformer.transformer.layers.{i}."
        q, k, v = lin(ln(t, p + "0.norm", 1e-5), p + "0.fn.to_qkv", bias=False).chunk(3, -1)
        t = lin(attend(q, k, v, hd["heads"]), p + "0.fn.to_out.0") + t
        q = lin(ln(t, p + "1.norm", 1e-5), p + "1.fn.to_q", bias=False)
        k, v = lin(ctx, p + "1.fn.to_kv", bias=False).chunk(2, -1)
        t = lin(attend(q, k, v, hd["heads"]), p + "1.fn.to_out.0") + t
        t = lin(F.gelu(lin(ln(t, p + "2.norm", 1e-5), p + "2.fn.net.0")), p + "2.fn.net.3") + t
    t = t[:, 0]
    pose = lin(t, "smpl_head.decpose") + sd["smpl_head.init_body_pose"]
    betas = lin(t, "smpl_head.decshape") + sd["smpl_head.init_betas"]
    cam = lin(t, "smpl_head.deccam") + sd["smpl_head.init_cam"]
    return pose, betas, cam


def test_forward_matches_4d_humans_on_official_names(tiny):
    model, _ = tiny
    official = to_official_names(model.state_dict())
    converted = build_hmr2(TINY).eval()
    converted.load_state_dict(humans.convert_hmr2_state_dict(official), strict=True)
    crops = torch.randn(3, 3, 256, 192)
    with torch.no_grad():
        smpl, cam = converted(crops)
        pose6d, betas, cam_ref = _reference_forward(official, crops, {
            "backbone": {**TINY["backbone"]}, "head": {**TINY["head"]}})
    rot_ref = rot6d_to_rotmat(pose6d).view(3, 24, 3, 3)
    torch.testing.assert_close(cam, cam_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(smpl["betas"], betas, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(smpl["global_orient"], rot_ref[:, :1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(smpl["body_pose"], rot_ref[:, 1:], rtol=1e-4, atol=1e-5)
    assert smpl["body_pose"].shape == (3, 23, 3, 3) and smpl["betas"].shape == (3, 10) and cam.shape == (3, 3)


def test_rot6d_to_rotmat():
    # the first two columns of a rotation give it back; any 6 numbers give a proper rotation
    angles = torch.tensor([[0.3, -1.2, 2.0], [0.0, 0.0, 0.0], [3.0, 0.1, -0.5]])
    rots = []
    for a, b, c in angles:
        rz = torch.tensor([[c.cos(), -c.sin(), 0], [c.sin(), c.cos(), 0], [0, 0, 1.0]])
        ry = torch.tensor([[b.cos(), 0, b.sin()], [0, 1.0, 0], [-b.sin(), 0, b.cos()]])
        rx = torch.tensor([[1.0, 0, 0], [0, a.cos(), -a.sin()], [0, a.sin(), a.cos()]])
        rots.append(rz @ ry @ rx)
    r = torch.stack(rots)
    six = torch.cat([r[:, :, 0], r[:, :, 1]], dim=1)
    torch.testing.assert_close(rot6d_to_rotmat(six), r, atol=1e-6, rtol=0)
    torch.testing.assert_close(rot6d_to_rotmat(2.5 * six), r, atol=1e-6, rtol=0)  # scale-free
    rnd = rot6d_to_rotmat(torch.randn(50, 6))
    torch.testing.assert_close(rnd @ rnd.transpose(1, 2), torch.eye(3).expand(50, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rnd), torch.ones(50), atol=1e-5, rtol=0)


def test_lightning_checkpoint_is_read_without_unpickling_objects(tiny, tmp_path):
    model, _ = tiny
    official = to_official_names(model.state_dict())
    ckpt = tmp_path / "epoch=35-step=1000000.ckpt"
    torch.save({"epoch": 35, "global_step": 1000000, "pytorch-lightning_version": "2.0.0",
                "state_dict": OrderedDict({**official, "discriminator.D_conv1.weight": torch.zeros(2)}),
                "hyper_parameters": {"cfg": CfgNode(MODEL=CfgNode(IMAGE_SIZE=256))},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-5}]}]}, ckpt)
    with pytest.raises(Exception, match="CfgNode"):  # a plain weights-only load refuses the pickled config
        torch.load(ckpt, weights_only=True)
    state = humans.read_lightning_state_dict(str(ckpt))
    assert state.keys() == {*official, "discriminator.D_conv1.weight"}
    converted, arch = humans.load_hmr2_weights(str(ckpt))
    assert arch is None and converted.keys() == model.state_dict().keys()
    # convert once to safetensors (what `modalmill convert-weights hmr2 SRC DST` does, at the official size)
    dst = humans.convert_checkpoint(str(ckpt), str(tmp_path / "out" / "hmr2.safetensors"), architecture=TINY)
    lab = get_labeler("hmr2")({"weights": dst})
    lab.setup()
    assert all(torch.equal(a, b) for a, b in zip(lab.model.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="safetensors"):
        get_labeler("hmr2").convert_weights(str(ckpt), str(tmp_path / "x.pth"))
    # a .pth holding the official names is converted on load (read as the official architecture: no metadata)
    pth = tmp_path / "official.pth"
    torch.save(official, pth)
    state, arch = humans.load_hmr2_weights(str(pth))
    assert arch is None and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_missing_and_mismatched_weights(tmp_path):
    cls = get_labeler("hmr2")
    with pytest.raises(WeightsError) as e:
        cls().setup()
    assert "hmr2_data.tar.gz" in str(e.value) and "convert-weights hmr2" in str(e.value)
    with pytest.raises(WeightsError, match="weights not found at .*missing.ckpt"):
        cls({"weights": str(tmp_path / "missing.ckpt")}).setup()
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"smpl_head.decpose.weight": torch.zeros(2, 2), "layer.weight": torch.zeros(1)}, str(other))
    with pytest.raises(WeightsError, match="not an HMR 2.0 checkpoint"):
        cls({"weights": str(other)}).setup()
    # weights whose recorded architecture does not match the tensors (a deeper backbone than the weights have)
    deeper = tmp_path / "deeper.safetensors"
    deeper_arch = {**TINY, "backbone": {**TINY["backbone"], "depth": 3}}
    humans.save_converted(tiny_hmr2().state_dict(), str(deeper), deeper_arch)
    with pytest.raises(WeightsError, match="missing .*backbone.blocks.2"):
        cls({"weights": str(deeper)}).setup()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a torch checkpoint"):
        cls({"weights": str(broken)}).setup()


# ---------------------------------------------------------------------- preprocessing


def _cv2_crop(image, box, scale=1.0):
    """HMR 2.0's crop (ViTDetDataset + generate_image_patch_cv2), restated with OpenCV: the box grown to the
    192:256 aspect, the square of its longer side warped to 256x256, its central 192 columns."""
    import cv2

    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale, (y1 - y0) * scale
    if h / w < 256 / 192:
        h = max(w * 256 / 192, h)
    else:
        w = max(h * 192 / 256, w)
    s = max(w, h)
    src = np.float32([[cx, cy], [cx, cy + s / 2], [cx + s / 2, cy]])
    dst = np.float32([[128, 128], [128, 256], [256, 128]])
    patch = cv2.warpAffine(image, cv2.getAffineTransform(src, dst), (256, 256), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return patch[:, 32:-32].astype(np.float64), s


def _to_pixels(crops):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((crops.cpu() * std + mean) * 255).permute(0, 2, 3, 1).double().numpy()


def test_person_crops_match_hmr2_preprocessing(tiny):
    _, path = tiny
    lab = get_labeler("hmr2")({"weights": path})
    lab.setup()
    img = _photo("astronaut")
    boxes = np.array([[51.2, 25.6, 307.2, 506.9], [300.0, 100.0, 500.0, 160.0], [-40.0, 400.0, 90.0, 560.0]])
    ours = _to_pixels(lab.crops(img, boxes))
    assert ours.shape == (3, 256, 192, 3)
    for i, box in enumerate(boxes):
        want, side = _cv2_crop(img, box)
        assert side < 563  # no pre-blur at these sizes
        diff = np.abs(ours[i] - want)
        # OpenCV rounds to uint8: the float crop is within half a grey level of it (a 1-pixel shift is ~3-7 off)
        assert diff.mean() < 0.3 and diff.max() <= 0.51, (i, diff.mean(), diff.max())
    # crop_boxes: the square side of a tall and of a wide box
    sq = humans.crop_boxes(np.array([[0, 0, 30, 100], [0, 0, 100, 30]]))
    np.testing.assert_allclose(sq, [[15, 50, 100], [50, 15, 100 * 256 / 192]])
    # a person much larger than the crop: HMR 2.0 blurs before resampling (sigma = (side / 512 - 1) / 2)
    from skimage.filters import gaussian

    big = np.ascontiguousarray(np.repeat(np.repeat(img, 3, axis=0), 3, axis=1))
    box = np.array([100.0, 50.0, 900.0, 1500.0])
    _, side = _cv2_crop(big, box)
    sigma = (side / 512 - 1) / 2
    assert sigma > 0.05
    blurred = gaussian(big.astype(np.float64), sigma=sigma, channel_axis=2, preserve_range=True)
    want, _ = _cv2_crop(blurred.astype(np.float32), box)
    got = _to_pixels(lab.crops(big, box[None]))[0]
    assert np.abs(got - want).mean() < 0.5
    sharp, _ = _cv2_crop(big, box)
    assert np.abs(got - sharp).mean() > np.abs(got - want).mean()


# ---------------------------------------------------------------------- predict on constructed det labels


def test_predict_from_det_labels(tiny):
    _, path = tiny
    lab = get_labeler("hmr2")({"weights": path})
    lab.setup()
    img = _photo("astronaut")[::2, ::2].copy()  # 256 x 256 stored, from a 512 x 512 original
    det = {"instances": [{"boxes": [0.5, 0.4, 0.8, 0.9], "class_name": "person", "score": 0.6},
                         {"boxes": [0.1, 0.05, 0.6, 0.99], "class_name": "person", "score": 0.9},
                         {"boxes": [0.0, 0.0, 0.5, 0.5], "class_name": "dog", "score": 0.99},
                         {"boxes": [0.2, 0.2, 0.3, 0.3], "class_name": "person", "score": 0.3}]}
    none = {"instances": [{"boxes": [0.0, 0.0, 0.5, 0.5], "class_name": "dog", "score": 0.99}]}
    results = lab.process_batch([_inp(img, det, "a", (512, 512)), _inp(img, none, "b"), _inp(img, {"instances": []}),
                                 LabelInput(key="nodet", image=img, original_size=(256, 256),
                                            crops=np.zeros((1, 5), np.int64))])
    poses = results[0]["human_poses"]
    assert results[1] == {"human_poses": []} and results[2] == {"human_poses": []}
    assert isinstance(results[3], LabelFailure) and "det" in results[3].reason
    # people ordered by score; boxes in stored-rgb pixels
    np.testing.assert_allclose(poses["bbox_xyxy"], [[25.6, 12.8, 153.6, 253.44], [128.0, 102.4, 204.8, 230.4]])
    body = np.array(poses["pred_smpl_params"]["body_pose"])
    orient = np.array(poses["pred_smpl_params"]["global_orient"])
    assert body.shape == (2, 23, 3, 3) and orient.shape == (2, 1, 3, 3)
    assert np.array(poses["pred_smpl_params"]["betas"]).shape == (2, 10) and np.array(poses["pred_cam"]).shape == (2, 3)
    rots = np.concatenate([orient, body], axis=1).reshape(-1, 3, 3)
    np.testing.assert_allclose(rots @ rots.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rots.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(rots), 1.0, atol=1e-5)
    assert "pose_tokenized" not in poses  # filled in by the tokenize stage
    encoded = get_modality("human_poses").encode(poses, "a")
    assert json.loads(encoded) == poses
    # one person at a time: the same parameters (batching does not change results)
    (one,) = lab.process_batch([_inp(img, {"instances": [det["instances"][1]]})])
    np.testing.assert_allclose(one["human_poses"]["pred_cam"][0], poses["pred_cam"][0], atol=1e-5)
    # under bf16 autocast (a GPU actor with dtype auto; here on the CPU) only the backbone is reduced: the head and
    # the rotations stay float32, so the matrices are still orthonormal
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        (amp,) = lab.predict([_inp(img, det)])
    r = np.array(amp["human_poses"]["pred_smpl_params"]["body_pose"]).reshape(-1, 3, 3)
    np.testing.assert_allclose(r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r.shape), atol=1e-5)
    np.testing.assert_allclose(amp["human_poses"]["pred_smpl_params"]["body_pose"], body, atol=0.05)
    # settings: source-image pixels, a cap on people, a lower threshold
    orig = get_labeler("hmr2")({"weights": path, "bbox_frame": "original"})
    (r,) = orig.process_batch([_inp(img, det, "a", (512, 512))])
    np.testing.assert_allclose(r["human_poses"]["bbox_xyxy"], np.array(poses["bbox_xyxy"]) * 2)
    np.testing.assert_allclose(r["human_poses"]["pred_cam"], poses["pred_cam"], atol=1e-6)
    (r,) = get_labeler("hmr2")({"weights": path, "max_people": 1}).process_batch([_inp(img, det)])
    assert r["human_poses"]["bbox_xyxy"] == poses["bbox_xyxy"][:1]
    (r,) = get_labeler("hmr2")({"weights": path, "score_threshold": 0.25}).process_batch([_inp(img, det)])
    assert len(r["human_poses"]["bbox_xyxy"]) == 3


def test_human_poses_validation():
    spec = get_modality("human_poses")
    rot = np.eye(3).tolist()
    good = {"bbox_xyxy": [[1, 2, 30, 40]], "pred_cam": [[0.9, 0.1, 0.2]],
            "pred_smpl_params": {"global_orient": [[rot]], "body_pose": [[rot] * 23], "betas": [[0.1] * 10]}}
    spec.encode(good, "k")
    spec.encode([], "k")
    spec.encode({**good, "pose_tokenized": [[1, 2, 3, 4, 5, 6, 7, 1023]]}, "k")
    for bad, field in (({**good, "pred_cam": [[0.9, 0.1]]}, "pred_cam"),
                       ({**good, "bbox_xyxy": [[1, 2, 3, 4], [1, 2, 3, 4]]}, "people"),
                       ({**good, "pose_tokenized": [[1024] * 8]}, "pose_tokenized"),
                       ({**good, "pred_smpl_params": {**good["pred_smpl_params"], "body_pose": [[rot] * 22]}},
                        "body_pose"),
                       ([{"bbox_xyxy": [1, 2, 3, 4]}], "type")):
        with pytest.raises(RecordError, match=field):
            spec.encode(bad, "k")


# ---------------------------------------------------------------------- inside the Ray pipeline


def _members(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def test_hmr2_in_the_pipeline_after_a_detector(shared_labels, tmp_path):
    """HMR 2.0 after the default detector (a tiny D-FINE favouring people) in the session's shared job
    (tests/shared_labels.py); then, on a copy, --only det,human_poses --force with a test detector of known people
    and other HMR 2.0 settings."""
    path, out, s = shared_labels.weights["hmr2"]["weights"], shared_labels.out, shared_labels.summary
    mods = ["rgb", "crop_settings", "det", "human_poses"]
    assert shared_labels.data["labelers"]["hmr2"]["config"] == {"weights": path}
    assert s["exit_code"] == EXIT_OK and s["samples_written"] == 10, s
    lab = get_labeler("hmr2")({"weights": path})
    n_people = 0
    for shard in ("shard-00000", "shard-00001"):
        members = {m: _members(out / m / f"{shard}.tar") for m in mods}
        keys = [n.split(".", 1)[0] for n, _ in members["rgb"]]
        assert len(keys) == 5
        for m in mods:
            assert [n.split(".", 1)[0] for n, _ in members[m]] == keys, f"{m} is not aligned with rgb"
        for key, (_, rgb_b), (_, det_b), (_, hp_b) in zip(keys, members["rgb"], members["det"],
                                                          members["human_poses"]):
            rgb = get_modality("rgb").decode(rgb_b)
            h, w = rgb.shape[:2]
            det, poses = json.loads(det_b), json.loads(hp_b)
            persons = [d for d in det["instances"] if d["class_name"] == "person" and d["score"] >= 0.5
                       and d["boxes"][2] > d["boxes"][0] and d["boxes"][3] > d["boxes"][1]]
            n_people += len(persons)
            if not persons:
                assert poses == []
                continue
            get_modality("human_poses").encode(poses, key)
            # the people of the stored det, in stored-rgb pixels (ordered by score: compared as sets, for ties)
            np.testing.assert_allclose(sorted(map(list, poses["bbox_xyxy"])),
                                       sorted(list(np.array(d["boxes"]) * [w, h, w, h]) for d in persons), atol=1e-5)
            # the stored parameters are those of the labeler run here on the stored rgb and det
            (direct,) = lab.process_batch([_inp(rgb, det, key)])
            for field in ("pred_cam",):
                np.testing.assert_allclose(poses[field], direct["human_poses"][field], atol=1e-4)
            np.testing.assert_allclose(poses["pred_smpl_params"]["body_pose"],
                                       direct["human_poses"]["pred_smpl_params"]["body_pose"], atol=1e-4)
    assert n_people > 0, "the person-favouring detector found nobody: HMR 2.0 never ran on a crop"
    rows = manifest.read_manifest(str(out)).to_pylist()
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows)
    p = {q["modality"]: q for q in rows[0]["producers"]}["human_poses"]
    assert (p["labeler"], p["version"], p["checkpoint"]) == ("hmr2", lab.version, content_hash(path))
    assert p["config_hash"] == lab.config_hash()

    # --only det,human_poses --force: a detector with 0, 1 or 2 people by key, HMR 2.0 in source-image pixels
    before = {m: (out / m / "shard-00000.tar").read_bytes() for m in ("rgb", "crop_settings", "caption")}
    out, s2 = shared_labels.rerun(tmp_path / "again", ["det", "human_poses"], {
        "test_person_boxes": {}, "hmr2": {"config": {"weights": path, "bbox_frame": "original"}, "resources": CPU}})
    assert s2["exit_code"] == EXIT_OK and s2["samples_written"] == 10, s2
    assert all((out / m / "shard-00000.tar").read_bytes() == b for m, b in before.items())
    rows = {r["key"]: r for r in manifest.read_manifest(str(out)).to_pylist()}
    people_count = []
    for shard in ("shard-00000", "shard-00001"):
        for (name, rgb_b), (_, hp_b) in zip(_members(out / "rgb" / f"{shard}.tar"),
                                            _members(out / "human_poses" / f"{shard}.tar")):
            key = name.split(".", 1)[0]
            poses = json.loads(hp_b)
            expected = {0: 0, 1: 1, 2: 2}[int(key) % 3]
            people_count.append(expected)
            if not expected:
                assert poses == []
                continue
            get_modality("human_poses").encode(poses, key)
            assert len(poses["bbox_xyxy"]) == len(poses["pred_cam"]) == expected
            h, w = get_modality("rgb").decode(rgb_b).shape[:2]
            ow, oh = rows[key]["original_width"], rows[key]["original_height"]
            assert max(ow, oh) > 128 and max(w, h) <= 128
            d = np.array(poses["bbox_xyxy"])
            np.testing.assert_allclose(d[0], np.array([0.2, 0.1, 0.7, 0.95]) * [ow, oh, ow, oh], atol=1e-3)
    assert set(people_count) == {0, 1, 2}
    p = {q["modality"]: q for q in rows[key]["producers"]}
    assert p["det"]["labeler"] == "test_person_boxes" and p["human_poses"]["labeler"] == "hmr2"
    assert p["human_poses"]["config_hash"] == get_labeler("hmr2")({"weights": path, "bbox_frame": "original"}
                                                                 ).config_hash() != lab.config_hash()
