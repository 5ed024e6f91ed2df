"""One real Ray cluster on loopback (`ray start --head`, then a second `ray start` node), shared by the tests of
tests/test_cluster.py through the ``loopback_cluster`` (head only) and ``two_node_cluster`` fixtures
(tests/conftest.py).

The head (2 CPUs, no GPU, 2 units of a custom device ``dev`` that tests/labelers_costed.py's labelers ask shares
of, the dashboard for the Jobs API) starts when the first test that asks for it runs; a test
that asks for two nodes adds a second node (1 CPU) to it. The cluster is stopped as soon as the next test does not
ask for it (``pytest_runtest_teardown`` in tests/conftest.py), so it never idles through the rest of the session,
and a head-only test never runs on a cluster that has the second node: on one machine both nodes share the
session's runtime-env folder, and two nodes building the same ``--pip`` virtualenv in it at once break it (a
worker then fails with "No module named 'ray'"), which real clusters, one node per machine, never see.
Stopping kills exactly this cluster's processes (`ray stop` would stop every Ray on the machine).

The nodes run on a small virtualenv of their own whose site-packages are this environment's (a ``.pth`` file adds
them), not on this environment itself: a job's ``pip`` runtime env starts by cloning the nodes' virtualenv, and
cloning this one copied all 7 GB of it (torch and the models' packages) on every `submit --pip` test run.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import site
import socket
import subprocess
import sys
import tempfile

import psutil

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# gcs_server and the raylets do not exit on SIGTERM within 15 s (`ray stop` itself waits 16 s, then kills):
# a throwaway test cluster gets a short grace period, then SIGKILL.
STOP_GRACE_S = 2.0


def layered_python(folder: str) -> str:
    """A new virtualenv in ``folder`` that imports everything this one has: its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", folder], check=True, capture_output=True,
                   timeout=120)
    (own,) = glob.glob(os.path.join(folder, "lib", "python3*", "site-packages"))
    with open(os.path.join(own, "_modalmill_tests_base.pth"), "w") as f:  # addsitedir: their .pth files run too
        f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in site.getsitepackages()) + "\n")
    return os.path.join(folder, "bin", "python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="mmray", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
        self.port, self.dash = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dash}"
        # ray.init() in the test process rewrites RAY_AUTH_MODE; the loopback cluster runs without auth, like the
        # tests. PYTHONPATH holds the repository root (tests/conftest.py), so jobs can import the test labelers.
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONBREAKPOINT")}
        env.update({"PATH": BIN + os.pathsep + os.environ["PATH"], "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": "disabled",
                    "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)})
        self.env = env
        self.nodes = 1
        self.python = ""

    COMMON = ("--node-ip-address", "127.0.0.1", "--num-gpus", "0", "--disable-usage-stats")

    def start(self) -> LoopbackCluster:
        self.python = layered_python(os.path.join(self.temp, "py"))
        # each node's dashboard agent needs its own HTTP port (the default one may be taken by another Ray)
        self._ray_start("--head", "--port", str(self.port), "--temp-dir", self.temp, "--include-dashboard", "true",
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dash),
                        "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", "2",
                        "--resources", '{"dev": 2}', *self.COMMON)
        return self

    def add_node(self) -> None:
        self._ray_start("--address", self.address, "--dashboard-agent-listen-port", str(free_port()),
                        "--num-cpus", "1", *self.COMMON)
        self.nodes = 2

    def _ray_start(self, *args: str) -> None:
        r = subprocess.run([self.python, "-m", "ray.scripts.scripts", "start", *args], env=self.env,
                           capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"`ray start {args[0]}` failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: those whose command line names its temp dir or address, and all their
        descendants (the raylets' agents and workers rename themselves, e.g. ``ray::RuntimeEnvAgent``)."""
        # whole names only: "127.0.0.1:4321" must not match another cluster's "127.0.0.1:43210" (other pytest-xdist
        # workers and other test sessions on this machine run clusters of their own)
        mine = re.compile(rf"{re.escape(self.temp)}(?![\w-])|{re.escape(self.address)}(?!\d)")
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if mine.search(cmd):
                    found[p.pid] = p
                    found.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.Error:
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
        for _ in range(3):  # a raylet still alive may have started a process since the first listing
            known = {p.pid for p in alive}
            alive += [p for p in self.processes() if p.pid not in known]
            if not alive:
                break
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp, ignore_errors=True)


_shared: LoopbackCluster | None = None


def shared(nodes: int = 1) -> LoopbackCluster:
    """The shared cluster with ``nodes`` nodes (1: the head alone; 2: a second node added), started on first use."""
    global _shared
    if _shared is not None and _shared.nodes > nodes:
        stop_shared()
    try:
        if _shared is None:
            _shared = LoopbackCluster()
            _shared.start()
        if _shared.nodes < nodes:
            _shared.add_node()
    except BaseException:
        stop_shared()
        raise
    return _shared


def stop_shared() -> None:
    global _shared
    cluster, _shared = _shared, None
    if cluster is not None:
        cluster.stop()
