"""The shard index: what every shard's marker and manifest say, learned from listings instead of one read per shard.

An output of 700k shards has 700k markers and 700k manifests. Reading each of them with its own request, one
after another, is hours at an object store's 20-50 ms per request. Instead:

- **Listings first.** ``_modalmill/shards/`` and ``_modalmill/manifest/`` are listed page by page (one request
  per 1,000 keys). A listing says which shards have a marker, a failure record and a manifest, and gives each
  file's *version* (S3: ETag and size; local: inode, size and mtime; see :func:`storage.list_pages`).
- **A snapshot as a cache.** ``_modalmill/index/shards.parquet`` holds, per shard, the version of the marker and
  manifest it was made from and their digests: the marker without its key list (source, sample count, state, the
  producer of every modality, the size and digests of every tar) and the manifest's counts (read / ok / failed,
  failures by reason and stage). An entry is used only while the listing still shows the same version; a file
  that is new, rewritten or whose entry is missing is read again (bounded parallel requests), and an entry whose
  file is gone is dropped. So the snapshot is never trusted over the marker files: an interrupted run that wrote
  markers after the last snapshot, a snapshot from a killed driver, a snapshot that is missing, corrupt or of
  another version all cost only re-reads.
- **Markers checked against the tars.** A marker is only a claim: the modality folders are listed too, page by
  page alongside the markers (one LIST per 1,000 tars of a folder, no request per shard), and a shard whose marker
  is pending or names a tar that is missing or listed with another size or version (:mod:`modalmill.io.commit`)
  is *torn*: it is left out of ``markers`` (so planning redoes it, ``status`` and the loader do not count it as
  done) and reported in ``torn`` with why.
- **Who writes it.** Runs (the only writers of an output): after planning when planning had to read markers,
  and at the end of a run. Read-only commands (``status``, ``stats``, ``load_dataset``) use it and never write.

What the index keeps per marker is what deciding a shard needs: the marker minus ``keys``, ``index``, ``seconds``,
``updated``, ``stats`` and (pending markers) ``previous``; each modality's tar record (``bytes``, ``md5`` cut to
16 hex digits, ``mtime_ns``) is kept apart from its producer as one compact JSON string, and ``sha256``/``n`` are
left out (``check`` reads the markers themselves). The producer dicts are the same for almost every shard and are
shared (interned), so the driver holds about 200 bytes per shard plus about 50 bytes per tar.
"""

from __future__ import annotations

import io
import json
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import commit, manifest, storage

INDEX_VERSION = 2  # 2: tar records and marker states
_DROP_TOP = ("keys", "seconds", "updated", "stats", "index", "previous")  # index: the number in the shard name
_TAR_FIELDS = ("bytes", "md5", "mtime_ns")  # what a listing is compared with (io.commit)
_DROP_MODALITY = ("sha256", "n") + _TAR_FIELDS


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
    tars: str = "{}"  # JSON: modality -> the tar's record (``bytes``, ``md5`` cut to 16 digits, ``mtime_ns``)

    @property
    def modalities(self) -> dict:
        return self.body.get("modalities") or {}

    def as_marker(self) -> dict:
        """The marker as a dict, without ``keys`` (what planning and the readers decide on)."""
        return {**self.body, "shard": self.shard, "source": self.source, "n_samples": self.n_samples}

    def problem(self, listed: dict[str, str | None], s3: bool, tags: bool = True) -> str | None:
        """Why the shard is not done given the listed versions of its tars (see :func:`commit.listing_problem`)."""
        tars = json.loads(self.tars)
        marker = {**self.body, "modalities": {m: tars.get(m, {}) for m in self.modalities}}
        return commit.listing_problem(marker, listed, s3, tags)


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
    tars = {}
    if isinstance(mods, dict):
        tars = {m: {k: info[k][:16] if k == "md5" else info[k] for k in _TAR_FIELDS if k in info}
                for m, info in mods.items() if isinstance(info, dict)}
        body["modalities"] = {m: {k: v for k, v in info.items() if k not in _DROP_MODALITY}
                              if isinstance(info, dict) else info for m, info in mods.items()}
    n = marker.get("n_samples")
    return MarkerInfo(shard, version, marker.get("source"), int(n if n is not None else len(marker.get("keys") or ())),
                      _intern(body), json.dumps(tars, sort_keys=True, separators=(",", ":")))


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


_MARKER_COLS = ["marker_version", "source", "n_samples", "marker_body", "tars"]
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
                                        parsed(cols["marker_body"][i], _intern), cols["tars"][i] or "{}")
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
        "tars": [m.tars if m else None for m in mk],
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
    markers: dict[str, MarkerInfo]  # the done ones: pending or torn markers are in ``torn``
    failures: list[str]
    read: int = 0  # markers read (not known to the snapshot at their listed version)
    torn: dict[str, str] = field(default_factory=dict)  # shard -> why its marker does not describe its tars


class TarListings:
    """The ``.tar`` files of every modality folder of an output, listed page by page in step with the marker
    listing (shard names sort the same in both), so each marker is compared with its tars' listed versions without
    a request per shard. A folder is listed from its first use on."""

    def __init__(self, root: str, tags: bool = True):
        self.root, self.s3, self.tags = root, storage.is_s3(root), tags
        self._cursors: dict[str, list] = {}  # modality -> [page iterator, buffered (name, version) or None]
        self._seen: dict[str, dict[str, str]] = {}  # modality -> {shard: version} listed up to the last cut

    def _advance(self, m: str, limit: str) -> dict[str, str]:
        if m not in self._cursors:
            prefix = storage.join(self.root, m)
            files = (f for page in storage.list_pages(prefix, suffix=".tar") for f in page)
            self._cursors[m] = [prefetch(files, depth=2000), None]
            self._seen[m] = {}
        cursor, seen = self._cursors[m], self._seen[m]
        while True:
            if cursor[1] is None:
                cursor[1] = next(cursor[0], False)
            if cursor[1] is False:
                return seen
            url, version = cursor[1]
            name = _name(url)
            if name > limit:
                return seen
            seen[name[: -len(".tar")]] = version
            cursor[1] = None

    def torn(self, markers: dict[str, MarkerInfo]) -> dict[str, str]:
        """shard -> why, for the markers (one listing page's) that do not describe their tars."""
        if not markers:
            return {}
        limit = max(markers) + ".tar"
        out: dict[str, str] = {}
        for shard, info in markers.items():
            listed = {m: self._advance(m, limit).get(shard) for m in info.modalities}
            why = info.problem(listed, self.s3, self.tags)
            if why:
                out[shard] = why
        for seen in self._seen.values():  # what the next pages need is listed after ``limit``
            for shard in [s for s in seen if s + ".tar" <= limit]:
                del seen[shard]
        return out


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
                 workers: int | None = None, tags: bool = True) -> Iterator[MarkerPage]:
    """Stream the markers of ``root`` one listing page at a time, in listing order.

    Markers the snapshot knows at the listed version come from it; the others (only those ``want(shard)``
    accepts, when given) are read with at most ``workers`` requests in flight, and ``snap`` is updated. Markers
    that disappeared are dropped from ``snap`` once the listing is complete. Each page's markers are compared with
    the listed tars (:class:`TarListings`; ``tags=False``: presence and sizes only): a pending or torn one is moved
    to the page's ``torn``."""
    listed: set[str] = set()
    tars = TarListings(root, tags)
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
        torn = tars.torn(found)
        done = {s: info for s, info in sorted(found.items()) if s not in torn}
        yield MarkerPage(_name(page[-1][0]), done, failures, len(stale), torn)
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

    markers: dict[str, MarkerInfo]  # the done shards' markers
    failures: list[str]
    manifests: dict[str, ManifestInfo]
    snapshot: Snapshot
    torn: dict[str, str] = field(default_factory=dict)  # shard -> why its marker is pending or does not match


def scan(root: str, with_manifests: bool = True, write: bool = False, workers: int | None = None,
         snap: Snapshot | None = None, with_markers: bool = True, tags: bool = True,
         fence: Callable[[], None] | None = None) -> OutputIndex:
    """Everything the index knows about ``root``, brought up to date with the files. ``write``: store the
    refreshed snapshot when it changed (only a run, the output's one writer, does that). ``snap``: a snapshot
    already loaded (else the stored one); ``with_markers=False`` leaves its markers as they are. ``tags=False``:
    a marker is torn when pending or when a tar it names is missing or of another size, not for another ETag or
    mtime alone (the loader, which checks every key against the marker as it reads). ``fence``: see
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
    torn: dict[str, str] = {}
    if with_markers:
        for page in marker_pages(root, snap, workers=workers, tags=tags):
            markers.update(page.markers)
            failures.extend(page.failures)
            torn.update(page.torn)
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
    return OutputIndex(dict(sorted(markers.items())), sorted(failures), result.get("manifests", {}), snap,
                       dict(sorted(torn.items())))
