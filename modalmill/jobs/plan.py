"""``modalmill plan``: what a job will cost before it runs, from its labelers measured on a sample of its input.

The sample is read, decoded and cropped as the shard tasks do it (timed: that is the shard tasks' CPU cost per
image, model-free labelers included); every model labeler then runs as one actor placed with the resources the job
gives it, on the connected cluster, and its service time per image is timed over the sample after one warm-up
batch. From those costs the pool-sizing rule (:mod:`modalmill.pipeline.autoscale`) gives the actors each pool would
get on this cluster (or on ``devices`` accelerators of the kind measured), the job's projected images per second,
its bottleneck and the device-hours a million images take.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import ray

from ..io.cluster import init_ray, local_s3_env
from ..io.crops import make_crop_settings
from ..io.decode import DecodeError, decode_image
from ..io.readers import RawSample, iter_samples, pick_image_member, plan_sources
from ..labelers.base import LabelInput
from ..pipeline.autoscale import PoolShape, allocate
from ..pipeline.execute import kill_pools, start_pools, wait_until_set_up
from ..pipeline.shard import LabelerRun
from .runner import resolve_labelers
from .spec import JobSpec, LabelerSettings

SHARD_TASKS = "shard tasks"
NOT_ACCELERATORS = ("CPU", "memory", "object_store_memory")


@dataclass(frozen=True)
class Cost:
    name: str
    seconds_per_image: float  # one actor (or one shard task) alone, on its resources
    per_actor: dict[str, float]


def read_sample(spec: JobSpec, n: int) -> tuple[list[LabelInput], float]:
    """The first ``n`` decodable images of the input as labelers see them, and the CPU seconds per image that
    reading, decoding and cropping took here."""
    inputs: list[LabelInput] = []
    t0 = time.process_time()
    for src in plan_sources(spec.input, spec.shard_size, spec.parquet):
        for raw in iter_samples(src):
            item = _decoded(spec, raw) if isinstance(raw, RawSample) else None
            if item is not None:
                inputs.append(item)
            if len(inputs) >= n:
                return inputs, (time.process_time() - t0) / len(inputs)
    if not inputs:
        raise ValueError(f"plan: no decodable image in the input {spec.input!r}")
    return inputs, (time.process_time() - t0) / len(inputs)


def _decoded(spec: JobSpec, raw: RawSample) -> LabelInput | None:
    picked = None if raw.error else pick_image_member(raw.members)
    if picked is None:
        return None
    try:
        dec = decode_image(picked[1], spec.decode)
    except DecodeError:
        return None
    h, w = dec.image.shape[:2]
    return LabelInput(key=raw.key, image=dec.image, original_size=dec.original_size,
                      crops=make_crop_settings(raw.key, h, w, spec.crops, spec.seed))


def _batches(inputs: list[LabelInput], size: int) -> list[list[LabelInput]]:
    return [inputs[i:i + max(1, size)] for i in range(0, len(inputs), max(1, size))]


def _keep_labels(batch: list[LabelInput], run: LabelerRun, results: list) -> None:
    """Give the next labelers what this one made (derived labelers read other modalities)."""
    for inp, res in zip(batch, results):
        if isinstance(res, dict):
            for m in run.outputs:
                if m in res:
                    inp.labels[m] = res[m]


def _time_local(run: LabelerRun, inputs: list[LabelInput]) -> float:
    labeler = run.instance()
    labeler.setup()
    t0 = time.process_time()
    for batch in _batches(inputs, run.batch_size):
        _keep_labels(batch, run, labeler.process_batch(labeler.prepare(batch)))
    return (time.process_time() - t0) / len(inputs)


def _time_actor(run: LabelerRun, actor, inputs: list[LabelInput]) -> tuple[float, float]:
    """Seconds per image of one actor, after a warm-up batch (the first call pays lazy initialisation), and the
    CPU seconds per image of the labeler's ``prepare`` (done in the shard tasks: their cost)."""
    preparer = run.instance()
    batches = _batches(inputs, run.batch_size)
    c0 = time.process_time()
    prepared = [preparer.prepare(b) for b in batches]
    prepare_cost = (time.process_time() - c0) / len(inputs)
    _keep_labels(batches[0], run, ray.get(actor.process_batch.remote(prepared[0])))
    timed = list(zip(batches[1:], prepared[1:])) or [(batches[0], prepared[0])]
    t0 = time.perf_counter()
    for batch, p in timed:
        _keep_labels(batch, run, ray.get(actor.process_batch.remote(p)))
    return (time.perf_counter() - t0) / sum(len(b) for b, _ in timed), prepare_cost


def measure(spec: JobSpec, runs: list[LabelerRun], inputs: list[LabelInput], read_cost: float) -> list[Cost]:
    """Each model pool's cost (one actor on the cluster) and the shard tasks' (read + decode + model-free
    labelers + the model labelers' ``prepare``, on one CPU here)."""
    one_each = {name: dataclasses.replace(s, workers=1, min_workers=1, max_workers=None)
                for name, s in spec.labelers.items()}
    models = [r for r in runs if r.stateful]
    env = local_s3_env(str(spec.input), *[str(v) for r in runs for v in r.config.values() if isinstance(v, str)])
    pools = start_pools(models, one_each, spec.ray.shard_cpus, env)
    try:
        wait_until_set_up(pools)
        shard_cost, costs = read_cost, []
        for run in runs:
            if run.stateful:
                handle = pools[run.labeler][0]
                seconds, prepare_cost = _time_actor(run, handle, inputs)
                costs.append(Cost(run.labeler, seconds, _held(handle)))
                shard_cost += prepare_cost
            else:
                shard_cost += _time_local(run, inputs)
    finally:
        kill_pools(pools)
    return [Cost(SHARD_TASKS, shard_cost, {"CPU": spec.ray.shard_cpus})] + costs


def _held(actor) -> dict[str, float]:
    """The resources Ray gave this actor (after the job's settings were fitted to the cluster)."""
    return ray.get(actor.assigned.remote()) or {"CPU": 0.0}


def budget_of(cluster: dict[str, float], costs: list[Cost], devices: int | None) -> dict[str, float]:
    """What the pools and shard tasks share: the cluster's resources, or ``devices`` of the accelerator the
    labelers were measured on."""
    budget = {k: float(v) for k, v in cluster.items() if k == "CPU" or k not in NOT_ACCELERATORS}
    if devices is not None:
        kinds = {r for c in costs for r, v in c.per_actor.items() if r not in NOT_ACCELERATORS and v > 0}
        if not kinds:
            raise ValueError("plan --devices: the model labelers ran on CPUs here, so their speed on an "
                             "accelerator is unknown; run `plan` where the cluster has the accelerator")
        for kind in kinds:
            budget[kind] = float(devices)
    return budget


def project(costs: list[Cost], budget: dict[str, float], spec: JobSpec) -> dict:
    shapes = [PoolShape(c.name, {k: v for k, v in c.per_actor.items() if k not in ("memory",)},
                        **_bounds(spec.labelers.get(c.name))) for c in costs]
    alloc = allocate(shapes, {c.name: c.seconds_per_image for c in costs}, budget)
    accel = {r for s in shapes for r, v in s.per_actor.items() if r not in NOT_ACCELERATORS and v > 0}
    used = sum(alloc.actors[s.name] * max([s.per_actor.get(r, 0.0) for r in accel] or [0.0]) for s in shapes)
    hours = 1e6 / alloc.throughput / 3600 if alloc.throughput else float("inf")
    return {"actors": alloc.actors, "images_per_s": alloc.throughput, "bottleneck": alloc.bottleneck,
            "devices_used": used, "device_kind": sorted(accel),
            "device_hours_per_million": hours * used if accel else None,
            "cpu_hours_per_million": hours * budget.get("CPU", 0.0)}


def _bounds(s: LabelerSettings | None) -> dict:
    return s.bounds() if s is not None else {}


def plan(spec: JobSpec, sample: int = 200, address: str | None = None, devices: int | None = None) -> dict:
    runs = resolve_labelers(spec, list(spec.modalities))
    inputs, read_cost = read_sample(spec, sample)
    init_ray(address or spec.ray.address, spec.ray.num_cpus, quiet_embedded=True)
    costs = measure(spec, runs, inputs, read_cost)
    budget = budget_of(ray.cluster_resources(), costs, devices)
    return {"sample": len(inputs), "budget": budget,
            "costs": [dataclasses.asdict(c) for c in costs], **project(costs, budget, spec)}


def render(p: dict) -> str:
    lines = [f"measured on {p['sample']} image(s); resources: "
             + ", ".join(f"{k} {v:g}" for k, v in sorted(p["budget"].items())),
             f"{'pool':<22} {'per actor':<26} {'ms/image':>9} {'images/s/actor':>15} {'actors':>7} {'images/s':>9}"]
    for c in p["costs"]:
        n = p["actors"][c["name"]]
        per = ", ".join(f"{k} {v:g}" for k, v in sorted(c["per_actor"].items()) if v)
        share = max([v for k, v in c["per_actor"].items() if k not in NOT_ACCELERATORS] or [1.0])
        rate = min(1.0, share) / c["seconds_per_image"] if c["seconds_per_image"] else float("inf")
        lines.append(f"{c['name']:<22} {per:<26} {c['seconds_per_image'] * 1e3:>9.1f} "
                     f"{1 / c['seconds_per_image']:>15.1f} {n:>7d} {n * rate:>9.1f}")
    lines.append(f"projected: {p['images_per_s']:.1f} images/s for the whole job; bottleneck: {p['bottleneck']}")
    if p["device_hours_per_million"] is not None:
        lines.append(f"{p['device_hours_per_million']:.1f} device-hours ({'/'.join(p['device_kind'])}, "
                     f"{p['devices_used']:g} in use) per million images")
    lines.append(f"{p['cpu_hours_per_million']:.1f} CPU-hours of the cluster per million images")
    return "\n".join(lines)
