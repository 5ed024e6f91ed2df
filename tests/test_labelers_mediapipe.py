"""MediaPipe labelers (optional extra ``modalmill[mediapipe]``): real models shipped inside the
``mediapipe==0.10.21`` wheel. The registry entries, configs, record validation and the missing-package error
are tested everywhere; the labels themselves (real weights, real photos, inside the Ray pipeline) wherever
mediapipe is installed (it needs numpy<2 / protobuf<5, so the main development environment, which has numpy 2
and protobuf 7, skips them)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import tarfile

import numpy as np
import pytest

from modalmill.labelers import LabelFailure, LabelInput, get_labeler
from modalmill.labelers.mediapipe_labelers import POSE_LANDMARKS, mediapipe_model_files
from modalmill.labelers.model import ModelLabeler
from modalmill.io.fetch import WeightsError
from modalmill.schemas import RecordError, get_modality

NAMES = ("mediapipe_pose", "mediapipe_person_mask")
HAVE_MEDIAPIPE = importlib.util.find_spec("mediapipe") is not None
NEEDS_MEDIAPIPE = ("mediapipe is an optional extra (pip install 'modalmill[mediapipe]'; numpy<2, protobuf<5) and "
                   "is not installed here")


def _inp(image, key="k"):
    h, w = image.shape[:2]
    return LabelInput(key=key, image=image, original_size=(w, h), crops=np.zeros((1, 5), np.int64))


def _photo(name):
    from skimage import data

    return np.ascontiguousarray(getattr(data, name)())


# ---------------------------------------------------------------------- without mediapipe


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_is_complete_and_frozen(name):
    cls = get_labeler(name)
    assert issubclass(cls, ModelLabeler) and cls.stateful and cls.outputs and not cls.requires
    for attr in ("architecture", "weights", "weights_help", "license", "description"):
        assert isinstance(getattr(cls, attr), str) and getattr(cls, attr), attr
    assert "mediapipe==0.10.21" in cls.weights and "modalmill[mediapipe]" in cls.weights_help
    assert cls.input_size and len(cls.mean) == len(cls.std) == 3
    r = cls.default_resources
    assert r.num_cpus >= 1 and r.num_gpus == 0 and r.memory_mb > 0  # TFLite on the CPU
    assert cls.Config.__dataclass_params__.frozen
    fields = dataclasses.fields(cls.Config)
    assert [(f.name, f.default) for f in fields[:3]] == [("weights", None), ("device", "cpu"), ("dtype", "float32")]
    c = cls.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.device = "cuda"  # type: ignore[misc]
    assert cls(dataclasses.asdict(c)).config_hash() == cls().config_hash()
    with pytest.raises(ValueError, match="device"):
        cls.make_config({"device": "cuda"})
    with pytest.raises(ValueError, match="unknown setting"):
        cls.make_config({"nope": 1})


def test_settings_are_checked_and_hashed():
    pose, seg = get_labeler("mediapipe_pose"), get_labeler("mediapipe_person_mask")
    with pytest.raises(ValueError, match="min_detection_confidence"):
        pose.make_config({"min_detection_confidence": 1.5})
    with pytest.raises(ValueError, match="model_selection"):
        seg.make_config({"model_selection": 2})
    with pytest.raises(ValueError, match="threshold"):
        seg.make_config({"threshold": 0})
    assert seg({"threshold": 0.7}).config_hash() != seg().config_hash()
    assert len(POSE_LANDMARKS) == 33 and POSE_LANDMARKS[0] == "nose" and POSE_LANDMARKS[11] == "left_shoulder"


def test_cli_lists_them():
    from click.testing import CliRunner

    from modalmill.cli import main

    out = CliRunner().invoke(main, ["labelers", "--wide"]).output
    for name, modality in zip(NAMES, ("pose_keypoints", "person_mask")):
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert modality in line and "mediapipe==0.10.21" in line and "Apache-2.0" in line and "gpu=0 " in line


@pytest.mark.skipif(HAVE_MEDIAPIPE, reason="mediapipe is installed here: the missing-package error cannot happen")
@pytest.mark.parametrize("name", NAMES)
def test_without_mediapipe_setup_says_how_to_install_it(name):
    with pytest.raises(WeightsError, match=r"mediapipe is not installed: pip install 'modalmill\[mediapipe\]'"):
        get_labeler(name)().setup()
    with pytest.raises(WeightsError, match="mediapipe is not installed"):
        mediapipe_model_files(("modules/pose_landmark/pose_landmark_full.tflite",))


@pytest.mark.parametrize("name", NAMES)
def test_weights_cannot_be_replaced(name):
    with pytest.raises(WeightsError, match="bundled in mediapipe==0.10.21"):
        get_labeler(name)({"weights": "/some/model.tflite"}).setup()


def test_record_validation():
    spec = get_modality("pose_keypoints")
    kp = [[10.0, 20.0, -3.0, 0.9]] * 33
    good = {"height": 40, "width": 50, "people": [{"keypoints": kp}]}
    assert json.loads(spec.encode(good, "k")) == good
    spec.encode({"height": 40, "width": 50, "people": []}, "k")
    for bad, field in (({**good, "people": [{"keypoints": kp[:32]}]}, "keypoints"),
                       ({**good, "people": [{"keypoints": [[1, 2, 3, 1.5]] * 33}]}, "keypoints"),
                       ({"people": []}, "height")):
        with pytest.raises(RecordError, match=field):
            spec.encode(bad, "k")
    mask = get_modality("person_mask")
    m = np.zeros((6, 8), np.uint8)
    m[2:4, 3:6] = 255
    assert np.array_equal(mask.decode(mask.encode(m, "k", image_hw=(6, 8))), m)
    with pytest.raises(RecordError, match="stored rgb image"):
        mask.encode(m, "k", image_hw=(6, 9))


# ---------------------------------------------------------------------- with mediapipe (real bundled models)


def test_pose_keypoints_on_real_photos():
    pytest.importorskip("mediapipe", reason=NEEDS_MEDIAPIPE)
    lab = get_labeler("mediapipe_pose")()
    lab.setup()
    assert len(lab.checkpoint_id()) == 16
    astronaut, flat = _photo("astronaut"), np.full((60, 80, 3), 128, np.uint8)
    bad = LabelInput(key="bad", image=astronaut[..., 0], original_size=(1, 1), crops=np.zeros((1, 5), np.int64))
    res = lab.process_batch([_inp(astronaut), _inp(flat), bad])
    assert isinstance(res[2], LabelFailure)
    rec = res[0]["pose_keypoints"]
    get_modality("pose_keypoints").encode(rec, "k")
    assert (rec["height"], rec["width"]) == (512, 512) and len(rec["people"]) == 1
    kp = np.array(rec["people"][0]["keypoints"])
    assert kp.shape == (33, 4)
    nose, l_sh, r_sh = kp[0], kp[11], kp[12]
    # the astronaut faces the camera: her face is in the upper middle, her left shoulder on the image's right
    assert 150 < nose[0] < 280 and 60 < nose[1] < 200 and nose[3] > 0.9
    assert l_sh[0] > nose[0] > r_sh[0] and l_sh[1] > nose[1] and r_sh[1] > nose[1]
    assert res[1]["pose_keypoints"] == {"height": 60, "width": 80, "people": []}
    again = get_labeler("mediapipe_pose")().process_batch([_inp(astronaut.copy())])
    assert again[0] == res[0]  # deterministic, a fresh graph gives the same landmarks


def test_person_mask_on_real_photos():
    pytest.importorskip("mediapipe", reason=NEEDS_MEDIAPIPE)
    lab = get_labeler("mediapipe_person_mask")()
    lab.setup()
    astronaut = _photo("astronaut")
    (res,) = lab.process_batch([_inp(astronaut)])
    m = res["person_mask"]
    get_modality("person_mask").encode(m, "k", image_hw=(512, 512))
    assert m.shape == (512, 512) and m.dtype == np.uint8 and set(np.unique(m)) == {0, 255}
    assert m[150, 200] == 255 and m[400, 250] == 255  # face and body
    assert m[:40, 440:].max() == 0  # the background, top right
    assert 0.3 < (m > 0).mean() < 0.8
    strict = get_labeler("mediapipe_person_mask")({"threshold": 0.99}).process_batch([_inp(astronaut)])
    assert (strict[0]["person_mask"] > 0).sum() < (m > 0).sum()
    (flat,) = lab.process_batch([_inp(np.full((60, 80, 3), 128, np.uint8))])
    assert flat["person_mask"].shape == (60, 80) and flat["person_mask"].max() == 0


@pytest.mark.skipif(not HAVE_MEDIAPIPE, reason=NEEDS_MEDIAPIPE)  # (before the Ray and corpus fixtures start)
def test_mediapipe_labelers_in_the_pipeline(ray_local, demo_corpus, tmp_path):
    pytest.importorskip("mediapipe", reason=NEEDS_MEDIAPIPE)
    from modalmill.jobs.runner import EXIT_OK, run_job
    from modalmill.jobs.spec import job_from_dict
    from modalmill.io import manifest

    out = tmp_path / "out"
    mods = ["rgb", "crop_settings", "pose_keypoints", "person_mask"]
    cpu = {"num_cpus": 0.25, "memory_mb": 0}
    data = {"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": str(out), "modalities": mods,
            "batch_size": 4, "decode": {"max_size": 192},
            "labelers": {n: {"resources": cpu} for n in NAMES}}
    s = run_job(job_from_dict(data), show_progress=False)
    assert s["exit_code"] == EXIT_OK and s["samples_written"] == 10, s
    people = 0
    for shard in ("shard-00000", "shard-00001"):
        members = {}
        for m in mods:
            with tarfile.open(out / m / f"{shard}.tar") as t:
                members[m] = [(x.name, t.extractfile(x).read()) for x in t.getmembers()]
        keys = [n.split(".", 1)[0] for n, _ in members["rgb"]]
        assert len(keys) == 5 and all([n.split(".", 1)[0] for n, _ in members[m]] == keys for m in mods)
        for (_, rgb_b), (_, kp_b), (_, mask_b) in zip(members["rgb"], members["pose_keypoints"],
                                                      members["person_mask"]):
            h, w = get_modality("rgb").decode(rgb_b).shape[:2]
            rec = json.loads(kp_b)
            get_modality("pose_keypoints").encode(rec, "k")
            assert (rec["height"], rec["width"]) == (h, w)
            people += len(rec["people"])
            mask = get_modality("person_mask").decode(mask_b)
            assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
    assert people >= 1  # the demo corpus has the astronaut
    rows = manifest.read_manifest(str(out)).to_pylist()
    producers = {p["modality"]: p for p in rows[0]["producers"]}
    for name, modality in zip(NAMES, ("pose_keypoints", "person_mask")):
        lab = get_labeler(name)()
        lab.setup()
        assert producers[modality]["labeler"] == name and producers[modality]["checkpoint"] == lab.checkpoint_id()
