"""One writer per output: the lease (modalmill/io/lease.py) on a local folder and on SeaweedFS on loopback.

Unit level: exactly one of many racing creators wins (threads and processes); a live lease refuses with a line
naming its owner; a released one is free; one whose owner's process is gone (same host) or that stopped
heart-beating (another host) is taken over, and says so; an owner that was taken over notices.
End to end (real subprocess CLIs, real Ray): two drivers on one output, the second refuses (exit 5) or waits with
--wait and then finds everything done, the output passes `modalmill check`; a killed driver's lease is taken over.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.io import lease, storage

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    _, bucket = request.getfixturevalue("s3_env")
    return f"s3://{bucket}/out"


def test_exactly_one_of_many_racing_creators_wins(root):
    url = lease.lease_url(root, "race.json")
    with ThreadPoolExecutor(8) as ex:
        won = list(ex.map(lambda i: lease.create_exclusive(url, str(i).encode()), range(16)))
    assert sum(won) == 1
    assert storage.read_bytes(url) == str(won.index(True)).encode()
    assert not lease.create_exclusive(url, b"again")


def test_processes_race_for_the_lease_and_one_wins(root, tmp_path):
    """Four processes take the lease at the same moment: exactly one holds it, the others are refused.

    Each process imports, says it is ready and spins until the go file appears; the winner holds the lease until
    this test has every answer (it closes the winner's stdin), so the losers are refused by a lease that is held."""
    go = tmp_path / "go"
    code = ("import os, sys, time; from modalmill.io import lease\n"
            "print('ready', flush=True)\n"
            f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.001)\n"
            "try:\n"
            f"    l = lease.Lease({root!r}).acquire(); print('won', flush=True); sys.stdin.read(); l.release()\n"
            "except lease.LeaseHeld as e:\n    print('refused', e, flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=os.environ) for _ in range(4)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 4
        go.touch()
        answers = [p.stdout.readline() for p in procs]  # the winner's 'won' comes while it still holds the lease
    finally:
        go.touch()
        outs = [p.communicate(timeout=120)[0] for p in procs]  # closes stdin: the winner releases and exits
    assert sorted(a.split()[0] for a in answers) == ["refused"] * 3 + ["won"], answers
    assert all("is being written by" in a for a in answers if a.startswith("refused"))
    assert all(p.returncode == 0 for p in procs) and not any(outs), outs


def test_live_lease_refuses_naming_its_owner_then_released_is_free(root):
    first = lease.Lease(root, command="modalmill run a.yaml").acquire()
    try:
        with pytest.raises(lease.LeaseHeld) as e:
            lease.Lease(root).acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"pid {os.getpid()}" in msg and socket.gethostname() in msg
        assert "modalmill run a.yaml" in msg and "--wait" in msg
    finally:
        first.release()
    second = lease.Lease(root).acquire()
    assert second.generation == 2 and not second.took_over  # a released lease is not "taken over"
    second.release()


def test_wait_gets_the_lease_when_the_holder_releases_it(root):
    first = lease.Lease(root).acquire()
    told = []
    threading.Timer(1.5, first.release).start()
    t0 = time.time()
    second = lease.Lease(root).acquire(wait=True, poll_s=0.2, on_wait=told.append)
    assert time.time() - t0 >= 1.0 and len(told) == 1 and told[0]["token"] == first.token
    second.release()


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(root):
    p = subprocess.Popen([sys.executable, "-c", f"from modalmill.io import lease; import time\n"
                          f"lease.Lease({root!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                         stdout=subprocess.PIPE, text=True, env=os.environ)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(lease.LeaseHeld):
            lease.Lease(root).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    new = lease.Lease(root).acquire()  # ttl 60 s: only the dead pid lets it in now
    assert f"pid {p.pid}" in new.took_over and "process gone" in new.took_over
    new.release()


def test_lease_that_stopped_heart_beating_on_another_host_is_taken_over(root):
    now = time.time()
    rec = {"owner": "ann@elsewhere", "host": "elsewhere", "pid": 4242, "token": "t", "command": "modalmill run x",
           "acquired": now - 500, "heartbeat": now - 5, "ttl_s": 60, "released": False, "generation": 1}
    assert lease.create_exclusive(lease.lease_url(root, "gen-000000001.json"), json.dumps(rec).encode())
    with pytest.raises(lease.LeaseHeld, match="ann@elsewhere"):  # heart-beating 5 s ago: alive
        lease.Lease(root).acquire()
    rec.update(heartbeat=now - 300)
    storage.write_bytes(lease.lease_url(root, "gen-000000001.json"), json.dumps(rec).encode())
    new = lease.Lease(root).acquire()
    assert "ann@elsewhere" in new.took_over and "no heartbeat for 30" in new.took_over
    assert new.generation == 2
    new.release()


def test_heartbeat_renews_and_an_owner_taken_over_notices(root, capsys):
    a = lease.Lease(root, ttl_s=0.8).acquire()
    beat0 = a.record["heartbeat"]
    time.sleep(0.6)  # the thread beats every ttl/4
    _, rec = lease.current(root)
    assert rec["heartbeat"] > beat0 and rec["token"] == a.token and not a.lost
    # simulate a driver elsewhere that decided `a` was dead and took over
    other = {"owner": "bob@far", "host": "far", "pid": 1, "heartbeat": time.time(), "ttl_s": 60, "released": False}
    assert lease.create_exclusive(lease.lease_url(root, f"gen-{a.generation + 1:09d}.json"),
                                  json.dumps(other).encode())
    deadline = time.time() + 10
    while not a.lost and time.time() < deadline:
        time.sleep(0.1)
    assert "taken over by bob@far" in a.lost
    assert "taken over by bob@far" in capsys.readouterr().err
    a.release()  # does not release bob's lease
    assert lease.current(root)[1]["owner"] == "bob@far"


def test_hold_is_reentrant_in_one_process(root):
    with lease.hold(root) as outer:
        with lease.hold(root) as inner:
            assert inner is outer and lease.held(root) is outer
        assert lease.held(root) is outer and not lease.current(root)[1]["released"]
    assert lease.held(root) is None and lease.current(root)[1]["released"]


# ---------------------------------------------------------------------- real drivers


def _cli(*args, **kw):
    return subprocess.Popen([f"{BIN}/python", "-m", "modalmill", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT}, **kw)


def _wait_for_lease(root, pid, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, rec = lease.current(root)
        if rec and rec.get("pid") == pid:
            return rec
        time.sleep(0.1)
    raise AssertionError(f"driver {pid} never took the lease on {root}")


def test_two_drivers_on_one_output_one_writes_the_other_refuses_or_waits(root, demo_corpus):
    inp = os.path.join(demo_corpus, "shard-{00000..00001}.tar")
    args = ["label", inp, root, "-m", "rgb,crop_settings,canny_edge", "--no-progress", "--num-cpus", "1"]
    a = _cli(*args)
    try:
        _wait_for_lease(root, a.pid)
        refused = subprocess.run([f"{BIN}/python", "-m", "modalmill", *args], capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode == 5, refused.stderr
        assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]  # one line
        assert f"pid {a.pid}" in refused.stderr and "is being written by" in refused.stderr
        waiter = _cli(*args, "--wait")
        out_a, err_a = a.communicate(timeout=300)
        out_w, err_w = waiter.communicate(timeout=300)
    finally:
        a.kill()
    assert a.returncode == 0, err_a[-2000:]
    assert "2 shard(s) processed" in out_a
    assert waiter.returncode == 0, err_w[-2000:]
    assert "waiting for" in err_w and f"pid {a.pid}" in err_w
    assert "0 shard(s) processed, 2 already done" in out_w
    chk = CliRunner().invoke(main, ["check", root])  # read-only: in this process
    assert chk.exit_code == 0 and "clean" in chk.stdout, chk.output


def test_a_killed_driver_lease_is_taken_over(ray_local, demo_corpus, tmp_path):
    root = str(tmp_path / "out")
    inp = os.path.join(demo_corpus, "shard-{00000..00001}.tar")
    args = ["label", inp, root, "-m", "rgb,crop_settings,canny_edge", "--no-progress", "--num-cpus", "1"]
    a = _cli(*args, start_new_session=True)
    try:
        _wait_for_lease(root, a.pid)
    finally:
        os.killpg(a.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
        a.wait()
    # the next driver is the CLI in this process (on the session's embedded Ray): another pid than the dead one
    b = CliRunner().invoke(main, args)
    assert b.exit_code == 0, b.output[-2000:]
    assert f"took over the lease on {root}" in b.stderr and f"pid {a.pid}" in b.stderr and "process gone" in b.stderr
    chk = CliRunner().invoke(main, ["check", root])
    assert chk.exit_code == 0 and "clean" in chk.stdout, chk.output


def test_read_only_commands_need_no_lease(demo_corpus, tmp_path, ray_local):
    from modalmill.jobs.runner import run_job
    from modalmill.jobs.spec import job_from_dict

    root = str(tmp_path / "out")
    run_job(job_from_dict({"input": os.path.join(demo_corpus, "shard-00000.tar"), "output": root,
                           "modalities": ["rgb", "crop_settings"]}), show_progress=False)
    key = json.loads(storage.read_bytes(storage.join(root, "_modalmill", "shards", "shard-00000.json")))["keys"][0]
    holder = subprocess.Popen([sys.executable, "-c", f"from modalmill.io import lease; import time\n"
                               f"lease.Lease({root!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, env=os.environ)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (["status", root], ["check", root], ["stats", root],
                     ["show", root, "--key", key, "--out", str(tmp_path / "s.png")]):
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 0, (args, r.output[-1000:])
        from modalmill.dataset import load_dataset

        assert len(list(load_dataset(root, modalities=["rgb"]))) == 5
    finally:
        holder.kill()
        holder.wait()
