"""Memory bounded by bytes: a shard task holds its decoded samples (gathered, at the model actors, back but not yet
written) within ``ray.bytes_in_flight`` plus one sample, and decodes a JPEG no larger than its labelers need when
they all read only resized crops (JPEG draft decoding: the labelers' inputs match a full decode's within a stated
tolerance). 12-megapixel photos: scikit-image's, upscaled to 4000 x 3000."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
import time

import numpy as np
import pytest

from tests import labelers_for_tests  # noqa: F401 - registers test_crop_reader

MP12 = (4000, 3000)
MIB = 2 ** 20
# a draft decode's crops against a full decode's, both cut and resized by crop_images: pixel values 0..255
MEAN_ABS_TOL, P99_TOL = 1.5, 12


def _photo_jpeg(name: str, size=MP12, quality: int = 90, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    from modalmill.jobs.democorpus import photos

    buf = io.BytesIO()
    Image.fromarray(photos()[name]).resize(size, Image.BICUBIC).save(buf, fmt, quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_jpegs():
    return {name: _photo_jpeg(name) for name in ("astronaut", "coffee")}


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory, big_jpegs):
    """One shard of four 12-megapixel JPEGs."""
    from modalmill.jobs.democorpus import write_shard

    d = tmp_path_factory.mktemp("big")
    names = list(big_jpegs)
    write_shard(str(d / "shard-00000.tar"), [(f"s{i}", {"jpg": big_jpegs[names[i % 2]]}) for i in range(4)])
    return str(d / "shard-00000.tar")


def _task_draft(key: str, side: int, n_crops: int = 4):
    """The shard task's draft function for ``key`` (crop settings of ``n_crops`` crops, seed 0)."""
    from types import SimpleNamespace

    from modalmill.io.crops import CropConfig
    from modalmill.pipeline.shard import draft_size

    return draft_size(SimpleNamespace(crops=CropConfig(n_crops=n_crops), seed=0), key, side)


@pytest.mark.parametrize("key,side", [("astronaut", 224), ("coffee", 64)])
def test_draft_decode_gives_the_labelers_the_same_crops_within_tolerance(big_jpegs, key, side):
    """A 12 MP JPEG decoded reduced (1/4 or 1/8 a side) for a labeler that reads crops at ``side``: the stored rgb is
    still the source's own bytes at full size, and every crop as crop_images cuts and resizes it differs from the
    full decode's by at most MEAN_ABS_TOL on average and P99_TOL at the 99th percentile (pixel values 0..255)."""
    from modalmill.io.crops import CropConfig, make_crop_settings
    from modalmill.io.decode import decode_image
    from modalmill.labelers.base import LabelInput
    from modalmill.labelers.dinov2 import crop_images

    for data in [big_jpegs[key]]:
        full = decode_image(data)
        reduced = decode_image(data, draft=_task_draft(key, side))
        assert reduced.stored_bytes == data and not reduced.reencoded and reduced.stored_size == MP12
        assert reduced.reduced and not full.reduced
        assert reduced.image.shape[1] <= MP12[0] // 4 and reduced.image.shape[0] <= MP12[1] // 4
        crops = make_crop_settings(key, MP12[1], MP12[0], CropConfig(n_crops=4), 0)
        a = crop_images(LabelInput(key, full.image, MP12, crops), side)
        b = crop_images(LabelInput(key, reduced.image, MP12, crops, stored_size=reduced.stored_size), side)
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.mean() <= MEAN_ABS_TOL and np.percentile(diff, 99) <= P99_TOL, (key, diff.mean())
        # and the draft is no more than the labeler needs: every crop keeps >= 2 x side pixels a side
        mapped = LabelInput(key, reduced.image, MP12, crops, stored_size=MP12).image_crops()
        assert (mapped[:, 2:4] >= 2 * side - 2).all()


def test_a_reencoded_source_keeps_its_full_size_and_only_the_labeler_image_is_reduced():
    """A PNG must be re-encoded: the stored JPEG keeps the original size; the labelers' image is that JPEG decoded
    reduced. Without a draft (a labeler reads the full image) nothing changes."""
    from modalmill.io.decode import decode_image, decode_stored_rgb

    data = _photo_jpeg("chelsea", size=(2000, 1500), fmt="PNG")
    reduced = decode_image(data, draft=_task_draft("k", 64))
    assert reduced.reencoded and reduced.stored_size == (2000, 1500)
    assert decode_stored_rgb(reduced.stored_bytes).shape == (1500, 2000, 3)
    assert reduced.image.shape[:2] in ((375, 500), (188, 250))
    full = decode_image(data, draft=_task_draft("k", None))
    assert not full.reduced and full.image.shape == (1500, 2000, 3) and full.stored_bytes == reduced.stored_bytes


def test_bytes_in_flight_bounds_what_a_shard_task_holds(tmp_path, demo_corpus):
    """In-process: a slow 'model' (batches pile up: 4 may be in flight). Without a byte bound the task holds more
    than B; with B it never holds more than B plus one sample, and the tars are the same."""
    from modalmill.jobs.runner import plan_job
    from modalmill.jobs.spec import job_from_dict
    from modalmill.pipeline.shard import call_local, process_shard

    out = {}
    for name, limit in (("unbounded", None), ("bounded", 250_000)):
        spec = job_from_dict({"input": os.path.join(demo_corpus, "shard-00000.tar"), "output": str(tmp_path / name),
                              "modalities": ["rgb", "crop_settings", "caption"], "batch_size": 1,
                              "labelers": {"test_crop_reader": {"batch_size": 1, "config": {"side": None}}}})
        task = plan_job(spec).tasks[0]
        lock = threading.Lock()

        def call(run, inputs, lock=lock):
            with lock:  # one batch at a time, as one actor
                time.sleep(0.1)
                return call_local(run, inputs)

        call.in_flight, call.bytes_in_flight, call.checkpoint = 4, limit, call_local.checkpoint
        summary = process_shard(task, call)
        assert summary["n_ok"] == 5
        out[name] = (summary["held_bytes"], open(os.path.join(spec.output, "caption", "shard-00000.tar"), "rb").read())
    unbounded, bounded = out["unbounded"][0], out["bounded"][0]
    assert unbounded["peak"] > 250_000 + unbounded["largest_sample"]  # the bound below matters
    assert bounded["limit"] == 250_000 and bounded["peak"] <= 250_000 + bounded["largest_sample"]
    assert out["unbounded"][1] == out["bounded"][1]


def _captions(out):
    with tarfile.open(os.path.join(out, "caption", "shard-00000.tar")) as tf:
        return [json.loads(tf.extractfile(m).read()) for m in tf.getmembers()]


def _shard_record(out):
    runs = os.path.join(out, "_modalmill", "runs")
    with open(os.path.join(runs, sorted(os.listdir(runs))[-1])) as f:
        return json.load(f)["shards"][0]


@pytest.mark.slow
def test_12mp_photos_with_a_model_labeler_on_ray_workers(ray_local, tmp_path, big_corpus, big_jpegs):
    """Across a real Ray worker and actor, 12 MP JPEGs. A labeler that reads 64 px crops: every sample is decoded
    reduced (its prepare saw <= 1000 x 750 of the stored 4000 x 3000), the stored rgb is the source's bytes, and the
    task's byte bound is the default formula's (a quarter of its part of the node's memory); an ``--only`` run that
    reads the stored rgb back decodes it reduced too. A labeler that reads
    the full image with ``bytes_in_flight: 80MiB``: each sample holds a full 36 MB decode and the task never holds
    more than the bound plus one sample although 4 batches may be in flight."""
    from modalmill.jobs.runner import run_job
    from modalmill.jobs.spec import job_from_dict
    from modalmill.pipeline.execute import BYTES_IN_FLIGHT_MIN, BYTES_IN_FLIGHT_SHARE

    def run(name, config, ray_settings):
        spec = job_from_dict({"input": big_corpus, "output": str(tmp_path / name), "batch_size": 1,
                              "modalities": ["rgb", "crop_settings", "caption"], "ray": ray_settings,
                              "labelers": {"test_crop_reader": {"batch_size": 1, "config": config}}})
        assert run_job(spec, show_progress=False)["exit_code"] == 0
        return spec.output

    out = run("draft", {"side": 64}, {})
    rec = _shard_record(out)
    assert rec["draft_decoded"] == 4
    for key, seen, stored, _ in _captions(out):
        h, w = (int(v) for v in seen.split("x"))
        assert stored == "4000x3000" and w <= 1000 and h <= 750, (key, seen)
    with tarfile.open(os.path.join(out, "rgb", "shard-00000.tar")) as tf:
        assert {tf.extractfile(m).read() for m in tf.getmembers()} == set(big_jpegs.values())
    node = next(n["Resources"] for n in ray_local.nodes() if n["Alive"])
    expect = max(BYTES_IN_FLIGHT_MIN, int(BYTES_IN_FLIGHT_SHARE * node["memory"] / node["CPU"]))
    assert rec["held_bytes"]["limit"] == expect
    assert rec["held_bytes"]["peak"] < 4 * 1000 * 750 * 3 + 4 * max(map(len, big_jpegs.values())) + MIB
    # an --only run (the stored rgb read back) decodes it reduced too: crops at 32 px need only 1/8 a side
    spec = job_from_dict({"input": big_corpus, "output": out, "batch_size": 1,
                          "modalities": ["rgb", "crop_settings", "caption"],
                          "labelers": {"test_crop_reader": {"batch_size": 1, "config": {"side": 32}}}})
    assert run_job(spec, only=["caption"], force=True, show_progress=False)["exit_code"] == 0
    rec = _shard_record(out)
    assert rec["mode"] == "update" and rec["draft_decoded"] == 4
    assert all(seen == "375x500" and stored == "4000x3000" for _, seen, stored, _ in _captions(out))

    out = run("full", {"side": None, "sleep_s": 0.4}, {"bytes_in_flight": "80MiB", "batches_in_flight": 4})
    held = _shard_record(out)["held_bytes"]
    assert held["limit"] == 80 * MIB and held["largest_sample"] >= 4000 * 3000 * 3
    assert held["peak"] <= held["limit"] + held["largest_sample"]
    assert all(seen == "3000x4000" for _, seen, _, _ in _captions(out))


def test_bytes_in_flight_is_checked_in_the_job_spec(tmp_path):
    from modalmill.jobs.spec import JobSpecError, job_from_dict

    base = {"input": str(tmp_path / "in.tar"), "output": str(tmp_path / "out"), "modalities": ["rgb"]}
    assert job_from_dict(base).ray.bytes_in_flight is None
    for given, want in ((2 ** 30, 2 ** 30), ("512MiB", 512 * MIB), ("1.5GB", 1_500_000_000), ("800M", 800_000_000)):
        assert job_from_dict({**base, "ray": {"bytes_in_flight": given}}).ray.bytes_in_flight == want
    for bad in (0, 1000, "lots", "5TB", True, 2.5):
        with pytest.raises(JobSpecError, match="bytes_in_flight"):
            job_from_dict({**base, "ray": {"bytes_in_flight": bad}})
