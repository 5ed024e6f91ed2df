"""The SAM-instance and pose tokenizers end to end: label the demo photos with tiny SAM and tiny DETR + HMR 2.0
inside the Ray pipeline, train both tokenizers (SAM on Ray Train, pose in process and through the CLI), write 4M's
``sam_instance`` file and ``human_poses`` with ``pose_tokenized`` through ``modalmill tokenize``, and check layout,
alignment, token ranges, the recorded producers, rerun no-ops, byte identity and ``modalmill check``; plus the
geometry of instances cut to a crop, the object-array codec and the 4M-21 text layouts of both."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.jobs.runner import EXIT_OK, JobError, run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.io import manifest
from modalmill.jobs.check import check_output
from modalmill.schemas import RecordError, get_modality
from modalmill.tokenize.adapters import MIN_BOX_FRACTION, body_poses, crop_instances
from modalmill.tokenize.checkpoint import checkpoint_hash, load_tokenizer
from modalmill.jobs.tokenize_output import tokenize_output
from modalmill.tokenize.text_tokenizer import human_poses_to_text, sam_instance_to_text
from modalmill.tokenize.train import train_tokenizer
from tests.tiny_models import TEST_SETTINGS, save_tiny_detr, save_tiny_hmr2, save_tiny_sam

CPU = {"num_cpus": 0.25, "num_gpus": 0, "memory_mb": 0}
SHARD = "shard-00000"
VALUE = re.compile(r"v[0-3]=(\d+)")


def members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def decoded(out, modality):
    spec = get_modality(modality)
    return [(name.split(".", 1)[0], spec.decode(data)) for name, data in members(out / modality / f"{SHARD}.tar")]


@pytest.fixture(scope="module")
def work(ray_local, demo_corpus, tmp_path_factory, one_torch_thread):
    """Shard 0 of the demo corpus labeled with tiny SAM, DETR and HMR 2.0; both tokenizers trained on it."""
    d = tmp_path_factory.mktemp("structured")
    out = d / "out"
    labelers = {
        "sam": {"config": {**TEST_SETTINGS["sam"], "weights": save_tiny_sam(d / "sam.pth")}, "resources": CPU},
        "detr_coco": {"config": {**TEST_SETTINGS["detr_coco"],
                                 "weights": save_tiny_detr(str(d / "detr"), favour="person")}, "resources": CPU},
        "hmr2": {"config": {"weights": save_tiny_hmr2(d / "hmr2.safetensors")}, "resources": CPU},
    }
    job = {"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": str(out), "shards": "0",
           "modalities": ["rgb", "crop_settings", "sam_mask", "det", "human_poses"], "batch_size": 5,
           "decode": {"max_size": 64}, "crops": {"n_crops": 3}, "labelers": labelers, "ray": {"shard_cpus": 0.5}}
    s = run_job(job_from_dict(job), show_progress=False)
    assert s["exit_code"] == EXIT_OK and s["samples_written"] == 5, s
    sam_ck, pose_ck = str(d / "tok-sam"), str(d / "tok-pose")
    # the SAM-instance tokenizer on Ray Train (TorchTrainer, 1 worker); 16 tokens per instance
    sam_report = train_tokenizer("sam_instance", str(out), sam_ck, preset="tiny", steps=40, workers=1,
                                 cpus_per_worker=1, show_progress=False)
    # the pose tokenizer through the CLI, in this process (8 tokens per person)
    res = CliRunner().invoke(main, ["train-tokenizer", "--modality", "human_poses", "--data", str(out), "--out",
                                    pose_ck, "--preset", "tiny", "--steps", "40", "--in-process", "--no-progress"])
    assert res.exit_code == 0, res.output
    pose_report = json.loads(open(os.path.join(pose_ck, "report.json")).read())
    return {"out": out, "dir": d, "sam_ck": sam_ck, "pose_ck": pose_ck, "sam_report": sam_report,
            "pose_report": pose_report, "raw_poses": dict(decoded(out, "human_poses")), "job": job}


def test_tokenizers_train_on_every_instance_and_person(work):
    out, sam, pose = work["out"], work["sam_report"], work["pose_report"]
    n_inst = sum(len(v["instances"]) for _, v in decoded(out, "sam_mask"))
    n_people = sum(len(body_poses(v)) for v in work["raw_poses"].values())
    assert n_inst >= 5 and n_people >= 2, (n_inst, n_people)
    assert sam["modality"] == "sam_instance" and sam["steps"] == 40 and sam["workers"] == 1
    assert sam["held_out"]["items"] >= 1 and 0 < sam["after"]["codes_used"] <= 256
    for k in ("mse", "iou"):
        assert k in sam["after"] and k in sam["before"] and k in sam["baseline"]
    assert sam["after"]["mse"] < sam["before"]["mse"]  # 40 steps on the masks of 4 photos improve on random init
    assert os.path.getsize(sam["picture"]) > 0  # originals beside reconstructions (64x64 in-box masks)
    cfg = json.loads(open(os.path.join(work["sam_ck"], "config.json")).read())
    assert cfg["modalmill"]["modality"] == "sam_instance" and cfg["modalmill"]["n_tokens"] == 16
    assert cfg["image_size"] == 64 and cfg["n_channels"] == 1 and cfg["out_conv"] is True  # 4M's SAM tokenizer
    assert pose["modality"] == "human_poses" and pose["steps"] == 40 and "picture" not in pose
    assert pose["after"]["mse"] < pose["before"]["mse"]
    cfg = json.loads(open(os.path.join(work["pose_ck"], "config.json")).read())
    assert cfg["modalmill"]["n_tokens"] == 8 and cfg["n_channels"] == 207 and cfg["quant_type"] == "memcodes"
    assert cfg["num_codebooks"] == 8 and cfg["enc_type"].startswith("BottleneckMLP/")
    # resume: the same command continues from the saved state (already at its last step: nothing to train)
    again = train_tokenizer("sam_instance", str(out), work["sam_ck"], preset="tiny", steps=40, use_ray=False,
                            show_progress=False)
    assert again["steps"] == 40 and again["history"] == sam["history"]


def test_tokenize_writes_4m_files_aligned_recorded_idempotent_and_deterministic(work):
    out = work["out"]
    tokenizers = {"sam_instance": work["sam_ck"], "human_poses": work["pose_ck"]}
    before = {m: (out / m / f"{SHARD}.tar").read_bytes() for m in ("rgb", "crop_settings", "sam_mask", "det")}
    s = tokenize_output(str(out), ["sam_instance", "human_poses"], tokenizers, show_progress=False)
    assert s["exit_code"] == EXIT_OK and s["shards_failed"] == 0 and s["samples_dropped"] == 0, s
    assert all((out / m / f"{SHARD}.tar").read_bytes() == b for m, b in before.items())  # inputs untouched

    keys = [k for k, _ in decoded(out, "rgb")]
    crops = dict(decoded(out, "crop_settings"))
    rgb = dict(decoded(out, "rgb"))
    sam_mask = dict(decoded(out, "sam_mask"))
    sam_model, _ = load_tokenizer(work["sam_ck"], "cpu")
    pose_model, _ = load_tokenizer(work["pose_ck"], "cpu")
    from modalmill.tokenize.fourm_inputs import fourm_input_for

    adapter = fourm_input_for("sam_instance", sam_model)

    sam_instance = decoded(out, "sam_instance")
    assert [k for k, _ in sam_instance] == keys  # aligned with every other modality
    total = 0
    for key, value in sam_instance:
        assert value.dtype == object and value.shape == (len(crops[key]),)  # one entry per crop
        for crop, entry in zip(crops[key], value):
            ids, bbox, points = entry["token_ids"], entry["bbox"], entry["points"]
            n = len(points)
            assert ids.dtype == np.int16 and ids.shape == (n, 16) and bbox.dtype == np.int32 and bbox.shape == (n, 4)
            assert (ids >= 0).all() and (ids < sam_model.quantizer.codebook_size).all()
            for contours, (ymin, xmin, ymax, xmax) in zip(points, bbox):
                allp = np.concatenate([c.reshape(-1, 2) for c in contours])
                assert all(c.dtype == np.int32 and c.ndim == 3 and c.shape[1:] == (1, 2) for c in contours)
                assert allp.min() >= 0 and allp.max() <= 223  # in the 224 crop
                assert [allp[:, 1].min(), allp[:, 0].min(), allp[:, 1].max(), allp[:, 0].max()] == \
                    [ymin, xmin, ymax, xmax]
                assert (ymax - ymin) * (xmax - xmin) >= MIN_BOX_FRACTION * 224 * 224
            # the ids are the tokenizer's encoding of exactly these instances of this crop
            insts = crop_instances(sam_mask[key], crop, rgb[key].shape[:2])
            assert [i["bbox"].tolist() for i in insts] == bbox.tolist()
            if n:
                with torch.inference_mode():
                    x = torch.stack([adapter.prepare(i["mask"]) for i in insts])  # 0/1 masks, as 4M
                    np.testing.assert_array_equal(sam_model.encode_ids(x).numpy(), ids)
            total += n
    assert total > 0

    people = 0
    for key, value in decoded(out, "human_poses"):
        raw = work["raw_poses"][key]
        if not raw:
            assert value == []
            continue
        tokens = value.pop("pose_tokenized")
        assert value == raw  # everything else as HMR 2.0 stored it
        assert len(tokens) == len(raw["bbox_xyxy"]) and all(len(t) == 8 for t in tokens)
        with torch.inference_mode():
            direct = pose_model.encode_ids(torch.from_numpy(np.stack(body_poses(raw)))[:, :, None, None]).numpy()
        assert tokens == direct.tolist() and 0 <= direct.min() and direct.max() < pose_model.quantizer.codebook_size
        people += len(tokens)
    assert people > 0

    marker = manifest.read_marker(str(out), SHARD)
    assert marker["keys"] == keys
    for m, name, ck in (("sam_instance", "tok_sam_instance", work["sam_ck"]),
                        ("human_poses", "tok_human_poses", work["pose_ck"])):
        p = marker["modalities"][m]
        assert p["labeler"] == name and p["checkpoint"] == checkpoint_hash(ck), p
    rows = manifest.read_manifest(str(out)).to_pylist()
    assert all("sam_instance" in r["modalities"] for r in rows if r["status"] == "ok")
    report = check_output(str(out))
    assert report.ok, [v.line() for v in report.violations]

    # rerun: nothing to do, nothing rewritten
    written = {m: (out / m / f"{SHARD}.tar").read_bytes() for m in ("sam_instance", "human_poses")}
    again = tokenize_output(str(out), ["sam_instance", "human_poses"], tokenizers, show_progress=False)
    assert again["shards_processed"] == 0 and again["shards_skipped"] == 2, again
    assert {m: (out / m / f"{SHARD}.tar").read_bytes() for m in written} == written

    # the labeling job that made human_poses still finds it done: pose tokens refine HMR 2.0's output in place
    marker = manifest.read_marker(str(out), SHARD)
    assert marker["modalities"]["human_poses"]["labeler"] == "tok_human_poses"
    assert marker["modalities"]["human_poses"]["refines"]["labeler"] == "hmr2"
    relabel = run_job(job_from_dict(work["job"]), show_progress=False)
    assert relabel["exit_code"] == EXIT_OK and relabel["shards_processed"] == 0, relabel
    assert {m: (out / m / f"{SHARD}.tar").read_bytes() for m in written} == written

    # another pose checkpoint: the poses were tokenized with a different one, so it asks for --force
    other = str(work["dir"] / "tok-pose-2")
    train_tokenizer("human_poses", str(out), other, preset="tiny", steps=3, use_ray=False, show_progress=False,
                    config={"train": {"seed": 1}})
    with pytest.raises(JobError, match="--force"):
        tokenize_output(str(out), ["human_poses"], {"human_poses": other}, show_progress=False)


def test_cli_tokenize_recomputes_byte_identical_files(work):
    """`modalmill tokenize --force` on a copy of the output recomputes both files: the same bytes."""
    copy = work["dir"] / "copy"
    shutil.copytree(work["out"], copy)
    name = f"{SHARD}.tar"
    (copy / "sam_instance" / name).write_bytes(b"")  # clobbered: must be rewritten, not kept
    res = CliRunner().invoke(main, ["tokenize", "--data", str(copy), "--modalities", "sam_instance,human_poses",
                                    "--tokenizer", f"sam_instance={work['sam_ck']}", "--tokenizer",
                                    f"human_poses={work['pose_ck']}", "--force", "--no-progress"])
    assert res.exit_code == 0, res.output
    for m in ("sam_instance", "human_poses"):
        assert (copy / m / name).read_bytes() == (work["out"] / m / name).read_bytes(), m
    assert check_output(str(copy)).ok


def test_text_of_real_outputs_uses_4m_layouts(work):
    """The tokenized files serialise as 4M-21's transforms write them (value tokens all inside the vocabulary)."""
    out = work["out"]
    rgb = dict(decoded(out, "rgb"))
    crops = dict(decoded(out, "crop_settings"))
    for _key, value in decoded(out, "sam_instance"):
        for entry in value:
            text = sam_instance_to_text(entry, rng=random.Random(0))
            words = text.split()
            assert 1 <= words.count("point") <= 7  # 4M's 7 random query points (duplicates merge)
            assert all(0 <= int(v) <= 999 for v in VALUE.findall(text))
            assert words.count("polygon") + words.count("none") >= words.count("point")
    for key, value in decoded(out, "human_poses"):
        h, w = rgb[key].shape[:2]
        for crop in crops[key]:
            text = human_poses_to_text(value, (w, h), crop=crop, image_hw=(h, w), rng=random.Random(1))
            if text == "none":
                continue
            words = text.split()
            humans = words.count("human")
            assert humans >= 1 and len(words) == humans * (5 + 9 + 10 + 4 + 11)
            assert all(0 <= int(v) <= 999 for v in VALUE.findall(text))


def test_load_dataset_gives_sam_instance_token_ids_in_4m_layout(work):
    """A trainer reads the real ``sam_instance`` file through ``load_dataset`` with a small WordPiece vocabulary
    trained on this output's own serialised labels: the ids of crop 0 spell 4M-21's sequence for that entry."""
    import modalmill
    from modalmill.tokenize.text_tokenizer import det_to_text, fixed_tokens, train_text_tokenizer

    out = work["out"]
    if not (out / "sam_instance" / f"{SHARD}.tar").exists():  # this test run alone
        tokenize_output(str(out), ["sam_instance"], {"sam_instance": work["sam_ck"]}, show_progress=False)
    texts = [det_to_text(v, threshold=0.0) for _, v in decoded(out, "det")]
    texts += [sam_instance_to_text(e) for _, v in decoded(out, "sam_instance") for e in v]
    tok = train_text_tokenizer(texts, vocab_size=len(fixed_tokens()) + 256)  # room for every word of these texts
    vocab, eos = tok.get_vocab_size(), tok.token_to_id("[EOS]")
    ds = modalmill.load_dataset(str(out), ["sam_instance", "det"], text_tokenizer=tok, crop=0, shuffle_shards=False)
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [k for k, _ in decoded(out, "rgb")]
    polygons = 0
    for s in samples:
        assert s["__crop__"] == 0
        for m in ("sam_instance", "det"):
            ids = s[m]
            assert ids.dtype == torch.long and ids.ndim == 1 and 0 <= int(ids.min()) and int(ids.max()) < vocab
            assert int(ids[-1]) == eos and tok.token_to_id("[UNK]") not in ids.tolist()
        entry, text = s["sam_instance.raw"][0], s["sam_instance.text"]  # crop 0's entry of the stored file
        words = text.split()
        assert [tok.id_to_token(i) for i in s["sam_instance"].tolist()] == words + ["[EOS]"]  # one id per word
        boxes = {(int(b[1]), int(b[0]), int(b[3]), int(b[2])): row.tolist()  # xmin, ymin, xmax, ymax -> ids
                 for b, row in zip(entry["bbox"], entry["token_ids"])}
        # point v0=<y> v1=<x>, then "none" or per containing instance: polygon v0=xmin v1=ymin v2=xmax v3=ymax + 16 ids
        i, points = 0, 0
        while i < len(words):
            assert words[i] == "point" and re.fullmatch(r"v0=\d+", words[i + 1]) and \
                re.fullmatch(r"v1=\d+", words[i + 2]), words[i:i + 3]
            assert all(0 <= int(w.split("=")[1]) <= 223 for w in words[i + 1:i + 3])
            points, i = points + 1, i + 3
            if words[i] == "none":
                i += 1
                continue
            assert words[i] == "polygon"
            while i < len(words) and words[i] == "polygon":
                box = tuple(int(w.split("=")[1]) for w in words[i + 1:i + 5])
                assert [w.split("=")[0] for w in words[i + 1:i + 5]] == ["v0", "v1", "v2", "v3"]
                ids16 = [int(w[3:]) + (512 if w.startswith("v1=") else 0) for w in words[i + 5:i + 21]]
                assert all(w[:3] in ("v0=", "v1=") for w in words[i + 5:i + 21])
                assert box in boxes and ids16 == boxes[box], (box, sorted(boxes))
                polygons, i = polygons + 1, i + 21
        assert 1 <= points <= 7  # 4M's 7 random query points (duplicates merge)
    assert polygons > 0  # some query point fell inside an instance


# ---------------------------------------------------------------------- pieces without Ray


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _inst(poly, extra=()):
    pts = np.array(poly + [p for q in extra for p in q])
    return {"polygons": [poly, *extra], "bbox_xyxy": [int(pts[:, 0].min()), int(pts[:, 1].min()),
                                                     int(pts[:, 0].max()), int(pts[:, 1].max())],
            "area": 100, "predicted_iou": 0.9, "stability_score": 0.9}


def test_instances_cut_to_a_crop():
    rec = {"height": 100, "width": 200, "instances": [
        _inst(_square(10, 10, 59, 49)),                             # inside the left crop
        _inst(_square(120, 50, 199, 99), [_square(0, 95, 3, 99)]),  # a part in each half
        _inst(_square(150, 0, 151, 1)),                             # tiny: its box is under 0.0005 of the crop
    ]}
    get_modality("sam_mask").encode(rec, "k")
    crop = [0, 0, 100, 100, 0]  # 100x100 -> 224x224: 2.24 px per px
    insts = crop_instances(rec, crop, (100, 200))
    assert len(insts) == 2 and len(insts[1]["contours"]) == 1  # only the small part of the second is left
    assert insts[1]["bbox"].tolist()[1] <= 1 and insts[1]["bbox"].tolist()[3] <= 4 * 2.24 + 1
    ymin, xmin, ymax, xmax = insts[0]["bbox"].tolist()
    def to_crop(v):  # pixel centres map to pixel centres
        return (v + 0.5) * 2.24 - 0.5

    assert [ymin, xmin, ymax, xmax] == pytest.approx([to_crop(10), to_crop(10), to_crop(49), to_crop(59)], abs=1)
    assert insts[0]["mask"].shape == (64, 64) and insts[0]["mask"].mean() > 0.95  # a box fills its own box
    flipped = crop_instances(rec, [0, 0, 100, 100, 1], (100, 200))
    fy0, fx0, fy1, fx1 = flipped[0]["bbox"].tolist()
    assert (fy0, fy1) == (ymin, ymax) and (fx0, fx1) == (223 - xmax, 223 - xmin)
    right = crop_instances(rec, [0, 100, 100, 100, 0], (100, 200))
    assert len(right) == 1 and len(right[0]["contours"]) == 1  # the tiny one dropped, the part at x 0..3 cut away
    assert right[0]["bbox"].tolist()[1] == pytest.approx(to_crop(20), abs=1)
    whole = crop_instances(rec, [0, 0, 100, 200, 0], (100, 200))  # non-square crop: x scaled by 224/200
    assert len(whole) == 2 and len(whole[1]["contours"]) == 2  # both parts, largest first
    with pytest.raises(ValueError, match="stored rgb"):
        crop_instances(rec, crop, (100, 150))
    with pytest.raises(ValueError, match="outside"):
        crop_instances(rec, [0, 150, 100, 100, 0], (100, 200))


def test_sam_instance_codec_validates_and_never_runs_pickled_code():
    spec = get_modality("sam_instance")
    contour = np.array(_square(1, 2, 30, 40), np.int32).reshape(-1, 1, 2)
    entry = {"points": [[contour]], "token_ids": np.full((1, 16), 7, np.int16), "bbox": np.array([[2, 1, 40, 30]],
                                                                                                 np.int32)}
    value = np.empty(2, dtype=object)
    value[0] = entry
    value[1] = {"points": [], "token_ids": np.zeros((0, 16), np.int16), "bbox": np.zeros((0, 4), np.int32)}
    data = spec.encode(value, "k")
    assert data == spec.encode(value, "k")
    back = spec.decode(data)
    assert back.shape == (2,) and back[0]["token_ids"].tolist() == [[7] * 16] and back[1]["points"] == []
    np.testing.assert_array_equal(back[0]["points"][0][0], contour)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    import io

    evil = np.empty(1, dtype=object)
    evil[0] = Payload()
    buf = io.BytesIO()
    np.save(buf, evil, allow_pickle=True)
    with pytest.raises(Exception, match="refusing to load"):
        spec.decode(buf.getvalue())
    for bad, field in (({**entry, "token_ids": np.full((1, 16), 1024)}, "token_ids"),
                       ({**entry, "bbox": np.zeros((2, 4))}, "bbox"),
                       ({**entry, "points": [[]]}, "points"),
                       ({"points": [[contour]]}, r"\[0\]")):
        arr = np.empty(1, dtype=object)
        arr[0] = bad
        with pytest.raises(RecordError, match=field):
            spec.encode(arr, "k")
