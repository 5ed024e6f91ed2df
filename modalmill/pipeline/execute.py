"""Running shard tasks on Ray: one task per shard, model labelers in actor pools, progress on the driver.

Shard tasks read, decode, run model-free labelers in-process and write their shard's tars themselves, so no
image or label passes through the driver. Stateful (model) labelers run as Ray actors, one pool per
labeler sized by the job (``workers``) and placed by the resources the labeler declares; shard tasks send
them batches. A shard task's failure is a returned value: the driver records it and goes on.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import ray

from ..labelers.base import Resources, assigned_cpus
from ..labelers.oom import BatchLimiter
from ..io import manifest, storage
from ..io.cluster import local_s3_env
from ..io.lease import LeaseLost
from .placement import PlacementWatch
from .autoscale import PoolShape
from .dispatch import PoolRegistry, actor_key
from .resize import REFRESH_S, Resizer, can_move, first_sizes, pool_budget, shapes_for
from .shard import LabelerRun, ShardAbort, ShardTask, call_local, fenced, local_labeler, process_shard


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ProgressCounter:
    def __init__(self):
        self.samples = 0

    def add(self, n: int) -> None:
        self.samples += n

    def get(self) -> int:
        return self.samples


def limit_threads() -> int:
    """Size this worker's thread pools to the CPUs Ray gave it. Ray sets ``OMP_NUM_THREADS`` (torch follows it),
    but OpenCV ignores it and starts one thread per core in every worker: two 1-CPU shard tasks on a 2-core machine
    would then run four busy threads (measured: more CPU time for the same work). Returns the thread count."""
    n = assigned_cpus()
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:
        pass
    if "torch" in sys.modules:  # never import torch just for this
        sys.modules["torch"].set_num_threads(n)
    return n


def device_of(labeler) -> str | None:
    """Which device this actor's batches run on, as a key unique in the cluster: the node and the labeler's own
    ``device_key()`` when it names one (a device Ray tracks only as a count, like a custom resource), else the node
    and the GPU ids Ray assigned the actor (fractional GPUs share an id); None when neither says (a CPU actor)."""
    ctx = ray.get_runtime_context()
    own = labeler.device_key()
    if own is None:
        gpus = [str(g) for g in (ctx.get_accelerator_ids() or {}).get("GPU", [])]
        own = f"GPU:{','.join(gpus)}" if gpus else None
    return None if own is None else f"{ctx.get_node_id()}/{own}"


class LabelerSetupError(ShardAbort):
    """A labeler's actor could not set itself up (missing or wrong weights seen only by the workers, e.g. a
    node-local path on a cluster): one line, raised on the driver; the actor is not restarted."""


INTERVALS_KEPT = 4096  # batch intervals an actor keeps between two load() calls (the resizer asks every second)


@ray.remote(concurrency_groups={"control": 1})
class LabelerActor:
    """Holds one model labeler, set up once; serves batches from shard tasks.

    ``__init__`` only records the labeler, so an actor is placed (holds its resources) at once; the set-up (imports,
    weights) runs on the first call, normally :meth:`ready`, sent right after creation, while the first shard tasks
    already read and decode. A set-up failure is kept, not raised: raised from ``__init__``, Ray would print the
    worker's traceback on the driver and restart the actor (``max_restarts``) to fail the same way again.
    :meth:`ready` returns it as one line instead (an empty string when the labeler is ready) and the executor stops
    there; a batch sent to such an actor raises LabelerSetupError, which fails its shard task as a whole.

    Batches run through a :class:`~modalmill.labelers.oom.BatchLimiter`: out of (GPU or CPU) memory, the batch is
    split and retried down to single samples (one that fails alone is recorded as ``oom``), and the actor keeps
    the smaller batch size for the rest of the run."""

    def __init__(self, run: LabelerRun):
        limit_threads()
        self.run, self.labeler, self.setup_error, self.setup_traceback = run, None, "", ""
        self.tried = False
        self.setup_lock = threading.Lock()
        self.limiter = BatchLimiter(run.labeler)  # out of memory: split, retry, keep the size that fits
        self.served, self.busy_s = 0, 0.0  # samples served and seconds in process_batch (the autoscaler's view)
        # each batch's (start, end, samples) since the last load(), and when the batch being served began: the
        # autoscaler's device-time accounting (autoscale.DeviceClock); bounded, since no one asks a fixed pool
        self.intervals: deque[tuple[float, float, int]] = deque(maxlen=INTERVALS_KEPT)
        self.running_since: float | None = None
        self.device: str | None = None

    @ray.method(concurrency_group="control")
    def placed(self) -> bool:
        return True

    @ray.method(concurrency_group="control")
    def assigned(self) -> dict[str, float]:
        """The resources Ray gave this actor (its request fitted to the cluster)."""
        return {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}

    def _set_up(self) -> None:
        with self.setup_lock:  # a control call may come while a batch sets the labeler up
            self._set_up_once()

    def _set_up_once(self) -> None:
        if self.tried:
            return
        self.tried = True
        try:
            self.labeler = local_labeler(self.run)
        except Exception as e:  # noqa: BLE001 - reported by ready(), see the class docstring
            lines = str(e).strip().splitlines()
            self.setup_error = lines[0] if lines else type(e).__name__
            if not type(e).__name__.endswith(("WeightsError", "SetupError")):
                self.setup_error = f"{type(e).__name__}: {self.setup_error}"
            self.setup_traceback = traceback.format_exc()
            return
        with contextlib.suppress(Exception):  # unknown: the autoscaler estimates the sharing instead
            self.device = device_of(self.labeler)

    def ready(self) -> str:
        self._set_up()
        return self.setup_error

    def setup_details(self) -> str:
        return self.setup_traceback

    def process_batch(self, inputs):
        self._set_up()
        if self.labeler is None:
            raise LabelerSetupError(self.setup_error)
        t0, self.running_since = time.perf_counter(), time.time()
        try:
            return self.limiter.run(self.labeler.process_batch, inputs)
        finally:
            self.busy_s += time.perf_counter() - t0
            self.served += len(inputs)
            self.intervals.append((self.running_since, time.time(), len(inputs)))
            self.running_since = None

    @ray.method(concurrency_group="control")
    def load(self) -> dict:
        """What the autoscaler measures: samples served and seconds spent serving them since the actor started
        (``samples``, ``busy_s``); the device it labels on (``device``: None when unknown, see :func:`device_of`),
        its batches' intervals since the last call (``intervals``: start, end, samples), the start of the batch
        it is serving (``running_since``, or None) and this moment (``at``), all on this node's clock; its process
        (``pid``: what a message about a hung actor names)."""
        got, self.intervals = self.intervals, deque(maxlen=INTERVALS_KEPT)
        return {"samples": self.served, "busy_s": self.busy_s, "device": self.device, "intervals": list(got),
                "running_since": self.running_since, "at": time.time(), "pid": os.getpid()}

    @ray.method(concurrency_group="control")
    def checkpoint_id(self) -> str:
        self._set_up()
        if self.labeler is None:
            raise LabelerSetupError(self.setup_error)
        return self.labeler.checkpoint_id()


class WorkerDied(RuntimeError):
    """The process running a labeler died (crash, segfault, killed) while labelling these samples."""


def _call_in_own_process(run: LabelerRun, inputs):
    return call_local(run, inputs)


_isolated_call = ray.remote(max_retries=0)(_call_in_own_process)


# batches a shard task keeps at the model actors by default: this many per actor of the pools it uses (a batch
# visits each pool in turn), at most IN_FLIGHT_MAX (each holds its decoded images: ~30 MB at 16 x 768 px)
IN_FLIGHT_PER_ACTOR = int(os.environ.get("MODALMILL_IN_FLIGHT_PER_ACTOR", "2"))
IN_FLIGHT_MAX = 8

# bytes of decoded samples a shard task holds between decode and write by default (``ray.bytes_in_flight: null``):
# this share of the task's part of its node's memory, i.e. SHARE x node memory / (node CPUs / the task's CPUs), where
# node memory is the Ray ``memory`` resource of the node (what Ray may give tasks and actors there: by default ~70%
# of its RAM less the object store); at least BYTES_IN_FLIGHT_MIN. The rest of the task's part is its own process
# (Python, the labelers' prepare, writers) and the batches' copies in the object store.
BYTES_IN_FLIGHT_SHARE = 0.25
BYTES_IN_FLIGHT_MIN = 64 * 2 ** 20
_NODE_SHARE: dict[float, int] = {}


def default_bytes_in_flight() -> int:
    """``ray.bytes_in_flight``'s default for a shard task running in this worker (see BYTES_IN_FLIGHT_SHARE). Run
    outside a Ray worker (a task run in-process), 70% of this machine's RAM stands for the node's memory."""
    try:
        if not ray.is_initialized():  # (get_runtime_context() would start a Ray)
            raise RuntimeError("not in a Ray worker")
        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)) or 1.0
        me = ray.get_runtime_context().get_node_id() if cpus not in _NODE_SHARE else None
    except Exception:  # noqa: BLE001 - not in a Ray worker
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return max(BYTES_IN_FLIGHT_MIN, int(BYTES_IN_FLIGHT_SHARE * 0.7 * ram / (os.cpu_count() or 1)))
    if cpus not in _NODE_SHARE:  # asked once per worker process
        node = next((n.get("Resources", {}) for n in ray.nodes() if n.get("NodeID") == me), {})
        memory, node_cpus = float(node.get("memory", 0.0)), float(node.get("CPU", 0.0)) or cpus
        share = BYTES_IN_FLIGHT_SHARE * memory / max(1.0, node_cpus / cpus)
        _NODE_SHARE[cpus] = max(BYTES_IN_FLIGHT_MIN, int(share))
    return _NODE_SHARE[cpus]


ACTOR_WAIT_S = float(os.environ.get("MODALMILL_ACTOR_WAIT_S", "300"))


def _ping(actor):
    """A cheap call that answers once ``actor`` serves again: retried without limit by Ray (a call to a restarting
    actor waits for it instead of failing at once), so the caller waits in one Ray call, not in sleeps between
    failed ones (a task's main thread lends its CPU only while it waits in Ray)."""
    return actor.ready.options(max_task_retries=-1).remote()


def _wait_until_alive(ping, deadline: float, what: str) -> None:
    """Block until ``ping()`` (a cheap actor call, see :func:`_ping`) answers, i.e. the restarted actor is serving
    again."""
    delay = 0.5
    while True:
        try:
            ray.get(ping(), timeout=max(1.0, deadline - time.time()))
            return
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            if time.time() > deadline:
                raise WorkerDied(f"the {what} actor stayed unavailable for {ACTOR_WAIT_S:.0f} s") from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
            raise WorkerDied(f"the {what} actor is dead ({type(e).__name__})") from None


def _actor_get(submit, what: str, ping=None):
    """``ray.get(submit())``, waiting out an actor that is restarting (e.g. its node died) for a bounded time.

    The call is sent again only once the actor answers ``ping`` again; if the call itself fails twice on a
    live actor (the call kills it), WorkerDied is raised: the caller splits the batch, so a sample that kills
    the actor every time ends up isolated and recorded instead of being retried forever."""
    deadline = time.time() + ACTOR_WAIT_S
    deaths = 0
    while True:
        try:
            return ray.get(submit())
        except ray.exceptions.ActorUnavailableError:
            deaths += 1
            if ping is None or deaths >= 2:
                raise WorkerDied(f"the {what} worker died while labelling this batch (actor unavailable "
                                 f"{deaths} times)") from None
            _wait_until_alive(ping, deadline, what)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as e:
            raise WorkerDied(f"the {what} worker died while labelling this batch ({type(e).__name__})") from None


class _AtActors:
    """A shard task's calls to the model actors (one per labelling thread), so that its main thread can wait on
    them in ``ray.wait`` whenever it waits for the actors: Ray lends a task's CPUs to other tasks while its main
    thread is blocked there (not while another thread waits in ``ray.get``), so another shard task reads, decodes
    and sends its batches while this one's are labelled, and before it commits (the threads that sent them still
    ``ray.get`` the results). Without it the next task starts only after this one's commit, and the actors' queue
    runs dry at shard ends. Lending matters most after a node died: an actor restarting may need the very CPU the
    task holds, and gets it only while the main thread waits in Ray."""

    PREPARING = None  # a call begun whose batch is still being prepared (not yet at an actor)

    def __init__(self):
        self.cond = threading.Condition()
        self.calls: dict[int, Any] = {}  # labelling thread -> the object ref of its call at an actor, or PREPARING

    def begin(self) -> None:
        self._set(self.PREPARING)

    def sent(self, ref):
        self._set(ref)
        return ref

    def answered(self) -> None:
        with self.cond:
            self.calls.pop(threading.get_ident(), None)
            self.cond.notify_all()

    def _set(self, state) -> None:
        with self.cond:
            self.calls[threading.get_ident()] = state
            self.cond.notify_all()

    def wait(self, future, thread: int | None) -> None:
        """Block until ``future`` (a batch's labelling, run by labelling thread ``thread``) is done: in ``ray.wait``
        (CPUs lent) while that thread has a call at an actor unanswered, on a condition (the CPU held: the thread
        works on the CPU, preparing a batch or making results into payloads, or sleeps between pings of a restarting
        actor, its failed call still registered) until it sends another or the batch is done. It leaves only when
        the batch is done: a thread whose call failed goes on to ping the actor, send the call again or split the
        batch into calls of its own, and a main thread that had left would sit in ``future.result()`` holding its
        CPU through all of them."""
        future.add_done_callback(lambda _: self._notify())
        answered = None  # the last call seen answered (the thread has not yet said what comes next)
        while not future.done():
            with self.cond:
                self.cond.wait_for(lambda was=answered: future.done() or self._at_actor(self.calls.get(thread), was),
                                   timeout=1.0)
                ref = self.calls.get(thread)
            if self._at_actor(ref, answered) and ray.wait([ref], num_returns=1, timeout=1.0)[0]:
                # bounded: a call whose actor's node died may stay pending while the actor waits for a place to
                # restart; the labelling thread's own ray.get decides what happens to it
                answered = ref

    @classmethod
    def _at_actor(cls, ref, answered) -> bool:
        """Whether ``ref`` (a thread's entry) is a call at an actor not yet seen answered."""
        return ref is not cls.PREPARING and ref is not answered

    def _notify(self) -> None:
        with self.cond:
            self.cond.notify_all()


class _Members:
    """A shard task's view of the model pools: which actors each has and which one labels its next batch. With the
    execution's :class:`~.dispatch.PoolRegistry` (when some pool is ``auto``) the registry chooses, from
    every task's batches in flight, and its answers carry the pools' membership when it changed; the view is also
    refreshed at most every ``REFRESH_S`` seconds. Without one (or when it is gone: the driver ended) a batch goes
    to the actor with the fewest of this task's batches (ties: the one after the last chosen, starting from a place
    set by the shard's index, so tasks spread over the pool)."""

    def __init__(self, pools: dict[str, list], registry, start: int, shard: str = ""):
        self.pools = {name: list(handles) for name, handles in pools.items()}
        self.registry, self.version, self.checked = registry, 0, time.monotonic()
        self.shard = shard
        self.outstanding: dict[str, int] = {}  # actor key -> this task's batches at it
        self.last = {name: start % max(1, len(handles)) - 1 for name, handles in pools.items()}
        self.lock, self.refreshing = threading.Lock(), threading.Lock()

    def refresh(self, force: bool = False) -> None:
        if self.registry is None or (not force and time.monotonic() - self.checked < REFRESH_S):
            return
        with self.refreshing:
            self.checked = time.monotonic()
            try:
                got = ray.get(self.registry.since.remote(self.version), timeout=30)
            except (ray.exceptions.RayError, TimeoutError):  # the registry is gone (the driver ended): keep this view
                return
            self._update(got)

    def _update(self, got) -> None:
        if got is not None:
            with self.lock:
                self.version, self.pools = got[0], {name: list(h) for name, h in got[1].items()}

    def ask(self, name: str, samples: int = 1):
        """Ask the registry now for the actor of a batch being prepared (the answer travels while it is): what
        :meth:`take` is then given; None without a registry."""
        if self.registry is None:
            return None
        try:
            return self.registry.take.remote(name, self.shard, self.version, samples)
        except Exception:  # noqa: BLE001 - the registry is gone (the driver ended): this task's own choice
            return None

    def take(self, name: str, samples: int = 1, asked=None) -> tuple[Any, float]:
        """The actor for this task's next batch of pool ``name`` (``samples`` samples) and the work the registry
        charged it (what :meth:`give_back` returns); ``asked``: :meth:`ask`'s answer for this batch, if any."""
        chosen, work = self._dispatched(name, samples, asked)
        if chosen is None:
            self.refresh()
        with self.lock:
            handles = self.pools[name]
            n = len(handles)
            i = next((j for j in range(n) if actor_key(handles[j]) == chosen), None)
            if i is None and chosen is not None:  # (a choice this view cannot follow: not charged to it)
                self._return(chosen, work)
            if i is None:  # no registry (or its choice is unknown here): this task's own least-loaded actor
                i = min(range(n), key=lambda j: (self.outstanding.get(actor_key(handles[j]), 0),
                                                 (j - self.last[name] - 1) % n))
                self.last[name] = i
            key = actor_key(handles[i])
            self.outstanding[key] = self.outstanding.get(key, 0) + 1
            return handles[i], (work if key == chosen else 0.0)

    def _dispatched(self, name: str, samples: int, asked=None) -> tuple[str | None, float]:
        """The registry's choice for this task's next batch of ``name`` and the work it charged (None: no registry,
        or it is gone)."""
        if asked is None:
            asked = self.ask(name, samples)
        if asked is None:
            return None, 0.0
        try:
            got, since = ray.get(asked, timeout=30)
        except (ray.exceptions.RayError, TimeoutError):  # the registry is gone (the driver ended)
            return None, 0.0
        self._update(since)
        return got if got is not None else (None, 0.0)

    def give_back(self, handle, work: float = 0.0) -> None:
        key = actor_key(handle)
        with self.lock:
            self.outstanding[key] -= 1
        self._return(key, work)

    def _return(self, key: str, work: float) -> None:
        if self.registry is not None and work:
            with contextlib.suppress(Exception):
                self.registry.give_back.remote(key, self.shard, work)

    def removed(self, name: str, handle) -> bool:
        """Whether ``handle`` left its pool (a shrink retired it): asked after a batch failed at it."""
        self.refresh(force=True)
        with self.lock:
            return actor_key(handle) not in {actor_key(h) for h in self.pools[name]}

    def size(self, name: str) -> int:
        return len(self.pools[name])


def _call_pool(members: _Members, name: str, batch, at_actors: _AtActors | None = None, samples: int = 1,
               asked=None):
    """Send a prepared batch to one actor of pool ``name`` and return its results; a batch whose actor a shrink
    killed before it was served is sent again to an actor that remains. ``at_actors``: the shard task's calls at
    the actors, where the batch's object ref is registered (its main thread waits on them, lending its CPU);
    ``samples``: the batch's size (what the dispatch charges the chosen actor); ``asked``: the registry's answer
    asked for while the batch was prepared (:meth:`_Members.ask`)."""
    sent = at_actors.sent if at_actors is not None else (lambda ref: ref)
    while True:
        actor, work = members.take(name, samples, asked)
        asked = None  # (a batch sent again asks anew)
        try:
            # the ping too is a call at an actor: while the thread waits for a restarting actor (its node died),
            # the task's main thread waits on it with its CPU lent, so the actor can be placed where tasks hold
            # every CPU (else the main thread sat in future.result() holding it, and the restart never came)
            return _actor_get(lambda a=actor: sent(a.process_batch.remote(batch)), name,
                              ping=lambda a=actor: sent(_ping(a)))
        except WorkerDied:
            if not members.removed(name, actor):
                raise
        finally:
            members.give_back(actor, work)


def _run_shard(task: ShardTask, pools: dict[str, list], counter, isolate: bool = False,
               in_flight: int | None = None, checkpoints: dict[str, str] | None = None,
               bytes_in_flight: int | None = None, registry=None) -> dict:
    """One shard task. With ``isolate`` (after the shard's worker died more often than its retries allow),
    model-free labelers run in a throw-away process per batch, so a sample that kills its process is split
    off and recorded as failed instead of taking the shard down again. ``in_flight``: batches kept at the model
    actors (None: 2 per actor of the pools the task uses, at most 8); ``checkpoints``: each pool's weights id;
    ``bytes_in_flight``: bytes of decoded samples the task may hold until written (None: the node-derived default,
    :func:`default_bytes_in_flight`); ``registry``: the execution's :class:`~.dispatch.PoolRegistry`, which
    chooses each batch's actor and knows the pools' current membership (see :class:`_Members`)."""
    limit_threads()

    preparers: dict[str, Any] = {}  # per pooled labeler, an instance (never set up) that runs its ``prepare``
    members = _Members(pools, registry, task.source.index, task.shard)
    local_locks = {run.labeler: threading.Lock() for run in task.labelers}  # one batch at a time per labeler

    at_actors = _AtActors()  # the main thread waits on them whenever the task waits for the actors

    def call(run: LabelerRun, inputs):
        if run.stateful and run.labeler in pools:
            at_actors.begin()
            asked = members.ask(run.labeler, len(inputs))  # which actor: answered while the batch is prepared
            try:
                with local_locks[run.labeler]:  # prepare here, on the shard task's CPU, not the model's
                    if run.labeler not in preparers:
                        preparers[run.labeler] = run.instance()
                    batch = preparers[run.labeler].prepare(inputs)
                return _call_pool(members, run.labeler, batch, at_actors, len(inputs), asked)
            finally:
                at_actors.answered()
        with local_locks[run.labeler]:
            if isolate:
                return _actor_get(lambda: _isolated_call.options(num_cpus=0).remote(run, inputs), run.labeler)
            return call_local(run, inputs)

    # batches wait for model actors: keep ``in_flight`` of them there while the task reads and decodes the next
    pooled = [members.size(run.labeler) for run in task.labelers if run.stateful and run.labeler in pools]
    call.in_flight = (in_flight or min(IN_FLIGHT_MAX, IN_FLIGHT_PER_ACTOR * sum(pooled))) if pooled else 0
    call.bytes_in_flight = bytes_in_flight or default_bytes_in_flight()

    def checkpoint(run: LabelerRun) -> str:
        if run.stateful and run.labeler in pools:
            if run.labeler in (checkpoints or {}):  # asked once by the driver: not queued behind other batches
                return checkpoints[run.labeler]
            head = pools[run.labeler][0]
            return _actor_get(head.checkpoint_id.remote, run.labeler, ping=lambda: _ping(head))
        return call_local.checkpoint(run)

    call.checkpoint = checkpoint
    call.await_in_flight = at_actors.wait

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
        if isinstance(e, LeaseLost):  # another driver owns the output now: write nothing, not even this record
            failure.pop("traceback")
            return failure
        record_failure(task, failure)
        failure.pop("traceback", None)
        return failure


def record_failure(task: ShardTask, failure: dict) -> dict:
    """Write the shard's failure record (fenced, like every write). One that cannot be written is not dropped
    silently: the error says so (it reaches the run record and ``modalmill run``'s report), and so does stderr."""
    try:
        fenced(task)
        manifest.write_failure(task.output, task.shard, failure)
    except LeaseLost:
        failure["error"] = f"{failure['error']} (not recorded: this driver lost its lease)"
    except Exception as e:  # noqa: BLE001 - the output itself may be what fails
        why = f"its failure record could not be written: {type(e).__name__}: {e}"[:500]
        print(f"modalmill: error: shard {task.shard}: {why}", file=sys.stderr, flush=True)
        failure["error"] = f"{failure['error']}; {why}"
    return failure


def _largest_node() -> dict[str, float]:
    """The most CPUs, GPUs and memory (bytes) that any one alive node of the connected cluster offers."""
    best: dict[str, float] = {"CPU": 0.0, "GPU": 0.0, "memory": 0.0}
    for node in ray.nodes():
        if node.get("Alive"):
            for k in best:
                best[k] = max(best[k], float(node.get("Resources", {}).get(k, 0.0)))
    return best


def fit_resources(name: str, defaults: Resources, overrides: dict | None, node: dict[str, float]) -> Resources:
    """The resources one actor of labeler ``name`` asks for, made to fit the cluster.

    A labeler's *default* request adapts: on a cluster without GPUs its GPU share becomes 0 (the model runs on
    the CPU), a default memory reservation larger than any node is dropped, default CPUs are capped at the
    largest node. What the job asks for explicitly (``labelers.NAME.resources``) is kept, and a request no node
    can ever satisfy is a clear error instead of a job that waits forever."""
    overrides = dict(overrides or {})
    res = Resources(**{**defaults.__dict__, **overrides})
    fixes: dict = {}
    if res.num_gpus > node["GPU"]:
        if "num_gpus" in overrides:
            have = "any GPU" if not node["GPU"] else f"more than {node['GPU']:g}"
            raise ValueError(f"labeler {name!r} asks for {res.num_gpus:g} GPU(s) per worker but no node of this "
                             f"Ray cluster has {have}; set labelers.{name}.resources.num_gpus to 0 to run it on "
                             "the CPU")
        fixes["num_gpus"] = 0.0 if not node["GPU"] else node["GPU"]
    if res.num_cpus > node["CPU"]:
        if "num_cpus" in overrides:
            raise ValueError(f"labeler {name!r} asks for {res.num_cpus:g} CPUs per worker but the largest node "
                             f"has {node['CPU']:g}")
        fixes["num_cpus"] = node["CPU"]
    for k, v in (res.custom or {}).items():
        have = float(ray.cluster_resources().get(k, 0.0))
        if float(v) > have:
            raise ValueError(f"labeler {name!r} asks for {float(v):g} {k!r} per worker but this Ray cluster has "
                             f"{have:g} (declare it with `ray start --resources` or lower "
                             f"labelers.{name}.resources.custom)")
    if res.memory_mb and res.memory_mb * 1024 * 1024 > node["memory"]:
        if "memory_mb" in overrides:
            raise ValueError(f"labeler {name!r} reserves {res.memory_mb} MB per worker but the largest node "
                             f"offers {node['memory'] / 2**20:.0f} MB to Ray")
        fixes["memory_mb"] = 0
    if fixes:
        print(f"modalmill: labeler {name}: default resources adapted to this cluster: "
              + ", ".join(f"{k}={v:g}" for k, v in fixes.items()), file=sys.stderr)
    return Resources(**{**res.__dict__, **fixes})


def _leave_room_for_shard_tasks(plans: list, shard_cpus: float, total_cpus: float) -> None:
    """Actor pools must leave at least one shard task's CPUs free, or the job waits forever. Default CPU
    requests shrink (proportionally, down to 0: such an actor then shares the CPUs with the shard tasks) to make
    room; explicit ones that alone leave no room are a clear error."""
    need = sum(res.num_cpus * n for _, res, n, _ in plans)
    room = total_cpus - shard_cpus  # what the actors may hold
    if need <= room + 1e-9:
        return
    fixed = sum(res.num_cpus * n for _, res, n, explicit in plans if explicit)
    flexible = need - fixed
    if fixed > room + 1e-9:
        names = ", ".join(f"{name} ({n} x {res.num_cpus:g})" for name, res, n, explicit in plans if explicit)
        left = max(0.0, total_cpus - fixed)
        raise ValueError(f"the labeler actors' explicit CPU requests reserve {fixed:g} of the cluster's "
                         f"{total_cpus:g} CPUs ({names}), leaving {left:g}: less than one shard task's "
                         f"{shard_cpus:g} (ray.shard_cpus); lower labelers.NAME.resources.num_cpus or "
                         "labelers.NAME.workers, or ray.shard_cpus")
    scale = max(0.0, room - fixed) / flexible
    for i, (name, res, n, explicit) in enumerate(plans):
        if not explicit:
            plans[i] = (name, Resources(**{**res.__dict__, "num_cpus": round(res.num_cpus * scale, 4)}), n, False)
    print(f"modalmill: labeler actors' default CPU requests scaled by {scale:.2f} to leave {shard_cpus:g} CPU(s) "
          f"of {total_cpus:g} for shard tasks" + (" (the actors share the CPUs with the shard tasks)"
                                                  if scale == 0 else ""), file=sys.stderr)


def make_pools(runs: list[LabelerRun], settings: dict, shard_cpus: float = 1.0,
               env: dict[str, str] | None = None) -> dict[str, list]:
    """One actor pool per stateful labeler (``env``: extra environment variables); waits until every actor is
    set up."""
    pools = start_pools(runs, settings, shard_cpus, env)
    wait_until_set_up(pools)
    return pools


def start_pools(runs: list[LabelerRun], settings: dict, shard_cpus: float = 1.0,
                env: dict[str, str] | None = None, requests: dict[str, Resources] | None = None,
                sizes: Callable[[dict[str, Resources], dict[str, int]], dict[str, int]] | None = None
                ) -> dict[str, list]:
    """Create one actor pool per stateful labeler; the actors set themselves up in the background (see
    :func:`wait_until_set_up`). ``requests``, when given, receives the resources one actor of each pool asks.
    ``sizes(requests, counts)``: how many actors each pool starts with (default: ``counts``, the job's
    ``workers``, or ``min_workers`` for ``auto``)."""
    node = _largest_node()
    plans: list = []
    for run in runs:
        if not run.stateful or any(p[0] == run.labeler for p in plans):
            continue
        cls = run.labeler_class()
        s = settings.get(run.labeler)
        res = fit_resources(run.labeler, cls.default_resources, s.resources if s else None, node)
        plans.append((run.labeler, res, s.actors() if s else 1, bool(s and "num_cpus" in s.resources)))
    _leave_room_for_shard_tasks(plans, shard_cpus, float(ray.cluster_resources().get("CPU", 0.0)))
    wanted = {name: res for name, res, _, _ in plans}
    counts = {name: n for name, _, n, _ in plans}
    counts = sizes(wanted, counts) if sizes is not None else counts
    if requests is not None:
        requests.update(wanted)
    first_run = {}
    for run in runs:
        first_run.setdefault(run.labeler, run)
    return {name: [new_actor(first_run[name], res, env) for _ in range(counts[name])] for name, res in wanted.items()}


def new_actor(run: LabelerRun, res: Resources, env: dict[str, str] | None):
    """One more actor of ``run``'s pool (placed by Ray; it sets itself up on its first call)."""
    # a killed actor is restarted and its in-flight batch retried once; a batch that keeps killing it is
    # split by the shard task until the poisoned sample is isolated and recorded
    opts = {**res.ray_options(), "max_restarts": -1, "max_task_retries": 1}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return LabelerActor.options(**opts).remote(run)


def wait_until_placed(pools: dict[str, list]) -> None:
    """Block until Ray has placed every actor (it holds its CPUs, GPUs and custom resources), so the shard tasks
    sent afterwards cannot take the resources an actor waits for at the start (an actor restarted later, after
    its node died, competes with them: the executor's placement watch says when that stalls a job)."""
    refs = {h.placed.remote(): name for name, handles in pools.items() for h in handles}
    waited = 0.0
    while refs:
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=30)
        for ref in done:
            ray.get(ref)
            refs.pop(ref)
        if refs:
            waited += 30
            print(f"modalmill: still waiting ({waited:.0f} s) for Ray to place labeler actors "
                  f"{sorted(set(refs.values()))}: the cluster may lack the resources they ask for "
                  f"(see `ray status`)", file=sys.stderr)


def kill_pools(pools: dict[str, list]) -> None:
    for handles in pools.values():
        for h in handles:
            ray.kill(h)


def wait_until_set_up(pools: dict[str, list]) -> None:
    """Block until every actor is set up; on the first set-up error, kill the pools and raise LabelerSetupError."""
    handle_of = {}
    for name, handles in pools.items():
        for h in handles:
            handle_of[h.ready.remote()] = (name, h)
    pending = {ref: name for ref, (name, _) in handle_of.items()}
    waited = 0.0
    while pending:
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=30)
        for ref in done:
            name = pending.pop(ref)
            error = ray.get(ref)
            if error:  # the actor could not set up (e.g. weights only the workers see are missing): stop here
                details = ray.get(handle_of[ref][1].setup_details.remote()) if os.environ.get("MODALMILL_DEBUG") \
                    else ""
                kill_pools(pools)
                raise LabelerSetupError(f"labeler {name!r} could not be set up on a Ray worker: {error}"
                                        + (f"\n{details}" if details else ""))
        if pending:
            waited += 30
            print(f"modalmill: still waiting ({waited:.0f} s) for labeler actors {sorted(set(pending.values()))} "
                  f"to be placed and set up: the cluster may lack the resources they ask for (see `ray status`), "
                  f"or their weights are slow to load", file=sys.stderr)


def execute(tasks: Iterable[ShardTask], runs: list[LabelerRun], labeler_settings: dict, *, shard_cpus: float = 1.0,
            max_retries: int = 3, show_progress: bool = True, batches_in_flight: int | None = None,
            bytes_in_flight: int | None = None, on_submit: Callable[[ShardTask], None] | None = None,
            stop: Callable[[], str] | None = None, report: dict | None = None) -> list[dict]:
    """Run the shard tasks on the connected Ray cluster; returns one summary per task, in shard order.

    ``tasks`` may be a stream (a generator that is still planning): it is pulled only as the window of tasks in
    flight has room, so the first tasks run while later ones are planned. ``runs``: the labelers whose actor
    pools are started (every stateful labeler the tasks use must be among them). ``on_submit(task)`` is called
    as each task is handed to Ray. ``batches_in_flight``: how many batches each shard task keeps at the model actors
    (default: 2 per actor of the pools it uses, at most 8); ``bytes_in_flight``: how many bytes of decoded samples
    it holds between decode and write (default: :func:`default_bytes_in_flight`). ``stop()``: asked before each
    round of submissions; a non-empty answer (the driver lost its lease) submits nothing more and ends the running
    tasks at once (they are fenced: none commits after the takeover), keeps the results already back, and leaves
    the output's temporary files to the new holder. ``report``: when given, receives ``autoscale``
    (:meth:`.resize.Resizer.record`: the resize decisions, each pool's measured and projected figures) when ``auto``
    pools were resized while it ran.

    The steps: start the actor pools and wait until Ray has placed them (:func:`_place_pools`); then, in
    :class:`_Execution`, keep a window of shard tasks at Ray, wait for the actors' set-up once the first tasks
    are sent, collect results (a task whose worker died more often than its retries is run once more with its
    model-free labelers isolated), draw progress, and say when Ray cannot place what the job waits for."""
    source = iter(tasks)
    first = next(source, None)
    if first is None:
        return []
    # input, output and s3:// weights: a Ray started before this process' S3 settings must still reach them
    env = local_s3_env(first.output, first.source.url,
                       *[str(v) for r in runs for v in r.config.values() if isinstance(v, str)])
    pools, requests, shapes = _place_pools(runs, labeler_settings, shard_cpus, env)
    run = _Execution(first, source, pools, requests, shard_cpus=shard_cpus, max_retries=max_retries, env=env,
                     show_progress=show_progress, batches_in_flight=batches_in_flight,
                     bytes_in_flight=bytes_in_flight, on_submit=on_submit,
                     stop=stop, total=len(tasks) if isinstance(tasks, (list, tuple)) else None)
    try:
        run.start_resizer(shapes, runs, env)
        run.loop()
    finally:
        run.close()
        if report is not None and run.record is not None:  # a second execution (deferred tasks): its own entry
            report["autoscale_deferred" if "autoscale" in report else "autoscale"] = run.record
    return sorted(run.results, key=lambda r: r["index"])


def _on_this_node() -> dict:
    """Scheduling options that keep a small driver-side actor on the driver's node when there is one (so a worker
    node's death does not take it away; it costs no CPU)."""
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                      soft=True)}
    except Exception:  # noqa: BLE001 - e.g. a Ray Client driver has no node of its own
        return {}


def _place_pools(runs: list[LabelerRun], settings: dict, shard_cpus: float,
                 env: dict[str, str]) -> tuple[dict[str, list], dict[str, Resources], list[PoolShape]]:
    """Start the actor pools, wait until Ray has placed every actor, then queue each actor's set-up (imports,
    weights) as its first call: it runs while the first shard tasks start, read and decode. ``auto`` pools that
    hold accelerator shares start from an equal split of the free ones (:func:`.resize.first_sizes`). Returns the
    pools, the resources one actor of each asks for and the pools' shapes (what the autoscaler resizes)."""
    requests: dict[str, Resources] = {}
    budget = pool_budget(ray.cluster_resources(), shard_cpus)
    shapes: list[PoolShape] = []

    def sizes(wanted: dict[str, Resources], counts: dict[str, int]) -> dict[str, int]:
        shapes.extend(shapes_for(wanted, settings, budget, counts))
        return first_sizes(shapes, budget)

    pools = start_pools(runs, settings, shard_cpus, env, requests=requests, sizes=sizes)
    try:
        wait_until_placed(pools)
        for handles in pools.values():
            for h in handles:
                h.ready.remote()
    except BaseException:
        kill_pools(pools)
        raise
    return pools, requests, shapes


class _Execution:
    """One execution's state on the driver: the task stream, the window of tasks at Ray, retries, results,
    progress bars and the placement watch. :meth:`loop` runs it; :meth:`close` always runs after."""

    def __init__(self, first: ShardTask, source, pools: dict[str, list], requests: dict[str, Resources], *,
                 shard_cpus: float, max_retries: int, env: dict[str, str], show_progress: bool,
                 batches_in_flight: int | None, on_submit, stop, total: int | None,
                 bytes_in_flight: int | None = None):
        from tqdm.auto import tqdm

        self.first, self.source, self.pools = first, source, pools
        self.in_flight, self.on_submit = batches_in_flight, on_submit
        self.bytes_in_flight = bytes_in_flight
        self.stop: Callable[[], str] | None = stop
        self.stopped = ""  # why :meth:`loop` stopped early (the driver lost its lease); empty: it did not
        self.checkpoints: dict[str, str] | None = None  # each pool's weights id, once every actor is set up
        self.counter = ProgressCounter.options(**_on_this_node()).remote()
        self.remote = ray.remote(_run_shard).options(num_cpus=shard_cpus, max_retries=max_retries,
                                                     **({"runtime_env": {"env_vars": env}} if env else {}))
        # twice as many tasks as the cluster's CPUs can run at once: the next is queued when one ends
        self.window = max(2, int(2 * ray.cluster_resources().get("CPU", 2) / max(shard_cpus, 0.01)))
        disable = not show_progress or os.environ.get("TQDM_DISABLE") == "1"
        self.shard_bar = tqdm(total=total, unit="shard", desc="shards", position=0, disable=disable)
        self.sample_bar = tqdm(unit="sample", desc="samples", position=1, disable=disable)
        self.results: list[dict] = []
        self.retry: list[tuple[ShardTask, bool]] = []
        self.upcoming: ShardTask | None = first  # the next task of the stream (None: the stream ended)
        self.pulled = 0
        self.running: dict = {}  # object ref -> (task, isolated)
        self.watch = PlacementWatch(pools, requests, shard_cpus)
        self.requests, self.shard_cpus = requests, shard_cpus
        self.registry, self.resizer = None, None  # set by :meth:`start_resizer`
        self.t0, self.samples = time.time(), 0
        self.record: dict | None = None  # the resizer's record (run record ``autoscale``), made by :meth:`close`

    def start_resizer(self, shapes: list[PoolShape], runs: list[LabelerRun], env: dict[str, str]) -> None:
        """When some pool may be resized (``workers: auto``, its actors hold a bounded resource, and it could shrink
        or grow at all), start the pools' registry (:mod:`.dispatch`: the pools' membership, and it chooses each
        batch's actor) and the :class:`~.resize.Resizer`. Fixed pools keep each task's own choice: there the
        registry's call per batch (a median of 9 ms on 2 loaded cores) cost more than it balanced (benchmark 6, two
        whole devices: busy 0.78-0.84 with it against 0.78-0.89 without)."""
        budget = pool_budget(ray.cluster_resources(), self.shard_cpus)
        if not can_move(shapes, {name: len(h) for name, h in self.pools.items()}, budget):
            return
        self.registry = PoolRegistry.options(**_on_this_node()).remote(
            {name: list(handles) for name, handles in self.pools.items()})
        run_of = {}
        for r in runs:
            run_of.setdefault(r.labeler, r)
        self.resizer = Resizer(shapes, budget, self.pools,
                               self.registry, lambda name: new_actor(run_of[name], self.requests[name], env))

    def next_task(self) -> tuple[ShardTask, bool] | None:
        """A task to retry first, else the next of the stream (pulling one more ahead, so the end is known)."""
        if self.retry:
            return self.retry.pop(0)
        if self.upcoming is None:
            return None
        t = self.upcoming
        self.upcoming = next(self.source, None)
        self.pulled += 1
        if self.upcoming is None and self.shard_bar.total is None:  # the stream ended: the bar knows its total
            self.shard_bar.total = self.pulled
            self.shard_bar.refresh()
        return t, False

    def submit(self) -> None:
        while len(self.running) < self.window:
            nxt = self.next_task()
            if nxt is None:
                return
            t, isolate = nxt
            ref = self.remote.remote(t, self.pools, self.counter, isolate, self.in_flight, self.checkpoints,
                                     self.bytes_in_flight, self.registry)
            self.running[ref] = (t, isolate)
            if not isolate and self.on_submit is not None:
                self.on_submit(t)

    def await_set_up(self) -> None:
        """Once, after the first tasks are sent: wait until every actor is set up and ask each pool's weights id
        (every actor of a pool loaded the same weights; asked here, no later task waits for the answer behind the
        batches queued at the actor). A set-up failure cancels the tasks sent (they could only fail on the
        missing labeler; their temporary files are removed by :meth:`close`) and is raised."""
        try:
            wait_until_set_up(self.pools)
            self.checkpoints = {name: _actor_get(handles[0].checkpoint_id.remote, name,
                                                 ping=lambda h=handles[0]: _ping(h))
                                for name, handles in self.pools.items()}
        except BaseException:
            for ref in self.running:
                ray.cancel(ref, force=True)
            raise

    def collect(self, timeout: float = 0.5) -> None:
        """Record the tasks that ended within ``timeout``. A task that raised (its worker died more often than
        ``max_retries``: a task's own errors are returned values) is run once more with its model-free labelers in
        throw-away processes; if that fails too, the shard is recorded as failed."""
        done, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout)
        for ref in done:
            task, isolated = self.running.pop(ref)
            if self.registry is not None:  # its batches still counted at the actors (a worker lost) are not
                self.registry.forget.remote(task.shard)
            try:
                res = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - see the docstring
                if not isolated:
                    self.retry.append((task, True))
                    continue
                res = record_failure(task, {
                    "shard": task.shard, "index": task.source.index, "source": task.source.url,
                    "mode": task.mode, "status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]})
            self.results.append(res)
            self.shard_bar.update(1)

    def show_samples(self) -> None:
        try:  # best effort: a counter lost with its node restarts from zero
            n = ray.get(self.counter.get.remote(), timeout=5)
            self.sample_bar.update(max(0, n - self.sample_bar.n))
            self.samples = max(self.samples, n)
        except (ray.exceptions.RayError, TimeoutError):
            pass

    def loop(self) -> None:
        while True:
            self.stopped = self.stop() if self.stop is not None else ""
            if self.stopped:
                self.end_early()
                return
            self.submit()
            if self.checkpoints is None:
                self.await_set_up()
            if not self.running:
                return
            self.collect()
            self.show_samples()
            self.watch.check(len(self.running))
            if self.resizer is not None and self.checkpoints is not None:
                self.resizer.tick()

    def end_early(self) -> None:
        """The driver lost its lease: keep the results already back (the fenced tasks say LeaseLost) and end the
        other tasks now (they are fenced: none commits after the takeover)."""
        back, _ = (ray.wait(list(self.running), num_returns=len(self.running), timeout=0) if self.running
                   else ([], []))
        for ref in self.running:
            if ref in back:
                with contextlib.suppress(Exception):
                    self.results.append(ray.get(ref))
            else:
                ray.cancel(ref, force=True)
        self.running.clear()

    def close(self) -> None:
        self.shard_bar.close()
        self.sample_bar.close()
        if self.resizer is not None:
            self.show_samples()
            self.record = self.resizer.record(time.time() - self.t0, self.samples)
            for h in self.resizer.handles():
                ray.kill(h)
        kill_pools(self.pools)
        ray.kill(self.counter)
        if self.registry is not None:
            ray.kill(self.registry)
        if not self.stopped:  # after losing the lease, the temporary files may be the new holder's
            remove_stale_temp_files(self.first.output)


def remove_stale_temp_files(root: str) -> None:
    """Remove temporary files that killed workers (or a killed earlier driver) left in the local output ``root``.

    Only called when no task of this run is running; S3 outputs never have any (uploads are all-or-nothing).
    """
    if storage.is_s3(root):
        return
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.startswith(".") and ".tmp-" in f:
                try:
                    os.remove(os.path.join(dirpath, f))
                except OSError:
                    pass
