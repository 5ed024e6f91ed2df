"""End to end on the embedded Ray: read shards, label, write aligned 4M-style shards, manifests, resume."""

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tests.labelers_for_tests  # noqa: F401  (registers the test labelers)
from modalmill.jobs.democorpus import jpeg_bytes, photos, write_shard
from modalmill.jobs.runner import EXIT_OK, EXIT_SAMPLES_FAILED, JobError, run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.io import manifest
from modalmill.schemas import get_modality

MODEL_FREE = ["rgb", "crop_settings", "canny_edge", "color_palette", "metadata"]


def tar_members(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def tar_keys(path):
    return [name.split(".", 1)[0] for name, _ in tar_members(path)]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def spec(inp, out, modalities=MODEL_FREE, **kw):
    data = {"input": inp, "output": str(out), "modalities": list(modalities), "batch_size": 3,
            "crops": {"n_crops": 3}, "decode": {"max_size": 256}, **kw}
    return job_from_dict(data)


def assert_aligned(out, shard, modalities):
    keys = [tar_keys(os.path.join(out, m, f"{shard}.tar")) for m in modalities]
    assert all(k == keys[0] for k in keys), "keys differ between modalities"
    return keys[0]


def test_end_to_end_writes_aligned_4m_shards(ray_local, demo_corpus, tmp_path):
    out = tmp_path / "out"
    s = run_job(spec(os.path.join(demo_corpus, "shard-{00000..00001}.tar"), out), show_progress=False)
    assert s["exit_code"] == EXIT_OK and s["shards_processed"] == 2 and s["samples_written"] == 10
    for shard in ("shard-00000", "shard-00001"):
        keys = assert_aligned(str(out), shard, MODEL_FREE)
        assert len(keys) == 5
        members = {m: dict(tar_members(out / m / f"{shard}.tar")) for m in MODEL_FREE}
        for key in keys:
            rgb = get_modality("rgb").decode(members["rgb"][f"{key}.jpg"])
            h, w = rgb.shape[:2]
            assert max(h, w) <= 256
            edge = get_modality("canny_edge").decode(members["canny_edge"][f"{key}.png"])
            assert edge.shape == (h, w) and set(np.unique(edge)) <= {0, 255}
            crops = get_modality("crop_settings").decode(members["crop_settings"][f"{key}.npy"])
            assert crops.shape == (3, 5) and crops[0, 2] == crops[0, 3] == min(h, w)
            meta = json.loads(members["metadata"][f"{key}.json"])
            assert meta["original_width"] >= w and 0 <= meta["brightness"] <= 255
            pal = json.loads(members["color_palette"][f"{key}.json"])
            assert len(pal[0]["7"]) == 21
    rows = manifest.read_manifest(str(out)).to_pylist()
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows)
    assert {p["modality"] for p in rows[0]["producers"]} == set(MODEL_FREE)
    assert all(p["config_hash"] for p in rows[0]["producers"])
    marker = manifest.read_marker(str(out), "shard-00000")
    assert marker["keys"] == tar_keys(out / "rgb" / "shard-00000.tar")
    assert marker["modalities"]["rgb"]["sha256"] == sha(out / "rgb" / "shard-00000.tar")


def test_same_input_gives_byte_identical_tars_and_rerun_does_nothing(ray_local, demo_corpus, tmp_path):
    inp = os.path.join(demo_corpus, "shard-{00000..00001}.tar")
    a, b = tmp_path / "a", tmp_path / "b"
    run_job(spec(inp, a), show_progress=False)
    run_job(spec(inp, b), show_progress=False)
    for m in MODEL_FREE:
        for shard in ("shard-00000", "shard-00001"):
            assert sha(a / m / f"{shard}.tar") == sha(b / m / f"{shard}.tar"), m
    mtimes = {p: os.stat(p).st_mtime_ns for p in (a / "rgb").iterdir()}
    again = run_job(spec(inp, a), show_progress=False)
    assert again["shards_processed"] == 0 and again["shards_skipped"] == 2 and again["samples_read"] == 0
    assert mtimes == {p: os.stat(p).st_mtime_ns for p in (a / "rgb").iterdir()}
    assert len(manifest.list_runs(str(a))) == 1  # the rerun had nothing to do: it wrote no run record either


def test_only_adds_a_modality_without_rewriting_others(ray_local, demo_corpus, tmp_path):
    inp = os.path.join(demo_corpus, "shard-{00000..00001}.tar")
    out = tmp_path / "out"
    run_job(spec(inp, out, ["rgb", "canny_edge"]), show_progress=False)
    before = {p: (sha(p), os.stat(p).st_mtime_ns) for m in ("rgb", "crop_settings", "canny_edge")
              for p in (out / m).iterdir()}
    s = run_job(spec(inp, out, ["rgb", "canny_edge"]), only=["metadata"], show_progress=False)
    assert s["shards_processed"] == 2 and s["exit_code"] == EXIT_OK
    after = {p: (sha(p), os.stat(p).st_mtime_ns) for p in before}
    assert before == after
    for shard in ("shard-00000", "shard-00001"):
        assert_aligned(str(out), shard, ["rgb", "crop_settings", "canny_edge", "metadata"])
    rows = manifest.read_manifest(str(out)).to_pylist()
    assert all("metadata" in r["modalities"] and "canny_edge" in r["modalities"] for r in rows)
    # the job without --only now sees metadata as extra and the requested ones as done
    assert run_job(spec(inp, out, ["rgb", "canny_edge"]), show_progress=False)["shards_processed"] == 0
    # and --only again is idempotent
    assert run_job(spec(inp, out, ["rgb", "canny_edge"]), only=["metadata"], show_progress=False)[
        "shards_processed"] == 0
    # a job that now asks for color_palette too adds just that
    s = run_job(spec(inp, out, ["rgb", "canny_edge", "color_palette"]), show_progress=False)
    assert s["shards_processed"] == 2 and {r["mode"] for r in s["shards"]} == {"update"}


def test_only_failure_drops_the_sample_from_every_tar(ray_local, demo_corpus, tmp_path):
    inp = os.path.join(demo_corpus, "shard-{00000..00001}.tar")
    out = tmp_path / "out"
    run_job(spec(inp, out, ["rgb", "canny_edge"]), show_progress=False)
    victim, raiser = tar_keys(out / "rgb" / "shard-00000.tar")[1], tar_keys(out / "rgb" / "shard-00001.tar")[2]
    job = spec(inp, out, ["rgb", "canny_edge"],
               labelers={"test_caption_or_fail": {"config": {"fail_keys": [victim], "raise_keys": [raiser]}}})
    s = run_job(job, only=["caption"], show_progress=False)
    assert s["exit_code"] == EXIT_SAMPLES_FAILED and s["samples_dropped"] == 2
    for shard, gone in (("shard-00000", victim), ("shard-00001", raiser)):
        keys = assert_aligned(str(out), shard, ["rgb", "crop_settings", "canny_edge", "caption"])
        assert gone not in keys and len(keys) == 4
        assert manifest.read_marker(str(out), shard)["keys"] == keys
    rows = {r["key"]: r for r in manifest.read_manifest(str(out)).to_pylist()}
    assert rows[victim]["status"] == "failed" and rows[victim]["stage"] == "label:test_caption_or_fail"
    assert "chosen to fail" in rows[victim]["error"]
    assert "ValueError" in rows[raiser]["error"] and len(rows) == 10


def test_corrupt_image_is_an_error_row_and_the_rest_is_written(ray_local, tmp_path):
    pics = photos()
    good = [(f"g{i}", {"jpg": jpeg_bytes(pics[n][:200, :200])}) for i, n in enumerate(["astronaut", "coffee"])]
    bad = [("bad", {"jpg": jpeg_bytes(pics["chelsea"])[:300]}), ("noimg", {"txt": b"hello"}),
           ("empty", {"jpg": b""})]
    write_shard(str(tmp_path / "in" / "shard-00000.tar"), [good[0], bad[0], bad[1], good[1], bad[2]])
    out = tmp_path / "out"
    s = run_job(spec(str(tmp_path / "in" / "shard-00000.tar"), out), show_progress=False)
    assert s["exit_code"] == EXIT_SAMPLES_FAILED and s["samples_read"] == 5 and s["samples_written"] == 2
    assert assert_aligned(str(out), "shard-00000", MODEL_FREE) == ["g0", "g1"]
    rows = {r["key"]: r for r in manifest.read_manifest(str(out)).to_pylist()}
    assert set(rows) == {"g0", "g1", "bad", "noimg", "empty"}
    assert rows["bad"]["stage"] == "decode" and "truncated" in rows["bad"]["error"].lower()
    assert rows["noimg"]["stage"] == "read" and "no image member" in rows["noimg"]["error"]
    assert rows["empty"]["stage"] == "decode"
    assert [r["position"] for r in sorted(rows.values(), key=lambda r: r["position"])] == [0, 1, 2, 3, 4]


def test_image_folder_input(ray_local, tmp_path):
    pics = photos()
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(pics["astronaut"]).save(src / "a.png")
    Image.fromarray(pics["coffee"]).save(src / "sub" / "b.v2.jpg")
    Image.fromarray(pics["rocket"]).save(src / "c.JPEG")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    s = run_job(spec(str(src), out, shard_size=2), show_progress=False)
    assert s["exit_code"] == EXIT_OK and s["shards_processed"] == 2 and s["samples_written"] == 3
    assert tar_keys(out / "rgb" / "shard-00000.tar") == ["a", "c"]
    assert tar_keys(out / "rgb" / "shard-00001.tar") == ["sub/b_v2"]


def test_changed_settings_need_force(ray_local, demo_corpus, tmp_path):
    inp = os.path.join(demo_corpus, "shard-00000.tar")
    out = tmp_path / "out"
    run_job(spec(inp, out, ["rgb", "canny_edge"]), show_progress=False)
    changed = spec(inp, out, ["rgb", "canny_edge"], labelers={"canny_edge": {"config": {"blur_sigma": 2.5}}})
    with pytest.raises(JobError, match="canny_edge.*--force"):
        run_job(changed, show_progress=False)
    old = sha(out / "canny_edge" / "shard-00000.tar")
    s = run_job(changed, only=["canny_edge"], force=True, show_progress=False)
    assert s["shards_processed"] == 1 and sha(out / "canny_edge" / "shard-00000.tar") != old
    assert run_job(changed, show_progress=False)["shards_processed"] == 0


def test_manifest_is_parquet_with_one_row_per_sample(ray_local, demo_corpus, tmp_path):
    out = tmp_path / "out"
    run_job(spec(os.path.join(demo_corpus, "shard-00000.tar"), out), show_progress=False)
    t = pq.read_table(out / "_modalmill" / "manifest" / "shard-00000.parquet")
    assert t.num_rows == 5
    assert set(t.column_names) >= {"key", "source", "status", "error", "modalities", "producers"}
    stats = json.loads((out / "_modalmill" / "shards" / "shard-00000.json").read_text())
    assert stats["stats"]["n_read"] == 5 and "decode" in stats["seconds"]


def test_stored_rgb_is_the_image_labels_were_computed_on(ray_local, demo_corpus, tmp_path):
    out = tmp_path / "out"
    run_job(spec(os.path.join(demo_corpus, "shard-00000.tar"), out, ["rgb", "canny_edge"]), show_progress=False)
    from modalmill.labelers.base import LabelInput
    from modalmill.labelers import get_labeler

    members = dict(tar_members(out / "rgb" / "shard-00000.tar"))
    edges = dict(tar_members(out / "canny_edge" / "shard-00000.tar"))
    key = tar_keys(out / "rgb" / "shard-00000.tar")[0]
    img = np.asarray(Image.open(io.BytesIO(members[f"{key}.jpg"])).convert("RGB"))
    lab = get_labeler("canny_edge")()
    lab.setup()
    res = lab.process_batch([LabelInput(key=key, image=img, original_size=(1, 1), crops=np.zeros((1, 5), np.int64))])
    assert get_modality("canny_edge").encode(res[0]["canny_edge"], key) == edges[f"{key}.png"]


def test_labelers_run_after_the_labelers_they_need_whatever_the_listed_order():
    from modalmill.jobs.runner import resolve_labelers

    mods = ["rgb", "human_poses", "metadata", "det", "semseg_coco", "normal", "caption"]
    spec = job_from_dict({"input": "/nonexistent/s-{0..1}.tar", "output": "/nonexistent/out", "modalities": mods,
                          "labelers": {"metadata_derived_full": {}}, "text": {"caption_source": "model"}})
    order = [r.labeler for r in resolve_labelers(spec, mods, available=set(mods))]
    assert order.index("hmr2") > order.index("dfine_coco")  # the default detector
    assert order.index("metadata_derived_full") > max(order.index(n) for n in
                                                      ("dfine_coco", "mask2former_coco", "omnidata_normal", "caption"))


def test_each_labeler_is_called_with_its_own_batch_size(ray_local, demo_corpus, tmp_path):
    out = tmp_path / "out"
    s = run_job(spec(os.path.join(demo_corpus, "shard-00000.tar"), out, ["rgb", "caption"], batch_size=2,
                     labelers={"test_batch_probe": {"batch_size": 3}}), show_progress=False)
    assert s["exit_code"] == EXIT_OK
    sizes = [json.loads(data)[0] for _, data in tar_members(out / "caption" / "shard-00000.tar")]
    assert sizes == ["n=3", "n=3", "n=3", "n=2", "n=2"]  # 5 samples gathered past the job's 2, cut at the labeler's 3


def test_model_labelers_prepare_in_the_shard_task_and_label_in_their_actor(ray_local, demo_corpus, tmp_path):
    """``prepare`` runs where the batch is assembled (the shard task), the model step in the labeler's actor; with
    the shard task labelling one batch in the background while it reads the next, order and alignment hold."""
    out = tmp_path / "out"
    s = run_job(spec(os.path.join(demo_corpus, "shard-00000.tar"), out, ["rgb", "caption"], batch_size=2,
                     labelers={"test_where_prepared": {"batch_size": 2}}), show_progress=False)
    assert s["exit_code"] == EXIT_OK and s["samples_written"] == 5
    captions = [json.loads(data) for _, data in tar_members(out / "caption" / "shard-00000.tar")]
    assert [c[2] for c in captions] == tar_keys(out / "rgb" / "shard-00000.tar")  # in order, aligned
    prepared = {c[0] for c in captions}
    labelled = {c[1] for c in captions}
    assert len(prepared) == 1 and len(labelled) == 1  # one shard task, one actor
    assert prepared.pop().split()[-1] != labelled.pop().split()[-1]  # two different processes


def test_actor_pools_always_leave_room_for_a_shard_task():
    from modalmill.labelers.base import Resources
    from modalmill.pipeline.execute import _leave_room_for_shard_tasks

    # two default 1-CPU model labelers on 2 CPUs would leave none for the shard task: defaults shrink
    plans = [("a", Resources(num_cpus=1), 1, False), ("b", Resources(num_cpus=1), 1, False)]
    _leave_room_for_shard_tasks(plans, shard_cpus=1.0, total_cpus=2.0)
    assert sum(res.num_cpus for _, res, _, _ in plans) <= 1.0 and all(res.num_cpus > 0 for _, res, _, _ in plans)
    # explicit requests are kept, and when they leave no room that is a clear error
    plans = [("a", Resources(num_cpus=2), 1, True)]
    with pytest.raises(ValueError, match=r"reserve 2 of the cluster's 2 CPUs \(a \(1 x 2\)\), leaving 0: less than "
                                         r"one shard task's 1 \(ray.shard_cpus\)"):
        _leave_room_for_shard_tasks(plans, shard_cpus=1.0, total_cpus=2.0)
    # what is left is said as it is (0.5 CPU left is not "none"), and only explicit requests count against it
    plans = [("a", Resources(num_cpus=0.5), 1, True), ("b", Resources(num_cpus=1), 1, False)]
    with pytest.raises(ValueError, match=r"reserve 0.5 of the cluster's 1 CPUs \(a \(1 x 0.5\)\), leaving 0.5: "
                                         r"less than one shard task's 1"):
        _leave_room_for_shard_tasks(plans, shard_cpus=1.0, total_cpus=1.0)
    # a default request shrinks as far as it must, to 0 on a one-CPU cluster (the actor then shares the CPU)
    plans = [("a", Resources(num_cpus=1), 2, False)]
    _leave_room_for_shard_tasks(plans, shard_cpus=1.0, total_cpus=1.0)
    assert plans[0][1].num_cpus == 0
    plans = [("a", Resources(num_cpus=0.5), 2, True), ("b", Resources(num_cpus=1), 1, False)]
    _leave_room_for_shard_tasks(plans, shard_cpus=0.5, total_cpus=2.0)
    assert plans[0][1].num_cpus == 0.5 and plans[1][1].num_cpus == 0.5


def test_workers_size_their_thread_pools_to_their_ray_cpus(ray_local):
    """assigned_cpus / limit_threads: the whole CPUs Ray gave the worker (at least 1); outside a worker 1, and
    asking never starts a Ray."""
    import subprocess
    import sys

    from modalmill.labelers.base import assigned_cpus
    from modalmill.pipeline.execute import limit_threads

    def probe():
        import cv2

        n = limit_threads()
        return assigned_cpus(), n, cv2.getNumThreads()

    f = ray_local.remote(probe)
    assert ray_local.get(f.options(num_cpus=2).remote()) == (2, 2, 2)
    assert ray_local.get(f.options(num_cpus=0.5).remote()) == (1, 1, 1)
    r = subprocess.run([sys.executable, "-c", "import ray; from modalmill.labelers.base import assigned_cpus; "
                        "print(assigned_cpus(), ray.is_initialized())"], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["1", "False"], r.stdout + r.stderr
