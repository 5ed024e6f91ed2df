"""One writer per output root: a lease (a lock object with holder token, owner, machine, pid and heartbeat)
under ``OUT/_modalmill/lease/``.

The lease is a sequence of *generation* objects, ``lease/gen-000000042.json``; the one with the highest number is
the current lease. Taking the lease means creating the next generation **only if it does not exist yet**, a
step in which exactly one of any number of racing drivers wins:

- on S3, a conditional PUT (``If-None-Match: *``; AWS S3 and SeaweedFS answer ``412 Precondition Failed`` to the
  losers; tested against SeaweedFS on loopback, see ``tests/test_lease.py``);
- on a local or network filesystem, a complete temporary file hard-linked to the generation's name
  (``link(2)`` fails with ``EEXIST`` when the name exists, atomically; the object is never seen half-written).

**Holder identity.** Each holder is a random token (``uuid4``) made when it takes the lease; a generation is
created exclusively, so generation number + token name one holder without relying on host names or pids.

A driver may take the lease when the current generation is *free*: released by its owner, or *stale*: its owner
stopped heart-beating (no heartbeat for ``ttl_s``, ``MODALMILL_LEASE_TTL_S``, default 60 s), or its process is
provably gone: only when the record's ``machine`` (a hash of the kernel's random per-boot id and the pid
namespace, :func:`machine_id`) equals ours is its pid looked up here, so two containers with the same host name,
or two machines, never judge each other's pid. Heartbeats are wall-clock times: hosts sharing an output must
have clocks that agree to well within ``ttl_s`` (NTP does).

**Heartbeat.** The owner rewrites its own generation every ``ttl_s / 4`` (15 s of the default 60 s: three
renewals may fail before anyone may take the lease over) with a new heartbeat time, through its own S3 client
(2 attempts, connect and read timeouts of ``min(5, ttl_s / 8)`` s: :func:`modalmill.io.s3.short_client`), not
the pipeline's shared one (10 attempts, 60 s read timeout), so a slow upload never delays a renewal past the
ttl. Each renewal first lists the lease folder: a later generation means the lease was taken over (the owner was
deemed dead) and :attr:`Lease.lost` says by whom. When storage cannot be reached and the last renewal is
``0.75 * ttl_s`` old, the lease also counts as lost: from ``ttl_s`` on another driver may take it, so this one
stops first.

**Fencing.** :meth:`Lease.fence` gives a picklable :class:`Fence` (root, generation, token) that shard tasks call
before every write step: it lists the lease folder (one small request, no cache) and raises :class:`LeaseLost`
naming the new holder when a later generation exists. The driver checks the same before each commit of its own
(shard index, run record, failure records) and before submitting shard tasks (:meth:`Lease.lost_now`), and
stores the generation in what it writes. What fencing cannot close: a write step that passed its check an
instant before a takeover still completes; the taker only takes a lease whose heartbeat is ``ttl_s`` old, and
such a step is one file, which the commit protocol makes safe to redo.

Only commands that write an output take the lease (``run``, ``label``, ``tokenize``, ``demo``, and ``filter`` on
its new output); ``status``,
``check``, ``show``, ``stats`` and ``load_dataset`` read without it. Within one process the lease is re-entrant
(:func:`hold` nests), so ``tokenize`` holds it across its per-modality runs.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import storage

LEASE_DIR = "lease"
_GEN = re.compile(r"gen-(\d{9})\.json$")
KEEP_GENERATIONS = 4  # older generation objects are removed by the driver that takes the lease


def default_ttl() -> float:
    raw = os.environ.get("MODALMILL_LEASE_TTL_S", "60")
    try:
        ttl = float(raw)
    except ValueError:
        raise ValueError(f"MODALMILL_LEASE_TTL_S={raw!r} is not a number") from None
    if ttl <= 0:
        raise ValueError(f"MODALMILL_LEASE_TTL_S must be > 0, got {raw!r}")
    return ttl


class LeaseHeld(RuntimeError):
    """Another live driver holds the output's lease; the message names it (one line)."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def lease_url(root: str, *parts: str) -> str:
    return storage.join(root, "_modalmill", LEASE_DIR, *parts)


def _gen_url(root: str, gen: int) -> str:
    return lease_url(root, f"gen-{gen:09d}.json")


# ---------------------------------------------------------------------- storage primitives


#: the first boto3 whose botocore (1.35.2) can send ``IfNoneMatch`` with PutObject (botocore 1.35.1 cannot); the floor
#: in pyproject.toml, checked by tests/test_boto_floor.py
BOTO3_CONDITIONAL_PUT = "1.35.2"


def _require_conditional_put(service_model) -> None:
    """A clear error where botocore's S3 model predates conditional writes (it would refuse the parameter as
    unknown)."""
    shape = service_model.operation_model("PutObject").input_shape
    if "IfNoneMatch" not in shape.members:
        import botocore

        raise RuntimeError(f"botocore {botocore.__version__} cannot make the conditional PUT (If-None-Match) that the "
                           f"S3 lease needs: install boto3>={BOTO3_CONDITIONAL_PUT}")


def create_exclusive(url: str, data: bytes) -> bool:
    """Create ``url`` holding ``data`` only if nothing is there yet; True if this call created it. Exactly one of
    several concurrent callers gets True (S3: conditional PUT; local: link(2) of a complete temporary file)."""
    if storage.is_s3(url):
        from botocore.exceptions import ClientError

        _require_conditional_put(storage.s3_client().meta.service_model)

        bucket, _, key = url[5:].partition("/")
        with storage.s3_errors(url, "create the lease"):
            try:
                storage.s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                code = e.response.get("Error", {}).get("Code")
                if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
    path = storage.local_path(url)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-lease-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def short_timeout(ttl_s: float) -> float:
    """The connect and read timeout (s) of the lease's own S3 requests: ``min(5, ttl_s / 8)``, at least 0.5."""
    return max(0.5, min(5.0, ttl_s / 8))


def _short_client(ttl_s: float):
    from .s3 import short_client

    return short_client(short_timeout(ttl_s))


def _generations(root: str, ttl_s: float | None = None) -> list[int]:
    """The generation numbers in the lease folder (one listing). ``ttl_s``: list through the lease's own
    short-timeout S3 client (heartbeat, fence) instead of the shared one."""
    try:
        if ttl_s is not None and storage.is_s3(root):
            bucket, _, key = lease_url(root)[5:].partition("/")
            with storage.s3_errors(lease_url(root), "list the lease"):
                page = _short_client(ttl_s).list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/")
            names = [o["Key"] for o in page.get("Contents", ())]
        else:
            names = storage.list_files(lease_url(root), ".json")
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for u in names if (m := _GEN.search(u)))


def _write_own(root: str, gen: int, record: dict, ttl_s: float) -> None:
    """Rewrite our own generation object (heartbeat, release) through the short-timeout client."""
    data = json.dumps(record, indent=1).encode()
    url = _gen_url(root, gen)
    if storage.is_s3(url):
        bucket, _, key = url[5:].partition("/")
        with storage.s3_errors(url, "renew the lease"):
            _short_client(ttl_s).put_object(Bucket=bucket, Key=key, Body=data)
    else:
        storage.write_bytes(url, data)


def _read(root: str, gen: int) -> dict | None:
    try:
        return json.loads(storage.read_bytes(_gen_url(root, gen)))
    except FileNotFoundError:
        return None
    except ValueError:  # unreadable: treat as a lease whose owner is unknown and long gone
        return {"owner": "?", "host": "?", "pid": 0, "heartbeat": 0.0, "ttl_s": 0.0, "generation": gen}


def current(root: str) -> tuple[int, dict | None]:
    """(generation, record) of the current lease; (0, None) when the output never had one."""
    for _ in range(5):
        gens = _generations(root)
        if not gens:
            return 0, None
        rec = _read(root, gens[-1])
        if rec is not None:
            return gens[-1], rec
    return 0, None  # generations removed as fast as we listed them: treat as free


# ---------------------------------------------------------------------- liveness


def machine_id() -> str:
    """Who may judge whose pid: a hash of this kernel's random per-boot id and this process's pid namespace,
    '' when either is unknown (not Linux). Equal only for processes whose pids are comparable (same boot of
    the same kernel, same pid namespace): two machines, or two containers with their own pid namespaces, differ
    even when their host names are the same."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    if not boot or not pidns:
        return ""
    import hashlib

    return hashlib.sha256(f"{boot}/{pidns}".encode()).hexdigest()[:16]


def _proc_start(pid: int) -> str:
    """The start time of process ``pid`` (Linux: /proc/PID/stat field 22), '' when unknown; guards against a
    recycled pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _pid_alive(pid: int, start: str = "") -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # a zombie: dead, not yet reaped by its parent
                return False
    except (OSError, IndexError):
        pass
    return not start or not _proc_start(pid) or _proc_start(pid) == start


def why_free(rec: dict | None, now: float | None = None) -> str:
    """'' when the lease ``rec`` is held by a live owner; otherwise why it may be taken: 'none', 'released',
    'process gone' (its pid is dead and the record's machine id equals ours, see :func:`machine_id`) or
    'no heartbeat for N s'."""
    if rec is None:
        return "none"
    if rec.get("released"):
        return "released"
    here = machine_id()
    if here and rec.get("machine") == here \
            and not _pid_alive(int(rec.get("pid") or 0), rec.get("pid_start", "")):
        return "process gone"
    now = time.time() if now is None else now
    age = now - float(rec.get("heartbeat") or 0.0)
    if age > float(rec.get("ttl_s") or 0.0):
        return f"no heartbeat for {age:.0f} s"
    return ""


def describe(rec: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(rec.get("acquired") or 0)))
    return (f"{rec.get('owner', '?')} (holder {str(rec.get('token', '?'))[:12]}, generation "
            f"{rec.get('generation', '?')}, host {rec.get('host', '?')}, pid {rec.get('pid', '?')}, since {since}, "
            f"last heartbeat {max(0.0, now - float(rec.get('heartbeat') or 0)):.0f} s ago: {rec.get('command', '?')})")


class LeaseLost(LeaseHeld):
    """This driver's lease was taken over (or could not be renewed in time): it must not commit more output. The
    message names the new holder; ``record`` is its lease record ({} when unknown)."""


def _taken_over(root: str, generation: int, gens: list[int]) -> LeaseLost:
    rec = (_read(root, gens[-1]) if gens else None) or {}
    who = describe(rec) if rec else "another driver (its lease record is gone)"
    return LeaseLost(f"the lease on {root} (generation {generation}) was taken over by {who} while this driver held "
                     "it", rec)


@dataclass(frozen=True)
class Fence:
    """What shard tasks check before every write step: the lease on ``root`` still is ``generation``, taken by
    ``token``. Picklable (it travels with each ShardTask); calling it is :meth:`check`."""

    root: str
    generation: int
    token: str
    ttl_s: float = 60.0

    def check(self) -> None:
        """Raise :class:`LeaseLost` (naming the new holder) when a later generation exists or ours is gone: one
        listing of the lease folder, no cache."""
        gens = _generations(self.root, ttl_s=self.ttl_s)
        if not gens or gens[-1] != self.generation:
            raise _taken_over(self.root, self.generation, gens)

    def __call__(self) -> None:
        self.check()


# ---------------------------------------------------------------------- the lease


class Lease:
    """The lease on one output root, taken by :meth:`acquire` and given back by :meth:`release`."""

    def __init__(self, root: str, command: str | None = None, ttl_s: float | None = None):
        self.root = root
        self.ttl_s = default_ttl() if ttl_s is None else float(ttl_s)
        self.command = command if command is not None else " ".join(["modalmill", *sys.argv[1:]])[:300]
        self.token = uuid.uuid4().hex
        self.generation = 0
        self.record: dict[str, Any] = {}
        self.took_over: str = ""  # set when acquire took over a stale lease: whose, and why
        self.lost: str = ""  # set when another driver took the lease over while we held it (or renewals failed)
        self.renewed = 0.0  # when the lease was last written successfully (time.time())
        self._checked = (0.0, "")  # (when, result) of the last storage check of lost_now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = threading.Lock()

    # -- taking it
    def _new_record(self, gen: int) -> dict:
        now = time.time()
        pid = os.getpid()
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name in some containers
            user = str(os.getuid()) if hasattr(os, "getuid") else "?"
        host = socket.gethostname()
        return {"owner": f"{user}@{host}", "host": host, "machine": machine_id(), "pid": pid,
                "pid_start": _proc_start(pid), "token": self.token, "command": self.command, "output": self.root,
                "generation": gen, "acquired": now, "heartbeat": now, "ttl_s": self.ttl_s, "released": False}

    def try_acquire(self) -> dict | None:
        """Take the lease if it is free or stale; returns None on success, else the live holder's record."""
        while True:
            gen, rec = current(self.root)
            why = why_free(rec)
            if not why:
                return rec
            mine = self._new_record(gen + 1)
            if create_exclusive(_gen_url(self.root, gen + 1), json.dumps(mine, indent=1).encode()):
                self.generation, self.record, self.renewed = gen + 1, mine, time.time()
                if rec is not None and why not in ("released", "none"):
                    self.took_over = f"took over the lease on {self.root} from {describe(rec)}: {why}"
                self._cleanup(gen + 1)
                self._start_heartbeat()
                return None
            # another driver created that generation first: look again

    def acquire(self, wait: bool = False, poll_s: float = 2.0, timeout_s: float | None = None,
                on_wait=None) -> "Lease":
        """Take the lease. Held by a live driver: raise :class:`LeaseHeld` naming it, or with ``wait`` poll until
        it is released or goes stale (``on_wait(record)`` is called once, when waiting starts)."""
        deadline = None if timeout_s is None else time.time() + timeout_s
        told = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                return self
            if not wait or (deadline is not None and time.time() > deadline):
                raise LeaseHeld(f"{self.root} is being written by {describe(holder)}; wait for it with --wait, or "
                                "stop that process", holder)
            if not told and on_wait is not None:
                on_wait(holder)
                told = True
            time.sleep(poll_s)

    def _cleanup(self, gen: int) -> None:
        for old in _generations(self.root):
            if old <= gen - KEEP_GENERATIONS:
                with contextlib.suppress(Exception):
                    storage.remove(_gen_url(self.root, old))

    # -- holding it
    def fence(self) -> Fence:
        """The picklable check that shard tasks call before every write step (see :class:`Fence`)."""
        return Fence(self.root, self.generation, self.token, self.ttl_s)

    def _start_heartbeat(self) -> None:
        if storage.is_s3(self.root):
            _short_client(self.ttl_s)  # made now (a boto3 client takes a while to build), not in the first beat
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="modalmill-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.heartbeat()
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried; the ttl allows three
                print(f"modalmill: warning: lease heartbeat on {self.root} failed: {type(e).__name__}: {e}",
                      file=sys.stderr)
                self._expire_unrenewed()

    def _expire_unrenewed(self) -> None:
        """Called when storage could not be reached: a lease not renewed for 3/4 of its ttl is given up (from
        ``ttl_s`` on, another driver may take it). A late renewal that reaches storage and finds no later
        generation (the process was paused) goes on: nobody took the lease, and every write step is fenced."""
        with self._io:
            late = time.time() - self.renewed
            if not self.lost and self.generation and late > 0.75 * self.ttl_s:
                self._lose(f"the lease on {self.root} (generation {self.generation}) could not be renewed for "
                           f"{late:.0f} s (ttl {self.ttl_s:g} s): another driver may take it over")

    def _lose(self, why: str) -> None:
        self.lost = why
        print(f"modalmill: error: {self.lost}", file=sys.stderr, flush=True)
        self._stop.set()

    def heartbeat(self) -> None:
        """Renew the lease (called by the heartbeat thread); sets :attr:`lost` if a later generation exists."""
        with self._io:
            if self.lost or not self.generation:
                return
            gens = _generations(self.root, ttl_s=self.ttl_s)
            if not gens or gens[-1] != self.generation:
                self._lose(str(_taken_over(self.root, self.generation, gens)))
                return
            self.record["heartbeat"] = time.time()
            _write_own(self.root, self.generation, self.record, self.ttl_s)
            self.renewed = self.record["heartbeat"]

    def check(self) -> None:
        """Raise :class:`LeaseLost` (naming the new holder) if this driver no longer holds the lease: taken over
        (one listing of the lease folder, made now) or, with storage unreachable, not renewed for
        ``0.75 * ttl_s``. The caller must not commit more output; the driver calls it before each commit of its
        own."""
        if not self.lost and self.generation:
            try:
                self.fence().check()
            except LeaseLost as e:
                with self._io:
                    if not self.lost:
                        self._lose(str(e))
            except Exception:  # noqa: BLE001 - storage unreachable: held until the renewals are too late
                self._expire_unrenewed()
        if self.lost:
            raise LeaseLost(self.lost, {})

    def lost_now(self, max_age_s: float = 1.0) -> str:
        """Why the lease is lost ('' while held), checking storage at most once per ``max_age_s`` (the driver
        asks before each shard task it submits; between checks the heartbeat's finding counts)."""
        when, why = self._checked
        if self.lost or time.time() - when < max_age_s:
            return self.lost or why
        try:
            self.check()
            why = ""
        except LeaseLost as e:
            why = str(e)
        self._checked = (time.time(), why)
        return why

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._io:
            if not self.generation or self.lost:
                return
            if any(g > self.generation for g in _generations(self.root)):
                return
            self.record.update(released=True, heartbeat=time.time())
            with contextlib.suppress(Exception):  # an unreachable output: the lease goes stale by itself
                _write_own(self.root, self.generation, self.record, self.ttl_s)
            self.generation = 0


_HELD: dict[str, list] = {}  # root -> [lease, depth]: this process's leases (re-entrant)
_HELD_LOCK = threading.Lock()


def _key(root: str) -> str:
    return root.rstrip("/") if storage.is_s3(root) else os.path.abspath(storage.local_path(root))


def held(root: str) -> Lease | None:
    """The lease this process holds on ``root`` (None when it holds none)."""
    entry = _HELD.get(_key(root))
    return entry[0] if entry else None


@contextlib.contextmanager
def hold(root: str, wait: bool = False, command: str | None = None, poll_s: float = 2.0,
         announce=None) -> Iterator[Lease]:
    """Hold the lease on ``root`` for the ``with`` block (re-entrant within this process). ``announce(line)``
    (default: print to stderr) is told when the driver waits for another one, or takes a stale lease over."""
    say = announce or (lambda line: print(f"modalmill: {line}", file=sys.stderr, flush=True))
    key = _key(root)
    with _HELD_LOCK:
        entry = _HELD.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield entry[0]
        finally:
            with _HELD_LOCK:
                entry[1] -= 1
        return
    lease = Lease(root, command=command).acquire(
        wait=wait, poll_s=poll_s, on_wait=lambda rec: say(f"waiting for {describe(rec)} to finish with {root}"))
    if lease.took_over:
        say(lease.took_over)
    with _HELD_LOCK:
        _HELD[key] = [lease, 1]
    try:
        yield lease
    finally:
        with _HELD_LOCK:
            _HELD.pop(key, None)
        lease.release()
