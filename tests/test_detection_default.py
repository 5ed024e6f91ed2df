"""The default detector: D-FINE-X (59.3 COCO box AP, within a point of 4M-21's ViTDet-H Cascade at 58.7), with
DETR-R50 kept as the light option. Tiny random D-FINE configurations of transformers' real class, saved and loaded
like the real checkpoint; checked against transformers' own D-FINE pre/post-processing; run as the default inside
the Ray pipeline, from weights staged by `modalmill weights fetch` and read through `weights_from`, with HMR 2.0
regressing the people it finds.
"""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.io import manifest
from modalmill.jobs.runner import EXIT_OK, resolve_labelers, run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.labelers import LabelInput, get_labeler
from modalmill.io import hashes
from modalmill.labelers.base import labeler_for
from modalmill.labelers.detection import detections_from_focal_logits
from modalmill.labelers.semseg import COCO_THING_CLASSES
from modalmill.io.fetch import WeightsError
from modalmill.io.hashes import content_hash
from modalmill.labelers.pins import Pin
from modalmill.schemas import get_modality
from tests.tiny_models import save_tiny_dfine, save_tiny_hmr2, tiny_dfine

CPU = {"num_cpus": 0.25, "num_gpus": 0, "memory_mb": 0}


@pytest.fixture(scope="module")
def dfine_dir(tmp_path_factory):
    return save_tiny_dfine(str(tmp_path_factory.mktemp("dfine") / "dfine-xlarge-obj2coco"))


def _photo(name="astronaut", step=2):
    import skimage.data

    return np.ascontiguousarray(getattr(skimage.data, name)()[::step, ::step, :3])


def _inp(image, key="k"):
    return LabelInput(key=key, image=image, original_size=(image.shape[1], image.shape[0]),
                      crops=np.zeros((1, 5), np.int64))


def test_default_detector_registry_and_cli():
    cls = labeler_for("det")
    assert cls.name == "dfine_coco" and get_labeler("detr_coco").outputs == ("det",)  # DETR: the light option
    assert cls.weights == "ustc-community/dfine-xlarge-obj2coco" and "Apache-2.0" in cls.license
    assert "59.3" in cls.quality and "58.7" in cls.quality and "42.0" in get_labeler("detr_coco").quality
    assert cls.weights_pin.sha256 is None and "no published sha256" in cls.weights_pin.note
    with pytest.raises(ValueError, match="multiple of 32"):
        cls.make_config({"input_size": 100})
    out = CliRunner().invoke(main, ["labelers", "--wide"]).output
    for name, ap in (("dfine_coco", "59.3"), ("detr_coco", "42.0")):
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert ap in line and "COCO val2017 box AP" in line
    with pytest.raises(WeightsError, match="dfine-xlarge-obj2coco"):  # the hub default, offline here
        cls().setup()


def test_postprocessing_is_d_fines(dfine_dir):
    """Our post-processing equals transformers' D-FINE/RT-DETR post-processor (focal scores, top-k over the
    flattened query x class scores), boxes normalised by the image size."""
    from transformers import RTDetrImageProcessor

    model = tiny_dfine(seed=3)
    with torch.no_grad():
        out = model(pixel_values=torch.rand(1, 3, 64, 64))
    proc = RTDetrImageProcessor()
    h, w = 100, 200
    (ref,) = proc.post_process_object_detection(out, threshold=0.05, target_sizes=[(h, w)], use_focal_loss=True)
    ours = detections_from_focal_logits(out.logits[0], out.pred_boxes[0], COCO_THING_CLASSES, min_score=0.05,
                                        top_k=1000, num_top_queries=model.config.num_queries, decimals=6)
    assert len(ours["instances"]) == len(ref["scores"]) > 0
    order = torch.argsort(ref["scores"], descending=True, stable=True)
    for inst, i in zip(ours["instances"], order.tolist()):
        assert inst["class_name"] == model.config.id2label[int(ref["labels"][i])]
        assert inst["score"] == pytest.approx(float(ref["scores"][i]), abs=1e-5)
        np.testing.assert_allclose(inst["boxes"], (ref["boxes"][i] / torch.tensor([w, h, w, h])).clamp(0, 1),
                                   atol=1e-5)


def test_labels_match_transformers_pipeline_on_a_photo(dfine_dir):
    """The labeler on a real photo vs transformers' RTDetrImageProcessor (PIL resize to 640x640) + the same model +
    its post-processor: the same detections (resize implementations differ by at most a few grey levels)."""
    from PIL import Image
    from transformers import DFineForObjectDetection, RTDetrImageProcessor

    img = _photo("chelsea")
    lab = get_labeler("dfine_coco")({"weights": dfine_dir, "min_score": 0.0, "top_k": 10})
    lab.setup()
    assert lab.checkpoint_id() == content_hash(dfine_dir)
    (res,) = lab.process_batch([_inp(img)])
    get_modality("det").encode(res["det"], "k")
    model = DFineForObjectDetection.from_pretrained(dfine_dir).eval()
    proc = RTDetrImageProcessor()  # D-FINE's preprocessor_config: 640x640, rescale, no normalisation
    inputs = proc(images=Image.fromarray(img), return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[-2:]) == (640, 640)
    with torch.no_grad():
        out = model(**inputs)
    (ref,) = proc.post_process_object_detection(out, threshold=0.0, target_sizes=[img.shape[:2]])
    top = torch.argsort(ref["scores"], descending=True, stable=True)[:10]
    h, w = img.shape[:2]
    got = res["det"]["instances"]
    assert [d["class_name"] for d in got] == [model.config.id2label[int(ref["labels"][i])] for i in top]
    np.testing.assert_allclose([d["score"] for d in got], ref["scores"][top].numpy(), atol=2e-3)
    np.testing.assert_allclose([d["boxes"] for d in got],
                               (ref["boxes"][top] / torch.tensor([w, h, w, h])).clamp(0, 1).numpy(), atol=5e-3)


def test_wrong_checkpoints_are_clear_errors(tmp_path):
    detr = tmp_path / "detr"
    from tests.tiny_models import save_tiny_detr

    save_tiny_detr(str(detr))
    with pytest.raises(WeightsError, match="holds a 'detr' model, expected 'd_fine'"):
        get_labeler("dfine_coco")({"weights": str(detr)}).setup()
    other = save_tiny_dfine(str(tmp_path / "obj365"), names=tuple(f"class{i}" for i in range(80)))
    with pytest.raises(WeightsError, match="names class 0 'class0', expected 'person'"):
        get_labeler("dfine_coco")({"weights": other}).setup()


def _members(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def test_default_detector_in_the_pipeline_feeds_hmr2(ray_local, demo_corpus, tmp_path, monkeypatch):
    """det by the default labeler, at its default settings, from weights staged by `modalmill weights fetch` and
    named by the job's `weights_from`; HMR 2.0 regresses exactly the people it found."""
    dfine = save_tiny_dfine(str(tmp_path / "src" / "dfine"), favour="person")
    hmr2 = save_tiny_hmr2(str(tmp_path / "src" / "hmr2.safetensors"))
    # the registry defaults point at these local copies (the real ones are a hub id and an https:// tarball)
    monkeypatch.setattr(get_labeler("dfine_coco"), "weights", dfine)
    monkeypatch.setattr(get_labeler("dfine_coco"), "weights_pin", Pin())
    monkeypatch.setattr(get_labeler("hmr2"), "weights", hmr2)
    monkeypatch.setattr(get_labeler("hmr2"), "weights_pin", Pin())
    monkeypatch.setattr(hashes, "CACHE_DIR", str(tmp_path / "cache"))
    mirror = tmp_path / "staged"
    res = CliRunner().invoke(main, ["weights", "fetch", "dfine_coco", "hmr2", "--to", str(mirror)])
    assert res.exit_code == 0, res.output
    assert "weights_from: " + str(mirror) in res.output
    staged = json.loads((mirror / "dfine_coco" / ".modalmill-weights.json").read_text())
    assert staged["source"] == dfine and {f["path"] for f in staged["files"]} == {"config.json", "model.safetensors"}
    assert content_hash(str(mirror / "dfine_coco")) == content_hash(dfine)
    assert (mirror / "hmr2" / "hmr2.safetensors").read_bytes() == open(hmr2, "rb").read()

    out = tmp_path / "out"
    mods = ["rgb", "crop_settings", "det", "human_poses"]
    data = {"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": str(out), "modalities": mods,
            "batch_size": 4, "decode": {"max_size": 160}, "shards": "0", "weights_from": str(mirror),
            # resources only (no GPU on CI); the settings are the labelers' defaults
            "labelers": {"dfine_coco": {"resources": CPU}, "hmr2": {"resources": CPU}}}
    spec = job_from_dict(data)
    runs = {r.labeler: r for r in resolve_labelers(spec, mods)}
    assert set(runs) == {"dfine_coco", "hmr2"}
    assert runs["dfine_coco"].config == {"weights": str(mirror / "dfine_coco")}
    s = run_job(spec, show_progress=False)
    assert s["exit_code"] == EXIT_OK and s["samples_written"] == 5, s
    members = {m: _members(out / m / "shard-00000.tar") for m in mods}
    n_people = 0
    for (_, rgb_b), (_, det_b), (_, hp_b) in zip(members["rgb"], members["det"], members["human_poses"]):
        h, w = get_modality("rgb").decode(rgb_b).shape[:2]
        det, poses = json.loads(det_b), json.loads(hp_b)
        assert 0 < len(det["instances"]) <= 100 and all(d["score"] >= 0.05 for d in det["instances"])
        persons = [d for d in det["instances"] if d["class_name"] == "person" and d["score"] >= 0.5]
        assert persons and poses, "the favoured tiny detector finds people in every photo"
        np.testing.assert_allclose(poses["bbox_xyxy"], [np.array(d["boxes"]) * [w, h, w, h] for d in persons],
                                   atol=1e-5)
        assert len(poses["pred_cam"]) == len(poses["pred_smpl_params"]["betas"]) == len(persons)
        n_people += len(persons)
    assert n_people >= 5
    rows = manifest.read_manifest(str(out)).to_pylist()
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)
    producers = {q["modality"]: q for q in rows[0]["producers"]}
    assert producers["det"]["labeler"] == "dfine_coco" and producers["human_poses"]["labeler"] == "hmr2"
    assert producers["det"]["checkpoint"] == content_hash(dfine)
    assert producers["human_poses"]["checkpoint"] == content_hash(hmr2)
