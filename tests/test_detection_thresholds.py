"""Per-detector score thresholds comparable to 4M-21's (ViTDet-H boxes >= 0.6, HMR 2.0 people >= 0.5): each
detector writes its own into the ``det`` record, and every consumer in modalmill (4M's det sequence, the derived
metadata counts, HMR 2.0's person selection, ``modalmill show``) applies the record's, not a fixed 0.6 / 0.5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modalmill.labelers import LabelInput, get_labeler
from modalmill.labelers.derived import det_stats
from modalmill.labelers.detection import VITDET_THRESHOLDS, det_thresholds
from modalmill.tokenize.text_tokenizer import det_to_text
from tests.tiny_models import save_tiny_dfine

# A D-FINE record: one box scoring 0.55 (kept by D-FINE's 0.5, dropped by ViTDet's 0.6) and people at 0.45 (kept
# by D-FINE's person threshold 0.4, dropped by HMR 2.0's 0.5 for ViTDet) and 0.3 (dropped by both).
INSTANCES = [{"boxes": [0.1, 0.1, 0.5, 0.9], "class_name": "person", "score": 0.45},
             {"boxes": [0.5, 0.2, 0.9, 0.6], "class_name": "dog", "score": 0.55},
             {"boxes": [0.0, 0.0, 0.2, 0.3], "class_name": "person", "score": 0.3},
             {"boxes": [0.6, 0.6, 0.9, 0.9], "class_name": "cup", "score": 0.95}]


def test_per_detector_defaults():
    assert VITDET_THRESHOLDS == (0.6, 0.5)  # 4M-21's: the rule's reference point
    d, r = get_labeler("dfine_coco").Config(), get_labeler("detr_coco").Config()
    assert (d.score_threshold, d.person_score_threshold) == (0.5, 0.4)  # D-FINE's demo 0.4 + 4M's offsets
    assert (r.score_threshold, r.person_score_threshold) == (0.8, 0.7)  # DETR's demo 0.7 + 4M's offsets
    for cls in ("dfine_coco", "detr_coco"):
        with pytest.raises(ValueError, match="person_score_threshold"):
            get_labeler(cls).Config(person_score_threshold=1.5)
    assert det_thresholds({"instances": []}) == (0.6, 0.5)  # a record without its own: ViTDet-H's


def test_the_default_detector_writes_its_thresholds(tmp_path):
    from skimage import data

    lab = get_labeler("dfine_coco")({"weights": save_tiny_dfine(str(tmp_path / "dfine")), "device": "cpu",
                                     "input_size": 64})
    img = data.astronaut()[::8, ::8].copy()
    (r,) = lab.process_batch([LabelInput(key="a", image=img, original_size=(64, 64),
                                         crops=np.zeros((1, 5), np.int64))])
    assert det_thresholds(r["det"]) == (0.5, 0.4)
    (r,) = get_labeler("dfine_coco")({"weights": str(tmp_path / "dfine"), "device": "cpu", "input_size": 64,
                                      "score_threshold": 0.7}).process_batch(
        [LabelInput(key="a", image=img, original_size=(64, 64), crops=np.zeros((1, 5), np.int64))])
    assert det_thresholds(r["det"]) == (0.7, 0.4)


@pytest.mark.parametrize("own", [None, (0.5, 0.4)])
def test_consumers_apply_the_records_thresholds(own):
    det = {"instances": INSTANCES}
    if own:
        det = {**det, "score_threshold": own[0], "person_score_threshold": own[1]}
    box, person = own or (0.6, 0.5)
    kept = [i for i in INSTANCES if i["score"] >= box]
    # derived metadata counts
    s = det_stats(det)
    assert s["n_coco_instances"] == len(kept) == (2 if own else 1)
    assert s["n_humans"] == sum(i["class_name"] == "person" for i in kept)
    # 4M's det sequence: one "<v0> <v1> <v2> <v3> class" group per kept box
    assert sorted(g.split()[-1] for g in det_to_text(det).split(" v0=")) == sorted(i["class_name"] for i in kept)
    # HMR 2.0's people
    hmr = get_labeler("hmr2")({"device": "cpu"})
    img = np.zeros((100, 100, 3), np.uint8)
    boxes, scores = hmr.people(LabelInput(key="k", image=img, original_size=(100, 100),
                                          crops=np.zeros((1, 5), np.int64), labels={"det": det}))
    assert scores.tolist() == ([0.45] if own else [])
    # an explicit setting still wins
    boxes, scores = get_labeler("hmr2")({"device": "cpu", "score_threshold": 0.25}).people(
        LabelInput(key="k", image=img, original_size=(100, 100), crops=np.zeros((1, 5), np.int64),
                   labels={"det": det}))
    assert scores.tolist() == [0.45, 0.3]
    assert torch.is_tensor(torch.as_tensor(boxes))
