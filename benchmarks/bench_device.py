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

Figures (each the median of ``REPEATS`` runs, min and max beside it):

- **busy fraction** of a device: its busy time / the wall time from the first batch's start to the last
  batch's end;
- **images per second** over that window, against the ideal: images / (total device time / devices);
- one device, enough CPU (``BATCH_MS`` per batch of 16, default 320 ms = 50 images/s: a fifth of what 2 cores
  feed, so the device, not the CPU, is the limit; at 40 ms per batch a device eats 400 images/s, more than 2
  cores decode): busy >= 0.95;
- two labelers sharing one device (0.5 each, as a user packs two small models on one GPU): busy >= 0.95;
- two devices: throughput >= 1.9x one device's (same device time per batch);
- a sweep of the device time per batch (``SWEEP_MS``) on one device: where the busy fraction falls below 0.95,
  the CPU side (decode, crops, prepare, writing on this machine's cores) has become the limit; the images per
  second at that point are what this machine's CPUs can feed one device, the figure for sizing CPUs per GPU.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import statistics
import sys
import tempfile
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

from benchmarks.common import WORK, Figure, bench_env, ensure_corpus, shard_pattern
from modalmill.labelers.base import LabelFailure, LabelInput, Labeler, Prepared, Resources, register_labeler
from modalmill.schemas.modalities import ARRAY, ModalitySpec, register_modality

B6 = "6. simulated accelerator"
DEVICE = "sim_device"
BATCH = 16
BATCH_MS = float(os.environ.get("MODALMILL_BENCH_DEVICE_MS", "320"))
SWEEP_MS = tuple(float(x) for x in os.environ.get("MODALMILL_BENCH_DEVICE_SWEEP", "5,20,80,320").split(","))
REPEATS = int(os.environ.get("MODALMILL_BENCH_REPEATS", "3"))
SHARDS = int(os.environ.get("MODALMILL_BENCH_DEVICE_SHARDS", "4"))  # shards of 100 images per run
BUSY_TARGET = 0.95
TWO_DEVICE_TARGET = 1.9

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

    def run(self, seconds: float, n: int, who: str) -> None:
        with open(self.lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                t0 = time.time()
                time.sleep(seconds)  # no CPU, no GIL: the "kernel" runs on the device
                t1 = time.time()
                with open(self.log_path, "a") as log:
                    log.write(json.dumps({"start": t0, "end": t1, "n": n, "who": who}) + "\n")
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
        return out

    def process_batch(self, batch: list) -> list:
        self.device.run(self.config.batch_ms / 1000.0, len(batch), self.name)
        # the output from 1/64 of the pixels: ~0.2 ms of the actor's CPU per batch, so the actor's time between
        # batches is the pipeline's (Ray's call, argument transfer), not this stand-in model's post-processing
        return [it if isinstance(it, LabelFailure) else
                {self.outputs[0]: it[::8, ::8].reshape(-1, 3).mean(axis=0).astype(np.float16)} for it in batch]


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


def device_figures(devices: str, n_devices: int) -> dict:
    """Busy fraction and throughput from the devices' logs."""
    spans = []
    for i in range(n_devices):
        p = os.path.join(devices, f"device-{i}.log")
        spans.append([json.loads(line) for line in open(p)] if os.path.exists(p) else [])
    flat = [s for d in spans for s in d]
    if not flat:
        raise RuntimeError("no batch reached a simulated device")
    t0, t1 = min(s["start"] for s in flat), max(s["end"] for s in flat)
    wall = t1 - t0
    busy = [sum(s["end"] - s["start"] for s in d) for d in spans]
    images = sum(s["n"] for s in flat)
    return {"busy_fraction": sum(busy) / (n_devices * wall), "per_device_busy": [b / wall for b in busy],
            "images": images, "wall_s": wall, "images_per_s": images / wall,
            "ideal_images_per_s": images / (sum(busy) / n_devices)}


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
        t = time.perf_counter()
        summary = run_job(spec, show_progress=False)
        elapsed = time.perf_counter() - t
        if summary.get("exit_code", 0) != 0:
            raise RuntimeError(f"the benchmark job failed: {json.dumps(summary.get('failed_shards'))[:1500]}")
        figs = device_figures(devices, n_devices)
        figs["job_s"] = elapsed
        return figs
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def get_output(name: str) -> str:
    return {"bench_sim_a": "bench_sim_a", "bench_sim_b": "bench_sim_b"}[name]


def repeat(fn, n: int = REPEATS) -> dict:
    runs = [fn() for _ in range(n)]
    keys = ("busy_fraction", "images_per_s", "ideal_images_per_s")
    out = {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
               "max": max(r[k] for r in runs)} for k in keys}
    out["runs"] = runs
    return out


def _spread(d: dict, fmt: str = "{:.3f}") -> str:
    return f"median of {len(d.get('runs', [])) or REPEATS}; min {fmt.format(d['min'])}, max {fmt.format(d['max'])}"


def run(log=print) -> list[Figure]:
    bench_env()
    paths = ensure_corpus(log)[:SHARDS]
    figs: list[Figure] = []

    log(f"{B6}: one device, {BATCH_MS:g} ms per batch of {BATCH} ...")
    one = repeat(lambda: run_once(paths, 1, {"bench_sim_a": 1.0}, BATCH_MS))
    b = one["busy_fraction"]
    figs.append(Figure(B6, f"one device: busy fraction ({BATCH_MS:g} ms / batch of {BATCH})", b["median"], "",
                       f">= {BUSY_TARGET}", b["median"] >= BUSY_TARGET,
                       f"{_spread(b)}; {one['images_per_s']['median']:.1f} img/s of an ideal "
                       f"{one['ideal_images_per_s']['median']:.1f}", detail=one))

    log(f"{B6}: two labelers sharing one device (0.5 each) ...")
    shared = repeat(lambda: run_once(paths, 1, {"bench_sim_a": 0.5, "bench_sim_b": 0.5}, BATCH_MS / 2))
    b = shared["busy_fraction"]
    figs.append(Figure(B6, f"two labelers on one device (0.5 each, {BATCH_MS / 2:g} ms / batch each): busy "
                       "fraction", b["median"], "", f">= {BUSY_TARGET}", b["median"] >= BUSY_TARGET,
                       f"{_spread(b)}; {shared['images_per_s']['median']:.1f} batches' images/s of an ideal "
                       f"{shared['ideal_images_per_s']['median']:.1f}", detail=shared))

    log(f"{B6}: two devices ...")
    two = repeat(lambda: run_once(paths, 2, {"bench_sim_a": 1.0}, BATCH_MS, workers=2))
    ratio = two["images_per_s"]["median"] / one["images_per_s"]["median"]
    ratios = [a["images_per_s"] / o["images_per_s"] for a, o in zip(two["runs"], one["runs"])]
    figs.append(Figure(B6, "two devices: throughput vs one device", ratio, "x", f">= {TWO_DEVICE_TARGET}",
                       ratio >= TWO_DEVICE_TARGET,
                       f"medians {two['images_per_s']['median']:.1f} / {one['images_per_s']['median']:.1f} img/s; "
                       f"paired runs {min(ratios):.2f}-{max(ratios):.2f}x; busy "
                       f"{two['busy_fraction']['median']:.3f}", detail=two))

    limit = None
    for ms in SWEEP_MS:
        log(f"{B6}: sweep, {ms:g} ms per batch ...")
        r = one if ms == BATCH_MS else repeat(lambda ms=ms: run_once(paths, 1, {"bench_sim_a": 1.0}, ms))
        b = r["busy_fraction"]
        cpu_bound = b["median"] < BUSY_TARGET
        figs.append(Figure(B6, f"sweep: busy fraction at {ms:g} ms / batch", b["median"], "", "", None,
                           f"{_spread(b)}; {r['images_per_s']['median']:.1f} img/s, ideal "
                           f"{r['ideal_images_per_s']['median']:.1f}" + ("; CPU-bound" if cpu_bound else ""),
                           detail=r))
        if cpu_bound and (limit is None or r["images_per_s"]["median"] > limit[1]):
            limit = (ms, r["images_per_s"]["median"])
    cores = os.cpu_count()
    figs.append(Figure(B6, "what this machine's CPUs feed one device", limit[1] if limit else None, "img/s", "",
                       None, (f"the CPU side limits from {limit[0]:g} ms / batch of {BATCH} down "
                              f"({cores} cores: read, decode, crops, 224 px prepare, tar writes)")
                       if limit else f"never CPU-bound down to {min(SWEEP_MS):g} ms / batch"))
    return figs
