"""DINOv2, CLIP and ImageBind feature labelers: tiny random models of the real architectures, saved and loaded
through the real loading paths, run inside the Ray pipeline; ImageBind's checkpoint conversion."""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.jobs.runner import EXIT_OK
from modalmill.labelers import get_labeler
from modalmill.labelers.base import LabelFailure, LabelInput
from modalmill.labelers.clip import build_open_clip_visual
from modalmill.labelers.imagebind import IMAGEBIND_LN_EPS, imagebind_to_open_clip, open_clip_to_imagebind
from modalmill.labelers.model import ModelLabeler
from modalmill.io.fetch import WeightsError
from modalmill.io.hashes import content_hash
from modalmill.labelers.state_dicts import load_into
from modalmill.io.manifest import read_manifest
from modalmill.schemas.modalities import get_modality
from tests.tiny_models import IB_HEADS

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FEATURE_LABELERS = ["dinov2", "clip", "imagebind"]
IB_P, IB_T, IB_H = "modality_preprocessors.vision.", "modality_trunks.vision.", "modality_heads.vision."


@pytest.fixture(scope="module")
def tiny(shared_weights):
    """Tiny random checkpoints in the layouts the real weights come in: the session's (tests/shared_labels.py, the
    ones the shared job loaded), and ImageBind's vision state read back from its official-layout file."""
    return {"dinov2": shared_weights["dinov2"], "clip": shared_weights["clip"],
            "imagebind": shared_weights["imagebind"], "dir": Path(shared_weights["dinov2"]["weights"]).parent,
            "ib_state": torch.load(shared_weights["imagebind"]["weights"], weights_only=True)}


def tar_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


# ---------------------------------------------------------------------- references (independent of the labelers)


def crop_tensor(rgb: np.ndarray, row, size: int) -> torch.Tensor:
    """One crop as 4M feeds its teacher: cut, resized with PIL bicubic to uint8, flipped, normalised."""
    from PIL import Image

    top, left, h, w, flip = (int(v) for v in row)
    small = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[top:top + h, left:left + w])).resize((size, size),
                                                                                                      Image.BICUBIC))
    small = small[:, ::-1] if flip else small
    x = torch.from_numpy(small.copy()).permute(2, 0, 1)[None].float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def imagebind_reference(ib: dict, x: torch.Tensor, heads: int):
    """ImageBind's vision forward written from its source: image repeated into 2 frames -> Conv3d stem -> CLS +
    positional embedding -> LayerNorm -> pre-norm blocks (nn.MultiheadAttention, GELU MLP) -> head LayerNorm.
    Returns (patch tokens after the head LayerNorm, CLS after it, the L2-normalised joint embedding)."""
    eps = 1e-6
    stem = ib[IB_P + "rgbt_stem.proj.1.weight"]
    width = stem.shape[0]
    video = x.unsqueeze(2).repeat(1, 1, 2, 1, 1)  # PadIm2Video(pad_type="repeat", ntimes=2)
    t = F.conv3d(video, stem, stride=tuple(stem.shape[2:])).flatten(2).transpose(1, 2)
    t = torch.cat([ib[IB_P + "cls_token"].expand(x.shape[0], -1, -1), t], dim=1)
    t = t + ib[IB_P + "pos_embedding_helper.pos_embed"]
    t = F.layer_norm(t, (width,), ib[IB_T + "pre_transformer_layer.0.weight"],
                     ib[IB_T + "pre_transformer_layer.0.bias"], eps)
    t = t.transpose(0, 1)  # "b l d -> l b d"
    i = 0
    while f"{IB_T}blocks.{i}.norm_1.weight" in ib:
        b = f"{IB_T}blocks.{i}."
        attn = torch.nn.MultiheadAttention(width, heads, bias=True)
        attn.load_state_dict({k: ib[b + "attn." + k] for k in attn.state_dict()})
        h = F.layer_norm(t, (width,), ib[b + "norm_1.weight"], ib[b + "norm_1.bias"], eps)
        t = t + attn(h, h, h, need_weights=False)[0]
        h = F.layer_norm(t, (width,), ib[b + "norm_2.weight"], ib[b + "norm_2.bias"], eps)
        t = t + F.linear(F.gelu(F.linear(h, ib[b + "mlp.fc1.weight"], ib[b + "mlp.fc1.bias"])),
                         ib[b + "mlp.fc2.weight"], ib[b + "mlp.fc2.bias"])
        i += 1
    t = F.layer_norm(t.transpose(0, 1), (width,), ib[IB_H + "0.weight"], ib[IB_H + "0.bias"], eps)
    emb = F.normalize(F.linear(t[:, 0], ib[IB_H + "2.weight"]), dim=-1)
    return t[:, 1:], t[:, 0], emb


# ---------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", FEATURE_LABELERS)
def test_registry_entry_is_complete_and_frozen(name):
    cls = get_labeler(name)
    assert issubclass(cls, ModelLabeler) and cls.stateful
    for attr in ("version", "architecture", "weights", "weights_help", "license", "description"):
        assert isinstance(getattr(cls, attr), str) and getattr(cls, attr).strip(), attr
    assert cls.outputs == (name, f"{name}_global")
    assert get_modality(name).kind == "feature_map" and get_modality(f"{name}_global").kind == "global"
    assert cls.input_size == 224 and cls.mean == IMAGENET_MEAN and cls.std == IMAGENET_STD  # 4M's teacher input
    fields = dataclasses.fields(cls.Config)
    # float32 by default: 4M computed its feature tokenizers' teacher features in float32 (docs/labelers.md)
    assert [(f.name, f.default) for f in fields[:3]] == [("weights", None), ("device", "auto"), ("dtype", "float32")]
    cfg = cls.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weights = "elsewhere"
    import torch

    lab = cls()
    lab.device = torch.device("cuda")  # as on a GPU actor: no autocast unless asked for
    assert not isinstance(lab.autocast(), torch.autocast)
    lab = cls({"dtype": "auto"})
    lab.device = torch.device("cuda")
    assert isinstance(lab.autocast(), torch.autocast)
    r = cls.default_resources
    assert r.num_cpus >= 1 and 0 < r.num_gpus <= 1 and r.memory_mb > 0 and cls.default_batch_size >= 1
    # 2: one feature row per crop_settings row; dinov2 3: and the official position interpolation
    assert cls.version == ("3" if cls.name == "dinov2" else "2")
    with pytest.raises(ValueError, match="unknown setting.*region"):  # every crop is computed: no region to pick
        cls.make_config({"region": "full"})
    out = CliRunner().invoke(main, ["labelers", "--wide"]).output
    row = next(line for line in out.splitlines() if line.startswith(name + " "))
    assert cls.weights in row and cls.license in row and f"gpu={r.num_gpus:g}" in row


# ---------------------------------------------------------------------- in the pipeline


def test_feature_labelers_in_the_ray_pipeline(shared_labels, tiny):
    """DINOv2, CLIP and ImageBind in the session's shared job (tests/shared_labels.py: two crops per sample)."""
    out, s = shared_labels.out, shared_labels.summary
    assert all(shared_labels.data["labelers"][n]["config"] == tiny[n] for n in FEATURE_LABELERS)
    mods = ["rgb", "crop_settings", "dinov2", "dinov2_global", "clip", "clip_global", "imagebind", "imagebind_global"]
    assert shared_labels.data["crops"]["n_crops"] == 2
    assert s["exit_code"] == EXIT_OK and s["samples_written"] == 10, s

    widths = {"dinov2": (16, 32), "clip": (14, 16), "imagebind": (16, 40)}  # grid side, channels of the tiny models
    for shard in ("shard-00000", "shard-00001"):
        members = {m: tar_members(out / m / f"{shard}.tar") for m in mods}
        keys = [n.split(".", 1)[0] for n, _ in members["rgb"]]
        assert len(keys) == 5
        for m in mods:
            assert [n.split(".", 1)[0] for n, _ in members[m]] == keys, f"{m} keys differ from rgb's"
            assert all(n.endswith("." + get_modality(m).ext) for n, _ in members[m])
        for name, (grid, ch) in widths.items():
            for (_, fmap_b), (_, glob_b) in zip(members[name], members[f"{name}_global"]):
                fmap, glob = np.load(io.BytesIO(fmap_b)), np.load(io.BytesIO(glob_b))
                assert fmap.shape == (2, grid, grid, ch) and fmap.dtype == np.float16 and np.isfinite(fmap).all()
                assert glob.shape == (2, ch) and glob.dtype == np.float16 and np.isfinite(glob).all()
                assert not np.allclose(fmap[0], fmap[1]) and not np.allclose(glob[0], glob[1])  # two crops
                assert fmap.std() > 0.1  # not constant: real tokens
            maps = [np.load(io.BytesIO(b)) for _, b in members[name]]
            assert not np.allclose(maps[0], maps[1])  # different photos, different features

    # row c of the stored features is the models' features of crop c of the stored rgb (independent references)
    members = {m: dict(tar_members(out / m / "shard-00000.tar")) for m in mods}
    from transformers import Dinov2Model

    from modalmill.labelers.dinov2 import official_pos_interpolation

    dino = Dinov2Model.from_pretrained(tiny["dinov2"]["weights"]).eval()
    official_pos_interpolation(dino.embeddings)  # 4M-21's teacher: facebookresearch/dinov2's interpolation
    clip_visual = get_labeler("clip")(tiny["clip"])
    clip_visual.setup()
    clip_visual = clip_visual.model
    clip_visual.output_tokens = True
    for key in sorted(k.split(".")[0] for k in members["rgb"]):
        rgb = get_modality("rgb").decode(members["rgb"][f"{key}.jpg"])
        crops = np.load(io.BytesIO(members["crop_settings"][f"{key}.npy"]))
        x = torch.cat([crop_tensor(rgb, row, 224) for row in crops])
        with torch.no_grad():
            hs = dino(pixel_values=x).last_hidden_state
            pooled, toks = clip_visual(x)
            ib_patch, ib_cls, _ = imagebind_reference(tiny["ib_state"], x, IB_HEADS)
            n = len(crops)
            expect = {
                "dinov2": hs[:, 1:].reshape(n, 16, 16, -1), "dinov2_global": hs[:, 0],
                "clip": (toks @ clip_visual.proj).reshape(n, 14, 14, -1), "clip_global": pooled,
                "imagebind": ib_patch.reshape(n, 16, 16, -1), "imagebind_global": ib_cls,
            }
        for m, ref in expect.items():
            got = np.load(io.BytesIO(members[m][f"{key}.npy"])).astype(np.float32)
            np.testing.assert_allclose(got, ref.numpy(), rtol=1e-2, atol=1e-2, err_msg=f"{m} {key}")

    # the manifest names every producer with its version and the checkpoint's content hash
    rows = read_manifest(str(out)).to_pylist()
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows)
    weights_file = {"dinov2": tiny["dinov2"]["weights"], "clip": tiny["clip"]["weights"],
                    "imagebind": tiny["imagebind"]["weights"]}
    for r in rows:
        prod = {p["modality"]: p for p in r["producers"]}
        for name, path in weights_file.items():
            for m in (name, f"{name}_global"):
                assert prod[m]["labeler"] == name and prod[m]["version"] == get_labeler(name).version
                assert prod[m]["checkpoint"] == content_hash(path) and len(prod[m]["checkpoint"]) == 16


# ---------------------------------------------------------------------- in-process behaviour


def _inputs(n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(60, 200)), int(rng.integers(60, 200))
        side = min(h, w)
        out.append(LabelInput(key=f"k{i}", image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8), original_size=(w, h),
                              crops=np.array([[(h - side) // 2, (w - side) // 2, side, side, 0]], dtype=np.int64)))
    return out


def test_bad_crop_fails_only_that_sample_and_each_crop_row_is_its_own_forward(tiny):
    lab = get_labeler("dinov2")(tiny["dinov2"])
    lab.setup()
    batch = _inputs(3)
    batch[1].crops = np.array([[0, 0, 50, 50, 0], [0, 0, 10_000, 10_000, 0]])
    res = lab.process_batch(batch)
    assert isinstance(res[1], LabelFailure) and "crop 1" in res[1].reason and "does not fit" in res[1].reason
    assert isinstance(res[0], dict) and isinstance(res[2], dict)
    again = lab.process_batch([batch[0], batch[2]])
    assert all(np.array_equal(a["dinov2"], b["dinov2"]) for a, b in zip([res[0], res[2]], again))  # deterministic
    # a sample with the same crop twice, once flipped: row 1 is the teacher on the mirrored crop, and a sample's
    # rows do not depend on the other samples in the batch
    one = batch[0]
    row = one.crops[0]
    one.crops = np.array([row, [*row[:4], 1]])
    two = lab.process_batch([one, batch[2]])[0]
    assert two["dinov2"].shape == (2, 16, 16, 32) and two["dinov2_global"].shape == (2, 32)
    np.testing.assert_array_equal(two["dinov2"][0], res[0]["dinov2"][0])
    mirrored = dataclasses.replace(one, image=np.ascontiguousarray(one.image[:, ::-1]),
                                   crops=np.array([[row[0], one.image.shape[1] - row[1] - row[3], row[2], row[3], 0]]))
    np.testing.assert_allclose(lab.process_batch([mirrored])[0]["dinov2"][0].astype(np.float32),
                               two["dinov2"][1].astype(np.float32), atol=2e-3)


def test_imagebind_conversion_round_trip_and_reference_forward(tiny):
    """open_clip tiny ViT -> ImageBind names -> back: strict load, identical outputs; and the converted tower
    computes what ImageBind's own vision forward (Conv3d stem, eps 1e-6 LayerNorms) computes."""
    arch = tiny["imagebind"]["arch"]
    src = build_open_clip_visual(arch, vision_overrides={"norm_kwargs": {"eps": IMAGEBIND_LN_EPS}})
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) * 0.2 for k, v in src.state_dict().items()}
    load_into(src, state, where="test")
    ib = open_clip_to_imagebind(src.state_dict())
    assert ib[IB_P + "rgbt_stem.proj.1.weight"].shape == (40, 3, 2, 14, 14)
    assert ib[IB_P + "cls_token"].shape == (1, 1, 40)
    assert ib[IB_P + "pos_embedding_helper.pos_embed"].shape == (1, 257, 40)
    assert ib[IB_H + "2.weight"].shape == (24, 40)
    assert {f"{IB_T}blocks.1.attn.in_proj_weight", f"{IB_T}blocks.1.mlp.fc2.bias", f"{IB_T}blocks.0.norm_2.weight",
            f"{IB_T}pre_transformer_layer.0.bias", IB_H + "0.weight"} <= set(ib)
    back = imagebind_to_open_clip({**ib, "modality_heads.text.proj.0.weight": torch.zeros(2)})
    assert set(back) == set(state)
    dst = build_open_clip_visual(arch, vision_overrides={"norm_kwargs": {"eps": IMAGEBIND_LN_EPS}})
    dst.load_state_dict(back, strict=True)
    x = torch.randn(2, 3, 224, 224)
    src.eval(), dst.eval()
    with torch.no_grad():
        a = src.forward_intermediates(x, indices=1, normalize_intermediates=True, output_fmt="NLC",
                                      output_extra_tokens=True)
        b = dst.forward_intermediates(x, indices=1, normalize_intermediates=True, output_fmt="NLC",
                                      output_extra_tokens=True)
        ref_patch, ref_cls, ref_emb = imagebind_reference(ib, x, IB_HEADS)
    assert torch.equal(a["image_intermediates"][0], b["image_intermediates"][0])
    assert torch.equal(a["image_features"], b["image_features"])
    torch.testing.assert_close(b["image_intermediates"][0], ref_patch, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b["image_intermediates_prefix"][0][:, 0], ref_cls, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(F.normalize(b["image_features"], dim=-1), ref_emb, rtol=1e-4, atol=1e-4)
    # a LayerNorm eps other than ImageBind's would not match the reference
    wrong = build_open_clip_visual(arch)
    wrong.load_state_dict(back, strict=True)
    with torch.no_grad():
        c = wrong.eval().forward_intermediates(x, indices=1, normalize_intermediates=True, output_fmt="NLC")
    assert not torch.allclose(c["image_intermediates"][0], ref_patch, rtol=1e-6, atol=1e-6)


def test_convert_weights_command_writes_a_tower_that_loads_the_same(tiny, tmp_path):
    dst = tmp_path / "imagebind_vision.safetensors"
    r = CliRunner().invoke(main, ["convert-weights", "imagebind", tiny["imagebind"]["weights"], str(dst)])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    assert "conv1.weight" in load_file(dst) and not any(k.startswith("modality_") for k in load_file(dst))
    batch = _inputs(2, seed=3)
    outs = []
    for weights in (tiny["imagebind"]["weights"], str(dst)):
        lab = get_labeler("imagebind")({**tiny["imagebind"], "weights": weights})
        lab.setup()
        outs.append(lab.process_batch(batch))
    for a, b in zip(*outs):
        assert np.array_equal(a["imagebind"], b["imagebind"])
        assert np.array_equal(a["imagebind_global"], b["imagebind_global"])
    emb = get_labeler("imagebind")({**tiny["imagebind"], "global_embedding": "embedding"})
    emb.setup()
    g = emb.process_batch(batch[:1])[0]["imagebind_global"].astype(np.float32)
    assert g.shape == (1, 24) and abs(np.linalg.norm(g[0]) - 1) < 1e-2  # ImageBind's L2-normalised joint embedding


# ---------------------------------------------------------------------- weights errors


def test_missing_weights_name_the_file_and_where_to_get_it(tiny, tmp_path):
    missing = tmp_path / "nowhere" / "dinov2-base"
    with pytest.raises(WeightsError) as e:
        get_labeler("dinov2")({"weights": str(missing)}).setup()
    assert str(missing) in str(e.value) and "facebook/dinov2-base" in str(e.value)
    with pytest.raises(WeightsError) as e:  # the default location of ImageBind is the official download
        get_labeler("imagebind")({"arch": tiny["imagebind"]["arch"]}).setup()
    msg = str(e.value)
    assert "imagebind_huge.pth" in msg and "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="no single checkpoint file") as e:
        get_labeler("clip")({"weights": str(empty), "arch": tiny["clip"]["arch"]}).setup()
    assert "timm/vit_base_patch16_clip_224.openai" in str(e.value)


def test_mismatched_checkpoints_are_clear_errors(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Config, Dinov2Model

    # a file where a model directory is expected
    with pytest.raises(WeightsError, match="not a model directory"):
        get_labeler("dinov2")({"weights": tiny["clip"]["weights"]}).setup()
    # a DINOv2 directory whose weights belong to a wider model
    bad = tmp_path / "dinov2-wrong"
    Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(bad)
    (bad / "config.json").write_text((tiny["dir"] / "dinov2" / "config.json").read_text())
    with pytest.raises(WeightsError, match="cannot load the weights|does not fit"):
        get_labeler("dinov2")({"weights": str(bad)}).setup()
    # a DINOv2 directory with weights missing
    part = tmp_path / "dinov2-part"
    part.mkdir()
    (part / "config.json").write_text((tiny["dir"] / "dinov2" / "config.json").read_text())
    sd = load_file(tiny["dir"] / "dinov2" / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "layer.1." not in k}, part / "model.safetensors")
    with pytest.raises(WeightsError, match="missing"):
        get_labeler("dinov2")({"weights": str(part)}).setup()
    # CLIP given ImageBind's (converted) tower: shapes and names do not fit the configured arch
    with pytest.raises(WeightsError) as e:
        get_labeler("clip")({"weights": tiny["imagebind"]["weights"], "arch": tiny["clip"]["arch"]}).setup()
    assert "does not fit" in str(e.value) and "conv1.weight" in str(e.value)
    # an ImageBind checkpoint with a vision weight missing
    ib = {k: v for k, v in tiny["ib_state"].items() if k != f"{IB_T}blocks.1.mlp.fc2.bias"}
    torch.save(ib, tmp_path / "ib-missing.pth")
    with pytest.raises(WeightsError, match=r"missing vision weight .*blocks\.1\.mlp\.fc2\.bias"):
        get_labeler("imagebind")({**tiny["imagebind"], "weights": str(tmp_path / "ib-missing.pth")}).setup()
    # a torch file that holds no state dict
    torch.save([1, 2, 3], tmp_path / "not-a-checkpoint.pth")
    with pytest.raises(WeightsError, match="expected a state dict"):
        get_labeler("imagebind")({**tiny["imagebind"], "weights": str(tmp_path / "not-a-checkpoint.pth")}).setup()
