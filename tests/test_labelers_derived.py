"""Metadata derived from other modalities: each formula on constructed labels with known answers, the
variants' contract, and the pipeline: label with tiny models, then ``--only metadata`` with a derived labeler."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from modalmill.jobs.runner import EXIT_OK
from modalmill.labelers import LABELERS, LabelFailure, LabelInput, get_labeler
from modalmill.labelers.derived import (SOURCES, WALKABLE_CLASSES, DerivedMetadataLabeler, caption_stats, det_stats,
                                        derived_metadata_labeler, geometric_complexity, occlusion_score,
                                        semseg_stats)
from modalmill.labelers.semseg import COCO_PANOPTIC_CLASSES
from modalmill.io import manifest
from modalmill.schemas import get_modality
from modalmill.schemas.modalities import METADATA_RANGES

VARIANTS = ("metadata_derived", "metadata_derived_geometry", "metadata_derived_full", "metadata_derived_4m21")
ID = {name: i for i, name in enumerate(COCO_PANOPTIC_CLASSES)}


def inst(box, name, score):
    return {"boxes": list(box), "class_name": name, "score": score}


# ---------------------------------------------------------------------- formulas


def test_occlusion_score_known_answers():
    assert occlusion_score(np.zeros((0, 4))) == 0.0
    assert occlusion_score(np.array([[0, 0, 0.5, 0.5]])) == 0.0
    assert occlusion_score(np.array([[0, 0, 0.2, 0.2], [0.5, 0.5, 1, 1]])) == 0.0  # disjoint
    # two identical boxes: all of the union is covered twice
    assert occlusion_score(np.array([[0.1, 0.1, 0.3, 0.3]] * 2)) == pytest.approx(1.0)
    # [0, .4]^2 and [.2, .6]^2: overlap .04, union .16 + .16 - .04 = .28
    assert occlusion_score(np.array([[0, 0, 0.4, 0.4], [0.2, 0.2, 0.6, 0.6]])) == pytest.approx(0.04 / 0.28)
    # a box inside another: overlap = the small box (.01), union = the big box (.25)
    assert occlusion_score(np.array([[0, 0, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2]])) == pytest.approx(0.04)
    # three boxes in a row, each overlapping the next by .1 x .2: overlap .04, union .2 * (3 * .3 - .2) = .14
    boxes = np.array([[0.0, 0, 0.3, 0.2], [0.2, 0, 0.5, 0.2], [0.4, 0, 0.7, 0.2]])
    assert occlusion_score(boxes) == pytest.approx(0.04 / 0.14)
    # degenerate (empty) boxes are ignored
    assert occlusion_score(np.array([[0.2, 0.2, 0.2, 0.5], [0, 0, 1, 1]])) == 0.0


def test_occlusion_score_matches_a_raster_count():
    rng = np.random.default_rng(0)
    for _ in range(5):
        xy = rng.integers(0, 100, (6, 2, 2))
        lo, hi = xy.min(axis=1), xy.max(axis=1) + 1  # integer boxes on a 100 x 100 grid
        boxes = np.concatenate([lo, hi], axis=1)[:, [0, 1, 2, 3]] / 100.0
        cover = np.zeros((100, 100), int)
        for (x0, y0), (x1, y1) in zip(lo, hi):
            cover[y0:y1, x0:x1] += 1
        want = (cover >= 2).sum() / (cover >= 1).sum()
        assert occlusion_score(boxes) == pytest.approx(want)


def test_det_stats_count_above_the_threshold():
    det = {"instances": [inst((0, 0, 0.5, 0.5), "person", 0.9), inst((0.25, 0.25, 0.75, 0.75), "person", 0.6),
                         inst((0.5, 0.5, 1, 1), "dog", 0.7), inst((0, 0, 1, 1), "car", 0.59),
                         inst((0, 0, 1, 1), "person", 0.1)]}
    s = det_stats(det, 0.6)
    assert s["n_coco_instances"] == 3 and s["coco_instance_diversity"] == 2 and s["n_humans"] == 2
    # union: 3 boxes of .25 overlapping pairwise by .0625 (1-2 and 2-3), 1 and 3 touch only at a corner
    assert s["occlusion_score"] == pytest.approx(0.125 / (0.75 - 0.125))
    assert det_stats({"instances": []}, 0.6) == {"n_coco_instances": 0, "coco_instance_diversity": 0,
                                                 "n_humans": 0, "occlusion_score": 0.0}


def test_semseg_stats_known_answers():
    sem = np.full((10, 10), ID["sky-other-merged"], np.uint8)
    sem[5:, :] = ID["road"]  # 50 walkable
    sem[5:, :2] = ID["grass-merged"]  # 10 of them grass: still walkable
    sem[2:4, 2:4] = ID["person"]  # 4 thing pixels
    sem[0, :5] = 255  # 5 unlabelled, left out of every fraction
    s = semseg_stats(sem)
    assert s["semantic_diversity"] == 4
    assert s["walkability"] == pytest.approx(50 / 95) and s["objectness"] == pytest.approx(4 / 95)
    assert semseg_stats(np.full((3, 3), 255, np.uint8)) == {"semantic_diversity": 0, "objectness": 0.0,
                                                           "walkability": 0.0}
    things = np.arange(80, dtype=np.uint8).reshape(8, 10)
    assert semseg_stats(things) == {"semantic_diversity": 80, "objectness": 1.0, "walkability": 0.0}
    assert len(WALKABLE_CLASSES) == 13 and all(COCO_PANOPTIC_CLASSES.index(c) >= 80 for c in WALKABLE_CLASSES)


def _normal_map(vectors: np.ndarray) -> np.ndarray:
    v = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.clip(np.rint((v + 1) * 127.5), 0, 255).astype(np.uint8)


def test_geometric_complexity_is_the_spherical_variance_of_the_normals():
    flat = _normal_map(np.broadcast_to([0.0, 0.0, 1.0], (8, 8, 3)).copy())
    assert geometric_complexity(flat) == pytest.approx(0.0, abs=1e-4)
    # half facing left, half facing right: the mean normal is 0
    lr = np.zeros((4, 8, 3))
    lr[:, :4] = [-1.0, 0, 0]
    lr[:, 4:] = [1.0, 0, 0]
    assert geometric_complexity(_normal_map(lr)) == pytest.approx(1.0, abs=1e-2)  # 8-bit: z = 128 is not 0
    # two halves at +-60 degrees from the view axis: |mean| = cos 60 = 0.5
    c, s = np.cos(np.pi / 3), np.sin(np.pi / 3)
    tilt = np.zeros((4, 8, 3))
    tilt[:, :4] = [-s, 0, c]
    tilt[:, 4:] = [s, 0, c]
    assert geometric_complexity(_normal_map(tilt)) == pytest.approx(0.5, abs=5e-3)
    # uniformly spread over the visible hemisphere: 0.5 (|mean| of a uniform hemisphere is 1/2)
    rng = np.random.default_rng(0)
    v = rng.normal(size=(200, 200, 3))
    v[..., 2] = np.abs(v[..., 2])
    assert geometric_complexity(_normal_map(v)) == pytest.approx(0.5, abs=0.01)


def test_caption_stats():
    assert caption_stats(["A dog runs. It is happy! Is it?"]) == {
        "caption_n_chars": 31, "caption_n_words": 8, "caption_n_sentences": 3}
    assert caption_stats([{"caption": "two cats on a sofa"}, "ignored"]) == {
        "caption_n_chars": 18, "caption_n_words": 5, "caption_n_sentences": 1}
    assert caption_stats(["Wait... what?!"])["caption_n_sentences"] == 2
    assert caption_stats([]) == {"caption_n_chars": 0, "caption_n_words": 0, "caption_n_sentences": 0}


# ---------------------------------------------------------------------- the labelers


def _sample(key="k", seed=0, with_caption=True):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    sem = np.full((24, 32), ID["floor-wood"], np.uint8)
    sem[:12] = ID["couch"]
    normal = np.empty((24, 32, 3), np.uint8)
    normal[:] = (128, 128, 255)
    labels = {"semseg_coco": sem, "normal": normal,
              "det": {"instances": [inst((0, 0, 0.6, 0.6), "person", 0.95), inst((0.4, 0.4, 1, 1), "couch", 0.8)]}}
    if with_caption:
        labels["caption"] = ["A person on a couch. Cozy."]
    labels["sam_mask"] = {"height": 24, "width": 32, "instances": [
        {"polygons": [[[0, 0], [5, 0], [5, 5]]], "bbox_xyxy": [0, 0, 5, 5], "area": 15, "predicted_iou": 0.9,
         "stability_score": 0.96}] * 3}
    return LabelInput(key=key, image=img, original_size=(64, 48), crops=np.zeros((1, 5), np.int64), labels=labels)


def test_the_variants_are_registered_with_their_requirements():
    assert [get_labeler(n).requires for n in VARIANTS] == [
        ("semseg_coco", "det"), ("semseg_coco", "det", "normal"), ("semseg_coco", "det", "normal", "caption"),
        ("semseg_coco", "det", "normal", "caption", "sam_mask")]
    for n in VARIANTS:
        cls = get_labeler(n)
        assert issubclass(cls, DerivedMetadataLabeler) and cls.outputs == ("metadata",) and not cls.stateful
        assert cls.description and n in LABELERS
    from modalmill.labelers.base import labeler_for

    assert labeler_for("metadata").name == "metadata"  # the model-free labeler stays the default


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_adds_exactly_its_fields_on_top_of_the_image_statistics(name):
    cls = get_labeler(name)
    inp = _sample()
    (res,) = cls().process_batch([inp])
    (base,) = get_labeler("metadata")().process_batch([inp])
    meta = res["metadata"]
    expected = set(base["metadata"]) | {f for m in cls.requires for f in SOURCES[m]}
    assert set(meta) == expected
    assert {k: meta[k] for k in base["metadata"]} == base["metadata"]  # the model-free values, unchanged
    get_modality("metadata").encode(meta, "k")  # inside 4M's ranges
    assert meta["n_coco_instances"] == 2 and meta["n_humans"] == 1 and meta["coco_instance_diversity"] == 2
    assert meta["semantic_diversity"] == 2 and meta["objectness"] == 0.5 and meta["walkability"] == 0.5
    assert meta["occlusion_score"] == round(0.04 / 0.68, 4)  # overlap .2 x .2, union .36 + .36 - .04
    for f in ("n_coco_instances", "n_humans", "coco_instance_diversity", "semantic_diversity"):
        assert isinstance(meta[f], int)
    if "normal" in cls.requires:
        assert meta["geometric_complexity"] == 0.0
    if "caption" in cls.requires:
        assert (meta["caption_n_chars"], meta["caption_n_words"], meta["caption_n_sentences"]) == (26, 6, 2)
    assert ("n_sam_instances" in meta) == ("sam_mask" in cls.requires)
    if "sam_mask" in cls.requires:
        assert meta["n_sam_instances"] == 3 and isinstance(meta["n_sam_instances"], int)


def test_values_are_clipped_into_4m_ranges_and_missing_inputs_fail_the_sample():
    lab = get_labeler("metadata_derived_geometry")()
    inp = _sample()
    inp.labels["det"] = {"instances": [inst((0, 0, 1, 1), "person", 0.9)] * 3}  # occlusion 1.0 -> 0.25
    lr = np.zeros((24, 32, 3))
    lr[:, :16] = [-1.0, 0, 0]
    lr[:, 16:] = [1.0, 0, 0]
    inp.labels["normal"] = _normal_map(lr)  # spherical variance 1.0 -> 0.75
    lacking = _sample("lacking")
    del lacking.labels["normal"]
    garbled = _sample("garbled")
    garbled.labels["det"] = {"boxes": []}
    results = lab.process_batch([inp, lacking, garbled, _sample("fine", seed=1)])
    meta = results[0]["metadata"]
    assert meta["occlusion_score"] == METADATA_RANGES["occlusion_score"][1] == 0.25
    assert meta["geometric_complexity"] == METADATA_RANGES["geometric_complexity"][1] == 0.75
    assert isinstance(results[1], LabelFailure) and "normal" in results[1].reason
    assert isinstance(results[2], LabelFailure) and "unreadable" in results[2].reason
    assert isinstance(results[3], dict)


def test_the_factory_makes_other_combinations():
    cls = derived_metadata_labeler("metadata_from_captions_test", ("caption",), register=False)
    assert cls.requires == ("caption",) and cls.name not in LABELERS
    (res,) = cls().process_batch([_sample()])
    assert {"caption_n_words", "brightness"} <= set(res["metadata"]) and "n_humans" not in res["metadata"]
    with pytest.raises(ValueError, match="derived metadata can be computed from"):
        derived_metadata_labeler("bad", ("depth",), register=False)
    sam_only = derived_metadata_labeler("metadata_from_sam_test", ("sam_mask",), register=False)
    empty, garbled = _sample("empty"), _sample("garbled")
    empty.labels["sam_mask"] = {"height": 24, "width": 32, "instances": []}
    garbled.labels["sam_mask"] = {"height": 24, "width": 32, "instances": "three"}
    res = sam_only().process_batch([_sample(), empty, garbled])
    assert res[0]["metadata"]["n_sam_instances"] == 3 and res[1]["metadata"]["n_sam_instances"] == 0
    assert isinstance(res[2], LabelFailure) and "unreadable" in res[2].reason and "n_coco" not in str(res[0])


# ---------------------------------------------------------------------- in the pipeline


def tar_members(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def keys_of(path):
    return [name.split(".", 1)[0] for name, _ in tar_members(path)]


def test_only_metadata_with_the_derived_labeler_adds_the_fields_and_keeps_the_shard_aligned(shared_labels, tmp_path):
    """On a copy of the session's shared output (tests/shared_labels.py: semseg, det and normal by tiny models):
    --only metadata --force with the model-free metadata labeler, then with a derived one."""
    mods = ["rgb", "crop_settings", "semseg_coco", "det", "normal", "metadata"]
    assert shared_labels.summary["exit_code"] == EXIT_OK and shared_labels.summary["samples_written"] == 10
    out, s = shared_labels.rerun(tmp_path / "out", ["metadata"], {})
    assert s["exit_code"] == EXIT_OK and s["samples_written"] == 10, s
    assert manifest.read_marker(str(out), "shard-00000")["modalities"]["metadata"]["labeler"] == "metadata"
    before = {m: (out / m / "shard-00000.tar").read_bytes() for m in mods}
    first = {n.split(".")[0]: json.loads(b) for n, b in tar_members(out / "metadata" / "shard-00000.tar")}
    assert first and not any(f in meta for meta in first.values() for f in SOURCES["det"])

    # the stored metadata was made by the model-free labeler: recompute it with the derived one
    out, s2 = shared_labels.rerun(out, ["metadata"], {"metadata_derived_geometry": {}})
    assert s2["exit_code"] == EXIT_OK and s2["samples_written"] == 10 and s2["samples_dropped"] == 0, s2
    for m in mods:
        if m != "metadata":
            assert (out / m / "shard-00000.tar").read_bytes() == before[m], f"{m} was rewritten"
    keys = keys_of(out / "rgb" / "shard-00000.tar")
    assert all(keys_of(out / m / "shard-00000.tar") == keys for m in mods)
    members = {m: dict(tar_members(out / m / "shard-00000.tar")) for m in ("semseg_coco", "det", "normal")}
    new_fields = {f for m in ("det", "semseg_coco", "normal") for f in SOURCES[m]}
    for name, blob in tar_members(out / "metadata" / "shard-00000.tar"):
        key = name.split(".")[0]
        meta = json.loads(blob)
        assert set(meta) == set(first[key]) | new_fields
        assert {k: meta[k] for k in first[key]} == first[key]
        get_modality("metadata").encode(meta, key)
        # the fields are those of the stored labels
        det = json.loads(members["det"][f"{key}.json"])
        sem = get_modality("semseg_coco").decode(members["semseg_coco"][f"{key}.png"])
        normal = get_modality("normal").decode(members["normal"][f"{key}.png"])
        want = {**det_stats(det, 0.6), **semseg_stats(sem), "geometric_complexity": geometric_complexity(normal)}
        for f, v in want.items():
            lo, hi = METADATA_RANGES[f]
            assert meta[f] == pytest.approx(min(max(v, lo), hi), abs=1e-4), f
    marker = manifest.read_marker(str(out), "shard-00000")
    assert marker["keys"] == keys and marker["modalities"]["metadata"]["labeler"] == "metadata_derived_geometry"
    rows = manifest.read_manifest(str(out)).to_pylist()
    assert {p["modality"]: p["labeler"] for p in rows[0]["producers"]}["metadata"] == "metadata_derived_geometry"
