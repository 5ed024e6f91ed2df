"""Fencing: a driver whose lease is taken over while it still runs commits nothing more and exits 5.

Two real drivers (the ``modalmill run`` CLI in subprocesses, each with its own embedded Ray), on a local output and
on SeaweedFS on loopback (files compared by ETag, LastModified and size there). Driver A runs a
job whose labeler lets one batch through and holds the others at a gate (a file the test creates); once A has
committed a shard, driver B starts with ``--wait``; then A's driver process is frozen with SIGSTOP (a paused
heartbeat, as in a long GC pause or a frozen VM: its Ray workers keep running). A's heartbeat goes stale, B takes
the lease over and is frozen at once, so that from then on only A could write. After the takeover plus one
heartbeat interval the committed files of the output (markers, manifests, tars, index, run records) are
snapshotted by inode, mtime and size; the gate opens and A's held shard tasks go on to their write steps (they meet
the fence: ``LeaseLost``) while A is still frozen; A is resumed and must exit 5 naming B, with that snapshot
unchanged. Then B finishes the job (the gate open: no waiting) and the output passes ``modalmill check``.
"""

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from modalmill.io import lease, manifest
from modalmill.jobs.democorpus import build_corpus

TTL_S = 4.0  # heartbeat every TTL_S / 4 = 1 s
N_SHARDS = 6
TO_WRITE_STEPS_S = 3.0  # from a released batch to its shard task's write steps (3 samples of 100-140 px)


def _cli(args, env, logs):
    """The CLI with the test-only labelers registered (the slow one below); stdout and stderr go to files
    ``logs``.out / ``logs``.err (a frozen reader never blocks it)."""
    code = "import sys, tests.labelers_for_tests; from modalmill.cli import main; sys.argv[0] = 'modalmill'; main()"
    with open(f"{logs}.out", "w") as o, open(f"{logs}.err", "w") as e:
        return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=o, stderr=e,
                                start_new_session=True)


def _log(logs, which):
    with open(f"{logs}.{which}") as f:
        return f.read()


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(output root, a function listing its committed files): a local folder, or a bucket on SeaweedFS."""
    if request.param == "local":
        return str(tmp_path / "out"), _committed
    server, bucket = request.getfixturevalue("s3_env")
    client = server.client()

    def committed(out):  # key -> (ETag, LastModified, size): a rewrite changes LastModified even with equal bytes
        files = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/"):
            for o in page.get("Contents", ()):
                if "/_modalmill/lease/" not in o["Key"]:
                    files[o["Key"]] = (o["ETag"], o["LastModified"].isoformat(), o["Size"])
        return files

    return f"s3://{bucket}/out", committed


def _committed(out: str) -> dict[str, tuple[int, int, int]]:
    """Every committed file of the output (temporary files and the lease folder aside): path -> (inode, mtime, size)."""
    files = {}
    for dirpath, _, names in os.walk(out):
        if os.path.join("_modalmill", "lease") in dirpath:
            continue
        for n in names:
            if n.startswith(".") and ".tmp-" in n:
                continue
            p = os.path.join(dirpath, n)
            st = os.stat(p)
            files[os.path.relpath(p, out)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return files


def _wait(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_driver_whose_lease_is_taken_over_commits_nothing_more_and_exits_5(tmp_path, where):
    corpus = tmp_path / "corpus"
    build_corpus(str(corpus), n_shards=N_SHARDS, per_shard=3, size_range=(100, 140))
    out, committed = where
    job, gate = tmp_path / "job.yaml", tmp_path / "gate"
    job.write_text(f"input: '{corpus}/shard-{{00000..{N_SHARDS - 1:05d}}}.tar'\noutput: {out}\n"
                   "modalities: [rgb, caption]\nbatch_size: 3\n"  # one batch per shard
                   f"labelers: {{test_crash_task: {{config: {{gate: '{gate}', free_calls: 1}}}}}}\n"
                   "ray: {num_cpus: 2}\n")
    env = {**os.environ, "MODALMILL_LEASE_TTL_S": str(TTL_S), "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p)}
    args = ["run", str(job), "--no-progress"]
    la, lb = tmp_path / "a", tmp_path / "b"
    a = _cli(args, env, la)
    b = None
    try:
        _wait(lambda: manifest.list_markers(out), 240, "driver A's first shard")
        gen_a, rec_a = lease.current(out)
        assert rec_a["pid"] == a.pid and gen_a == 1
        b = _cli([*args, "--wait"], env, lb)
        _wait(lambda: "waiting for" in _log(lb, "err") or b.poll() is not None, 120, "driver B to wait")
        assert b.poll() is None, _log(lb, "err")
        os.kill(a.pid, signal.SIGSTOP)  # A's heartbeat stops; its shard tasks run on
        _wait(lambda: lease.current(out)[0] == gen_a + 1, 60, "driver B to take the lease over")
        os.kill(b.pid, signal.SIGSTOP)  # from here on only A could write
        took_over = time.time()
        _, rec_b = lease.current(out)
        assert rec_b["pid"] == b.pid and rec_b["token"] != rec_a["token"]
        time.sleep(TTL_S / 4)  # the takeover plus one heartbeat interval
        before = committed(out)
        done_by_a = set(manifest.list_markers(out))
        assert len(done_by_a) < N_SHARDS, "driver A finished before the takeover: nothing was fenced"
        gate.touch()  # A's held shard tasks go on to their write steps while A is still frozen
        held, released = tmp_path / "gate.held", tmp_path / "gate.released"
        _wait(lambda: released.exists() and released.stat().st_size == held.stat().st_size, 60,
              "A's held batches to go on")
        time.sleep(TO_WRITE_STEPS_S)
        os.kill(a.pid, signal.SIGCONT)
        a.wait(timeout=180)
        out_a, err_a = _log(la, "out"), _log(la, "err")
        after = committed(out)
        assert a.returncode == 5, err_a[-3000:]
        assert "was taken over by" in err_a and f"pid {b.pid}" in err_a and rec_b["token"][:12] in err_a, err_a
        changed = {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
        assert not changed, f"driver A committed after losing its lease ({time.time() - took_over:.0f} s): {changed}"
        assert "LeaseLost" in out_a, out_a  # some of A's shard tasks met the fence at a write step
        assert not manifest.list_runs(out), "driver A wrote a run record"

        os.kill(b.pid, signal.SIGCONT)
        b.wait(timeout=300)
        out_b, err_b = _log(lb, "out"), _log(lb, "err")
        assert b.returncode == 0, err_b[-3000:]
        assert f"{N_SHARDS - len(done_by_a)} shard(s) processed, {len(done_by_a)} already done" in out_b, out_b
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert len(manifest.list_markers(out)) == N_SHARDS
    chk = subprocess.run([sys.executable, "-m", "modalmill", "check", out], env=env, capture_output=True, text=True,
                         timeout=300)
    assert chk.returncode == 0 and "clean" in chk.stdout, chk.stdout + chk.stderr
    runs = manifest.list_runs(out)
    assert len(runs) == 1 and runs[0]["lease"]["generation"] == gen_a + 1  # B's, naming its generation: A wrote none


# ---------------------------------------------------------------------- one shard task, in this process


def _one_task(tmp_path, fence=None):
    from modalmill.jobs.runner import decide_shard, prepare_job
    from modalmill.jobs.spec import job_from_dict

    paths = build_corpus(str(tmp_path / "in"), n_shards=1, per_shard=3, size_range=(64, 96))
    spec = job_from_dict({"input": paths[0], "output": str(tmp_path / "out"), "modalities": ["rgb", "canny_edge"],
                          "batch_size": 3, "crops": {"n_crops": 1}})
    job = prepare_job(spec)
    if fence is not None:
        job.base["fence"] = fence
    return decide_shard(job, job.selected[0], None), paths[0]


def test_a_shard_task_of_a_driver_that_lost_its_lease_writes_nothing(tmp_path):
    """A real lease taken over by a second holder: the first holder's fence stops its shard task at the first
    write step; no tar, marker, manifest or failure record appears, and the task's error names the new holder."""
    from modalmill.pipeline.execute import _run_shard

    out = str(tmp_path / "out")
    first = lease.Lease(out, ttl_s=0.5).acquire()
    first._stop.set()  # its heartbeat stops: the lease goes stale
    time.sleep(0.6)
    second = lease.Lease(out, ttl_s=30, command="modalmill run second.yaml").acquire()
    try:
        task, _ = _one_task(tmp_path, fence=first.fence())
        res = _run_shard(task, {}, None)
        assert res["status"] == "failed" and res["error"].startswith("LeaseLost: ")
        assert "taken over by" in res["error"] and second.token[:12] in res["error"] and "second.yaml" in res["error"]
        written = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
        assert all(p.startswith(os.path.join("_modalmill", "lease")) for p in written), written
        with pytest.raises(lease.LeaseLost):
            first.check()
        assert "taken over by" in first.lost
        second.fence().check()  # the new holder's fence passes
        task2, _ = _one_task(tmp_path / "again", fence=second.fence())
        assert _run_shard(dataclasses.replace(task2, output=out), {}, None)["status"] == "done"
    finally:
        second.release()


def test_a_failure_record_that_cannot_be_written_is_said_and_the_shard_fails(tmp_path, capfd):
    from modalmill.pipeline.execute import _run_shard

    task, inp = _one_task(tmp_path)
    os.remove(inp)  # the shard task fails as a whole: its input is gone
    record = os.path.join(task.output, "_modalmill", "shards", f"{task.shard}.failed.json")
    os.makedirs(record)  # ... and its failure record cannot be written: a directory has its name
    res = _run_shard(task, {}, None)
    assert res["status"] == "failed" and "its failure record could not be written" in res["error"], res["error"]
    assert f"shard {task.shard}: its failure record could not be written" in capfd.readouterr().err
    assert os.path.isdir(record) and manifest.read_marker(task.output, task.shard) is None


# ---------------------------------------------------------------------- heartbeat client, holder identity


def test_the_heartbeat_has_its_own_short_timeout_s3_client(s3_env):
    from modalmill.io import storage

    own = lease._short_client(60.0)
    assert own is not storage.s3_client() and own is lease._short_client(60.0)
    cfg = own.meta.config
    assert cfg.read_timeout == cfg.connect_timeout == 5.0 and cfg.retries["total_max_attempts"] == 2
    shared = storage.s3_client().meta.config
    assert shared.read_timeout == 60 and shared.retries["total_max_attempts"] == 11  # 10 retries
    assert lease.short_timeout(4.0) == 0.5 and lease.short_timeout(16.0) == 2.0
    _, bucket = s3_env
    held = lease.Lease(f"s3://{bucket}/out", ttl_s=60).acquire()
    try:
        before = lease.current(held.root)[1]["heartbeat"]
        time.sleep(0.01)
        held.heartbeat()  # listed and rewritten through the short client, on the real server
        assert lease.current(held.root)[1]["heartbeat"] > before and not held.lost
        held.check()
    finally:
        held.release()


def test_a_dead_pid_is_judged_only_on_the_same_machine_id_never_by_host_name():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rec = {"owner": "x@h", "host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time(), "ttl_s": 60,
           "token": "t", "machine": lease.machine_id()}
    assert lease.machine_id() and lease.why_free(rec) == "process gone"
    # the same host name on another machine or container (another boot id or pid namespace): its pid means nothing
    assert lease.why_free({**rec, "machine": "0123456789abcdef"}) == ""
    assert lease.why_free({**rec, "machine": ""}) == "" and lease.why_free({k: v for k, v in rec.items()
                                                                             if k != "machine"}) == ""
    assert lease.why_free({**rec, "machine": "0123456789abcdef", "heartbeat": time.time() - 61}).startswith(
        "no heartbeat for")
