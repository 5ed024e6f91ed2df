"""Say, within seconds, when Ray cannot place a job's shard tasks or labeler actors, and why.

Ray queues a task or actor whose resources no alive node has free and says nothing: after a worker node died, a
job whose only free CPU is held by a model actor would sit at the same shard count for ever. The driver's loop
calls :meth:`PlacementWatch.check` about once a second; it reads the cluster's state from Ray's GCS (alive nodes,
their total and free resources, the state of the job's actors: cheap calls that start nothing) and reports when,
for ``MODALMILL_STALL_S`` seconds (default 3):

- shard tasks are waiting but none of them holds a CPU (the CPUs in use are all the labeler actors'), or
- a labeler actor is waiting to be placed (created or restarted after its node died) and no node can take it.

The report names what is missing (each shard task's CPUs, each waiting actor's request), what the alive nodes
have free, which actor pools hold the rest, and the nodes that died during the job; it is repeated every 30 s
while the wait lasts, and a line says when Ray placed them again. The job waits (a node that joins, or resources
freed elsewhere, lets it go on); the report says how to make it fit instead.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import ray

from ..labelers.base import Resources

STALL_S = float(os.environ.get("MODALMILL_STALL_S", "3"))
REPEAT_S = 30.0
WAITING = ("PENDING_CREATION", "RESTARTING", "DEPENDENCIES_UNREADY")


def _cpus(x: float) -> str:
    return f"{x:g} CPU" + ("" if x == 1 else "s")


@dataclass
class ClusterView:
    """What Ray's GCS says now: alive nodes' total and free resources, and the state of each actor of ours."""

    total: dict[str, dict[str, float]]  # node id -> resources
    free: dict[str, dict[str, float]]
    actor_states: dict[str, str]  # actor id (hex) -> ALIVE / RESTARTING / PENDING_CREATION / DEAD ...

    @classmethod
    def read(cls, actor_ids: list[str]) -> ClusterView:
        from ray._private import state

        total = {n: dict(r) for n, r in state.total_resources_per_node().items()}
        free = {n: dict(r) for n, r in state.available_resources_per_node().items() if n in total}
        states = {}
        table = state.actors(job_id=ray.JobID.from_hex(ray.get_runtime_context().get_job_id())) if actor_ids else {}
        for aid in actor_ids:
            states[aid] = (table.get(aid) or {}).get("State", "DEAD")
        return cls(total, free, states)

    def cpu(self, node: str, free: bool = False) -> float:
        return float((self.free if free else self.total).get(node, {}).get("CPU", 0.0))


@dataclass
class PlacementWatch:
    """Watches one execution: ``pools`` (labeler -> actor handles), ``requests`` (labeler -> the resources one of
    its actors asks for), each shard task's ``shard_cpus``."""

    pools: dict[str, list]
    requests: dict[str, Resources]
    shard_cpus: float
    stall_s: float = STALL_S
    echo: object = None  # where reports go (default: stderr)
    nodes_at_start: set[str] = field(default_factory=set)
    since: float | None = None  # when the current wait began
    reported_at: float | None = None
    last_check: float = 0.0
    broken: bool = False  # the GCS cannot be read here (e.g. a Ray Client driver): stay quiet

    def __post_init__(self) -> None:
        try:
            self.nodes_at_start = set(ClusterView.read([]).total)
        except Exception:  # noqa: BLE001 - state calls are unavailable: the watch is off
            self.broken = True

    def _say(self, text: str) -> None:
        if self.echo is not None:
            self.echo(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def check(self, tasks_waiting: int, now: float | None = None) -> str | None:
        """Call often; at most once a second it looks. ``tasks_waiting``: shard tasks sent and not finished.
        Returns the report when one was printed now."""
        now = time.monotonic() if now is None else now
        if self.broken or now - self.last_check < 1.0:
            return None
        self.last_check = now
        try:
            view = ClusterView.read([h._actor_id.hex() for hs in self.pools.values() for h in hs])
        except Exception:  # noqa: BLE001 - a GCS hiccup: look again next time
            return None
        problem = self.diagnose(view, tasks_waiting)
        if problem is None:
            if self.reported_at is not None:
                self._say("modalmill: Ray placed the waiting shard tasks and labeler actors again; going on")
            self.since = self.reported_at = None
            return None
        self.since = self.since if self.since is not None else now
        due = self.reported_at is None and now - self.since >= self.stall_s
        if due or (self.reported_at is not None and now - self.reported_at >= REPEAT_S):
            self.reported_at = now
            text = f"modalmill: waiting {now - self.since:.0f} s: {problem}"
            self._say(text)
            return text
        return None

    def diagnose(self, view: ClusterView, tasks_waiting: int) -> str | None:
        """Why nothing can be placed, or None when the tasks and actors are placed (or could be)."""
        held = {name: 0.0 for name in self.pools}
        waiting_actors: dict[str, int] = {}
        for name, handles in self.pools.items():
            for h in handles:
                st = view.actor_states.get(h._actor_id.hex(), "DEAD")
                if st == "ALIVE":
                    held[name] += self.requests[name].num_cpus
                elif st in WAITING:
                    waiting_actors[name] = waiting_actors.get(name, 0) + 1
        nodes = sorted(view.total)
        total_cpu = sum(view.cpu(n) for n in nodes)
        free_cpu = sum(view.cpu(n, free=True) for n in nodes)
        most_free = max((view.cpu(n, free=True) for n in nodes), default=0.0)
        tasks_hold = total_cpu - free_cpu - sum(held.values())
        tasks_stuck = tasks_waiting > 0 and tasks_hold < self.shard_cpus - 1e-6 and most_free < self.shard_cpus - 1e-6
        stuck_actors = {name: n for name, n in waiting_actors.items()
                        if not self._fits(self.requests[name], view)}
        if not tasks_stuck and not stuck_actors:
            return None
        parts = []
        if tasks_stuck:
            parts.append(f"{tasks_waiting} shard task(s) cannot start: each asks for {_cpus(self.shard_cpus)} and no "
                         f"alive node has that free")
        for name, n in stuck_actors.items():
            parts.append(f"{n} {name} actor(s) cannot be placed: each asks for {self._request(self.requests[name])}")
        died = len(self.nodes_at_start - set(nodes))
        cluster = (f"the cluster's {len(nodes)} alive node(s) have {free_cpu:g} of {_cpus(total_cpu)} free"
                   + (f"; {died} node(s) died during this job" if died else ""))
        holders = ", ".join(f"{name} {held[name] / self.requests[name].num_cpus:g} actor(s) x "
                            f"{_cpus(self.requests[name].num_cpus)}" for name in self.pools if held[name] > 0)
        hold = f"; the labeler actor pools hold {_cpus(sum(held.values()))} ({holders})" if holders else ""
        return ("; ".join(parts) + f" ({cluster}{hold}). Ray places them when a node joins or resources free up; "
                "to fit this cluster instead, stop (completed shards are kept) and rerun with fewer "
                "labelers.NAME.workers, a lower labelers.NAME.resources.num_cpus or ray.shard_cpus")

    @staticmethod
    def _request(res: Resources) -> str:
        parts = [_cpus(res.num_cpus)] + ([f"{res.num_gpus:g} GPU"] if res.num_gpus else [])
        parts += [f"{res.memory_mb} MB"] if res.memory_mb else []
        parts += [f"{float(v):g} {k}" for k, v in (res.custom or {}).items()]
        return ", ".join(parts)

    @staticmethod
    def _fits(res: Resources, view: ClusterView) -> bool:
        need = {"CPU": res.num_cpus, "GPU": res.num_gpus, "memory": res.memory_mb * 2**20,
                **{k: float(v) for k, v in (res.custom or {}).items()}}
        return any(all(float(free.get(k, 0.0)) >= v - 1e-6 for k, v in need.items() if v)
                   for free in view.free.values())
