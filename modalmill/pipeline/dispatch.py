"""Which actor of a pool labels the next batch: one choice for every shard task of the execution.

A shard task alone sees only its own batches: when each task sent a batch to the actor with the fewest of *its*
batches, two tasks often chose the same actors while others idled (benchmark 8: over a 36-s window the d-model's
actors got 3 to 10 batches each and one simulated device was busy 0.48 of the time while another 0.83). Here the
execution's :class:`PoolRegistry` (one small actor on the driver's node) keeps every actor's batches in flight,
from every task, and hands out the actor whose device has the least work in flight (see :class:`Dispatcher`; the
devices and the pools' costs per sample come from the :class:`~.resize.Resizer`'s measurements). The cost is one
small call per batch (a millisecond on loopback), against batches of tens of milliseconds to seconds.

A task that dies holding batches cannot give them back: the driver ``forget``\\ s a shard's batches when its task
ends (done, failed or retried), so a lost worker leaves no actor looking busy for the rest of the job.
"""

from __future__ import annotations

from collections import Counter

import ray


def actor_key(handle) -> str:
    return handle._actor_id.hex()


class Dispatcher:
    """The choice itself (no Ray: :class:`PoolRegistry` wraps it, tests call it directly).

    Every batch in flight is charged to its actor as *work*: its samples times its pool's cost per sample (device-
    seconds, once :meth:`costs` has every pool's; before that, 1 per batch). A new batch goes to the actor whose
    device holds the least work (an actor whose device is not known is a device of its own), ties to the actor
    holding the least itself, then in turn. On a device shared by several actors (time-sliced, like a GPU shared by
    processes) the device's work in flight is when a new batch there would be done; counting batches instead sends
    as much to a device holding a cheap model's actors as to one holding only the costliest model's. (That is the
    reasoning; benchmark 8, CPU-bound on 2 cores, did not tell the two apart beyond its noise: one run counting
    batches at 0.86 of the ideal, eight weighing work at 0.76-0.96.)"""

    def __init__(self, pools: dict[str, list[str]]):
        self.pools: dict[str, list[str]] = {}  # pool -> its actors' keys, in order
        self.members(pools)
        self.held: dict[str, dict[str, list[float]]] = {}  # shard -> actor key -> [batches, work] of that shard
        self.at: Counter = Counter()  # actor key -> batches in flight at it (every shard's)
        self.work: Counter = Counter()  # actor key -> the work of those batches
        self.device: dict[str, str] = {}  # actor key -> its device, when its pool said
        self.cost: dict[str, float] = {}  # pool -> device-seconds per sample (all pools', or none)
        self.last: dict[str, int] = {}  # pool -> the index chosen last (ties go round)

    def members(self, pools: dict[str, list[str]]) -> None:
        self.pools = {name: list(keys) for name, keys in pools.items()}

    def costs(self, cost: dict[str, float]) -> None:
        """Each pool's device-seconds per sample (ignored unless every pool has one: work must be one unit)."""
        if set(self.pools) <= set(cost) and all(v > 0 for v in cost.values()):
            self.cost = dict(cost)

    def take(self, name: str, shard: str, samples: int = 1) -> tuple[str, float] | None:
        """The actor for a batch of ``samples`` samples of pool ``name`` and the work charged to it."""
        keys = self.pools.get(name) or []
        if not keys:
            return None
        on_device: Counter = Counter()
        for key, w in self.work.items():
            on_device[self.device.get(key, key)] += w
        n, last = len(keys), self.last.get(name, -1)
        i = min(range(n), key=lambda j: (round(on_device[self.device.get(keys[j], keys[j])], 9),
                                         self.work[keys[j]], (j - last - 1) % n))
        self.last[name] = i
        key, work = keys[i], (self.cost[name] * max(1, samples) if self.cost else 1.0)
        self.at[key] += 1
        self.work[key] += work
        mine = self.held.setdefault(shard, {}).setdefault(key, [0, 0.0])
        mine[0] += 1
        mine[1] += work
        return key, work

    def give_back(self, key: str, shard: str, work: float = 1.0) -> None:
        mine = self.held.get(shard, {}).get(key)
        if mine is None or mine[0] <= 0:  # forgotten meanwhile (its task ended or was retried)
            return
        mine[0] -= 1
        mine[1] -= work
        self.at[key] -= 1
        self.work[key] -= work
        if self.at[key] <= 0:  # (no float residue on an idle actor)
            self.work[key] = 0.0

    def forget(self, shard: str) -> None:
        for key, (n, work) in self.held.pop(shard, {}).items():
            self.at[key] -= n
            self.work[key] = 0.0 if self.at[key] <= 0 else self.work[key] - work

    def where(self, devices: dict[str, str]) -> None:
        self.device.update(devices)


@ray.remote(num_cpus=0)
class PoolRegistry:
    """The current actors of every pool, with a version number that changes with them, and the execution's
    :class:`Dispatcher`."""

    def __init__(self, pools: dict[str, list]):
        self.version, self.pools = 0, pools
        self.dispatch = Dispatcher(self._keys(pools))

    @staticmethod
    def _keys(pools: dict[str, list]) -> dict[str, list[str]]:
        return {name: [actor_key(h) for h in handles] for name, handles in pools.items()}

    def publish(self, pools: dict[str, list]) -> int:
        self.version += 1
        self.pools = pools
        self.dispatch.members(self._keys(pools))
        return self.version

    def since(self, version: int):
        """None when the pools are still those of ``version``; else (the version, the pools)."""
        return None if version == self.version else (self.version, self.pools)

    def take(self, name: str, shard: str, version: int, samples: int = 1):
        """For shard ``shard``'s next batch of pool ``name`` (``samples`` samples): the actor's key and the work
        charged (to give back with it; None: the pool has no actor), and :meth:`since` ``version``."""
        return self.dispatch.take(name, shard, samples), self.since(version)

    def give_back(self, key: str, shard: str, work: float = 1.0) -> None:
        self.dispatch.give_back(key, shard, work)

    def costs(self, cost: dict[str, float]) -> None:
        self.dispatch.costs(cost)

    def forget(self, shard: str) -> None:
        self.dispatch.forget(shard)

    def where(self, devices: dict[str, str]) -> None:
        self.dispatch.where(devices)
