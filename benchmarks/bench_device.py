"""Benchmark 6: keeping an accelerator busy, on any CPU machine (a simulated device).

A benchmark labeler (``bench_sim_a``, and ``bench_sim_b`` for the sharing case) stands in for a model on an
accelerator: its actor holds one simulated device for a fixed time per batch without using the CPU (an exclusive
``flock`` on the device's lock file plus ``time.sleep``, which releases the GIL), and records every busy interval.
Everything else is the real pipeline: ``modalmill``'s runner and Ray executor, shard tasks that read the benchmark
corpus's tars, decode, make crop settings, run the labeler's ``prepare`` (crop 0, the job's one crop, resized to
224x224, as the DINOv2 labeler resizes each crop) and write ``rgb`` (the corpus's RGB JPEGs are stored as they are,
not re-encoded), ``crop_settings`` and the labeler's output with markers and manifests. The device is declared to
Ray as the custom resource ``sim_device`` (``ray.init(resources=)``) and asked for through the labeler's
``resources.custom``, so Ray's own scheduling places the actors, packs two 0.5 shares on one device, and spreads
1.0 requests over two devices.

The stand-in model's host-side work per batch is a realistic cost, not nothing: before holding the device, its
actor copies the batch's uint8 224 px crops into one array and converts it to float32 (:func:`host_staging`: the
batch's 2.4 MB copied once and written again as 9.6 MB, what a model's ``to_tensor`` does before the transfer); the
median ms per batch is in the notes. Every batch is logged (sent by the shard task, started and ended on the device)
and the run record gives each shard task's timeline, so the notes say where the device waited.

Figures (each the median of ``REPEATS`` runs, min and max beside it):

- **busy fraction** of a device: its busy time / the wall time from the first batch's start to the last
  batch's end, with where it idled: no batch at the actor at a shard task's start or elsewhere, or actor-side
  (host staging, Ray's call);
- **images per second** over that window, against the ideal: images / (total device time / devices), and the
  **whole job's** images / its wall time against the same ideal (start-up, planning, the actors' set-up, the last
  commit and the run record included);
- one device, enough CPU (``BATCH_MS`` per batch of 16, default 320 ms = 50 images/s: well under what 2 cores
  feed): busy >= 0.95;
- two labelers sharing one device (0.5 each, as a user packs two small models on one GPU): busy >= 0.95;
- two devices: throughput >= 1.9x one device's (same device time per batch), judged on the **median of paired
  runs** (each pair: a one-device run and a two-device run one after the other; every pair's ratio is shown);
- a sweep of the device time per batch (``SWEEP_MS``) on one device, with the machine's CPU use over each run's
  busy window (every process, sampled): a run is labelled **CPU-bound** only when its busy fraction is below 0.95
  *and* the CPUs were saturated (>= 90% busy); the images per second there are what this machine's CPUs can feed
  one device, the figure for sizing CPUs per GPU. A busy fraction below 0.95 with CPUs to spare is the pipeline's
  and is labelled so.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    # run as the module Ray workers import: classes defined in __main__ would travel by value, and the benchmark
    # modalities they write would not be registered in the workers
    from benchmarks import bench_device

    for _f in bench_device.run():
        print(f"{_f.name}: {_f.value} {_f.unit} (target {_f.target or '-'}, met {_f.met}) {_f.note}")
    raise SystemExit(0)

from benchmarks.common import WORK, Figure, _busy_seconds, bench_env, ensure_corpus, shard_pattern
from modalmill.labelers.base import LabelFailure, LabelInput, Labeler, Prepared, Resources, register_labeler
from modalmill.schemas.modalities import ARRAY, ModalitySpec, register_modality

B6 = "6. simulated accelerator"
DEVICE = "sim_device"
BATCH = 16
BATCH_MS = float(os.environ.get("MODALMILL_BENCH_DEVICE_MS", "320"))
SWEEP_MS = tuple(float(x) for x in os.environ.get("MODALMILL_BENCH_DEVICE_SWEEP", "20,80,320").split(","))
REPEATS = int(os.environ.get("MODALMILL_BENCH_REPEATS", "3"))
SHARDS = int(os.environ.get("MODALMILL_BENCH_DEVICE_SHARDS", "4"))  # shards of 100 images per run
BUSY_TARGET = 0.95
TWO_DEVICE_TARGET = 1.9
CPU_SATURATED = 0.9  # the machine's CPUs count as saturated at this busy fraction (all processes, all cores)

for _name in ("bench_sim_a", "bench_sim_b"):
    register_modality(ModalitySpec(_name, ARRAY, "npy", "float16", (3,),
                                   "benchmark only: the mean colour of the labeler's 224x224 input (every 8th pixel)"))


# ---------------------------------------------------------------------- the simulated device


class SimDevice:
    """One simulated accelerator shared by processes: held exclusively (flock) for a fixed time per batch."""

    def __init__(self, root: str, index: int):
        self.index = index
        self.lock_path = os.path.join(root, f"device-{index}.lock")
        self.log_path = os.path.join(root, f"device-{index}.log")

    def run(self, seconds: float, n: int, who: str, **trace) -> None:
        """Hold the device for ``seconds``; log the batch (``trace``: when it was sent, the actor's host work)."""
        with open(self.lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                t0 = time.time()
                time.sleep(seconds)  # no CPU, no GIL: the "kernel" runs on the device
                t1 = time.time()
                with open(self.log_path, "a") as log:
                    log.write(json.dumps({"start": t0, "end": t1, "n": n, "who": who, **trace}) + "\n")
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def claim_device(root: str, n_devices: int, share: float) -> int:
    """The device an actor with ``share`` of one uses: the first whose claimed shares leave room (Ray has
    already checked that the shares fit; this only names which unit, as CUDA_VISIBLE_DEVICES does for GPUs)."""
    path = os.path.join(root, "claims.json")
    with open(os.path.join(root, "claims.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        claims = json.load(open(path)) if os.path.exists(path) else [0.0] * n_devices
        for i, used in enumerate(claims):
            if used + share <= 1.0 + 1e-9:
                claims[i] = used + share
                with open(path, "w") as f:
                    json.dump(claims, f)
                return i
    raise RuntimeError(f"no simulated device has {share:g} free (claims {claims})")


def host_staging(items: list) -> np.ndarray:
    """The stand-in model's host-side work per batch, before the device: the batch's uint8 crops copied into one
    array and converted to float32 in [0, 1] (what a model's ``to_tensor`` does before the host-to-device copy:
    the batch's bytes copied once and written again four times as large)."""
    x = np.stack(items).astype(np.float32)
    x *= 1.0 / 255.0
    return x


class _SimLabeler(Labeler):
    stateful = True
    default_batch_size = BATCH
    default_resources = Resources(num_cpus=0.0)

    @dataclass(frozen=True)
    class Config:
        batch_ms: float = 40.0
        devices: str = ""  # folder of the simulated devices' lock files and logs
        n_devices: int = 1
        input_size: int = 224

    def setup(self) -> None:
        import ray

        share = float(ray.get_runtime_context().get_assigned_resources().get(DEVICE, 1.0))
        self.device = SimDevice(self.config.devices, claim_device(self.config.devices, self.config.n_devices, share))

    def prepare(self, batch: list[LabelInput]) -> Prepared:
        from PIL import Image

        out = Prepared()
        s = self.config.input_size
        for inp in batch:
            top, left, h, w, _ = (int(v) for v in inp.crops[0])
            crop = np.ascontiguousarray(inp.image[top:top + h, left:left + w])
            if crop.size == 0:
                out.append(LabelFailure("empty crop 0"))
                continue
            out.append(np.asarray(Image.fromarray(crop).resize((s, s), Image.BICUBIC)))
        out.sent = time.time()  # trace: when the shard task sends the batch to the actor
        return out

    def process_batch(self, batch: list) -> list:
        called = time.time()  # the actor starts the call (the batch's arguments are here)
        ok = [it for it in batch if not isinstance(it, LabelFailure)]
        x = host_staging(ok) if ok else np.zeros((0, 8, 8, 3), np.float32)
        host_s = time.time() - called
        self.device.run(self.config.batch_ms / 1000.0, len(batch), self.name, sent=getattr(batch, "sent", None),
                        called=called, host_s=host_s)
        means = iter(x[:, ::8, ::8].reshape(len(x), -1, 3).mean(axis=1).astype(np.float16))
        return [it if isinstance(it, LabelFailure) else {self.outputs[0]: next(means)} for it in batch]


@register_labeler
class SimA(_SimLabeler):
    name = "bench_sim_a"
    outputs = ("bench_sim_a",)
    description = "benchmark only: holds a simulated accelerator for a fixed time per batch"


@register_labeler
class SimB(_SimLabeler):
    name = "bench_sim_b"
    outputs = ("bench_sim_b",)
    description = "benchmark only: a second model on the same simulated accelerator"


# ---------------------------------------------------------------------- one run and its figures


class CpuSampler:
    """The machine's CPU use (every process, all cores) sampled every ``interval`` s while a job runs, so the
    utilisation over any window of the run can be read (:meth:`utilisation`)."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while True:
            self.samples.append((time.time(), _busy_seconds()))
            if self._stop.wait(self.interval):
                self.samples.append((time.time(), _busy_seconds()))
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def utilisation(self, t0: float, t1: float) -> float:
        """Busy fraction of all the machine's cores between ``t0`` and ``t1`` (samples around the window)."""
        inside = [s for s in self.samples if t0 - self.interval <= s[0] <= t1 + self.interval]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return float("nan")
        (a, ca), (b, cb) = inside[0], inside[-1]
        return (cb - ca) / ((b - a) * (os.cpu_count() or 1))


def _device_logs(devices: str, n_devices: int) -> list[list[dict]]:
    spans = []
    for i in range(n_devices):
        p = os.path.join(devices, f"device-{i}.log")
        spans.append(sorted((json.loads(line) for line in open(p)), key=lambda s: s["start"])
                     if os.path.exists(p) else [])
    return spans


def _waits(spans: list[dict], firsts: list[float]) -> dict:
    """Where one device waited between its batches (seconds): ``starved``, no batch at the actor (the next batch
    was sent after the device freed), split by whether that batch was a shard task's first (``shard_start``:
    sent within 2 s of a task's first batch); ``actor``: the rest (the actor's host staging, Ray's call)."""
    out = {"starved_shard_start_s": 0.0, "starved_other_s": 0.0, "actor_s": 0.0}
    for a, b in zip(spans, spans[1:]):
        gap = b["start"] - a["end"]
        if gap <= 0:
            continue
        sent = b.get("sent") or a["end"]
        starved = min(gap, max(0.0, sent - a["end"]))
        first = any(0 <= sent - f < 2.0 for f in firsts)
        out["starved_shard_start_s" if first else "starved_other_s"] += starved
        out["actor_s"] += gap - starved
    return {k: round(v, 3) for k, v in out.items()}


def device_figures(devices: str, n_devices: int, shards: list[dict] | None = None) -> dict:
    """Busy fraction, throughput and where the devices waited, from the devices' logs (``shards``: the run
    record's shard entries, with each task's timeline)."""
    spans = _device_logs(devices, n_devices)
    flat = [s for d in spans for s in d]
    if not flat:
        raise RuntimeError("no batch reached a simulated device")
    t0, t1 = min(s["start"] for s in flat), max(s["end"] for s in flat)
    wall = t1 - t0
    busy = [sum(s["end"] - s["start"] for s in d) for d in spans]
    images = sum(s["n"] for s in flat)
    firsts = [s["timeline"]["first_sent"] for s in shards or () if (s.get("timeline") or {}).get("first_sent")]
    waits = [_waits(d, firsts) for d in spans]
    host = sorted(s.get("host_s") or 0.0 for s in flat)
    return {"busy_fraction": sum(busy) / (n_devices * wall), "per_device_busy": [b / wall for b in busy],
            "images": images, "wall_s": wall, "images_per_s": images / wall,
            "ideal_images_per_s": images / (sum(busy) / n_devices), "window": [t0, t1],
            "waits": {k: round(sum(w[k] for w in waits), 3) for k in waits[0]},
            "host_ms_per_batch": round(1000 * host[len(host) // 2], 2)}


def _timelines(shards: list[dict], t0: float) -> list[dict]:
    """Each shard task's milestones in seconds from the job's start (for the figures' detail)."""
    out = []
    for s in shards:
        tl = s.get("timeline") or {}
        out.append({"shard": s.get("shard"), **{k: round(v - t0, 3) for k, v in tl.items()
                                                 if isinstance(v, (int, float))}})
    return out


def run_once(paths: list[str], n_devices: int, labelers: dict[str, float], batch_ms: float, workers: int = 1,
             num_cpus: int = 2) -> dict:
    """One job on a fresh embedded Ray with ``n_devices`` simulated devices; ``labelers``: name -> device share."""
    import ray

    from modalmill.jobs.runner import run_job
    from modalmill.jobs.spec import job_from_dict

    tmp = tempfile.mkdtemp(prefix="device-", dir=WORK)
    devices, out = os.path.join(tmp, "devices"), os.path.join(tmp, "out")
    os.makedirs(devices)
    ray.init(address="local", num_cpus=num_cpus, resources={DEVICE: float(n_devices)}, include_dashboard=False,
             log_to_driver=False)
    try:
        spec = job_from_dict({
            "input": shard_pattern(paths), "output": out,
            "modalities": ["rgb", "crop_settings", *(get_output(n) for n in labelers)],
            "batch_size": BATCH,
            "labelers": {n: {"config": {"batch_ms": batch_ms, "devices": devices, "n_devices": n_devices},
                             "batch_size": BATCH, "workers": workers,
                             "resources": {"num_cpus": 0, "custom": {DEVICE: share}}}
                         for n, share in labelers.items()},
        })
        with CpuSampler() as cpu:
            t = time.time()
            summary = run_job(spec, show_progress=False)
            elapsed = time.time() - t
        if summary.get("exit_code", 0) != 0:
            raise RuntimeError(f"the benchmark job failed: {json.dumps(summary.get('failed_shards'))[:1500]}")
        figs = device_figures(devices, n_devices, summary.get("shards"))
        w0, w1 = figs["window"]
        figs.update(job_s=elapsed, job_images_per_s=figs["images"] / elapsed,
                    job_vs_ideal=figs["images"] / elapsed / figs["ideal_images_per_s"],
                    before_first_batch_s=round(w0 - t, 3), after_last_batch_s=round(t + elapsed - w1, 3),
                    cpu_busy=round(cpu.utilisation(w0, w1), 3), shards=_timelines(summary.get("shards") or [], t))
        return figs
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def get_output(name: str) -> str:
    return {"bench_sim_a": "bench_sim_a", "bench_sim_b": "bench_sim_b"}[name]


KEYS = ("busy_fraction", "images_per_s", "ideal_images_per_s", "job_images_per_s", "job_vs_ideal", "cpu_busy")


def summarise(runs: list[dict]) -> dict:
    """Median, min and max of each figure over ``runs``, and the runs themselves."""
    out = {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
               "max": max(r[k] for r in runs)} for k in KEYS}
    out["runs"] = runs
    return out


def repeat(fn, n: int = REPEATS) -> dict:
    return summarise([fn() for _ in range(n)])


def _spread(d: dict, fmt: str = "{:.3f}") -> str:
    return f"median of {len(d.get('runs', [])) or REPEATS}; min {fmt.format(d['min'])}, max {fmt.format(d['max'])}"


def _waited(r: dict) -> str:
    """Where the device waited, summed over the runs' windows, as shares of the busy windows."""
    wall = sum(x["wall_s"] * len(x["per_device_busy"]) for x in r["runs"])
    w = {k: sum(x["waits"][k] for x in r["runs"]) / wall for k in r["runs"][0]["waits"]}
    return (f"device idle {1 - r['busy_fraction']['median']:.1%}: no batch at the actor at a shard task's start "
            f"{w['starved_shard_start_s']:.1%}, elsewhere {w['starved_other_s']:.1%}, actor-side (host staging "
            f"{r['runs'][0]['host_ms_per_batch']:.1f} ms / batch, Ray's call) {w['actor_s']:.1%}")


def _job_note(r: dict) -> str:
    j = r["job_vs_ideal"]
    return (f"whole job (start-up, planning, actors' set-up, last commit, run record) {j['median']:.3f} of the "
            f"ideal (min {j['min']:.3f}, max {j['max']:.3f}); CPUs {r['cpu_busy']['median']:.0%} busy")


def run(log=print) -> list[Figure]:
    bench_env()
    paths = ensure_corpus(log)[:SHARDS]
    figs: list[Figure] = []

    log(f"{B6}: one device and two devices, {BATCH_MS:g} ms per batch of {BATCH}, {REPEATS} paired runs ...")
    pairs = [(run_once(paths, 1, {"bench_sim_a": 1.0}, BATCH_MS),
              run_once(paths, 2, {"bench_sim_a": 1.0}, BATCH_MS, workers=2)) for _ in range(REPEATS)]
    one, two = summarise([p[0] for p in pairs]), summarise([p[1] for p in pairs])
    figs.append(_busy_figure(f"one device: busy fraction ({BATCH_MS:g} ms / batch of {BATCH})", one))

    log(f"{B6}: two labelers sharing one device (0.5 each) ...")
    shared = repeat(lambda: run_once(paths, 1, {"bench_sim_a": 0.5, "bench_sim_b": 0.5}, BATCH_MS / 2))
    figs.append(_busy_figure(f"two labelers on one device (0.5 each, {BATCH_MS / 2:g} ms / batch each): busy "
                             "fraction", shared))
    figs.append(_two_devices(pairs, two))
    figs += _sweep(paths, one, log)
    return figs


def _busy_figure(name: str, r: dict) -> Figure:
    b = r["busy_fraction"]
    return Figure(B6, name, b["median"], "", f">= {BUSY_TARGET}", b["median"] >= BUSY_TARGET,
                  f"{_spread(b)}; {r['images_per_s']['median']:.1f} img/s in the busy window of an ideal "
                  f"{r['ideal_images_per_s']['median']:.1f}; {_waited(r)}; {_job_note(r)}", detail=r)


def _two_devices(pairs: list[tuple[dict, dict]], two: dict) -> Figure:
    """Two devices against one, run by run: each pair is a one-device run and a two-device run made one after the
    other; the figure is the median of the pairs' ratios (each shown), met only when that median meets it."""
    ratios = [t["images_per_s"] / o["images_per_s"] for o, t in pairs]
    job = [t["job_images_per_s"] / o["job_images_per_s"] for o, t in pairs]
    med = statistics.median(ratios)
    return Figure(B6, "two devices: throughput vs one device (median of paired runs)", med, "x",
                  f">= {TWO_DEVICE_TARGET}", med >= TWO_DEVICE_TARGET,
                  f"paired runs {', '.join(f'{x:.2f}' for x in ratios)}x (busy windows); whole jobs "
                  f"{', '.join(f'{x:.2f}' for x in job)}x; two-device busy {two['busy_fraction']['median']:.3f} "
                  f"({_waited(two)}); {_job_note(two)}", detail={"ratios": ratios, "job_ratios": job, **two})


def _sweep(paths: list[str], one: dict, log) -> list[Figure]:
    """Busy fraction against the device time per batch. A run is CPU-bound only when its busy fraction is under
    the target *and* the machine's CPUs were saturated (>= 90 % busy over the window, every process counted)."""
    figs, limit = [], None
    for ms in SWEEP_MS:
        log(f"{B6}: sweep, {ms:g} ms per batch ...")
        r = one if ms == BATCH_MS else repeat(lambda ms=ms: run_once(paths, 1, {"bench_sim_a": 1.0}, ms))
        b, cpu = r["busy_fraction"], r["cpu_busy"]["median"]
        short = b["median"] < BUSY_TARGET
        cpu_bound = short and cpu >= CPU_SATURATED
        why = ("; CPU-bound" if cpu_bound else "; NOT CPU-bound: the device waits on the pipeline" if short else "")
        figs.append(Figure(B6, f"sweep: busy fraction at {ms:g} ms / batch", b["median"], "", "", None,
                           f"{_spread(b)}; {r['images_per_s']['median']:.1f} img/s, ideal "
                           f"{r['ideal_images_per_s']['median']:.1f}; CPUs {cpu:.0%} busy{why}; {_waited(r)}",
                           detail=r))
        if cpu_bound and (limit is None or r["images_per_s"]["median"] > limit[1]):
            limit = (ms, r["images_per_s"]["median"])
    cores = os.cpu_count()
    figs.append(Figure(B6, "what this machine's CPUs feed one device", limit[1] if limit else None, "img/s", "",
                       None, (f"the CPU side limits from {limit[0]:g} ms / batch of {BATCH} down "
                              f"({cores} cores saturated: read, decode, crops, 224 px prepare, tar writes)")
                       if limit else f"never CPU-bound (CPUs saturated) down to {min(SWEEP_MS):g} ms / batch"))
    return figs
