"""Sizing model-labeler pools: how many actors each pool gets from what the cluster has, from measured costs.

Every sample visits every model pool, so a job runs at the speed of its slowest pool. A pool's cost is the
time one sample takes on a whole device (``cost_i``, device-seconds; for a pool on CPUs only, one actor's seconds),
and an actor holds a share ``w_i`` of a device (``num_gpus: 0.25`` or a custom device at 0.25: w = 0.25; one
device or more: w = 1), so pool *i* with ``n_i`` actors serves ``n_i * w_i / cost_i`` samples per second when its
actors' devices are kept busy (actors sharing a device take turns on it). The job's throughput is the smallest
of those. The allocation that maximises it is found greedily: every pool starts at
its minimum, then the pool that limits throughput gets one more actor while its per-actor resources still fit in
what is left (resources are shared: whole or fractional GPUs, Ray custom devices, CPUs); it stops when the
limiting pool cannot grow (out of resources or at its ``max``), since growing any other pool cannot raise the
minimum. With one resource and unit shares this is optimal; with several it is the usual greedy max-min.

:class:`Autoscaler` applies the same rule while a job runs, to costs measured over a sliding window, and only
moves actors when the projected throughput gains at least ``min_gain`` (hysteresis: measurements are noisy, and
an actor moved costs its start-up). Each decision is one line (pool, from, to, why). Nothing here touches Ray:
the executor measures and resizes; this module decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PoolShape:
    """A model labeler's pool as the allocator sees it."""

    name: str
    per_actor: dict[str, float]  # Ray resources one actor holds, e.g. {"CPU": 1, "GPU": 0.25}
    min: int = 1
    max: int | None = None
    fixed: int | None = None  # ``workers: N``: never resized

    @property
    def share(self) -> float:
        """The fraction of one accelerator an actor holds (1 for a CPU-only pool, or a whole device or more)."""
        dev = [v for r, v in self.per_actor.items() if r not in ("CPU", "memory") and v > 0]
        return min(1.0, max(dev)) if dev else 1.0

    def bounds(self) -> tuple[int, int]:
        if self.fixed is not None:
            return self.fixed, self.fixed
        return self.min, (self.max if self.max is not None else 1 << 30)


@dataclass(frozen=True)
class Allocation:
    actors: dict[str, int]
    throughput: float  # samples per second the job can do with these actors (its slowest pool's rate)
    bottleneck: str



@dataclass(frozen=True)
class Decision:
    pool: str
    before: int
    after: int
    why: str

    def line(self) -> str:
        return f"autoscale: pool {self.pool} {self.before} -> {self.after} actors: {self.why}"


def _fits(free: dict[str, float], need: dict[str, float]) -> bool:
    return all(free.get(r, 0.0) + 1e-9 >= v for r, v in need.items() if v > 0)


def _take(free: dict[str, float], need: dict[str, float], times: int = 1) -> None:
    for r, v in need.items():
        free[r] = free.get(r, 0.0) - v * times


def _rate(n: int, pool: PoolShape, cost: float) -> float:
    return math.inf if cost <= 0 else n * pool.share / cost


def allocate(pools: list[PoolShape], costs: dict[str, float], budget: dict[str, float]) -> Allocation:
    """Actors per pool that maximise the job's throughput within ``budget`` (Ray resources available to the
    pools, after what shard tasks need is set aside). ``costs``: device-seconds per sample (see above). Raises
    ValueError when the pools' minimums do not fit."""
    free = dict(budget)
    actors: dict[str, int] = {}
    for p in pools:
        lo, _ = p.bounds()
        if not _fits(free, {r: v * lo for r, v in p.per_actor.items()}):
            raise ValueError(f"pool {p.name}: {lo} actor(s) of {p.per_actor} do not fit in what is left "
                             f"of the cluster ({_fmt(free)})")
        _take(free, p.per_actor, lo)
        actors[p.name] = lo
    by_name = {p.name: p for p in pools}

    def slowest() -> str:
        return min(actors, key=lambda n: (_rate(actors[n], by_name[n], costs[n]), n))

    while True:
        p = by_name[slowest()]
        if actors[p.name] >= p.bounds()[1] or not _fits(free, p.per_actor):
            break
        _take(free, p.per_actor)
        actors[p.name] += 1
    last = slowest()
    return Allocation(actors, _rate(actors[last], by_name[last], costs[last]), last)


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(res.items())) or "nothing"


@dataclass
class Window:
    """What one pool did over a measuring window."""

    samples: int = 0
    busy_s: float = 0.0  # summed over the pool's actors: time spent serving batches
    # device-seconds used by its batches costed in the window, from their intervals on their devices
    # (:class:`DeviceClock`), and how many samples those batches held; None when an actor of the pool could not say
    # which device it is on (then the per-kind estimate of ``observe_all``)
    device_s: float | None = None
    device_samples: int = 0


def device_seconds(batch: tuple[float, float], others: list[tuple[float, float]]) -> float:
    """The device-seconds one batch used on a time-sliced device: the integral over its interval ``batch`` (start,
    end) of 1 / the number of batches running on that device at each moment (itself and those of ``others``, the
    device's other batches' intervals, finished or still running, that overlap it). A batch alone used its whole
    interval; two batches side by side used half of it each. This is how a GPU shared by processes runs kernels
    (time-sliced), and it needs only each batch's start and end, taken on the device's node."""
    t0, t1 = batch
    if t1 <= t0:
        return 0.0
    edges = sorted({t0, t1, *(t for a, b in others for t in (a, b) if t0 < t < t1)})
    used = 0.0
    for a, b in zip(edges, edges[1:], strict=False):
        mid = (a + b) / 2
        k = 1 + sum(1 for s, e in others if s <= mid < e)
        used += (b - a) / k
    return used


@dataclass
class _Batch:
    actor: str
    start: float
    end: float
    samples: int


@dataclass
class DeviceClock:
    """Device-seconds per actor, from its batches' intervals on each device (:func:`device_seconds`).

    Feed it every answer of an actor's ``load()`` (:meth:`take`: its device, its batches finished since the last
    answer, the one it is serving, the moment of the answer). A batch is costed only once every serving actor on
    its device has answered after the batch ended (the device's *horizon*): until then a batch that overlapped it
    may not be known yet. :meth:`drain` hands out what was costed since the last call, per actor: (samples,
    device-seconds)."""

    devices: dict[str, str] = field(default_factory=dict)  # actor -> its device
    heard: dict[str, float] = field(default_factory=dict)  # actor -> the moment of its last answer
    running: dict[str, float | None] = field(default_factory=dict)  # actor -> start of the batch it serves
    ended: dict[str, list[_Batch]] = field(default_factory=dict)  # device -> batches that may overlap later ones
    pending: dict[str, list[_Batch]] = field(default_factory=dict)  # device -> batches not costed yet
    costed: dict[str, tuple[int, float]] = field(default_factory=dict)  # actor -> (samples, device-s) to drain
    unheard: set = field(default_factory=set)  # serving actors that have not answered yet (device not known)

    def expect(self, actor: str) -> None:
        """A serving actor joined: until its first answer says which device it is on, no batch is costed (its
        batches may run beside any; it answers within one measuring interval)."""
        self.unheard.add(actor)

    def take(self, actor: str, device: str, intervals: list, running_since: float | None, at: float) -> None:
        self.devices[actor], self.heard[actor], self.running[actor] = device, at, running_since
        self.unheard.discard(actor)
        for start, end, n in intervals:
            b = _Batch(actor, start, end, n)
            self.ended.setdefault(device, []).append(b)
            self.pending.setdefault(device, []).append(b)
        self._cost(device)

    def leave(self, actor: str) -> None:
        """The actor left its pool (retired or gone): its device's horizon no longer waits for it."""
        device = self.devices.pop(actor, None)
        was_unheard = actor in self.unheard
        self.unheard.discard(actor)
        self.heard.pop(actor, None)
        self.running.pop(actor, None)
        # an actor never heard from held back every device (its own was not known): each may cost its batches now
        for d in ([device] if device is not None else []) + (list(self.pending) if was_unheard else []):
            self._cost(d)

    def _cost(self, device: str) -> None:
        here = [a for a, d in self.devices.items() if d == device]
        horizon = -math.inf if self.unheard else min((self.heard[a] for a in here), default=math.inf)
        open_now = [(self.running[a], self.heard[a]) for a in here if self.running[a] is not None]
        ready = [b for b in self.pending.get(device, []) if b.end <= horizon]
        self.pending[device] = [b for b in self.pending.get(device, []) if b.end > horizon]
        ended = self.ended.setdefault(device, [])
        for b in ready:
            others = [(o.start, o.end) for o in ended if o is not b] + open_now
            n, used = self.costed.get(b.actor, (0, 0.0))
            self.costed[b.actor] = (n + b.samples, used + device_seconds((b.start, b.end), others))
        # keep what a batch not costed yet (pending, or still running) may overlap
        keep_from = min([b.start for b in self.pending[device]] + [s for s, _ in open_now] + [horizon])
        self.ended[device] = [b for b in ended if b.end >= keep_from]

    def drain(self) -> dict[str, tuple[int, float]]:
        out, self.costed = self.costed, {}
        return out


@dataclass
class Autoscaler:
    """Resizes pools while a job runs. Feed it each pool's :class:`Window` every interval with :meth:`observe`;
    :meth:`decide` returns the resizes to make now (possibly none)."""

    pools: list[PoolShape]
    budget: dict[str, float]
    min_samples: int = 32  # a pool's cost is trusted once this many samples were measured
    min_gain: float = 0.10  # move actors only when the projected throughput rises by at least this fraction
    decay: float = 0.5  # weight of the older measurements when a new window comes in
    min_windows: int = 1  # and over at least this many windows (since the costs were cleared)
    costs: dict[str, float] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    windows: dict[str, int] = field(default_factory=dict)

    def observe(self, name: str, window: Window, sharing: float | None = None) -> None:
        """Take one window's measurement: its device-seconds when measured (``window.device_s``), else its busy
        time turned into device-seconds by dividing it by ``sharing``, how many kernels ran on the actor's device
        at once on average (time-sliced: each went that much slower); None: 1 / the actor's share, as if the
        actors that share a device kept it full (see :meth:`observe_all`)."""
        measured = window.device_s is not None  # measured on the devices: no estimate of the sharing needed
        samples = window.device_samples if measured else window.samples
        if samples <= 0:
            return
        if measured:
            cost = window.device_s / samples
        else:
            share = self._shape(name).share
            sharing = 1.0 / share if sharing is None else min(max(1.0, sharing), 1.0 / share)
            cost = window.busy_s / sharing / samples
        old = self.costs.get(name)
        self.costs[name] = cost if old is None else self.decay * old + (1 - self.decay) * cost
        self.seen[name] = self.seen.get(name, 0) + samples
        self.windows[name] = self.windows.get(name, 0) + 1

    def observe_all(self, windows: dict[str, Window], seconds: float, least: int = 1) -> None:
        """Take every pool's window of ``seconds``. Actors on fractional shares of a device take turns on it, so
        one actor's busy time is its kernels' device time times how many ran at once. That is estimated per kind of
        device from the pools that hold it: their summed busy seconds over the device-seconds the budget has in
        the window (at least 1: fewer kernels than devices run alone; at most 1 / the share: a device holds no
        more actors). Taking the share alone as the sharing made a pool measured while its device idled look
        cheaper than it is (the projection rose above what the devices can do). Pools with fewer than ``least``
        samples in the window are not taken (their busy time still counts in the sharing)."""
        busy: dict[str, float] = {}
        for p in self.pools:
            for r in self._devices(p):
                busy[r] = busy.get(r, 0.0) + windows.get(p.name, Window()).busy_s
        for p in self.pools:
            kinds = self._devices(p)
            if windows.get(p.name, Window()).samples < least:
                continue
            sharing = None
            if kinds and seconds > 0:
                sharing = max(busy[r] / (self.budget[r] * seconds) for r in kinds)
            self.observe(p.name, windows.get(p.name, Window()), sharing)

    def _devices(self, p: PoolShape) -> list[str]:
        """The accelerator kinds (in the budget) of which one actor of ``p`` holds a fraction."""
        return [r for r, v in p.per_actor.items()
                if r not in ("CPU", "memory") and 0 < v < 1 and self.budget.get(r, 0) > 0]

    def _shape(self, name: str) -> PoolShape:
        return next(p for p in self.pools if p.name == name)

    def ready(self) -> bool:
        return all(self.seen.get(p.name, 0) >= self.min_samples and self.windows.get(p.name, 0) >= self.min_windows
                   for p in self.pools)

    def forget(self) -> None:
        """Shares moved: what the pools cost is measured again."""
        self.costs.clear()
        self.seen.clear()
        self.windows.clear()

    def decide(self, current: dict[str, int]) -> list[Decision]:
        if not self.ready():
            return []
        now = min(_rate(current[p.name], p, self.costs[p.name]) for p in self.pools)
        best = allocate(self.pools, self.costs, self.budget)
        if best.throughput < now * (1 + self.min_gain):
            return []
        out = []
        for p in self.pools:
            before, after = current[p.name], best.actors[p.name]
            if before == after:
                continue
            rate = _rate(before, p, self.costs[p.name])
            if after > before:
                why = (f"{'the bottleneck' if p.name == best.bottleneck else 'limits throughput'}: "
                       f"{rate:.1f} samples/s at {self.costs[p.name] * 1e3:.0f} ms of a device per sample")
            else:
                why = f"idles: {rate:.1f} samples/s against the job's {best.throughput:.1f}"
            out.append(Decision(p.name, before, after, why + f"; job {now:.1f} -> {best.throughput:.1f} samples/s"))
        # shrink first, so the freed resources are there for the pools that grow
        return sorted(out, key=lambda d: d.after - d.before)
