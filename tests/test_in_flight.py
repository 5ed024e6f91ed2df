"""Shard tasks keep several batches at the model actors (``ray.batches_in_flight``) so an accelerator is never
waiting for the task between batches; results are still written in input order, byte for byte as with one batch
at a time, and a pool's actors share a task's batches."""

from __future__ import annotations

import json
import os
import tarfile
import threading
import time

import pytest

from tests import labelers_for_tests  # noqa: F401 - registers test_where_prepared


def _spec(tmp_path, demo_corpus, **extra):
    from modalmill.jobs.spec import job_from_dict

    return job_from_dict({"input": os.path.join(demo_corpus, "shard-00000.tar"), "output": str(tmp_path / "out"),
                          "modalities": ["rgb", "crop_settings", "caption"], "batch_size": 1,
                          "labelers": {"test_where_prepared": {"batch_size": 1}}, **extra})


def _members(path):
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def _tars(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".tar"):
                p = os.path.join(d, f)
                out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_in_flight_overlap_and_are_written_in_input_order(tmp_path, demo_corpus, depth):
    """In-process (no Ray): a ``call`` that takes longer for earlier batches, so later ones come back first. With
    ``in_flight`` = 3, three batches are at the 'model' at once; the tars equal a one-batch-at-a-time run's."""
    from modalmill.jobs.runner import plan_job
    from modalmill.pipeline.shard import call_local, process_shard

    results = {}
    for name, k in (("serial", 0), ("overlapped", depth)):
        spec = _spec(tmp_path / name, demo_corpus)
        task = plan_job(spec).tasks[0]
        now, peak, cond, n = [0], [0], threading.Condition(), [0]
        target = max(1, k)

        def call(run, inputs, now=now, peak=peak, cond=cond, n=n, target=target):
            with cond:  # hold each call until `target` are at the 'model' at once (or every batch has come)
                now[0] += 1
                n[0] += 1
                me = n[0]
                peak[0] = max(peak[0], now[0])
                cond.notify_all()
                cond.wait_for(lambda: now[0] >= target or n[0] >= 5, timeout=5)
            time.sleep(0.02 * (4 - me % 4))  # later batches come back first
            try:
                return call_local(run, inputs)
            finally:
                with cond:
                    now[0] -= 1
                    cond.notify_all()

        call.in_flight = k
        call.checkpoint = call_local.checkpoint
        summary = process_shard(task, call)
        assert summary["status"] == "done" and summary["n_failed"] == 0 and summary["n_ok"] == 5
        results[name] = (_tars(spec.output), peak[0])
    assert results["serial"][1] == 1
    assert results["overlapped"][1] == max(1, depth)
    assert results["overlapped"][0] == results["serial"][0]


def test_a_pools_actors_share_one_tasks_batches(ray_local, tmp_path, demo_corpus):
    """One shard task, a pool of two actors: both actors label batches of it (the task keeps 2 x 2 batches in
    flight and sends each to the actor with the fewest of its batches), and the keys stay in input order."""
    from modalmill.jobs.runner import run_job

    spec = _spec(tmp_path, demo_corpus, labelers={"test_where_prepared": {"batch_size": 1, "workers": 2,
                                                                           "resources": {"num_cpus": 0}}})
    summary = run_job(spec, show_progress=False)
    assert summary["exit_code"] == 0 and summary["samples_written"] == 5
    captions = [json.loads(data) for _, data in _members(os.path.join(spec.output, "caption", "shard-00000.tar"))]
    rgb_keys = [name.split(".")[0] for name, _ in _members(os.path.join(spec.output, "rgb", "shard-00000.tar"))]
    assert [c[2] for c in captions] == rgb_keys  # in order, aligned
    assert len({c[1] for c in captions}) == 2, captions  # labelled in both actors' processes


def test_batches_in_flight_is_checked_in_the_job_spec(tmp_path):
    from modalmill.jobs.spec import JobSpecError, job_from_dict

    base = {"input": str(tmp_path / "in.tar"), "output": str(tmp_path / "out"), "modalities": ["rgb"]}
    assert job_from_dict({**base, "ray": {"batches_in_flight": 4}}).ray.batches_in_flight == 4
    for bad in (0, -1, 2.5, "3", True):
        with pytest.raises(JobSpecError, match="batches_in_flight"):
            job_from_dict({**base, "ray": {"batches_in_flight": bad}})


def test_shard_tasks_started_before_an_actor_fails_to_set_up_leave_no_shard_done(ray_local, tmp_path, demo_corpus):
    """Shard tasks start while the actors set up; when a set-up fails, the job stops with the one-line error and
    no shard is recorded as done (its samples are not recorded as failed either): a fixed rerun labels them all."""
    from modalmill.io import manifest
    from modalmill.jobs.runner import run_job
    from modalmill.jobs.spec import job_from_dict
    from modalmill.pipeline.execute import LabelerSetupError

    out = tmp_path / "out"
    spec = job_from_dict({"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": str(out),
                          "modalities": ["rgb", "crop_settings", "caption"], "batch_size": 1,
                          "labelers": {"test_setup_fails": {"config": {"count_file": str(tmp_path / "n.txt")},
                                                            "resources": {"num_cpus": 0}}}})
    with pytest.raises(LabelerSetupError, match="could not be set up on a Ray worker"):
        run_job(spec, show_progress=False)
    for shard in ("shard-00000", "shard-00001"):
        assert manifest.read_marker(str(out), shard) is None
        assert not [r for r in manifest.read_rows(str(out), shard) if r.status == "failed"]


def test_the_next_shard_task_reads_while_the_batches_of_one_are_at_the_actor(ray_local, tmp_path, demo_corpus):
    """Room for one shard task at a time (shard_cpus 2 of 2 CPUs) and a model actor that holds each batch until a
    sample of another batch was prepared (in its shard task): while the first task waits for its batch it blocks in
    ``ray.wait``, where Ray lends its CPUs, so the second task starts, prepares and sends its batch to the actor's
    queue before the first one's batch is back and it commits. Without the lending the first batch would wait for
    a task that cannot start (60 s, then its caption says so). The timelines in the run record show the overlap;
    the output is complete and in order."""
    from modalmill.jobs.runner import run_job
    from modalmill.jobs.spec import job_from_dict

    folder = tmp_path / "prepared"
    folder.mkdir()
    spec = job_from_dict({"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": str(tmp_path / "o"),
                          "modalities": ["rgb", "crop_settings", "caption"], "batch_size": 5, "ray": {"shard_cpus": 2},
                          "labelers": {"test_waits_for_another_task": {"config": {"folder": str(folder)},
                                                                       "batch_size": 5,
                                                                       "resources": {"num_cpus": 0}}}})
    summary = run_job(spec, show_progress=False)
    assert summary["exit_code"] == 0 and summary["samples_written"] == 10
    first, second = sorted(summary["shards"], key=lambda s: s["timeline"]["started"])
    captions = [json.loads(d) for _, d in _members(os.path.join(spec.output, "caption", f"{first['shard']}.tar"))]
    assert all(c[0] == "other task prepared: True" for c in captions), captions
    rgb_keys = [name.split(".")[0] for name, _ in _members(os.path.join(spec.output, "rgb", f"{first['shard']}.tar"))]
    assert [c[1] for c in captions] == rgb_keys  # in order, aligned
    a, b = first["timeline"], second["timeline"]
    assert a["first_sent"] <= a["read_done"] <= a["last_result"] <= a["commit_start"] <= a["committed"]
    assert [n for _, n in a["batches"]] == [5]
    assert b["started"] < a["last_result"] < a["committed"], (a, b)


def test_a_task_lends_its_cpu_until_its_oldest_batch_is_back(ray_local, tmp_path, demo_corpus):
    """Room for one shard task at a time (shard_cpus 2 of 2 CPUs), two actors, batches of one sample: a task's first
    batch is held at its actor until a sample of the other shard was prepared, while its later batches come back at
    once from the other actor. Waiting for its batches, the task must stay in ``ray.wait`` (lending its CPU) until
    its *oldest* batch is back, not leave it when a younger one is back and block in the labelling thread's result
    (holding its CPU): only then does the second task start and prepare, and the first batch's caption says so
    (otherwise it is held ``wait_s``, then says False)."""
    from modalmill.jobs.runner import run_job
    from modalmill.jobs.spec import job_from_dict

    folder = tmp_path / "prepared"
    folder.mkdir()
    spec = job_from_dict({"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": str(tmp_path / "o"),
                          "modalities": ["rgb", "crop_settings", "caption"], "batch_size": 1, "ray": {"shard_cpus": 2},
                          "labelers": {"test_oldest_waits_for_another_task": {
                              "config": {"folder": str(folder)}, "batch_size": 1, "workers": 2,
                              "resources": {"num_cpus": 0}}}})
    summary = run_job(spec, show_progress=False)
    assert summary["exit_code"] == 0 and summary["samples_written"] == 10
    first, second = sorted(summary["shards"], key=lambda s: s["timeline"]["started"])
    captions = [json.loads(d) for _, d in _members(os.path.join(spec.output, "caption", f"{first['shard']}.tar"))]
    assert captions[0][0] == "other task prepared: True", captions
    assert [c[0] for c in captions[1:]] == ["not held"] * 4, captions
    assert second["timeline"]["started"] < first["timeline"]["batches"][0][0], (first["timeline"], second["timeline"])
