"""A real two-node Ray cluster on loopback (`ray start --head` + a second `ray start`): run a job with --address
and submit one with `modalmill submit`; both outputs must equal the embedded run's, byte for byte."""

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import psutil
import pytest

from modalmill.jobs.runner import run_job
from modalmill.jobs.spec import job_from_dict

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
BIN = os.path.dirname(sys.executable)
MODS = ["rgb", "crop_settings", "canny_edge", "color_palette", "metadata"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_digest(root):
    out = {}
    for m in MODS:
        for name in sorted(os.listdir(os.path.join(root, m))):
            with open(os.path.join(root, m, name), "rb") as f:
                out[f"{m}/{name}"] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def cluster():
    temp = tempfile.mkdtemp(prefix="mmray", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    port, dash = free_port(), free_port()
    # ray.init() in this process rewrites RAY_AUTH_MODE; the loopback cluster runs without auth, like the tests
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONBREAKPOINT")}
    env.update({"PATH": BIN + os.pathsep + os.environ["PATH"], "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "disabled"})
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    # each node's dashboard agent needs its own HTTP port (the default one is taken by the tests' embedded Ray)
    try:
        subprocess.run([f"{BIN}/ray", "start", "--head", "--port", str(port), "--temp-dir", temp,
                        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                        "--dashboard-agent-listen-port", str(free_port()), *common],
                       env=env, check=True, capture_output=True, timeout=180)
        subprocess.run([f"{BIN}/ray", "start", "--address", f"127.0.0.1:{port}",
                        "--dashboard-agent-listen-port", str(free_port()), *common], env=env, check=True,
                       capture_output=True, timeout=180)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        # stop exactly this cluster's processes (`ray stop` would stop every Ray on the machine)
        procs = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
            except psutil.Error:
                continue
            if temp in cmd or f"127.0.0.1:{port}" in cmd:
                procs.append(p)
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            p.kill()
        shutil.rmtree(temp, ignore_errors=True)


def test_job_on_a_two_node_cluster_equals_the_embedded_run(ray_local, cluster, demo_corpus, tmp_path):
    inp = os.path.join(demo_corpus, "shard-{00000..00001}.tar")
    local = tmp_path / "local"
    run_job(job_from_dict({"input": inp, "output": str(local), "modalities": MODS}), show_progress=False)

    # the cluster really has two nodes
    nodes = subprocess.run([f"{BIN}/python", "-c", "import ray; ray.init(address='%s'); "
                            "print(sum(n['Alive'] for n in ray.nodes()))" % cluster["address"]],
                           env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert nodes.stdout.strip().splitlines()[-1] == "2", nodes.stderr[-2000:]

    viacli = tmp_path / "cli"
    r = subprocess.run([f"{BIN}/python", "-m", "modalmill", "label", inp, str(viacli), "-m", ",".join(MODS),
                        "--address", cluster["address"], "--no-progress"], env=cluster["env"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree_digest(viacli) == tree_digest(local)

    job = tmp_path / "job.yaml"
    submitted = tmp_path / "submitted"
    job.write_text(f"name: t\ninput: '{inp}'\noutput: {submitted}\nmodalities: [{', '.join(MODS)}]\n")
    r = subprocess.run([f"{BIN}/python", "-m", "modalmill", "submit", str(job), "--address", cluster["dashboard"]],
                       env=cluster["env"], capture_output=True, text=True, timeout=500)
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout, (r.stdout[-3000:], r.stderr[-3000:])
    assert tree_digest(submitted) == tree_digest(local)
