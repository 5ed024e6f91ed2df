"""The shard index: what every shard's marker and manifest say, learned from listings instead of one read per shard.

An output of 700k shards has 700k markers and 700k manifests. Reading each of them with its own request, one
after another, is hours at an object store's 20-50 ms per request. Instead:

- **Listings first.** ``_modalmill/shards/`` and ``_modalmill/manifest/`` are listed page by page (one request
  per 1,000 keys). A listing says which shards have a marker, a failure record and a manifest, and gives each
  file's *version* (S3: ETag and size; local: inode, size and mtime; see :func:`storage.list_pages`).
- **A snapshot as a cache.** ``_modalmill/index/shards.parquet`` holds, per shard, the version of the marker and
  manifest it was made from and their digests: the marker without its key list (source, sample count, the
  producer of every modality) and the manifest's counts (read / ok / failed, failures by reason and stage).
  An entry is used only while the listing still shows the same version; a file that is new, rewritten or whose
  entry is missing is read again (bounded parallel requests), and an entry whose file is gone is dropped.
  So the snapshot is never trusted over the files themselves: an interrupted run that wrote markers after the
  last snapshot, a snapshot from a killed driver, a snapshot that is missing, corrupt or of another version
  all cost only re-reads, never a wrong answer.
- **Who writes it.** Runs (the only writers of an output): after planning when planning had to read markers,
  and at the end of a run. Read-only commands (``status``, ``stats``, ``load_dataset``) use it and never write.

What the index keeps per marker is what deciding a shard needs: the marker minus ``keys``, ``index``, ``seconds``,
``updated`` and ``stats``, and minus each modality's tar ``sha256``/``bytes``/``n`` (``check`` reads the markers
themselves). The producer dicts are the same for almost every shard and are shared (interned), so the driver
holds about 200 bytes per shard.
"""

from __future__ import annotations

import io
import json
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import manifest, storage

INDEX_VERSION = 1
_DROP_TOP = ("keys", "seconds", "updated", "stats", "index")  # index: the number in the shard name
_DROP_MODALITY = ("sha256", "bytes", "n")


def index_url(root: str) -> str:
    return manifest.meta_url(root, "index", "shards.parquet")


@dataclass(slots=True)
class MarkerInfo:
    """A shard's completion marker without its key list (see the module docstring)."""

    shard: str
    version: str
    source: str | None
    n_samples: int
    body: dict  # the marker's other fields (``modalities`` and anything else), shared between equal shards

    @property
    def modalities(self) -> dict:
        return self.body.get("modalities") or {}

    def as_marker(self) -> dict:
        """The marker as a dict, without ``keys`` (what planning and the readers decide on)."""
        return {**self.body, "shard": self.shard, "source": self.source, "n_samples": self.n_samples}


@dataclass(slots=True)
class ManifestInfo:
    """A shard's manifest as counts."""

    shard: str
    version: str
    n_read: int
    n_ok: int
    n_failed: int
    reasons: tuple  # ((reason, n), ...) in first-occurrence order; reason = "stage: error up to its first colon"
    stages: tuple  # ((stage, n), ...) in first-occurrence order


@dataclass
class Snapshot:
    markers: dict[str, MarkerInfo] = field(default_factory=dict)
    manifests: dict[str, ManifestInfo] = field(default_factory=dict)
    changed: bool = False  # differs from what is stored
    has_manifests: bool = True  # False: loaded without the manifest part (planning, the loader)


_interned: dict[str, dict] = {}
_intern_lock = threading.Lock()


def _intern(body: dict) -> dict:
    text = json.dumps(body, sort_keys=True)
    with _intern_lock:
        got = _interned.get(text)
        if got is None:
            if len(_interned) > 100_000:  # bounded: a pathological output with a different body per shard
                _interned.clear()
            got = _interned[text] = body
        return got


def marker_info(shard: str, version: str, marker: dict) -> MarkerInfo:
    body = {k: v for k, v in marker.items() if k not in _DROP_TOP and k not in ("shard", "source", "n_samples")}
    mods = body.get("modalities")
    if isinstance(mods, dict):
        body["modalities"] = {m: {k: v for k, v in info.items() if k not in _DROP_MODALITY}
                              if isinstance(info, dict) else info for m, info in mods.items()}
    n = marker.get("n_samples")
    return MarkerInfo(shard, version, marker.get("source"), int(n if n is not None else len(marker.get("keys") or ())),
                      _intern(body))


def manifest_info(shard: str, version: str, data: bytes) -> ManifestInfo:
    """Counts of one manifest file, read a column at a time (never the rows as Python objects)."""
    import pyarrow.parquet as pq

    t = pq.read_table(io.BytesIO(data), columns=["status", "stage", "error"], use_threads=False)
    status = t.column("status").to_pylist()
    n_ok = sum(s == "ok" for s in status)
    reasons: Counter = Counter()
    stages: Counter = Counter()
    if n_ok != len(status):
        for s, stage, err in zip(status, t.column("stage").to_pylist(), t.column("error").to_pylist()):
            if s == "failed":
                reasons[f"{stage}: {(err or '').split(':')[0].strip()}"] += 1
                stages[stage] += 1
    n_failed = sum(s == "failed" for s in status)
    return ManifestInfo(shard, version, len(status), n_ok, n_failed, tuple(reasons.items()), tuple(stages.items()))


# ---------------------------------------------------------------------- the stored snapshot


_MARKER_COLS = ["marker_version", "source", "n_samples", "marker_body"]
_MANIFEST_COLS = ["manifest_version", "n_read", "n_ok", "n_failed", "reasons", "stages"]


def load_snapshot(root: str, with_manifests: bool = True) -> Snapshot:
    """The stored snapshot, or an empty one when there is none or it cannot be read (it is only a cache).
    ``with_manifests=False`` loads only the marker part (what planning and the loader need)."""
    import pyarrow.parquet as pq

    columns = ["shard"] + _MARKER_COLS + (_MANIFEST_COLS if with_manifests else [])
    empty = Snapshot(has_manifests=with_manifests)
    try:
        data = storage.read_bytes(index_url(root))
        pf = pq.ParquetFile(io.BytesIO(data))
        if (pf.schema_arrow.metadata or {}).get(b"modalmill_index") != str(INDEX_VERSION).encode():
            empty.changed = True
            return empty
        t = pf.read(columns=columns, use_threads=False)
        cols = {name: t.column(name).to_pylist() for name in t.column_names}
    except FileNotFoundError:
        return empty
    except Exception:  # noqa: BLE001 - a corrupt cache is rebuilt from the files
        empty.changed = True
        return empty
    snap = Snapshot(has_manifests=with_manifests)
    cache: dict[str, object] = {}  # equal JSON texts (producer bodies, failure reasons) are parsed once

    def parsed(text: str, make):
        got = cache.get(text)
        if got is None:
            got = cache[text] = make(json.loads(text))
        return got

    def pairs(v):
        return tuple(map(tuple, v))

    markers, manifests = snap.markers, snap.manifests
    for i, shard in enumerate(cols["shard"]):
        if cols["marker_version"][i] is not None:
            markers[shard] = MarkerInfo(shard, cols["marker_version"][i], cols["source"][i], cols["n_samples"][i],
                                        parsed(cols["marker_body"][i], _intern))
        if with_manifests and cols["manifest_version"][i] is not None:
            manifests[shard] = ManifestInfo(shard, cols["manifest_version"][i], cols["n_read"][i], cols["n_ok"][i],
                                            cols["n_failed"][i], parsed(cols["reasons"][i], pairs),
                                            parsed(cols["stages"][i], pairs))
    return snap


def write_snapshot(root: str, snap: Snapshot, fence: Callable[[], None] | None = None) -> None:
    """Store ``snap`` as the output's shard index. ``fence``: the writer's lease (:class:`modalmill.io.lease.Fence`),
    checked right before the write (raises LeaseLost); its generation is recorded in the index's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not snap.has_manifests:  # loaded without its manifest part: keep the stored one
        snap.manifests = load_snapshot(root).manifests
        snap.has_manifests = True

    shards = sorted(set(snap.markers) | set(snap.manifests))
    mk = [snap.markers.get(s) for s in shards]
    mf = [snap.manifests.get(s) for s in shards]
    table = pa.table({
        "shard": shards,
        "marker_version": [m.version if m else None for m in mk],
        "source": [m.source if m else None for m in mk],
        "n_samples": pa.array([m.n_samples if m else None for m in mk], pa.int64()),
        "marker_body": [json.dumps(m.body, sort_keys=True) if m else None for m in mk],
        "manifest_version": [m.version if m else None for m in mf],
        "n_read": pa.array([m.n_read if m else None for m in mf], pa.int64()),
        "n_ok": pa.array([m.n_ok if m else None for m in mf], pa.int64()),
        "n_failed": pa.array([m.n_failed if m else None for m in mf], pa.int64()),
        "reasons": [json.dumps(m.reasons) if m else None for m in mf],
        "stages": [json.dumps(m.stages) if m else None for m in mf],
    }).replace_schema_metadata({"modalmill_index": str(INDEX_VERSION),
                                "modalmill_lease_generation": str(getattr(fence, "generation", ""))})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", use_dictionary=True)
    if fence is not None:
        fence()
    storage.write_bytes(index_url(root), buf.getvalue())
    snap.changed = False


# ---------------------------------------------------------------------- listings


def _name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


@dataclass
class MarkerPage:
    """One listing page of ``_modalmill/shards/``, resolved: the markers on it (from the snapshot or read), the
    failure records on it, and the last name it covers (every shard name up to it, in listing order, is known)."""

    last: str
    markers: dict[str, MarkerInfo]
    failures: list[str]
    read: int = 0  # markers read (not known to the snapshot at their listed version)


def prefetch(pages: Iterator, depth: int = 4) -> Iterator:
    """Iterate ``pages`` in a background thread, up to ``depth`` items ahead (the next LIST overlaps this page's
    reads; planning overlaps execution)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def run():
        try:
            for p in pages:
                q.put(p)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=run, daemon=True, name="modalmill-list").start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def marker_pages(root: str, snap: Snapshot, want: Callable[[str], bool] | None = None,
                 workers: int | None = None) -> Iterator[MarkerPage]:
    """Stream the markers of ``root`` one listing page at a time, in listing order.

    Markers the snapshot knows at the listed version come from it; the others (only those ``want(shard)``
    accepts, when given) are read with at most ``workers`` requests in flight, and ``snap`` is updated. Markers
    that disappeared are dropped from ``snap`` once the listing is complete."""
    listed: set[str] = set()
    for page in prefetch(storage.list_pages(manifest.meta_url(root, "shards"), suffix=".json")):
        if not page:
            continue
        found: dict[str, MarkerInfo] = {}
        failures: list[str] = []
        stale: dict[str, tuple[str, str]] = {}  # shard -> (url, version)
        for url, version in page:
            name = _name(url)
            if name.endswith(".failed.json"):
                failures.append(name[: -len(".failed.json")])
                continue
            shard = name[: -len(".json")]
            listed.add(shard)
            have = snap.markers.get(shard)
            if have is not None and have.version == version:
                found[shard] = have
            elif want is None or want(shard):
                stale[shard] = (url, version)
        if stale:
            versions = {u: (s, v) for s, (u, v) in stale.items()}
            for url, data in storage.read_many(list(versions), workers):
                shard, version = versions[url]
                if data is None:  # removed between the listing and the read
                    continue
                info = marker_info(shard, version, json.loads(data))
                snap.markers[shard] = found[shard] = info
                snap.changed = True
        yield MarkerPage(_name(page[-1][0]), dict(sorted(found.items())), failures, len(stale))
    for gone in [s for s in snap.markers if s not in listed]:
        del snap.markers[gone]
        snap.changed = True


def manifests(root: str, snap: Snapshot, workers: int | None = None) -> dict[str, ManifestInfo]:
    """Every manifest's counts (stale or new ones read, bounded parallel); updates ``snap``."""
    listed: dict[str, str] = {}
    for page in storage.list_pages(manifest.meta_url(root, "manifest"), suffix=".parquet"):
        for url, version in page:
            listed[url] = version
    out: dict[str, ManifestInfo] = {}
    stale: dict[str, tuple[str, str]] = {}
    for url, version in listed.items():
        shard = _name(url)[: -len(".parquet")]
        have = snap.manifests.get(shard)
        if have is not None and have.version == version:
            out[shard] = have
        else:
            stale[url] = (shard, version)
    for url, data in storage.read_many(list(stale), workers):
        if data is None:
            continue
        shard, version = stale[url]
        out[shard] = snap.manifests[shard] = manifest_info(shard, version, data)
        snap.changed = True
    shards = {_name(u)[: -len(".parquet")] for u in listed}
    for gone in [s for s in snap.manifests if s not in shards]:
        del snap.manifests[gone]
        snap.changed = True
    return dict(sorted(out.items()))


@dataclass
class OutputIndex:
    """What an output holds, from listings plus the snapshot: markers, failure records, manifests' counts."""

    markers: dict[str, MarkerInfo]
    failures: list[str]
    manifests: dict[str, ManifestInfo]
    snapshot: Snapshot


def scan(root: str, with_manifests: bool = True, write: bool = False, workers: int | None = None,
         snap: Snapshot | None = None, with_markers: bool = True,
         fence: Callable[[], None] | None = None) -> OutputIndex:
    """Everything the index knows about ``root``, brought up to date with the files. ``write``: store the
    refreshed snapshot when it changed (only a run, the output's one writer, does that). ``snap``: a snapshot
    already loaded (else the stored one); ``with_markers=False`` leaves its markers as they are; ``fence``: see
    :func:`write_snapshot`."""
    snap = snap if snap is not None else load_snapshot(root, with_manifests=with_manifests or write)
    if with_manifests and not snap.has_manifests:
        snap.manifests = load_snapshot(root).manifests
        snap.has_manifests = True
    result: dict = {}
    thread = None
    if with_manifests:  # the manifest listing and reads overlap the markers'
        def run():
            try:
                result["manifests"] = manifests(root, snap_m, workers)
            except BaseException as e:  # noqa: BLE001
                result["error"] = e

        snap_m = Snapshot(manifests=snap.manifests)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
    markers: dict[str, MarkerInfo] = {}
    failures: list[str] = []
    if with_markers:
        for page in marker_pages(root, snap, workers=workers):
            markers.update(page.markers)
            failures.extend(page.failures)
    else:
        markers = dict(snap.markers)
    if thread is not None:
        thread.join()
        if "error" in result:
            raise result["error"]
        snap.manifests = snap_m.manifests
        snap.changed = snap.changed or snap_m.changed
    if write and snap.changed:
        write_snapshot(root, snap, fence)
    return OutputIndex(dict(sorted(markers.items())), sorted(failures), result.get("manifests", {}), snap)


def refresh(root: str) -> OutputIndex:
    """Bring the stored snapshot up to date (a run does this when it ends)."""
    return scan(root, with_manifests=True, write=True)
