"""Running shard tasks on Ray: one task per shard, model labelers in actor pools, progress on the driver.

Shard tasks read, decode, run model-free labelers in-process and write their shard's tars themselves, so no
image or label passes through the driver. Stateful (model) labelers run as Ray actors, one pool per
labeler sized by the job (``workers``) and placed by the resources the labeler declares; shard tasks send
them batches. A shard task's failure is a returned value: the driver records it and goes on.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

import ray

from ..labelers.base import Resources
from . import manifest
from .shard import LabelerRun, ShardTask, call_local, local_labeler, process_shard


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (or ``RAY_ADDRESS``) or start an embedded Ray. Returns True if we started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return True


@ray.remote
class ProgressCounter:
    def __init__(self):
        self.samples = 0

    def add(self, n: int) -> None:
        self.samples += n

    def get(self) -> int:
        return self.samples


@ray.remote
class LabelerActor:
    """Holds one model labeler, set up once; serves batches from shard tasks."""

    def __init__(self, run: LabelerRun):
        self.labeler = local_labeler(run)

    def ready(self) -> str:
        return self.labeler.name

    def process_batch(self, inputs):
        return self.labeler.process_batch(inputs)

    def checkpoint_id(self) -> str:
        return self.labeler.checkpoint_id()


def _run_shard(task: ShardTask, pools: dict[str, list], counter) -> dict:
    def call(run: LabelerRun, inputs):
        if run.stateful and run.labeler in pools:
            handles = pools[run.labeler]
            call.n = getattr(call, "n", task.source.index)
            call.n += 1
            return ray.get(handles[call.n % len(handles)].process_batch.remote(inputs))
        return call_local(run, inputs)

    def checkpoint(run: LabelerRun) -> str:
        if run.stateful and run.labeler in pools:
            return ray.get(pools[run.labeler][0].checkpoint_id.remote())
        return call_local.checkpoint(run)

    call.checkpoint = checkpoint

    def progress(n: int) -> None:
        if counter is not None:
            counter.add.remote(n)

    try:
        return process_shard(task, call, progress)
    except Exception as e:  # noqa: BLE001 - a failed shard is reported, not raised
        failure = {"shard": task.shard, "index": task.source.index, "source": task.source.url, "mode": task.mode,
                   "status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                   "traceback": traceback.format_exc()[-4000:],
                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            manifest.write_failure(task.output, task.shard, failure)
        except Exception:  # noqa: BLE001 - the output itself may be what fails
            pass
        failure.pop("traceback")
        return failure


def make_pools(runs: list[LabelerRun], settings: dict) -> dict[str, list]:
    """One actor pool per stateful labeler; waits until every actor is set up."""
    pools: dict[str, list] = {}
    for run in runs:
        if not run.stateful or run.labeler in pools:
            continue
        cls = run.labeler_class()
        s = settings.get(run.labeler)
        res = Resources(**{**cls.default_resources.__dict__, **(s.resources if s else {})})
        n = max(1, s.workers if s else 1)
        pools[run.labeler] = [LabelerActor.options(**res.ray_options()).remote(run) for _ in range(n)]
    for handles in pools.values():
        ray.get([h.ready.remote() for h in handles])
    return pools


def execute(tasks: list[ShardTask], runs: list[LabelerRun], labeler_settings: dict, *, shard_cpus: float = 1.0,
            max_retries: int = 3, show_progress: bool = True) -> list[dict]:
    """Run the shard tasks on the connected Ray cluster; returns one summary per task."""
    from tqdm.auto import tqdm

    if not tasks:
        return []
    pools = make_pools(runs, labeler_settings)
    counter = ProgressCounter.remote()
    remote = ray.remote(_run_shard).options(num_cpus=shard_cpus, max_retries=max_retries)
    window = max(2, int(2 * ray.cluster_resources().get("CPU", 2) / max(shard_cpus, 0.01)))
    disable = not show_progress or os.environ.get("TQDM_DISABLE") == "1"
    shard_bar = tqdm(total=len(tasks), unit="shard", desc="shards", position=0, disable=disable)
    sample_bar = tqdm(unit="sample", desc="samples", position=1, disable=disable)
    results: list[dict] = []
    queue = list(tasks)
    running: dict = {}
    try:
        while queue or running:
            while queue and len(running) < window:
                t = queue.pop(0)
                running[remote.remote(t, pools, counter)] = t
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in done:
                task = running.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a worker died more often than max_retries
                    res = {"shard": task.shard, "index": task.source.index, "source": task.source.url,
                           "mode": task.mode, "status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
                    try:
                        manifest.write_failure(task.output, task.shard, res)
                    except Exception:  # noqa: BLE001
                        pass
                results.append(res)
                shard_bar.update(1)
            n = ray.get(counter.get.remote())
            sample_bar.update(n - sample_bar.n)
    finally:
        shard_bar.close()
        sample_bar.close()
        for handles in pools.values():
            for h in handles:
                ray.kill(h)
        ray.kill(counter)
    return sorted(results, key=lambda r: r["index"])
