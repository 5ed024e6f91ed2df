"""The rapidocr labeler: real PP-OCRv6 weights bundled in the rapidocr wheel (a modalmill dependency), on real
photos (scikit-image's scanned page and photos without text), in-process and inside the Ray pipeline."""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile

import numpy as np
import pytest

from modalmill.jobs.democorpus import jpeg_bytes, photos, write_shard
from modalmill.jobs.runner import EXIT_OK, run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.labelers import LabelFailure, LabelInput, get_labeler
from modalmill.labelers.model import ModelLabeler
from modalmill.labelers.ocr import rapidocr_model_files
from modalmill.io.fetch import WeightsError
from modalmill.io.hashes import files_hash
from modalmill.io import manifest
from modalmill.jobs.check import check_output
from modalmill.schemas import RecordError, get_modality

# the first lines of scikit-image's `page` (a scanned page of its own documentation)
PAGE_LINES = ["Region-based segmentation", "Let us first determine markers of the coins and the"]


def _inp(image, key="k"):
    h, w = image.shape[:2]
    return LabelInput(key=key, image=image, original_size=(w, h), crops=np.zeros((1, 5), np.int64))


@pytest.fixture(scope="module")
def ocr():
    lab = get_labeler("rapidocr")()
    lab.setup()
    return lab


def test_registry_entry_is_complete_and_frozen():
    cls = get_labeler("rapidocr")
    assert issubclass(cls, ModelLabeler) and cls.stateful and cls.outputs == ("ocr",) and not cls.requires
    for attr in ("architecture", "weights", "weights_help", "license", "description"):
        assert isinstance(getattr(cls, attr), str) and getattr(cls, attr), attr
    assert "rapidocr==3.10.0" in cls.weights and "PP-OCRv6" in cls.architecture
    r = cls.default_resources
    assert r.num_cpus >= 1 and r.num_gpus == 0 and r.memory_mb > 0
    assert cls.Config.__dataclass_params__.frozen
    c = cls.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.min_score = 0.1  # type: ignore[misc]
    for bad in ({"min_score": 1.5}, {"device": "cuda"}, {"threads": -1}):
        with pytest.raises(ValueError):
            cls(bad)
    with pytest.raises(WeightsError, match="leave `weights` unset"):
        cls({"weights": "/somewhere/det.onnx"}).setup()
    assert all(os.path.getsize(f) > 100_000 for f in rapidocr_model_files())  # real ONNX graphs, in the wheel


def test_reads_the_scanned_page_and_finds_no_text_in_a_photo(ocr):
    pics = photos()
    page, astronaut = pics["page"], pics["astronaut"]
    bad = np.zeros((4, 4), np.uint8)
    out = ocr.process_batch([_inp(page), _inp(astronaut), _inp(bad)])
    got = out[0]["ocr"]
    assert (got["height"], got["width"]) == page.shape[:2]
    assert [line["text"] for line in got["lines"][:2]] == PAGE_LINES
    assert len(got["lines"]) >= 5 and all(line["score"] >= 0.5 for line in got["lines"])
    poly = np.array([line["polygon"] for line in got["lines"]])
    assert poly.shape[1:] == (4, 2) and poly.min() >= 0
    assert (poly[..., 0] <= page.shape[1]).all() and (poly[..., 1] <= page.shape[0]).all()
    top = poly[0]  # the heading: a wide, short box at the top left of the page
    assert top[:, 1].max() < 50 and np.ptp(top[:, 0]) > 4 * np.ptp(top[:, 1])
    assert out[1]["ocr"]["lines"] == []
    assert isinstance(out[2], LabelFailure) and out[2].reason == "image must be [H, W, 3], got shape (4, 4)"
    # the record validates and round-trips; a malformed one is refused
    spec = get_modality("ocr")
    assert spec.decode(spec.encode(got, "k", page.shape[:2])) == got
    with pytest.raises(RecordError):
        spec.encode({**got, "lines": [{"polygon": [[0, 0]], "text": "x", "score": 0.9}]}, "k", page.shape[:2])
    with pytest.raises(RecordError):
        spec.encode({**got, "lines": [{**got["lines"][0], "score": 2.0}]}, "k", page.shape[:2])
    # deterministic: the same image gives the same record
    assert ocr.process_batch([_inp(page)])[0] == out[0]


def test_rapidocr_in_the_ray_pipeline(ray_local, ocr, tmp_path):
    pics = photos()
    names = ["page", "astronaut", "coins"]
    write_shard(str(tmp_path / "in" / "shard-00000.tar"),
                [(f"{i:06d}", {"jpg": jpeg_bytes(pics[n])}) for i, n in enumerate(names)])
    out = tmp_path / "out"
    spec = job_from_dict({"input": str(tmp_path / "in" / "shard-00000.tar"), "output": str(out),
                          "modalities": ["rgb", "crop_settings", "ocr"], "batch_size": 3,
                          "labelers": {"rapidocr": {"resources": {"num_cpus": 0.5}}}})
    assert run_job(spec, show_progress=False)["exit_code"] == EXIT_OK
    with tarfile.open(out / "ocr" / "shard-00000.tar") as t:
        members = [(m.name, json.loads(t.extractfile(m).read())) for m in t.getmembers()]
    with tarfile.open(out / "rgb" / "shard-00000.tar") as t:
        assert [m.name.split(".")[0] for m in t.getmembers()] == [n.split(".")[0] for n, _ in members]
    assert [n for n, _ in members] == ["000000.json", "000001.json", "000002.json"]
    assert [line["text"] for line in members[0][1]["lines"][:2]] == PAGE_LINES
    assert members[1][1]["lines"] == []
    marker = manifest.read_marker(str(out), "shard-00000")
    prod = marker["modalities"]["ocr"]
    assert prod["labeler"] == "rapidocr"
    assert prod["checkpoint"] == ocr.checkpoint_id() == files_hash(rapidocr_model_files())
    report = check_output(str(out))
    assert report.ok, [v.line() for v in report.violations]
