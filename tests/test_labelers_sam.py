"""SAM labeler: segment-anything's own Sam at a tiny random size, saved and loaded through the real path, run
inside the Ray pipeline; the official variants' key names and shapes; contour/edge post-processing on masks
with known answers; registry entry and weight errors."""

from __future__ import annotations

import dataclasses
import json
import tarfile

import numpy as np
import pytest
import torch

from modalmill.jobs.runner import EXIT_OK
from modalmill.labelers import LabelFailure, LabelInput, get_labeler
from modalmill.labelers.model import ModelLabeler
from modalmill.labelers.sam import SAM_VARIANTS, build_sam, infer_sam_encoder, instance_edges, mask_polygons, variant_of
from modalmill.io.fetch import WeightsError
from modalmill.io.hashes import content_hash
from modalmill.io import manifest
from modalmill.schemas import RecordError, get_modality
from tests.tiny_models import SAM_TINY as TINY
from tests.tiny_models import TEST_SETTINGS

CPU = {"num_cpus": 0.25, "num_gpus": 0, "memory_mb": 0}
LOOSE = TEST_SETTINGS["sam"]


class PickledConfig:
    """An arbitrary object in a checkpoint: loading must refuse to unpickle it."""


@pytest.fixture(scope="module")
def tiny_sam_file(shared_weights):
    """The session's tiny SAM checkpoint (tests/shared_labels.py: the one the shared job loaded)."""
    return shared_weights["sam"]["weights"]


def _inp(image, key="k"):
    h, w = image.shape[:2]
    return LabelInput(key=key, image=image, original_size=(w, h), crops=np.array([[0, 0, min(h, w), min(h, w), 0]]))


def _photo(name="astronaut", step=4):
    from skimage import data

    return np.ascontiguousarray(getattr(data, name)()[::step, ::step])


# ---------------------------------------------------------------------- registry entry


def test_registry_entry_is_complete_and_frozen():
    cls = get_labeler("sam")
    assert issubclass(cls, ModelLabeler) and cls.stateful and cls.outputs == ("sam_mask", "sam_edge")
    for attr in ("architecture", "weights", "weights_help", "license", "description"):
        assert isinstance(getattr(cls, attr), str) and getattr(cls, attr), attr
    assert cls.weights.endswith("sam_vit_h_4b8939.pth") and "segment-anything" in cls.weights_help
    assert cls.input_size == 1024 and len(cls.mean) == len(cls.std) == 3
    r = cls.default_resources
    assert r.num_cpus >= 1 and 0 < r.num_gpus <= 1 and r.memory_mb > 0 and cls.default_batch_size >= 1
    assert cls.Config.__dataclass_params__.frozen
    fields = dataclasses.fields(cls.Config)
    # float32 by default, as the official SAM (its thresholds are sensitive to the encoder's precision)
    assert [(f.name, f.default) for f in fields[:3]] == [("weights", None), ("device", "auto"), ("dtype", "float32")]
    # SAM's own generator defaults, recorded in the config (and so in the manifest's config hash)
    c = cls.Config()
    assert (c.model_type, c.points_per_side, c.pred_iou_thresh, c.stability_score_thresh, c.box_nms_thresh,
            c.crop_n_layers, c.min_mask_region_area) == ("vit_h", 32, 0.88, 0.95, 0.7, 0, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.points_per_side = 8  # type: ignore[misc]
    assert cls({"points_per_side": 8}).config_hash() != cls().config_hash()
    assert cls(dataclasses.asdict(c)).config_hash() == cls().config_hash()
    for bad, match in (({"model_type": "vit_x"}, "model_type"), ({"pred_iou_thresh": 1.5}, "pred_iou_thresh"),
                       ({"points_per_side": 0}, "points_per_side"), ({"crop_n_layers": -1}, "crop_n_layers"),
                       ({"nope": 1}, "unknown setting")):
        with pytest.raises(ValueError, match=match):
            cls.make_config(bad)
    assert get_modality("sam_mask").ext == "json" and get_modality("sam_edge").ext == "png"


def test_cli_lists_it():
    from click.testing import CliRunner

    from modalmill.cli import main

    out = CliRunner().invoke(main, ["labelers", "--wide"]).output
    line = next(ln for ln in out.splitlines() if ln.startswith("sam "))
    assert "sam_mask,sam_edge" in line and "sam_vit_h_4b8939.pth" in line and "Apache-2.0" in line
    assert "gpu=0.5" in line and "actor pool" in line


# ---------------------------------------------------------------------- official checkpoints


@pytest.mark.parametrize("variant", sorted(SAM_VARIANTS))
def test_official_variants_have_segment_anythings_key_names_and_shapes(variant):
    """An official sam_vit_*.pth is the state dict of segment_anything's build_sam_*: ours has the same keys and
    shapes, so it loads strictly; and the encoder settings are read back from the shapes alone (meta tensors)."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        theirs = sam_model_registry[variant]().state_dict()
        ours = build_sam(SAM_VARIANTS[variant]).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert "image_encoder.blocks.0.attn.rel_pos_h" in ours and "mask_decoder.iou_token.weight" in ours
    found = infer_sam_encoder(theirs)
    assert {k: found[k] for k in SAM_VARIANTS[variant]} == SAM_VARIANTS[variant]
    assert (found["img_size"], found["window_size"], found["out_chans"]) == (1024, 14, 256)
    assert variant_of(found) == variant


def test_tiny_encoder_settings_are_read_from_the_checkpoint(tiny_sam_file):
    state = torch.load(tiny_sam_file, weights_only=True)
    found = infer_sam_encoder(state)
    assert {k: found[k] for k in TINY} == TINY and variant_of(found) is None


def test_missing_and_mismatched_weights(tiny_sam_file, tmp_path):
    cls = get_labeler("sam")
    with pytest.raises(WeightsError) as e:  # the default location is a download URL, not fetched here
        cls().setup()
    assert "sam_vit_h_4b8939.pth" in str(e.value) and "facebookresearch/segment-anything" in str(e.value)
    with pytest.raises(WeightsError, match="weights not found at .*nowhere.pth.*sam_vit_h_4b8939.pth"):
        cls({"weights": str(tmp_path / "nowhere.pth")}).setup()
    # a checkpoint of another size than model_type: one line naming the mismatch, and the fix
    with pytest.raises(WeightsError) as e:
        cls({"weights": tiny_sam_file, "model_type": "vit_b"}).setup()
    msg = str(e.value)
    assert "shape mismatch" in msg and "image_encoder.patch_embed.proj.weight" in msg and "model_type: auto" in msg
    # not a SAM checkpoint at all
    other = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(WeightsError, match="not a SAM checkpoint"):
        cls({"weights": str(other), "model_type": "auto"}).setup()
    # a pickled object is refused (weights-only loading)
    pickled = tmp_path / "pickled.pth"
    torch.save({"cfg": PickledConfig(), "w": torch.zeros(1)}, pickled)
    with pytest.raises(WeightsError, match="weights-only"):
        cls({"weights": str(pickled)}).setup()


# ---------------------------------------------------------------------- post-processing with known answers


def test_polygons_of_known_masks():
    m = np.zeros((40, 60), bool)
    m[5:15, 10:30] = True  # a 20x10 rectangle
    m[25:28, 50:53] = True  # a small second part
    m[8:12, 15:20] = False  # a hole (not stored)
    polys = mask_polygons(m)
    assert len(polys) == 2
    big = np.array(polys[0])
    assert big[:, 0].min() == 10 and big[:, 0].max() == 29 and big[:, 1].min() == 5 and big[:, 1].max() == 14
    assert sorted(map(tuple, big.tolist())) == sorted([(10, 5), (10, 14), (29, 14), (29, 5)])  # simple chain
    small = np.array(polys[1])
    assert small[:, 0].min() == 50 and small[:, 1].max() == 27
    # filling the outer contours gives the mask without its hole (as 4M's tokenizer-training loader draws them)
    import cv2

    filled = np.zeros((40, 60), np.uint8)
    cv2.drawContours(filled, [np.array(p, np.int32).reshape(-1, 1, 2) for p in polys], -1, 1, thickness=cv2.FILLED)
    no_hole = m.copy()
    no_hole[8:12, 15:20] = True
    assert np.array_equal(filled.astype(bool), no_hole)
    assert mask_polygons(np.zeros((5, 5), bool)) == []


def test_edges_of_a_known_instance_map():
    a = np.zeros((10, 12), bool)
    a[2:6, 2:8] = True
    b = np.zeros((10, 12), bool)
    b[4:9, 5:11] = True  # overlaps a; painted on top of it
    e = instance_edges([a, b], (10, 12))
    assert e.dtype == np.uint8 and set(np.unique(e)) == {0, 255}
    ids = np.zeros((10, 12), int)
    ids[a] = 1
    ids[b] = 2
    want = np.zeros((10, 12), bool)
    for y in range(10):
        for x in range(12):
            for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < 10 and 0 <= xx < 12 and ids[yy, xx] != ids[y, x]:
                    want[y, x] = True
    assert np.array_equal(e > 0, want)
    assert not instance_edges([], (4, 4)).any()
    full = np.ones((4, 4), bool)
    assert not instance_edges([full], (4, 4)).any()  # the image border is not an edge


# ---------------------------------------------------------------------- the labeler on a tiny random SAM


def _check_labels(res, hw):
    h, w = hw
    assert set(res) == {"sam_mask", "sam_edge"}
    rec, edge = res["sam_mask"], res["sam_edge"]
    get_modality("sam_mask").encode(rec, "k")  # validates
    get_modality("sam_edge").encode(edge, "k", image_hw=hw)
    assert (rec["height"], rec["width"]) == (h, w)
    assert edge.shape == (h, w) and edge.dtype == np.uint8 and set(np.unique(edge)) <= {0, 255}
    areas = [i["area"] for i in rec["instances"]]
    assert areas == sorted(areas, reverse=True)
    for inst in rec["instances"]:
        x0, y0, x1, y1 = inst["bbox_xyxy"]
        assert 0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h
        assert 1 <= inst["area"] <= (x1 - x0 + 1) * (y1 - y0 + 1)
        pts = np.concatenate([np.array(p) for p in inst["polygons"]])
        # the contours lie on the mask, so inside its box
        assert pts[:, 0].min() >= x0 and pts[:, 0].max() <= x1 and pts[:, 1].min() >= y0 and pts[:, 1].max() <= y1
        assert 0.0 <= inst["stability_score"] <= 1.0
    return rec


def test_labeler_on_tiny_random_sam(tiny_sam_file):
    lab = get_labeler("sam")({**LOOSE, "weights": tiny_sam_file})
    lab.setup()
    assert lab.checkpoint_id() == content_hash(tiny_sam_file)
    images = [_photo("astronaut", 8), _photo("coffee", 8), _photo("chelsea", 6)[:40, :60].copy()]
    bad = LabelInput(key="bad", image=images[0][..., :2], original_size=(1, 1), crops=np.zeros((1, 5), np.int64))
    results = lab.process_batch([_inp(im, f"s{i}") for i, im in enumerate(images)] + [bad])
    assert isinstance(results[-1], LabelFailure) and "[H, W, 3]" in results[-1].reason
    n = [len(_check_labels(r, im.shape[:2])["instances"]) for r, im in zip(results, images)]
    assert all(k >= 1 for k in n), n  # loose thresholds: instances come out of random weights
    assert all(r["sam_edge"].any() or r["sam_mask"]["instances"][0]["area"] == im.shape[0] * im.shape[1]
               for r, im in zip(results, images))
    # the same result one image at a time (the batched encoder equals the per-image one) ...
    for i in (0, 2):
        (single,) = lab.process_batch([_inp(images[i])])
        assert json.dumps(single["sam_mask"]) == json.dumps(results[i]["sam_mask"])
        assert np.array_equal(single["sam_edge"], results[i]["sam_edge"])
    # ... and as segment-anything's own generator makes it when it encodes the image itself
    gen = lab.generator()
    with torch.inference_mode():
        anns = gen.generate(images[1])
    own = lab.to_labels(anns, images[1].shape[:2])
    assert json.dumps(own["sam_mask"]) == json.dumps(results[1]["sam_mask"])
    capped = get_labeler("sam")({**LOOSE, "max_instances": 1, "weights": tiny_sam_file})
    assert capped.to_labels(anns, images[1].shape[:2])["sam_mask"]["instances"] == own["sam_mask"]["instances"][:1]
    # under bf16 autocast (what a GPU actor does with dtype: bfloat16; here on the CPU) the encoder runs in bf16 and
    # the prompt decoding in float32: valid labels, no bfloat16 reaching segment-anything's numpy conversion
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        (amp,) = lab.predict([_inp(images[0])])
    _check_labels(amp, images[0].shape[:2])
    # the settings matter: SAM's default thresholds keep nothing of random weights
    strict = get_labeler("sam")({"model_type": "auto", "points_per_side": 4, "weights": tiny_sam_file})
    (r,) = strict.process_batch([_inp(images[0])])
    assert r["sam_mask"]["instances"] == [] and not r["sam_edge"].any()


def test_sam_mask_validation():
    spec = get_modality("sam_mask")
    good = {"height": 10, "width": 20, "instances": [{"polygons": [[[1, 1], [5, 1], [5, 4]]], "bbox_xyxy": [1, 1, 5, 4],
                                                       "area": 12, "predicted_iou": 0.9, "stability_score": 0.97}]}
    assert json.loads(spec.encode(good, "k")) == good
    for change, field in (({"polygons": [[[1, 1], [25, 1]]]}, "polygons"), ({"bbox_xyxy": [5, 1, 1, 4]}, "bbox_xyxy"),
                          ({"area": 0}, "area"), ({"predicted_iou": "x"}, "predicted_iou")):
        bad = {**good, "instances": [{**good["instances"][0], **change}]}
        with pytest.raises(RecordError, match=field):
            spec.encode(bad, "k")
    with pytest.raises(RecordError, match="height"):
        spec.encode({"instances": []}, "k")


# ---------------------------------------------------------------------- inside the Ray pipeline


def _members(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def test_sam_in_the_pipeline(shared_labels):
    """SAM (and the model-free canny_edge) in the session's shared job (tests/shared_labels.py)."""
    out, s, tiny_sam_file = shared_labels.out, shared_labels.summary, shared_labels.weights["sam"]["weights"]
    mods = ["rgb", "crop_settings", "sam_mask", "sam_edge", "canny_edge"]
    assert shared_labels.weights["sam"] == {**LOOSE, "weights": tiny_sam_file}
    assert s["exit_code"] == EXIT_OK and s["samples_written"] == 10, s
    total = 0
    for shard in ("shard-00000", "shard-00001"):
        members = {m: _members(out / m / f"{shard}.tar") for m in mods}
        keys = [n.split(".", 1)[0] for n, _ in members["rgb"]]
        assert len(keys) == 5
        for m in mods:
            assert [n.split(".", 1)[0] for n, _ in members[m]] == keys, f"{m} is not aligned with rgb"
        for (_, rgb_b), (_, mask_b), (_, edge_b) in zip(members["rgb"], members["sam_mask"], members["sam_edge"]):
            rgb = get_modality("rgb").decode(rgb_b)
            rec = _check_labels({"sam_mask": json.loads(mask_b), "sam_edge": get_modality("sam_edge").decode(edge_b)},
                                rgb.shape[:2])
            total += len(rec["instances"])
    assert total >= 10  # at least one instance per sample on average
    rows = manifest.read_manifest(str(out)).to_pylist()
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows)
    producers = {p["modality"]: p for p in rows[0]["producers"]}
    lab = get_labeler("sam")({**LOOSE, "weights": tiny_sam_file})
    for m in ("sam_mask", "sam_edge"):
        p = producers[m]
        assert p["labeler"] == "sam" and p["version"] == lab.version
        assert p["checkpoint"] == content_hash(tiny_sam_file) and p["config_hash"] == lab.config_hash()
