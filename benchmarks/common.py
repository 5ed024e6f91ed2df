"""Shared pieces of the benchmark suite: the corpus, the machine and version record, CPU and memory meters,
and the figure type every benchmark returns.

Every figure is a ratio or a measurement taken within one run, so it holds on a noisy, shared machine: the
CPU meter also records how much CPU *other* processes used during each timed phase (``foreign_cores``), and
a figure taken while others used a noticeable share of the machine says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.path.join(HERE, "_work")

# The corpus: real-photo-derived JPEGs at typical web sizes, made once and reused.
CORPUS_SHARDS = int(os.environ.get("MODALMILL_BENCH_SHARDS", "20"))  # fewer: `run.py --quick` (a smoke test)
CORPUS_PER_SHARD = 100
CORPUS_SIZE_RANGE = (500, 1000)
MODELFREE = ("rgb", "crop_settings", "canny_edge", "color_palette", "metadata")

# A timed phase during which other processes used more than this many cores is marked "disturbed".
DISTURBED_CORES = 0.15


def bench_env() -> None:
    """Environment every benchmark process (and the Ray workers it starts) runs with."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # One thread per process for BLAS/torch, as Ray gives a 1-CPU task: the single-process baselines then use
    # one core, the same as one pipeline worker (each phase's CPU use is measured and reported).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Never join a Ray cluster someone else started on this machine: `modalmill label` run as a subprocess
    # starts its own embedded instance.
    os.environ["RAY_ADDRESS"] = "local"
    # Ray workers import the benchmark modules (actor classes of the baselines) from the repository root.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


# ---------------------------------------------------------------------- corpus


def corpus_dir() -> str:
    lo, hi = CORPUS_SIZE_RANGE
    return os.path.join(WORK, f"corpus-{CORPUS_SHARDS}x{CORPUS_PER_SHARD}-{lo}-{hi}")


def ensure_corpus(log=print) -> list[str]:
    """The benchmark corpus (built on first use; a ``.done`` file marks a complete build)."""
    from modalmill.jobs.democorpus import build_corpus

    d = corpus_dir()
    done = os.path.join(d, ".done")
    paths = [os.path.join(d, f"shard-{i:05d}.tar") for i in range(CORPUS_SHARDS)]
    if os.path.exists(done) and all(os.path.exists(p) for p in paths):
        return paths
    t = time.perf_counter()
    log(f"building the corpus: {CORPUS_SHARDS} shards x {CORPUS_PER_SHARD} JPEGs ({CORPUS_SIZE_RANGE[0]}-"
        f"{CORPUS_SIZE_RANGE[1]} px) in {d} ...")
    paths = build_corpus(d, CORPUS_SHARDS, CORPUS_PER_SHARD, size_range=CORPUS_SIZE_RANGE)
    with open(done, "w") as f:
        f.write(json.dumps({"seconds": round(time.perf_counter() - t, 1)}))
    log(f"  built in {time.perf_counter() - t:.0f} s")
    return paths


def resharded(paths: list[str], images: int, per_shard: int, log=print) -> list[str]:
    """The first ``images`` samples of the corpus ``paths``, repacked ``per_shard`` a shard (made once, under
    ``WORK``): every member's bytes and key copied as they are, so the JPEGs are the corpus's own; only the cut
    into shards differs (a benchmark's own choice: how much work it times, and how finely it can be shared out)."""
    from modalmill.io.readers import iter_tar
    from modalmill.jobs.democorpus import write_shard

    d = os.path.join(WORK, f"{os.path.basename(os.path.dirname(paths[0]))}-first{images}-by{per_shard}")
    n_shards = -(-images // per_shard)
    out = [os.path.join(d, f"shard-{i:05d}.tar") for i in range(n_shards)]
    if os.path.exists(os.path.join(d, ".done")) and all(os.path.exists(p) for p in out):
        return out
    log(f"repacking the corpus's first {images} images, {per_shard} a shard, in {d} ...")
    samples = []
    for p in paths:
        samples += [(r.key, dict(r.members)) for r in iter_tar(p) if getattr(r, "key", None)]
        if len(samples) >= images:
            break
    if len(samples) < images:
        raise RuntimeError(f"the corpus has {len(samples)} images, fewer than the {images} asked for")
    for i, path in enumerate(out):
        write_shard(path, samples[i * per_shard:min(images, (i + 1) * per_shard)])
    with open(os.path.join(d, ".done"), "w") as f:
        f.write(json.dumps({"images": images, "per_shard": per_shard}))
    return out


def shard_pattern(paths: list[str]) -> str:
    """A brace pattern modalmill reads for consecutive shards ``paths`` of the corpus."""
    d = os.path.dirname(paths[0])
    first = int(os.path.basename(paths[0])[6:11])
    last = int(os.path.basename(paths[-1])[6:11])
    return os.path.join(d, f"shard-{{{first:05d}..{last:05d}}}.tar")


def count_images(paths: list[str]) -> int:
    from modalmill.io.readers import iter_tar

    return sum(1 for p in paths for _ in iter_tar(p))


# ---------------------------------------------------------------------- machine and versions


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} elsewhere)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                k, _, v = line.partition(":")
                out[k.strip()] = v.strip()
    except OSError:
        pass
    return out


def machine() -> dict[str, Any]:
    """The machine, with the CPU model as precisely as it is known: the model name, the vendor's family / model /
    stepping numbers (a virtual machine's model name may be generic, e.g. "AMD EPYC"), the clock, and the
    instruction-set extensions the figures depend on (SHA-NI: the tars' hashes; AVX2 / AVX-512 / AMX: torch)."""
    info = _cpuinfo()
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    ext = [f for f in ("sha_ni", "avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    detail = ", ".join(x for x in (
        f"{info['vendor_id']} family {info.get('cpu family', '?')} model {info.get('model', '?')} stepping "
        f"{info.get('stepping', '?')}" if "vendor_id" in info else "",
        f"{float(info['cpu MHz']):.0f} MHz" if info.get("cpu MHz") else "",
        "+".join(ext)) if x)
    return {"cpu": model + (f" ({detail})" if detail else ""), "cores": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "os": f"{platform.system()} {platform.release()}"}


def versions(state: tuple[str, str] | None = None) -> dict[str, str]:
    """The packages' versions and modalmill's commit: ``state`` (:func:`git_state` when the run began, what the
    header names), else the checkout's state now."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "ray", "pillow", "numpy", "opencv-python-headless", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    head, dirty = state if state is not None else git_state()
    out["modalmill"] = head + (" + uncommitted changes" if dirty else "")
    return out


def git_state() -> tuple[str, str]:
    """(commit, what is uncommitted): the checkout's HEAD (12 digits) and a list of the tracked files changed
    since it ('' when the tree is clean); ("unknown ...", "") outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD").stdout.strip()
        dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").stdout.splitlines()
                 if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)", ""
    if not head:
        return "unknown (not a git checkout)", ""
    return head[:12], ", ".join(dirty)


def git_commit() -> str:
    head, dirty = git_state()
    return head + (" + uncommitted changes" if dirty else "")


# ---------------------------------------------------------------------- CPU and memory meter


def _busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (all cores)."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    return sum(t) - idle - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _title(p: psutil.Process) -> str:
    """A short name for a process: a Ray worker's title (``ray::_run_shard``), else its program."""
    try:
        argv = p.cmdline()
    except psutil.Error:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    return os.path.basename(argv[0])


def _role(p: psutil.Process) -> str:
    """'ray worker' (a Python worker: tasks and actors), 'ray daemon' (raylet, GCS, agents, monitors) or 'other'.

    Judged by the program and its script, never by the whole command line: the raylet's arguments name
    ``default_worker.py`` too. A worker's title becomes ``ray::IDLE`` / ``ray::<task>`` once it has run something.
    """
    try:
        argv = p.cmdline()
    except psutil.Error:
        return "gone"
    if not argv:
        return "other"
    head = argv[0]
    if head.startswith("ray::"):
        return "ray daemon" if head.split()[0] in ("ray::DashboardAgent", "ray::RuntimeEnvAgent") else "ray worker"
    prog = os.path.basename(head)
    if prog in ("raylet", "gcs_server"):
        return "ray daemon"
    script = next((a for a in argv[1:] if not a.startswith("-")), "")
    if os.path.basename(script) in ("default_worker.py", "setup_worker.py"):
        return "ray worker"
    if "/ray/" in script:
        return "ray daemon"
    return "other"


@dataclass
class Phase:
    """One timed phase: wall time, the CPU our process tree used, the CPU the whole machine used, and the peak
    resident memory of the driver (this process) and of each Ray worker process."""

    name: str
    wall_s: float = 0.0
    own_cpu_s: float = 0.0  # this process and its descendants (Ray's daemons and workers when embedded)
    machine_cpu_s: float = 0.0  # every process on the machine
    driver_peak_rss: int = 0
    worker_peak_rss: dict[int, int] = field(default_factory=dict)
    cpu_by_process: dict[str, float] = field(default_factory=dict)  # CPU seconds by process (role: name)

    @property
    def own_cores(self) -> float:
        return self.own_cpu_s / self.wall_s if self.wall_s else 0.0

    @property
    def foreign_cores(self) -> float:
        """Cores other processes (other users, other containers) used on average during the phase."""
        return max(0.0, self.machine_cpu_s - self.own_cpu_s) / self.wall_s if self.wall_s else 0.0

    @property
    def disturbed(self) -> bool:
        return self.foreign_cores > DISTURBED_CORES

    def as_dict(self) -> dict:
        return {"name": self.name, "wall_s": self.wall_s, "own_cpu_s": self.own_cpu_s,
                "machine_cpu_s": self.machine_cpu_s, "driver_peak_rss": self.driver_peak_rss,
                "worker_peak_rss": {str(k): v for k, v in self.worker_peak_rss.items()},
                "cpu_by_process": self.cpu_by_process}

    @classmethod
    def from_dict(cls, d: dict) -> "Phase":
        return cls(d["name"], d["wall_s"], d["own_cpu_s"], d["machine_cpu_s"], d["driver_peak_rss"],
                   {int(k): v for k, v in d["worker_peak_rss"].items()}, d.get("cpu_by_process", {}))

    def summary(self) -> dict:
        return {"wall_s": round(self.wall_s, 2), "cpu_s": round(self.own_cpu_s, 1), "cores": round(self.own_cores, 2),
                "other_processes_cores": round(self.foreign_cores, 2), "cpu_by_process": self.cpu_by_process}


class Monitor:
    """Context manager that measures a :class:`Phase`.

    A background thread samples the CPU times and resident memory of this process and its descendants every
    ``interval`` seconds, and looks for new descendants every ``refresh`` seconds (listing processes is the
    expensive part). CPU time of a process that exits counts up to its last sample.
    """

    def __init__(self, name: str, interval: float = 0.25, refresh: float = 2.0):
        self.phase = Phase(name)
        self.interval, self.refresh = interval, refresh
        self._me = psutil.Process()
        self._procs: dict[int, psutil.Process] = {}
        self._roles: dict[int, str] = {}
        self._names: dict[int, str] = {}
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._listed = 0.0
        self._opening = True

    def _list(self):
        try:
            kids = self._me.children(recursive=True)
        except psutil.Error:
            kids = []
        for p in [self._me] + kids:
            if p.pid not in self._procs:
                self._procs[p.pid] = p
            if p.pid == self._me.pid:
                self._roles[p.pid] = "driver"
            elif self._roles.get(p.pid) in (None, "other"):  # a starting worker's title changes later
                self._roles[p.pid] = _role(self._procs[p.pid])
            if self._names.get(p.pid, "").startswith(("ray::IDLE", "python", "?")) or p.pid not in self._names:
                self._names[p.pid] = _title(self._procs[p.pid])
        self._listed = time.monotonic()

    def _sample(self):
        if time.monotonic() - self._listed >= self.refresh:
            self._list()
        ph = self.phase
        for pid, p in list(self._procs.items()):
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    rss = p.memory_info().rss
            except psutil.Error:
                self._procs.pop(pid, None)
                continue
            cpu = t.user + t.system  # descendants are sampled themselves (children_* would count them twice)
            # processes found after the start began during the phase: all their CPU time is the phase's
            self._start.setdefault(pid, cpu if self._opening else 0.0)
            self._last[pid] = cpu
            role = self._roles.get(pid)
            if role == "driver":
                ph.driver_peak_rss = max(ph.driver_peak_rss, rss)
            elif role == "ray worker":
                ph.worker_peak_rss[pid] = max(ph.worker_peak_rss.get(pid, 0), rss)

    def _loop(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Phase:
        self._list()
        self._sample()
        self._opening = False
        self._machine0 = _busy_seconds()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self.phase

    def __exit__(self, *exc):
        self.phase.wall_s = time.perf_counter() - self._t0
        machine1 = _busy_seconds()
        self._stop.set()
        self._thread.join()
        self._list()
        self._sample()
        self.phase.own_cpu_s = sum(self._last[pid] - self._start.get(pid, 0.0) for pid in self._last)
        by: dict[str, float] = {}
        for pid in self._last:
            what = f"{self._roles.get(pid, 'other')}: {self._names.get(pid, '?')}"
            by[what] = round(by.get(what, 0.0) + self._last[pid] - self._start.get(pid, 0.0), 2)
        self.phase.cpu_by_process = dict(sorted(by.items(), key=lambda kv: -kv[1]))
        self.phase.machine_cpu_s = machine1 - self._machine0
        return False


# ---------------------------------------------------------------------- output checks


def tar_digests(root: str, modalities, shards: list[str]) -> dict[str, str]:
    """sha256 of each ``root/<modality>/<shard>.tar``."""
    out = {}
    for m in modalities:
        for s in shards:
            path = os.path.join(root, m, f"{s}.tar")
            with open(path, "rb") as f:
                out[f"{m}/{s}"] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


# ---------------------------------------------------------------------- figures


@dataclass
class Figure:
    """One reported figure: a value with its target and whether it is met (None: not measured / no target)."""

    benchmark: str
    name: str
    value: float | None
    unit: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def not_measured(benchmark: str, name: str, reason: str, target: str = "") -> Figure:
    return Figure(benchmark, name, None, target=target, met=None, note=f"not measured: {reason}")


def start_ray(num_cpus: int = 2):
    """A fresh embedded Ray like ``modalmill label`` starts (returns the seconds it took)."""
    import ray

    t = time.perf_counter()
    # address="local": always a new embedded instance, never a cluster someone else started on this machine
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - t
