"""Bring your own labels: `modalmill import` (COCO / YOLO boxes, class-index masks, depth, captions) aligned with
the output, tokenized with a 4M tokenizer (ids equal ml-4m's own), and `modalmill export` to ml-4m's folder layout.

The photos are real (scikit-image), stored at fixed small sizes; the boxes and masks are hand-made, so the
expected det JSON is computed by hand below. tests/fixtures/own_labels/ (masks + ml-4m's token ids) was made by
scripts/make_own_labels_fixtures.py with apple/ml-4m's code.
"""

import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from modalmill.cli import main
from modalmill.io import manifest
from modalmill.jobs.check import check_output
from modalmill.jobs.democorpus import photos
from modalmill.jobs.export import export_folder
from modalmill.jobs.importer import ImportError_, import_annotations
from modalmill.jobs.runner import EXIT_OK, EXIT_SAMPLES_FAILED, run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.labelers.base import LabelInput
from modalmill.labelers.imported import ImportSemseg

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
OWN = os.path.join(FIX, "own_labels")
# (width, height) each photo is stored at; rocket is never annotated (the partially annotated set)
SIZES = {"astronaut": (160, 160), "chelsea": (192, 128), "coffee": (200, 100), "rocket": (120, 160)}
SHARD = "shard-00000"


def tar_members(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def tar_keys(path):
    return [n.split(".", 1)[0] for n, _ in tar_members(path)]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, ray_local):
    """An output of the four photos (rgb + 2 crops each), labelled once from an image folder."""
    tmp = tmp_path_factory.mktemp("own")
    src = tmp / "images"
    src.mkdir()
    pics = photos()
    for p, (w, h) in SIZES.items():
        Image.fromarray(pics[p]).resize((w, h), Image.BILINEAR).save(src / f"{p}.png")
    out = str(tmp / "out")
    spec = {"input": str(src), "output": out, "modalities": ["rgb", "crop_settings"], "batch_size": 4,
            "crops": {"n_crops": 2}}
    assert run_job(job_from_dict(spec), show_progress=False)["exit_code"] == EXIT_OK
    return out


@pytest.fixture
def out(labelled, tmp_path):
    """A fresh copy of the labelled output for one test."""
    dst = str(tmp_path / "out")
    shutil.copytree(labelled, dst)
    return dst


def write_coco(path):
    cats = [{"id": 1, "name": "person"}, {"id": 7, "name": "kitty"}, {"id": 9, "name": "saucer"}]
    images = [{"id": 10, "file_name": "astronaut.png", "width": 160, "height": 160},
              {"id": 11, "file_name": "chelsea.png", "width": 192, "height": 128},
              {"id": 12, "file_name": "coffee.png", "width": 200, "height": 100}]
    anns = [{"id": 1, "image_id": 10, "category_id": 1, "bbox": [40, 10, 60, 70], "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 7, "bbox": [30, 20, 120, 90], "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 1, "bbox": [0, 0, 50, 50], "iscrowd": 1},
            {"id": 4, "image_id": 12, "category_id": 9, "bbox": [60, 10, 80, 80], "iscrowd": 0}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(path)


# by hand: COCO bbox (x, y, w, h) in pixels -> (x / W, y / H, (x + w) / W, (y + h) / H), score 1
COCO_EXPECTED = {
    "astronaut": [{"boxes": [40 / 160, 10 / 160, 100 / 160, 80 / 160], "class_name": "person", "score": 1.0}],
    "chelsea": [{"boxes": [30 / 192, 20 / 128, 150 / 192, 110 / 128], "class_name": "cat", "score": 1.0}],
    "coffee": [{"boxes": [60 / 200, 10 / 100, 140 / 200, 90 / 100], "class_name": "saucer", "score": 1.0}],
}


def read_det(out):
    members = tar_members(os.path.join(out, "det", f"{SHARD}.tar"))
    return {n.split(".")[0]: json.loads(b)["instances"] for n, b in members}


def assert_dets(got, expected):
    assert sorted(got) == sorted(expected)
    for k, insts in expected.items():
        assert [(i["class_name"], i["score"]) for i in got[k]] == [(i["class_name"], i["score"]) for i in insts], k
        for a, b in zip(got[k], insts):
            np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-9, err_msg=k)


def test_coco_partially_annotated_set_stays_aligned(out, tmp_path):
    coco = write_coco(tmp_path / "instances.json")
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"kitty": "cat"}))
    # default --missing fail: rocket has no annotation -> refused, nothing written
    with pytest.raises(ImportError_, match=r"1 of 4 samples have no annotation.*rocket"):
        import_annotations(out, "det", coco, class_map=str(cmap), show_progress=False)
    assert not os.path.exists(os.path.join(out, "det"))
    # through the CLI, with --missing drop
    r = CliRunner().invoke(main, ["import", out, "--modality", "det", "--from", coco, "--class-map", str(cmap),
                                  "--missing", "drop", "--no-progress"])
    assert r.exit_code == EXIT_SAMPLES_FAILED, r.output  # a sample was dropped: exit 3, as for any failed sample
    assert "3 of 4 samples annotated, 1 without annotation" in r.output
    assert "not a 4M (COCO) class: 'saucer' (1 instances" in r.output
    assert "1 COCO crowd region(s) left out" in r.output
    assert_dets(read_det(out), COCO_EXPECTED)
    keys = [tar_keys(os.path.join(out, m, f"{SHARD}.tar")) for m in ("rgb", "crop_settings", "det")]
    assert keys[0] == keys[1] == keys[2] == ["astronaut", "chelsea", "coffee"]
    rows = {r.key: r for r in manifest.read_rows(out, SHARD)}
    assert rows["rocket"].status == "failed" and rows["rocket"].stage == "label:import_det"
    assert rows["rocket"].error.startswith("no_annotation")
    assert "det" in rows["astronaut"].modalities
    marker = manifest.read_marker(out, SHARD)
    assert marker["keys"] == keys[0]
    det = marker["modalities"]["det"]
    import hashlib
    digest = hashlib.sha256(open(coco, "rb").read()).hexdigest()
    assert det["provenance"] == "imported" and det["source_digest"] == f"sha256:{digest}"
    assert det["labeler"] == "import_det"
    report = check_output(out)
    assert report.ok, report.violations


def write_yolo(root):
    root.mkdir()
    (root / "classes.txt").write_text("person\ncat\nwidget\n")
    (root / "astronaut.txt").write_text("0 0.5 0.5 0.25 0.5\n")
    (root / "chelsea.txt").write_text("1 0.25 0.75 0.5 0.5\n2 0.9 0.1 0.2 0.2\n")
    (root / "coffee.txt").write_text("")  # annotated, no objects
    return str(root)


def test_yolo_by_file_name(out, tmp_path):
    yolo = write_yolo(tmp_path / "labels")
    s = import_annotations(out, "det", yolo, match="filename", missing="drop", show_progress=False)
    assert s["import"]["unmapped_classes"] == {"widget": 1} and s["import"]["format"] == "yolo"
    # by hand: (cx, cy, w, h) -> (cx - w/2, cy - h/2, cx + w/2, cy + h/2); widget's box clipped at 1
    expected = {"astronaut": [{"boxes": [0.375, 0.25, 0.625, 0.75], "class_name": "person", "score": 1.0}],
                "chelsea": [{"boxes": [0.0, 0.5, 0.5, 1.0], "class_name": "cat", "score": 1.0},
                            {"boxes": [0.8, 0.0, 1.0, 0.2], "class_name": "widget", "score": 1.0}],
                "coffee": []}
    assert_dets(read_det(out), expected)
    assert check_output(out).ok


def read_semseg(out):
    return {n.split(".")[0]: np.array(Image.open(__import__("io").BytesIO(b)))
            for n, b in tar_members(os.path.join(out, "semseg_coco", f"{SHARD}.tar"))}


def write_panoptic(tmp_path, masks):
    """COCO panoptic: per image a PNG whose RGB is the segment id (R + 256 G + 65536 B, 0 = void) and the
    segments' categories by name, made from the class-index masks."""
    from modalmill.labelers.semseg import COCO_PANOPTIC_CLASSES

    png_dir = tmp_path / "panoptic_val"
    png_dir.mkdir()
    cats = [{"id": 1000 + i, "name": n} for i, n in enumerate(COCO_PANOPTIC_CLASSES)]
    images, anns = [], []
    for i, f in enumerate(sorted(os.listdir(masks))):
        ids = np.array(Image.open(os.path.join(masks, f)))
        seg = np.zeros(ids.shape, np.int64)
        infos = []
        for j, cid in enumerate(sorted(set(np.unique(ids).tolist()) - {255})):
            sid = 70000 + 300 * j + i  # uses all three channels
            seg[ids == cid] = sid
            infos.append({"id": sid, "category_id": 1000 + cid})
        rgb = np.stack([seg % 256, seg // 256 % 256, seg // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(png_dir / f"{i:04d}.png")
        images.append({"id": i, "file_name": f.replace(".png", ".jpg"), "width": ids.shape[1], "height": ids.shape[0]})
        anns.append({"image_id": i, "file_name": f"{i:04d}.png", "segments_info": infos})
    (tmp_path / "panoptic_val.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                            "categories": cats}))
    return str(tmp_path / "panoptic_val.json")


def test_semseg_ids_survive_import_and_4m_tokenization(out, tmp_path):
    from modalmill.jobs.tokenize_output import tokenize_output

    masks = os.path.join(OWN, "semseg")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(masks):
        arr = np.array(Image.open(os.path.join(masks, f)))
        if f == "chelsea.png":
            arr[0, 0] = 140  # not a COCO-panoptic class (0..132, 255)
        Image.fromarray(arr).save(bad / f)
    with pytest.raises(ImportError_, match=r"chelsea\.png: class id\(s\) \[140\] outside 4M's semseg classes"):
        import_annotations(out, "semseg_coco", str(bad), missing="drop", show_progress=False)
    assert not os.path.exists(os.path.join(out, "semseg_coco"))

    # the same masks as COCO panoptic (RGB segment ids + categories by name), then as class-index PNGs
    s = import_annotations(out, "semseg_coco", write_panoptic(tmp_path, masks), missing="drop", show_progress=False)
    assert s["import"]["format"] == "coco" and s["import"]["matched"] == 3
    for k, arr in read_semseg(out).items():
        np.testing.assert_array_equal(arr, np.array(Image.open(os.path.join(masks, f"{k}.png"))), err_msg=k)
    s = import_annotations(out, "semseg_coco", masks, missing="drop", force=True, show_progress=False)
    assert s["import"]["matched"] == 3
    for k, arr in read_semseg(out).items():  # the ids are exactly the mask's: nothing rescaled or interpolated
        np.testing.assert_array_equal(arr, np.array(Image.open(os.path.join(masks, f"{k}.png"))))
    tokenize_output(out, ["semseg_coco"], {"semseg_coco": os.path.join(FIX, "ml4m_tokenizers", "semseg")},
                    device="cpu", show_progress=False)
    ref = np.load(os.path.join(OWN, "semseg_ids.npz"))
    crops = {n.split(".")[0]: np.load(__import__("io").BytesIO(b))
             for n, b in tar_members(os.path.join(out, "crop_settings", f"{SHARD}.tar"))}
    toks = {n.split(".")[0]: np.load(__import__("io").BytesIO(b))
            for n, b in tar_members(os.path.join(out, "tok_semseg@224", f"{SHARD}.tar"))}
    assert sorted(toks) == ["astronaut", "chelsea", "coffee"]
    for k in toks:
        np.testing.assert_array_equal(crops[k][0], ref[f"{k}/crop"])  # crop 0: the centre crop ml-4m used
        np.testing.assert_array_equal(toks[k][0], ref[f"{k}/ids"][0], err_msg=k)
    assert check_output(out).ok
    s = export_folder(out, str(tmp_path / "tokens"), tokens_only=True, show_progress=False)
    assert s["modalities"] == ["crop_settings", "tok_semseg@224"]  # no pictures; the crop rows the tokens use
    assert sorted(os.listdir(tmp_path / "tokens" / "tok_semseg@224" / SHARD)) == [
        "astronaut.npy", "chelsea.npy", "coffee.npy"]


def test_semseg_at_original_size_is_resized_nearest():
    mask = np.array(Image.open(os.path.join(OWN, "semseg", "astronaut.png")))  # 160 x 160
    lab = ImportSemseg({"index": "unused", "digest": "x"})
    lab.class_map = None
    inp = LabelInput(key="astronaut", image=np.zeros((100, 100, 3), np.uint8), original_size=(160, 160),
                     crops=np.zeros((1, 5), np.int64))
    got = lab.value(os.path.join(OWN, "semseg", "astronaut.png"), inp)
    assert got.shape == (100, 100) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.array(Image.fromarray(mask).resize((100, 100), Image.NEAREST)))
    assert set(np.unique(got)) <= set(np.unique(mask))  # no new ids from interpolation
    inp.original_size = (150, 150)  # neither size: refused, per sample
    with pytest.raises(Exception, match="annotation_size"):
        lab.value(os.path.join(OWN, "semseg", "astronaut.png"), inp)


def truncated_standardization(d, thresh=0.1):
    """4M's DepthTransform.truncated_depth_standardization restated in numpy (mean/std of the middle 80%)."""
    s = np.sort(d.reshape(-1))
    s = s[int(thresh * s.size): int((1 - thresh) * s.size)]
    return (d - s.mean()) / np.sqrt(s.var(ddof=1) + 1e-6)


def test_depth_units_converted_as_documented(out, tmp_path):
    metres = {}
    for p, (w, h) in SIZES.items():
        yy, xx = np.mgrid[0:h, 0:w]
        metres[p] = 1.0 + 9.0 * (yy / h) + 0.5 * np.sin(xx / 7.0) + (1.0 if p == "chelsea" else 0.0)
    srcs = {}
    for units in ("metres", "disparity", "mm_png"):
        d = tmp_path / f"depth-{units}"
        d.mkdir()
        for p, m in metres.items():
            if units == "metres":
                np.save(d / f"{p}.npy", m.astype(np.float32))
            elif units == "disparity":
                np.save(d / f"{p}.npy", (0.54 * 720.0 / m).astype(np.float32))  # baseline x focal / depth
            else:
                Image.fromarray(np.round(m * 1000).astype(np.uint16)).save(d / f"{p}.png")
        srcs[units] = str(d)
    stored = {}
    for units, src in srcs.items():  # each import replaces the last one (another source: --force)
        kw = {"units": "disparity"} if units == "disparity" else {"png_scale": 0.001} if units == "mm_png" else {}
        if units == "disparity":  # another source over an existing import: refused without --force
            with pytest.raises(Exception, match="force"):
                import_annotations(out, "depth", src, show_progress=False, **kw)
        import_annotations(out, "depth", src, show_progress=False, force=units != "metres", **kw)
        stored[units] = {n.split(".")[0]: np.array(Image.open(__import__("io").BytesIO(b)))
                         for n, b in tar_members(os.path.join(out, "depth", f"{SHARD}.tar"))}
        assert check_output(out).ok
    for p, m in metres.items():
        a = stored["metres"][p]
        assert a.dtype == np.uint16 and a.min() == 0 and a.max() == 65535  # larger = farther, min/max to 0..65535
        # what 4M's depth transform makes of it (PNG / 65535, then truncated standardization) is the standardised
        # metric depth: only depth up to an affine map reaches the tokenizer
        np.testing.assert_allclose(truncated_standardization(a / 65535.0), truncated_standardization(m), atol=2e-3)
        # disparity is inverted (not rescaled): the same stored depth, to float32 rounding (2 levels)
        assert np.abs(stored["disparity"][p].astype(int) - a.astype(int)).max() <= 2
        # millimetre PNGs scaled by png_scale: the same, to the PNG's own rounding (0.5 mm at the pixel and up to
        # 0.5 mm at the min/max that set the scale) + 1 level
        mm_levels = 1e-3 / (m.max() - m.min()) * 65535 + 1
        assert np.abs(stored["mm_png"][p].astype(int) - a.astype(int)).max() <= mm_levels


def test_captions_by_key_and_export_folder_layout(out, tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text("key,caption\nastronaut,an astronaut\nchelsea,a cat\ncoffee,a cup of coffee\n"
                     "rocket,a rocket on its pad\n")
    import_annotations(out, "caption", str(table), show_progress=False)
    import_annotations(out, "det", write_coco(tmp_path / "i.json"), missing="drop", show_progress=False)
    dest = tmp_path / "export"
    r = CliRunner().invoke(main, ["export", out, str(dest), "--split", "train", "--no-progress"])
    assert r.exit_code == 0, r.output
    root = dest / "train"
    mods = ["caption", "crop_settings", "det", "rgb"]
    assert sorted(p for p in os.listdir(root) if (root / p).is_dir()) == mods
    names = {m: sorted(os.listdir(root / m / SHARD)) for m in mods}
    stems = {m: [n.split(".")[0] for n in v] for m, v in names.items()}
    assert all(s == ["astronaut", "chelsea", "coffee"] for s in stems.values()), stems
    assert names["det"][0] == "astronaut.json" and names["crop_settings"][0] == "astronaut.npy"
    caps = json.loads((root / "caption" / SHARD / "chelsea.json").read_text())
    assert caps == ["a cat", "a cat"]  # one entry per crop row, as 4M's aligned captions need
    members = dict(tar_members(os.path.join(out, "rgb", f"{SHARD}.tar")))
    assert (root / "rgb" / SHARD / names["rgb"][0]).read_bytes() == members[names["rgb"][0]]
    with pytest.raises(ValueError, match="already holds files"):
        export_folder(out, str(dest), split="train", show_progress=False)
    with pytest.raises(ValueError, match="no token modality"):
        export_folder(out, str(tmp_path / "e2"), tokens_only=True, show_progress=False)


def test_normals_and_inverse_depth_conversions(tmp_path):
    from modalmill.labelers.imported import ImportDepth, ImportNormal

    inp = LabelInput(key="k", image=np.zeros((4, 6, 3), np.uint8), original_size=(6, 4), crops=np.zeros((1, 5)))
    n = np.zeros((4, 6, 3), np.float32)
    n[..., 0], n[..., 1], n[..., 2] = -1.0, 0.0, 1.0
    np.save(tmp_path / "n.npy", n)
    got = ImportNormal({"index": "x"}).value(str(tmp_path / "n.npy"), inp)
    assert got.dtype == np.uint8 and got[0, 0].tolist() == [0, 128, 255]  # round((n + 1) * 127.5)
    depth = np.linspace(1.0, 4.0, 24).reshape(4, 6)
    depth[0, 0] = np.nan  # a hole: becomes the farthest valid depth
    np.save(tmp_path / "inv.npy", 1.0 / depth)
    got = ImportDepth({"index": "x", "units": "inverse_depth"}).value(str(tmp_path / "inv.npy"), inp)
    want = np.where(np.isnan(depth), 4.0, depth)
    lo = np.nanmin(depth)  # the hole was the nearest pixel: the valid minimum is the next one
    np.testing.assert_allclose(got, np.round((want - lo) / (4.0 - lo) * 65535), atol=1)
    np.save(tmp_path / "zero.npy", np.zeros((4, 6)))
    with pytest.raises(Exception, match="invalid_depth"):
        ImportDepth({"index": "x"}).value(str(tmp_path / "zero.npy"), inp)


def test_matching_by_file_name_and_source_url():
    from modalmill.jobs.importer import match_entries

    samples = [("a/cat_1", "https://x.org/img/cat_1.jpg?s=2"), ("b/dog", "https://x.org/dog.png"), ("c/cow", None)]
    keyed, unmatched = match_entries(["cat_1.jpg", "dog.png", "emu.png"], samples, "filename")
    assert keyed == {"a/cat_1": "cat_1.jpg", "b/dog": "dog.png"} and unmatched == ["emu.png"]
    keyed, _ = match_entries(["https://x.org/dog.png", "cat_1.jpg"], samples, "source_url")
    assert keyed == {"b/dog": "https://x.org/dog.png", "a/cat_1": "cat_1.jpg"}
    keyed, _ = match_entries(["a/cat_1.png", "c/cow.json"], samples, "key")
    assert keyed == {"a/cat_1": "a/cat_1.png", "c/cow": "c/cow.json"}
    with pytest.raises(ImportError_, match="matches 2 samples"):
        match_entries(["dog.png"], samples + [("z/dog", None)], "filename")
    with pytest.raises(ImportError_, match="both match sample"):
        match_entries(["a/cat_1.png", "a/cat_1.jpg"], samples, "key")
