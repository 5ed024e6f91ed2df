"""Cluster paths no other test ran, on a real `ray start --head` cluster on loopback without GPUs:

- default resources: a job with the BLIP captioner (whose defaults ask for 1 GPU and 24 GB) and no `resources:`
  runs with `--address`, its defaults adapted to the cluster (the path every user without GPUs takes);
- `modalmill submit --no-wait` returns at once with the job's id; the job then finishes on its own;
- `modalmill submit --pip WHEEL`: the job's runtime env installs a wheel (a plugin labeler, built here) that the
  cluster does not have; the job only succeeds if it was installed there.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile

import psutil
import pytest

from modalmill.io import manifest
from tests.tiny_models import save_tiny_blip

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """One head node, 2 CPUs, no GPU, with the dashboard (Jobs API)."""
    temp = tempfile.mkdtemp(prefix="mmrayp", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONBREAKPOINT")}
    env.update({"PATH": BIN + os.pathsep + os.environ["PATH"], "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "disabled", "PYTHONPATH": ROOT})
    try:
        subprocess.run([f"{BIN}/ray", "start", "--head", "--port", str(port), "--temp-dir", temp,
                        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                        "--dashboard-agent-listen-port", str(free_port()), "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "2", "--num-gpus", "0", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=180)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
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


def modalmill(env, *args, timeout=500):
    return subprocess.run([f"{BIN}/python", "-m", "modalmill", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_default_resources_on_a_cluster_without_gpus(head, demo_corpus, tmp_path):
    weights = save_tiny_blip(tmp_path / "blip")
    job = tmp_path / "job.yaml"
    job.write_text(f"input: '{os.path.join(demo_corpus, 'shard-00000.tar')}'\noutput: {tmp_path / 'out'}\n"
                   f"modalities: [rgb, caption]\ndecode: {{max_size: 96}}\n"
                   f"labelers: {{caption: {{config: {{weights: '{weights}', max_new_tokens: 5, num_beams: 1}}}}}}\n")
    r = modalmill(head["env"], "run", job, "--address", head["address"], "--no-progress")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    # BLIP's default asks for a GPU (and 24 GB, kept when a node has that much): its GPU share became 0
    assert "labeler caption: default resources adapted to this cluster: num_gpus=0" in r.stderr, r.stderr[-2000:]
    assert "5 sample(s) written" in r.stdout
    assert manifest.read_marker(str(tmp_path / "out"), "shard-00000")["modalities"]["caption"]["checkpoint"]


def test_submit_no_wait_returns_at_once_and_the_job_finishes(head, demo_corpus, tmp_path):
    from ray.job_submission import JobSubmissionClient

    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(f"input: '{os.path.join(demo_corpus, 'shard-00000.tar')}'\noutput: {out}\n"
                   "modalities: [rgb, crop_settings, canny_edge]\n")
    t0 = time.time()
    r = modalmill(head["env"], "submit", job, "--address", head["dashboard"], "--no-wait", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("ray job ") and line.split(": ")[-1] in ("PENDING", "RUNNING", "SUCCEEDED"), r.stdout
    job_id = line.split()[2].rstrip(":")
    client = JobSubmissionClient(head["dashboard"])
    deadline = time.time() + 300
    while str(client.get_job_status(job_id)).split(".")[-1] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, "the submitted job did not finish"
        time.sleep(1)
    assert str(client.get_job_status(job_id)).endswith("SUCCEEDED"), client.get_job_logs(job_id)[-3000:]
    assert manifest.read_marker(str(out), "shard-00000") is not None
    assert time.time() - t0 < 400


PROBE = '''from modalmill.labelers.base import Labeler


class PipProbe(Labeler):
    name = "pip_probe"
    outputs = ("caption",)

    def process_batch(self, batch):
        return [{"caption": ["installed by --pip"]} for _ in batch]
'''


def make_wheel(folder) -> str:
    """A pure-Python wheel holding a plugin labeler (entry point ``modalmill.labelers``)."""
    files = {
        "mm_pip_probe/__init__.py": PROBE,
        "mm_pip_probe-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: mm-pip-probe\nVersion: 0.1\n",
        "mm_pip_probe-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: modalmill-tests\nRoot-Is-Purelib: true\n"
                                           "Tag: py3-none-any\n",
        "mm_pip_probe-0.1.dist-info/entry_points.txt": "[modalmill.labelers]\npip_probe = mm_pip_probe:PipProbe\n",
    }
    path = os.path.join(folder, "mm_pip_probe-0.1-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("mm_pip_probe-0.1.dist-info/RECORD", "".join(f"{n},,\n" for n in files)
                   + "mm_pip_probe-0.1.dist-info/RECORD,,\n")
    # the submitting side validates the job spec too: it sees the same package unpacked
    with zipfile.ZipFile(path) as z:
        z.extractall(os.path.join(folder, "site"))
    return path


def test_submit_pip_installs_a_package_the_cluster_lacks(head, demo_corpus, tmp_path):
    wheel = make_wheel(str(tmp_path))
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(f"input: '{os.path.join(demo_corpus, 'shard-00000.tar')}'\noutput: {out}\n"
                   "modalities: [rgb, caption]\nlabelers: {pip_probe: {config: {}}}\n")
    env = {**head["env"], "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), ROOT])}
    check = subprocess.run([f"{BIN}/python", "-c", "import mm_pip_probe"], env=head["env"], capture_output=True)
    assert check.returncode != 0  # the cluster's own environment does not have it
    r = modalmill(env, "submit", job, "--address", head["dashboard"], "--pip", wheel, timeout=590)
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout, (r.stdout[-3000:], r.stderr[-3000:])
    import tarfile

    with tarfile.open(out / "caption" / "shard-00000.tar") as t:
        texts = [t.extractfile(m).read().decode() for m in t.getmembers()]
    assert texts and all("installed by --pip" in x for x in texts)
