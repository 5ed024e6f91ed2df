"""Resizing ``workers: auto`` actor pools while a job runs: measure, decide (:mod:`.autoscale`), apply.

The driver's loop calls :meth:`Resizer.tick` about twice a second. It

- **measures**: every ``MODALMILL_AUTOSCALE_S`` seconds (default 1) it asks each serving actor for its cumulative
  counters (:meth:`LabelerActor.load`: samples served and seconds spent in ``process_batch``) and its batches'
  intervals on its device since the last answer. The call runs beside the actor's batches (its control group) and
  is collected without waiting; the difference between two answers is that actor's window. Each pool's window
  (its actors' samples, busy seconds, and the device-seconds :class:`.autoscale.DeviceClock` gives their batches)
  goes to :class:`.autoscale.Autoscaler`, whose cost per sample is those device-seconds (or, for a pool whose
  actors cannot say which device they are on, the busy time divided by an estimate of the sharing);
- **decides**: :meth:`Autoscaler.decide` gives the resizes that raise the projected throughput by at least 10 %
  (each logged as one line: pool, from, to, why). Nothing is decided while an earlier resize is still under way,
  and the measurements start afresh after one (actors that share devices measure each other's load);
- **applies**: a pool that grows gets new actors at once (Ray places them from what the allocation left free:
  the budget is the cluster's accelerators and its CPUs less one shard task's, the rule the pools start with); an
  actor joins its pool only once it is set up, so no batch waits behind its start. A pool that shrinks *retires*
  actors: they leave the pool's membership at once, are given ``MODALMILL_AUTOSCALE_DRAIN_S`` seconds (default 1.5:
  a shard task sees the shrink within ``REFRESH_S``) for the batches already sent to them, then one more call (queued
  after every batch) and only then killed.

Membership: shard tasks learn each pool's current actors from one small actor, :class:`.dispatch.PoolRegistry`
(no CPU; on the driver's node), which holds the handles and a version number and chooses the actor of every batch
(:mod:`.dispatch`): a shrink's retired actors get no batch after it is published, new actors get them at once. A
batch that still reached an actor killed by a shrink fails with the actor's death; the task then refreshes, sees
that the actor was removed, and sends the batch again to one that remains (``execute._Members``): nothing is lost,
and labels do not depend on which actor made them. The actors' devices, as their ``load()`` answers say, go to the
registry too, and every pool's cost per sample once all are measured: it sends a batch to the actor whose
device holds the least work in flight.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from .autoscale import Autoscaler, Decision, DeviceClock, PoolShape, Window, allocate
from .dispatch import actor_key

REFRESH_S = 1.0  # how stale a shard task's view of the pools may be
# a decision needs this many seconds of measurements (since the start or the last resize): one 1 s window of a
# loaded machine's noise made resizes back and forth on 2 cores
MEASURE_S = float(os.environ.get("MODALMILL_AUTOSCALE_MEASURE_S", "4"))
INTERVAL_S = float(os.environ.get("MODALMILL_AUTOSCALE_S", "1"))
# a retired actor's drain: after REFRESH_S no shard task sends it more; the barrier call then waits for the rest
DRAIN_S = float(os.environ.get("MODALMILL_AUTOSCALE_DRAIN_S", str(REFRESH_S + 0.5)))
NOT_BUDGET = ("memory", "object_store_memory")
# an actor whose load() is unanswered this long no longer holds back the costing of its device's batches
SILENT_S = float(os.environ.get("MODALMILL_AUTOSCALE_SILENT_S", "10"))


def per_actor(res) -> dict[str, float]:
    """A labeler's :class:`~modalmill.labelers.base.Resources` as the allocator counts them."""
    out = {"CPU": float(res.num_cpus), "GPU": float(res.num_gpus)}
    out.update({str(k): float(v) for k, v in (res.custom or {}).items()})
    return {k: v for k, v in out.items() if v > 0}


def pool_budget(cluster: dict[str, float], shard_cpus: float) -> dict[str, float]:
    """What the pools may hold: the cluster's accelerators and custom resources, and its CPUs less one shard
    task's (the rule :func:`execute._leave_room_for_shard_tasks` keeps), so shard tasks are never starved."""
    out = {k: float(v) for k, v in cluster.items() if k not in NOT_BUDGET and not k.startswith("node:")}
    out["CPU"] = max(0.0, out.get("CPU", 0.0) - shard_cpus)
    return out


def resizable(per: dict[str, float], budget: dict[str, float]) -> bool:
    """A pool can be sized by the rule only if one actor holds something the budget bounds (an actor that asks for
    nothing could be started without end)."""
    return any(v > 0 and k in budget for k, v in per.items())


def shapes_for(requests: dict, settings: dict, budget: dict[str, float], counts: dict[str, int]) -> list[PoolShape]:
    """Each pool as the allocator sees it: ``workers: N`` pools (and pools that hold nothing bounded) fixed at
    their size, ``auto`` pools within their bounds."""
    out = []
    for name, res in requests.items():
        s, per = settings.get(name), per_actor(res)
        bounds = s.bounds() if s is not None else {"min": 1, "max": None}
        if "fixed" not in bounds and not resizable(per, budget):
            bounds = {"fixed": counts[name]}
        out.append(PoolShape(name, per, **bounds))
    return out


def first_sizes(shapes: list[PoolShape], budget: dict[str, float]) -> dict[str, int]:
    """How many actors each pool starts with before anything is measured: ``auto`` pools that hold accelerator
    shares split what is free equally (idle accelerators are the costly waste; the autoscaler then moves shares to
    the pool that limits), CPU-only ``auto`` pools start at their minimum."""
    accel = [p for p in shapes if p.fixed is None and any(k != "CPU" for k in p.per_actor)]
    fixed = [p if p in accel else PoolShape(p.name, p.per_actor, fixed=p.bounds()[0]) for p in shapes]
    if not accel:
        return {p.name: p.bounds()[0] for p in shapes}
    try:
        return allocate(fixed, {p.name: 1.0 for p in shapes}, budget).actors
    except ValueError:  # the minimums do not fit: Ray's placement says so (see placement.PlacementWatch)
        return {p.name: p.bounds()[0] for p in shapes}


def can_move(shapes: list[PoolShape], sizes: dict[str, int], budget: dict[str, float]) -> bool:
    """Whether any resize is possible at all: some ``auto`` pool can shrink (it is above its minimum) or grow (one
    more of its actors fits in what the pools leave free, below its maximum). When none can, no resizer runs."""
    free = dict(budget)
    for p in shapes:
        for r, v in p.per_actor.items():
            free[r] = free.get(r, 0.0) - v * sizes[p.name]
    for p in shapes:
        lo, hi = p.bounds()
        if p.fixed is None and (sizes[p.name] > lo or (sizes[p.name] < hi and all(
                free.get(r, 0.0) + 1e-9 >= v for r, v in p.per_actor.items() if v > 0))):
            return True
    return False


@dataclass
class _Retiring:
    handle: object
    pool: str
    since: float
    barrier: object = None  # a call queued after every batch sent to it


@dataclass
class Resizer:
    """Resizes the pools of one execution. ``start_actor(name)`` creates one more actor of a pool (its set-up
    queued); ``pools`` is the execution's membership (name -> handles), updated in place and published."""

    shapes: list[PoolShape]
    budget: dict[str, float]
    pools: dict[str, list]
    registry: object
    start_actor: Callable[[str], object]
    interval: float = INTERVAL_S
    drain_s: float = DRAIN_S
    echo: Callable[[str], None] | None = None
    scaler: Autoscaler = None  # type: ignore[assignment]
    seen: dict[str, tuple[int, float]] = field(default_factory=dict)  # actor -> its last (samples, busy_s)
    asked: dict = field(default_factory=dict)  # load() ref -> (pool, actor key, when asked: monotonic)
    pids: dict[str, int] = field(default_factory=dict)  # actor -> its process, as its load() said
    silent: set = field(default_factory=set)  # actors whose load() went unanswered SILENT_S: no horizon waits on them
    windows: dict[str, Window] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)  # samples each pool served in this execution
    starting: dict = field(default_factory=dict)  # ready() ref -> (pool, handle)
    retiring: list[_Retiring] = field(default_factory=list)
    decisions: list[dict] = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)  # the last full measurement (device-s per sample)
    sizes_at_start: dict[str, int] = field(default_factory=dict)
    settled_at: float | None = None  # when the last resize was done: its new actors serving, the retired ones gone
    clock: DeviceClock = field(default_factory=DeviceClock)  # device-seconds from the batches' intervals
    pool_of: dict[str, str] = field(default_factory=dict)  # actor -> its pool
    on_device: set = field(default_factory=set)  # pools whose actors said which device they are on
    no_device: set = field(default_factory=set)  # pools with an actor that could not (the sharing is estimated)
    shared: dict[str, float] = field(default_factory=dict)  # the costs per sample last sent to the registry
    t0: float = field(default_factory=time.time)
    last: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        batch = 32
        windows = max(1, math.ceil(MEASURE_S / self.interval)) if self.interval > 0 else 1
        self.scaler = self.scaler or Autoscaler(self.shapes, self.budget, min_samples=batch, min_windows=windows)
        self.sizes_at_start = {n: len(h) for n, h in self.pools.items()}
        for handles in self.pools.values():
            for h in handles:
                self.clock.expect(actor_key(h))
        self.windows = {p.name: Window() for p in self.shapes}

    def _say(self, text: str) -> None:
        (self.echo or (lambda t: print(t, file=sys.stderr, flush=True)))(text)

    def sizes(self) -> dict[str, int]:
        """Each pool's size as decided: its serving actors and those starting."""
        out = {n: len(h) for n, h in self.pools.items()}
        for name, _ in self.starting.values():
            out[name] += 1
        return out

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._collect_loads()
        self._give_up_on_silent(now)
        self._admit_started()
        self._retire(now)
        resizing = bool(self.starting or self.retiring)
        if self.decisions and self.settled_at is None and not resizing:
            self.settled_at = time.time()
        if now - self.last < self.interval:
            return
        seconds, self.last = now - self.last, now
        self._device_times()
        if not resizing:  # (what the pools did during a resize is not measured)
            self.scaler.observe_all(self.windows, seconds)
            self._share_costs()
        self.windows = {p.name: Window() for p in self.shapes}
        if not resizing:
            self.apply(self.scaler.decide(self.sizes()))
        self._ask_loads()

    def _final_loads(self) -> None:
        """At the end: the serving actors' last counters (they are idle now), so every sample served is counted."""
        self._ask_loads()
        with contextlib.suppress(Exception):
            ray.wait(list(self.asked), num_returns=len(self.asked), timeout=2)
        self._collect_loads()
        seconds = time.monotonic() - self.last
        self._device_times()
        self.scaler.observe_all(self.windows, seconds, least=self.scaler.min_samples)
        self.windows = {p.name: Window() for p in self.shapes}

    def _ask_loads(self) -> None:
        waiting = {key for _, key, _ in self.asked.values()}
        for name, handles in self.pools.items():
            for h in handles:
                if actor_key(h) not in waiting:
                    self.asked[h.load.remote()] = (name, actor_key(h), time.monotonic())

    def _give_up_on_silent(self, now: float) -> None:
        """An actor whose ``load()`` went unanswered for ``SILENT_S`` (its process hung, its node unreachable) no
        longer holds back the costing of its device's batches (:class:`.autoscale.DeviceClock`'s horizon waits for
        every serving actor): the clock stops waiting for it until it answers again."""
        for name, key, asked_at in self.asked.values():
            if key not in self.silent and now - asked_at > SILENT_S:
                self.silent.add(key)
                self.clock.leave(key)
                pid = f" (pid {self.pids[key]})" if key in self.pids else ""
                self._say(f"autoscale: a {name} actor{pid} has not answered for {SILENT_S:g} s; its device's "
                          "costs no longer wait for it")

    def _collect_loads(self) -> None:
        if not self.asked:
            return
        done, _ = ray.wait(list(self.asked), num_returns=len(self.asked), timeout=0)
        learned: dict[str, str] = {}  # actors whose device is new: the dispatch prefers the least crowded device
        for ref in done:
            name, key, _ = self.asked.pop(ref)
            self.silent.discard(key)
            try:
                got = ray.get(ref)
            except ray.exceptions.RayError:  # retired and killed meanwhile, or restarting: no window from it
                self.clock.leave(key)
                continue
            samples, busy = got["samples"], got["busy_s"]
            self.pool_of[key], self.pids[key] = name, got.get("pid")
            if got["device"] is None:
                self.no_device.add(name)
                self.clock.leave(key)  # (on no device: no batch of it is beside another's)
            elif any(actor_key(h) == key for h in self.pools.get(name, [])):  # (not one retired meanwhile)
                self.on_device.add(name)
                if self.clock.devices.get(key) != got["device"]:
                    learned[key] = got["device"]
                self.clock.take(key, got["device"], got["intervals"], got["running_since"], got["at"])
            before = self.seen.get(key, (0, 0.0))
            self.seen[key] = (samples, busy)
            if samples < before[0]:  # restarted: its counters began again
                before = (0, 0.0)
            w = self.windows.setdefault(name, Window())
            w.samples += samples - before[0]
            w.busy_s += busy - before[1]
            self.served[name] = self.served.get(name, 0) + samples - before[0]
        if learned:
            self.registry.where.remote(learned)

    def _device_times(self) -> None:
        """Into this window: the device-seconds of the batches costed since the last one, for the pools whose
        every actor said which device it is on."""
        for name, w in self.windows.items():
            if name in self.on_device and name not in self.no_device:
                w.device_s = w.device_s or 0.0
        for key, (n, used) in self.clock.drain().items():
            w = self.windows.get(self.pool_of.get(key, ""))
            if w is not None and w.device_s is not None:
                w.device_s += used
                w.device_samples += n

    def _share_costs(self) -> None:
        """Every pool's cost per sample, once all are measured, to the registry: its dispatch then weighs each
        device's batches in flight by their device time (:class:`.dispatch.Dispatcher`)."""
        costs = self.scaler.costs
        if len(costs) == len(self.shapes) and costs != self.shared:
            self.shared = dict(costs)
            self.registry.costs.remote(self.shared)

    def apply(self, decisions: list[Decision]) -> None:
        """Shrinks first (their shares are what the growing pools take), then grows."""
        for d in decisions:
            self._say(d.line())
            self.decisions.append({"t": round(time.time() - self.t0, 2), "at": round(time.time(), 3), "pool": d.pool,
                                   "from": d.before, "to": d.after, "why": d.why})
            now = time.monotonic()
            for _ in range(d.before - d.after):
                handle = self.pools[d.pool].pop()
                self.clock.leave(actor_key(handle))
                self.retiring.append(_Retiring(handle, d.pool, now))
            for _ in range(d.after - d.before):
                handle = self.start_actor(d.pool)
                self.starting[handle.ready.remote()] = (d.pool, handle)
        if decisions:
            self.settled_at = None
            self._publish()
            self.costs = dict(self.scaler.costs)
            self.scaler.forget()  # shares moved: what the pools cost is measured again

    def _admit_started(self) -> None:
        if not self.starting:
            return
        done, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
        changed = False
        for ref in done:
            name, handle = self.starting.pop(ref)
            try:
                error = ray.get(ref)
            except ray.exceptions.RayError as e:
                error = f"{type(e).__name__}"
            if error:
                self._say(f"autoscale: a new {name} actor could not start ({error}); the pool stays smaller")
                ray.kill(handle)
                continue
            self.pools[name].append(handle)
            self.clock.expect(actor_key(handle))
            changed = True
        if changed:
            self._publish()

    def _retire(self, now: float) -> None:
        for r in list(self.retiring):
            if r.barrier is None and now - r.since >= self.drain_s:
                r.barrier = r.handle.placed.remote() if self.drain_s > 0 else "now"
            if r.barrier is None:
                continue
            ready = r.barrier == "now" or ray.wait([r.barrier], timeout=0)[0] or now - r.since > 10 * self.drain_s
            if ready:
                ray.kill(r.handle)
                self.retiring.remove(r)

    def _publish(self) -> None:
        ray.get(self.registry.publish.remote({n: list(h) for n, h in self.pools.items()}))

    def handles(self) -> list:
        """Every actor this resizer still holds (serving, starting, retiring): what the execution kills at the end."""
        return [r.handle for r in self.retiring] + [h for _, h in self.starting.values()]

    def record(self, wall_s: float, samples: int) -> dict:
        """The run record's ``autoscale`` entry: the decisions, and per pool the measured and projected figures."""
        self._final_loads()
        costs = dict(self.scaler.costs) if len(self.scaler.costs) == len(self.shapes) else dict(self.costs)
        projected = None
        if all(p.name in costs for p in self.shapes):
            a = allocate(self.shapes, costs, self.budget)
            used = sum(a.actors[p.name] * max([v for k, v in p.per_actor.items() if k != "CPU"] or [0.0])
                       for p in self.shapes)  # accelerator units the allocation holds
            projected = {"actors": a.actors, "images_per_s": round(a.throughput, 3), "bottleneck": a.bottleneck,
                         "devices_used": used, "device_hours_per_million":
                             round(used * 1e6 / a.throughput / 3600, 3) if used and a.throughput else None}
        pools = {p.name: {"per_actor": p.per_actor, "bounds": "fixed" if p.fixed is not None else
                          [p.bounds()[0], p.max], "actors_at_start": self.sizes_at_start.get(p.name),
                          "actors_at_end": len(self.pools.get(p.name, [])),
                          "measured_samples_per_s": round(self.served.get(p.name, 0) / wall_s, 3) if wall_s else None,
                          "cost_s_per_sample": round(costs[p.name], 6) if p.name in costs else None}
                 for p in self.shapes}
        return {"budget": self.budget, "decisions": self.decisions, "settled_at": self.settled_at,
                "pools": pools, "projected": projected,
                "measured_images_per_s": round(samples / wall_s, 3) if wall_s else None, "wall_s": round(wall_s, 2)}

