"""A worker node dies mid-job on a multi-node Ray cluster on this machine: the job still completes with
nothing lost or duplicated, and the output equals a run on the embedded Ray."""

import json
import os
import subprocess
import sys

import pytest

import tests.labelers_for_tests  # noqa: F401
from modalmill.jobs.democorpus import build_corpus
from modalmill.jobs.runner import run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.io import manifest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_removing_a_worker_node_mid_job_loses_nothing(ray_local, tmp_path):
    build_corpus(str(tmp_path / "corpus"), n_shards=6, per_shard=4, size_range=(100, 140))
    inp = str(tmp_path / "corpus" / "shard-{00000..00005}.tar")
    reference = tmp_path / "reference"
    # the same job without the 0.4 s per batch that keeps the cluster's run going long enough to lose a node in it
    # (the sleep changes nothing in the labels)
    run_job(job_from_dict({"input": inp, "output": str(reference), "modalities": ["rgb", "canny_edge", "caption"],
                           "batch_size": 2, "labelers": {"test_crash_actor": {"config": {}}}}),
            show_progress=False)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "node_death.py"), inp, str(out)],
                       env=env, capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["removed_node"].get("at"), "the node was never removed"
    assert summary["removed_node"]["after_markers"] < 6, "the node must be removed mid-job"
    assert summary["shards_failed"] == 0 and summary["samples_failed"] == 0, summary
    rows = manifest.read_manifest(str(out)).to_pylist()
    assert len(rows) == 24 and len({(r["shard"], r["key"]) for r in rows}) == 24  # nothing lost or duplicated
    for m in ("rgb", "canny_edge", "caption", "crop_settings"):
        for i in range(6):
            name = f"shard-{i:05d}.tar"
            assert (out / m / name).read_bytes() == (reference / m / name).read_bytes(), f"{m}/{name}"


def test_when_the_only_free_cpu_is_held_by_an_actor_after_a_node_died_the_driver_says_why(tmp_path):
    """The head's only CPU is held by the job's model actor; the node running the shard tasks dies. Ray cannot
    place the retried tasks anywhere and says nothing: the driver must say so within 10 s of the node's removal
    (which resources are missing, which pool holds them, that a node died), then go on once a node joins."""
    build_corpus(str(tmp_path / "corpus"), n_shards=4, per_shard=4, size_range=(100, 140))
    inp = str(tmp_path / "corpus" / "shard-{00000..00003}.tar")
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "stall_after_node_death.py"), inp,
                        str(out)], env=env, capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    ev = summary["events"]
    assert ev.get("removed_at") and ev["after_markers"] < 4, ev
    assert ev.get("report"), f"the driver never said why it waits:\n{r.stderr[-3000:]}"
    assert ev["reported_at"] - ev["removed_at"] < 10, ev
    report = ev["report"]
    assert "shard task(s) cannot start: each asks for 1 CPU and no alive node has that free" in report, report
    assert "1 alive node(s) have 0 of 1 CPU free; 1 node(s) died during this job" in report, report
    assert "the labeler actor pools hold 1 CPU (test_crash_actor 1 actor(s) x 1 CPU)" in report, report
    assert "labelers.NAME.workers" in report
    assert ev["going_on_at"] and ev["going_on_at"] > ev["adding_at"], ev  # and it says when it goes on
    assert summary["shards_failed"] == 0 and summary["samples_failed"] == 0, summary
    rows = manifest.read_manifest(str(out)).to_pylist()
    assert len(rows) == 16 and len({(r["shard"], r["key"]) for r in rows}) == 16  # nothing lost or duplicated
