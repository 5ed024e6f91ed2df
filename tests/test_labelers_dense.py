"""Depth, surface normals, COCO semseg and detection labelers: tiny random configurations of the real
architectures (transformers DPT-Hybrid, Depth Anything, Mask2Former, DETR), saved and loaded through the real
loading paths, run inside the Ray pipeline; the Omnidata key conversion; registry entries; weight errors; and
the post-processing on constructed tensors with known answers."""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from modalmill.jobs.runner import EXIT_OK
from modalmill.labelers import LABELERS, LabelFailure, LabelInput, get_labeler
from modalmill.labelers.depth import (build_dpt, depth_to_uint16, normals_to_uint8, omnidata_dpt_config,
                                      omnidata_to_transformers, transformers_to_omnidata)
from modalmill.labelers.detection import DETR_COCO_LABELS, detections_from_logits
from modalmill.labelers.model import ModelLabeler
from modalmill.labelers.semseg import COCO_PANOPTIC_CLASSES, COCO_THING_CLASSES, semantic_map
from modalmill.io.fetch import WeightsError
from modalmill.io.hashes import content_hash
from modalmill.io import manifest
from modalmill.schemas import get_modality
from tests.shared_labels import MODALITIES
from tests.tiny_models import TEST_SETTINGS, save_tiny_detr, save_tiny_mask2former, tiny_dpt

DENSE = ("omnidata_depth", "omnidata_normal", "depth_anything", "mask2former_coco", "detr_coco")
CPU = {"num_cpus": 0.25, "num_gpus": 0, "memory_mb": 0}  # no GPU and no memory reservation on CI


@pytest.fixture(scope="module")
def weights(shared_weights):
    """Each labeler's checkpoint: the session's (tests/shared_labels.py), the ones the shared job and its re-runs
    load. The normal model there went through the converter (what `modalmill convert-weights` runs)."""
    return {n: shared_weights[n]["weights"] for n in (*DENSE, "omnidata_normal_ckpt")}


def labeler(name, weights, **extra):
    cls = get_labeler(name)
    lab = cls({"weights": weights[name], **TEST_SETTINGS[name], **extra})
    lab.setup()
    return lab


# ---------------------------------------------------------------------- registry entries


MINE = [get_labeler(n) for n in DENSE]


@pytest.mark.parametrize("cls", MINE, ids=lambda c: c.name)
def test_registry_entry_is_complete_and_frozen(cls):
    assert issubclass(cls, ModelLabeler) and cls.stateful
    for attr in ("name", "version", "architecture", "weights", "weights_help", "license", "description"):
        assert isinstance(getattr(cls, attr), str) and getattr(cls, attr), attr
    assert cls.outputs and all(get_modality(m) for m in cls.outputs)
    assert isinstance(cls.input_size, int) and cls.input_size > 0
    assert len(cls.mean) == len(cls.std) == 3 and all(s > 0 for s in cls.std)
    r = cls.default_resources
    assert r.num_cpus >= 1 and 0 < r.num_gpus <= 1 and r.memory_mb > 0 and cls.default_batch_size >= 1
    assert dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen
    fields = dataclasses.fields(cls.Config)
    assert [(f.name, f.default) for f in fields[:3]] == [("weights", None), ("device", "auto"), ("dtype", "auto")]
    config = cls.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.weights = "x"  # type: ignore[misc]
    assert cls(dataclasses.asdict(config)).config_hash() == cls().config_hash()
    with pytest.raises(ValueError, match="unknown setting"):
        cls.make_config({"no_such_setting": 1})


def test_4m21_choices_are_the_defaults_and_the_cli_lists_every_entry():
    from click.testing import CliRunner

    from modalmill.cli import main
    from modalmill.labelers.base import labeler_for

    assert labeler_for("depth").name == "omnidata_depth" and labeler_for("normal").name == "omnidata_normal"
    # det: D-FINE-X (near 4M-21's ViTDet-H) is the default, DETR-R50 the light option (tests/test_detection_default.py)
    assert labeler_for("semseg_coco").name == "mask2former_coco" and labeler_for("det").name == "dfine_coco"
    assert labeler_for("metadata").name == "metadata"  # the model-free one stays the default
    out = CliRunner().invoke(main, ["labelers", "--wide"]).output
    for cls in MINE:
        line = next(ln for ln in out.splitlines() if ln.startswith(cls.name + " "))
        assert ",".join(cls.outputs) in line and cls.weights in line and cls.license[:20] in line
        assert f"gpu={cls.default_resources.num_gpus:g}" in line and "actor pool" in line


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of 14"):
        get_labeler("depth_anything").make_config({"input_size": 500})
    with pytest.raises(ValueError, match="input_size must be an integer >= 32"):
        get_labeler("mask2former_coco").make_config({"input_size": 16})
    with pytest.raises(ValueError, match="max_size"):
        get_labeler("detr_coco").make_config({"input_size": 800, "max_size": 600})
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        get_labeler("omnidata_normal").make_config({"max_aspect_ratio": 0.5})
    with pytest.raises(ValueError, match="min_score"):
        get_labeler("detr_coco").make_config({"min_score": 1.5})
    with pytest.raises(ValueError, match="disparity_floor"):
        get_labeler("depth_anything").make_config({"disparity_floor": 0})


# ---------------------------------------------------------------------- Omnidata checkpoint conversion


@pytest.mark.parametrize("out_channels", [1, 3])
def test_omnidata_conversion_round_trip_loads_strictly(out_channels):
    model = tiny_dpt(out_channels)
    hf = model.state_dict()
    official = transformers_to_omnidata(hf)
    # the official (MiDaS/Omnidata) naming, Lightning's "model." prefix, fused qkv
    for key in ("model.pretrained.model.pos_embed", "model.pretrained.model.blocks.3.attn.qkv.weight",
                "model.pretrained.model.patch_embed.backbone.stem.conv.weight",
                "model.pretrained.model.patch_embed.backbone.stages.2.blocks.0.downsample.norm.bias",
                "model.pretrained.act_postprocess4.4.weight", "model.pretrained.act_postprocess3.0.project.0.weight",
                "model.scratch.layer1_rn.weight", "model.scratch.refinenet4.resConfUnit1.conv2.bias",
                "model.scratch.refinenet1.out_conv.weight", "model.scratch.output_conv.4.weight"):
        assert key in official, key
    assert official["model.pretrained.model.blocks.0.attn.qkv.weight"].shape == (3 * 64, 64)
    assert not any("dpt." in k or "neck." in k for k in official)
    back = omnidata_to_transformers(official)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    config = omnidata_dpt_config(back)
    assert (config.hidden_size, config.num_hidden_layers, config.image_size) == (64, 4, 64)
    assert list(config.neck_hidden_sizes) == [128, 128, 32, 32] and config.backbone_out_indices[2:] == [2, 3]
    fresh = build_dpt(config, out_channels).eval()
    fresh.load_state_dict(back, strict=True)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(pixel_values=x).predicted_depth, model(pixel_values=x).predicted_depth)


def test_omnidata_conversion_refuses_foreign_keys():
    official = transformers_to_omnidata(tiny_dpt(1).state_dict())
    official["model.pretrained.model.blocks.0.ls1.gamma"] = torch.zeros(64)
    with pytest.raises(WeightsError, match="not an Omnidata DPT-Hybrid checkpoint.*ls1"):
        omnidata_to_transformers(official)


def test_convert_weights_cli_writes_a_loadable_directory(weights, tmp_path):
    from click.testing import CliRunner

    from modalmill.cli import main

    dst = tmp_path / "depth-hf"
    res = CliRunner().invoke(main, ["convert-weights", "omnidata_depth", weights["omnidata_depth"], str(dst)])
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors"]
    # the converted directory and the official file give the same labels
    img = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    inp = [LabelInput(key="k", image=img, original_size=(70, 40), crops=np.zeros((1, 5), np.int64))]
    from_dir = labeler("omnidata_depth", {"omnidata_depth": str(dst)}).process_batch(inp)[0]["depth"]
    from_ckpt = labeler("omnidata_depth", weights).process_batch(inp)[0]["depth"]
    assert np.array_equal(from_dir, from_ckpt)
    res = CliRunner().invoke(main, ["convert-weights", "detr_coco", "a", "b"])
    assert res.exit_code != 0 and "no weight conversion" in res.output


# ---------------------------------------------------------------------- missing and mismatched weights


@pytest.mark.parametrize("name", DENSE)
def test_missing_weights_name_the_file_and_where_to_get_it(name, tmp_path):
    cls = get_labeler(name)
    with pytest.raises(WeightsError) as e:
        cls({"weights": str(tmp_path / "nowhere" / "weights.ckpt")}).setup()
    msg = str(e.value)
    assert "nowhere/weights.ckpt" in msg and cls.weights_help in msg and "\n" not in msg
    with pytest.raises(WeightsError) as e:  # the default location: a hub id or URL, unavailable offline
        cls().setup()
    assert cls.weights in str(e.value) or cls.weights.split("/")[-1] in str(e.value)


def test_mismatched_checkpoints_are_clear_errors(weights, tmp_path):
    # a depth checkpoint for the normal labeler (and vice versa)
    with pytest.raises(WeightsError, match="1-channel head, expected 3"):
        get_labeler("omnidata_normal")({"weights": weights["omnidata_depth"]}).setup()
    with pytest.raises(WeightsError, match="3-channel head, expected 1"):
        get_labeler("omnidata_depth")({"weights": weights["omnidata_normal_ckpt"]}).setup()
    # another model type where Mask2Former / DETR / Depth Anything is expected
    with pytest.raises(WeightsError, match="holds a 'detr' model, expected 'mask2former'"):
        get_labeler("mask2former_coco")({"weights": weights["detr_coco"]}).setup()
    with pytest.raises(WeightsError, match="holds a 'mask2former' model, expected 'depth_anything'"):
        get_labeler("depth_anything")({"weights": weights["mask2former_coco"]}).setup()
    # the right type with the wrong label set
    ade = save_tiny_mask2former(str(tmp_path / "m2f-150"), n_labels=150, names=None)
    with pytest.raises(WeightsError, match="predicts 150 classes, expected 133"):
        get_labeler("mask2former_coco")({"weights": ade}).setup()
    renamed = list(COCO_PANOPTIC_CLASSES)
    renamed[5] = "bus-stop"
    with pytest.raises(WeightsError, match="names class 5 'bus-stop', expected 'bus'"):
        get_labeler("mask2former_coco")({"weights": save_tiny_mask2former(str(tmp_path / "m2f-x"),
                                                                           names=renamed)}).setup()
    # tensors that do not fit the configuration (shape) / a checkpoint missing tensors
    bad = tmp_path / "detr-bad"
    save_tiny_detr(str(bad))
    cfg = json.loads((bad / "config.json").read_text())
    cfg["d_model"] = 48
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="does not fit the model"):
        get_labeler("detr_coco")({"weights": str(bad)}).setup()
    state = torch.load(weights["omnidata_depth"], weights_only=True)["state_dict"]
    del state["model.scratch.output_conv.0.weight"]
    torch.save({"state_dict": state}, tmp_path / "cut.ckpt")
    with pytest.raises(WeightsError, match=r"missing 1 key\(s\).*head\.head\.0\.weight"):
        get_labeler("omnidata_depth")({"weights": str(tmp_path / "cut.ckpt")}).setup()


# ---------------------------------------------------------------------- post-processing with known answers


def test_depth_to_uint16_is_min_max_with_far_high():
    d = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    assert depth_to_uint16(d).tolist() == [[0, 16384], [32768, 65535]]
    assert depth_to_uint16(torch.full((3, 4), 7.0)).tolist() == [[0] * 4] * 3
    assert depth_to_uint16(d).dtype == np.uint16


def test_normals_to_uint8_store_the_clamped_prediction_as_omnidatas_demo():
    # Omnidata's demo saves ToPILImage()(output): x * 255 truncated to a byte, no renormalisation
    n = torch.zeros(3, 1, 3)
    n[:, 0, 0] = torch.tensor([0.5, 0.5, 1.0])
    n[:, 0, 1] = torch.tensor([0.0, 0.999, 1.5])  # above 1: clamped
    n[:, 0, 2] = torch.tensor([0.64, 0.02, -0.1])  # below 0: clamped
    out = normals_to_uint8(n)
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    assert out[0].tolist() == [[127, 127, 255], [0, 254, 255], [163, 5, 0]]
    from torchvision.transforms import ToPILImage
    assert np.array_equal(out, np.asarray(ToPILImage()(n.clamp(0, 1))))


def test_semantic_map_from_mask_and_class_logits():
    # two queries: class 7 on the left half, class 120 on the right half; a third, no-object query
    q_cls = torch.full((3, 134), -20.0)
    q_cls[0, 7] = q_cls[1, 120] = q_cls[2, 133] = 20.0
    masks = torch.full((3, 4, 4), -20.0)
    masks[0, :, :2] = masks[1, :, 2:] = 20.0
    labels = semantic_map(q_cls, masks, canvas=16, region=(16, 16), out_hw=(6, 10))
    assert labels.shape == (6, 10) and labels.dtype == np.uint8
    assert (labels[:, :5] == 7).all() and (labels[:, 5:] == 120).all()
    # a region (the image part of a letterboxed canvas) and low confidence -> 255
    masks[1] = -20.0
    labels = semantic_map(q_cls, masks, canvas=16, region=(8, 16), out_hw=(4, 8), min_confidence=0.5)
    assert (labels[:, :4] == 7).all() and (labels[:, 4:] == 255).all()


def test_detections_from_logits_sorted_filtered_normalised():
    logits = torch.full((5, 92), -10.0)
    logits[0, 1] = 5.0  # person, high
    logits[1, 3] = 1.0  # car, lower
    logits[2, 12] = 9.0  # an 'N/A' id: dropped
    logits[3, 91] = 9.0  # no-object: low score for every class
    logits[4, 18] = 3.0  # dog, middle
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.1, 0.1],
                          [0.5, 0.5, 0.1, 0.1], [0.9, 0.5, 0.4, 1.0]])
    det = detections_from_logits(logits, boxes, DETR_COCO_LABELS, min_score=0.05, top_k=10, decimals=4)
    names = [d["class_name"] for d in det["instances"]]
    assert names == ["person", "dog", "car"]
    scores = [d["score"] for d in det["instances"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.9
    assert det["instances"][0]["boxes"] == [0.4, 0.3, 0.6, 0.7]
    assert det["instances"][1]["boxes"] == [0.7, 0.0, 1.0, 1.0]  # clipped to the image
    assert det["instances"][2]["boxes"] == [0.0, 0.0, 0.3, 0.3]
    top = detections_from_logits(logits, boxes, DETR_COCO_LABELS, min_score=0.05, top_k=2, decimals=4)
    assert [d["class_name"] for d in top["instances"]] == ["person", "dog"]
    get_modality("det").encode(det, "k")
    assert DETR_COCO_LABELS[1] == "person" and DETR_COCO_LABELS[90] == "toothbrush"
    assert [n for n in DETR_COCO_LABELS if n != "N/A"] == list(COCO_THING_CLASSES)


def test_labelers_in_process_shapes_and_bad_inputs(weights):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (37, 91, 3), dtype=np.uint8), rng.integers(0, 256, (80, 50, 3), dtype=np.uint8)]
    inputs = [LabelInput(key=f"k{i}", image=im, original_size=im.shape[1::-1], crops=np.zeros((1, 5), np.int64))
              for i, im in enumerate(images)]
    bad = LabelInput(key="bad", image=images[0].astype(np.float32), original_size=(91, 37),
                     crops=np.zeros((1, 5), np.int64))
    for name in DENSE:
        lab = labeler(name, weights)
        assert lab.process_batch([]) == []
        results = lab.process_batch([inputs[0], bad, inputs[1]])
        assert isinstance(results[1], LabelFailure) and "uint8" in results[1].reason
        for res, im in zip((results[0], results[2]), images):
            (m,) = lab.outputs
            get_modality(m).encode(res[m], "k", image_hw=im.shape[:2])  # validates shape, dtype, range
        # one at a time gives the same labels as the batch (images run in same-size groups, never padded)
        alone = lab.process_batch([inputs[1]])[0]
        (m,) = lab.outputs
        if m == "det":
            assert [d["class_name"] for d in alone[m]["instances"]] == \
                [d["class_name"] for d in results[2][m]["instances"]]
        else:
            assert np.abs(alone[m].astype(np.int64) - results[2][m].astype(np.int64)).max() <= 1
        assert lab.checkpoint_id() == content_hash(weights[name])


# ---------------------------------------------------------------------- inside the Ray pipeline


def tar_members(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def keys_of(path):
    return [name.split(".", 1)[0] for name, _ in tar_members(path)]


def test_dense_labelers_in_the_pipeline(shared_labels, weights, tmp_path):
    """Depth, normals and semseg in the session's shared job (tests/shared_labels.py); then, on a copy,
    --only depth,det --force with Depth Anything and DETR: those are replaced, the shard stays aligned, the rest is
    untouched."""
    out, s = shared_labels.out, shared_labels.summary
    mods = ["rgb", "crop_settings", "depth", "normal", "semseg_coco", "det"]
    assert s["exit_code"] == EXIT_OK and s["samples_written"] == 10, s
    for n in ("omnidata_depth", "omnidata_normal", "mask2former_coco"):
        assert shared_labels.data["labelers"][n]["config"] == {"weights": weights[n], **TEST_SETTINGS[n]}

    for shard in ("shard-00000", "shard-00001"):
        keys = keys_of(out / "rgb" / f"{shard}.tar")
        assert len(keys) == 5
        members = {}
        for m in mods:
            assert keys_of(out / m / f"{shard}.tar") == keys, f"{m} is not aligned with rgb"
            members[m] = dict(tar_members(out / m / f"{shard}.tar"))
        for key in keys:
            rgb = get_modality("rgb").decode(members["rgb"][f"{key}.jpg"])
            hw = rgb.shape[:2]
            depth = get_modality("depth").decode(members["depth"][f"{key}.png"])
            assert depth.shape == hw and depth.dtype == np.uint16 and depth.min() == 0 and depth.max() == 65535
            normal = get_modality("normal").decode(members["normal"][f"{key}.png"])
            assert normal.shape == (*hw, 3) and normal.dtype == np.uint8
            # stored as Omnidata's demo stores its clamped prediction (x * 255 truncated), not renormalised to unit
            # length: the values are compared with the labeler run in-process below
            sem = get_modality("semseg_coco").decode(members["semseg_coco"][f"{key}.png"])
            assert sem.shape == hw and sem.dtype == np.uint8 and sem.max() <= 132

    # the labels are those of the labeler run on the stored rgb (same batch as in the shard task)
    rgbs = [get_modality("rgb").decode(b) for _, b in tar_members(out / "rgb" / "shard-00000.tar")]
    assert shared_labels.data["batch_size"] == len(rgbs) == 5
    batch = [LabelInput(key=str(i), image=im, original_size=im.shape[1::-1], crops=np.zeros((1, 5), np.int64))
             for i, im in enumerate(rgbs)]
    direct = labeler("omnidata_depth", weights).process_batch(batch)
    stored = [get_modality("depth").decode(b) for _, b in tar_members(out / "depth" / "shard-00000.tar")]
    assert all(np.abs(d["depth"].astype(np.int64) - s.astype(np.int64)).max() <= 1 for d, s in zip(direct, stored))

    # the manifest names each labeler, its version and the content hash of the weights it loaded
    rows = manifest.read_manifest(str(out)).to_pylist()
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows)
    by_modality = {p["modality"]: p for p in rows[0]["producers"]}
    for modality, name in (("depth", "omnidata_depth"), ("normal", "omnidata_normal"),
                           ("semseg_coco", "mask2former_coco")):
        p = by_modality[modality]
        assert p["labeler"] == name and p["version"] == LABELERS[name].version
        assert p["checkpoint"] == content_hash(weights[name])

    # --only depth,det --force with Depth Anything and DETR: replaced, the shard stays aligned, the rest untouched
    before = {m: (out / m / "shard-00000.tar").read_bytes() for m in MODALITIES if m not in ("depth", "det")}
    swap = {n: {"config": {"weights": weights[n], **TEST_SETTINGS[n]}, "resources": CPU}
            for n in ("depth_anything", "detr_coco")}
    out, s2 = shared_labels.rerun(tmp_path / "again", ["depth", "det"], swap)
    assert s2["exit_code"] == EXIT_OK and s2["samples_written"] == 10, s2
    assert all((out / m / "shard-00000.tar").read_bytes() == b for m, b in before.items())
    for shard in ("shard-00000", "shard-00001"):
        keys = keys_of(out / "rgb" / f"{shard}.tar")
        assert keys_of(out / "depth" / f"{shard}.tar") == keys and keys_of(out / "det" / f"{shard}.tar") == keys
        for _name, b in tar_members(out / "depth" / f"{shard}.tar"):
            d = get_modality("depth").decode(b)
            assert d.dtype == np.uint16 and d.max() == 65535 and d.min() == 0
        for _name, b in tar_members(out / "det" / f"{shard}.tar"):
            inst = json.loads(b)["instances"]
            assert 1 <= len(inst) <= 5
            assert [d["score"] for d in inst] == sorted((d["score"] for d in inst), reverse=True)
            for d in inst:
                x0, y0, x1, y1 = d["boxes"]
                assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1 and d["class_name"] in COCO_THING_CLASSES
    assert (out / "depth" / "shard-00000.tar").read_bytes() != (shared_labels.out / "depth" / "shard-00000.tar"
                                                                ).read_bytes()
    rows = manifest.read_manifest(str(out)).to_pylist()
    p = {p["modality"]: p for p in rows[0]["producers"]}
    for modality, name in (("depth", "depth_anything"), ("det", "detr_coco")):
        assert p[modality]["labeler"] == name and p[modality]["version"] == LABELERS[name].version
        assert p[modality]["checkpoint"] == content_hash(weights[name])
    assert p["normal"]["labeler"] == "omnidata_normal"  # the others' producers stay
