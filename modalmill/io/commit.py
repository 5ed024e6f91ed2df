"""The shard commit protocol: marker states, the record of each tar a marker names, and whether a listing agrees.

A shard is *done* only when its marker (``_modalmill/shards/shard-N.json``) is a done marker and every tar it names
is listed with the size (and, where the listing gives one, the version) the marker recorded:

- **done marker**: ``"state": "done"`` (a marker without ``state``, written before this protocol, counts as done).
  ``modalities[m]`` records the tar as written: ``bytes``, ``sha256``, ``md5`` (of the bytes: what S3 gives as the
  ETag of an object uploaded in one PUT), ``n`` (samples), and on local storage ``mtime_ns`` (the file's mtime once
  renamed into place).
- **pending marker**: ``"state": "pending"``, written *before* the first visible write of a task that rewrites a
  shard that has a marker (``--only``, ``--force``, realignment). It names the tars the task may change
  (``rewrites``) and keeps the done marker it replaces (``previous``, with its key list). Never done.

:func:`listing_problem` compares a marker's tar records with what a listing says of the tars (no extra request):

- size always (a marker without ``bytes`` for a tar, written before sizes were recorded: the tar must be listed);
- S3: an ETag without ``-`` is the MD5 of the object, compared with ``md5``; a multipart ETag (``…-N``) depends on
  how the object was uploaded, so only the size is compared;
- local: the mtime, when the marker recorded one (copy an output with its mtimes: ``cp -a``, ``rsync -a``).

``check`` reads the tars and compares their sha256 with the marker's.
"""

from __future__ import annotations

import time

from . import storage

DONE, PENDING = "done", "pending"
LEGACY = "legacy"  # a done marker without sizes: only that its tars are listed is checked


def state(marker: dict | None) -> str | None:
    """``None`` (no marker), ``"done"`` or ``"pending"``."""
    if marker is None:
        return None
    return PENDING if marker.get("state") == PENDING else DONE


def pending_marker(task_shard: str, index: int, source: str, rewrites: list[str], previous: dict | None,
                   version: str) -> dict:
    """The marker that says a rewrite of the shard is under way (never done)."""
    return {"state": PENDING, "shard": task_shard, "index": index, "source": source, "rewrites": sorted(rewrites),
            "previous": previous, "modalmill_version": version,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def tar_url(root: str, modality: str, shard: str) -> str:
    return storage.join(root, modality, f"{shard}.tar")


def parse_version(version: str, s3: bool) -> tuple[int | None, str | None]:
    """(size, tag) of a listing version (see :func:`storage.list_pages`): S3 ``etag:size`` gives the ETag as tag,
    local ``inode:size:mtime_ns`` the mtime."""
    parts = version.split(":")
    try:
        if s3:
            return (int(parts[-1]) if parts[-1] else None), parts[0]
        return int(parts[1]), parts[2]
    except (IndexError, ValueError):
        return None, None


def tar_problem(modality: str, record: dict, version: str | None, s3: bool, tags: bool = True) -> str | None:
    """Why the listed tar is not the one ``record`` (a marker's ``modalities[m]``) describes, or None. ``tags=False``
    compares presence and size only (not the ETag / mtime)."""
    if version is None:
        return f"{modality}: the marker names a tar that is not there"
    if "bytes" not in record:
        return None  # legacy marker: presence only
    size, tag = parse_version(version, s3)
    if size is not None and size != record["bytes"]:
        return f"{modality}: the tar has {size} bytes, the marker says {record['bytes']}"
    if not tags:
        return None
    if s3 and tag and "-" not in tag and record.get("md5") and not tag.startswith(record["md5"]):  # index: 16 digits
        return f"{modality}: the tar's ETag {tag} is not the MD5 the marker recorded ({record['md5']})"
    if not s3 and tag and record.get("mtime_ns") is not None and tag != str(record["mtime_ns"]):
        return f"{modality}: the tar was rewritten after the marker (mtime {tag}, the marker says {record['mtime_ns']})"
    return None


def listing_problem(marker: dict, tars: dict[str, str | None], s3: bool, tags: bool = True) -> str | None:
    """Why the shard of ``marker`` is not done, given the listed version of each of its tars (``tars[m]``; None or
    absent: not listed), or None when it is done (``tags``: see :func:`tar_problem`)."""
    if state(marker) == PENDING:
        return f"an interrupted rewrite (pending marker, rewriting {', '.join(marker.get('rewrites') or [])})"
    for m, record in sorted((marker.get("modalities") or {}).items()):
        why = tar_problem(m, record if isinstance(record, dict) else {}, tars.get(m), s3, tags)
        if why:
            return why
    return None
