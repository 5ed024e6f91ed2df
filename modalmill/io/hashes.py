"""Content hashes of weights files and directories, and the on-disk memo that spares re-reading them.

:func:`sha256_file` is the sha256 a pin names; :func:`content_hash` (16 hex) identifies weights in manifests and
resume decisions (over each file's relative name and bytes). Both are remembered in the weights cache
(:data:`CACHE_DIR`, ``MODALMILL_WEIGHTS_CACHE``, which :mod:`modalmill.io.fetch` fills with fetched weights) by one
implementation, :func:`remembered`, keyed by each file's size, inode, mtime *and* ctime: ctime cannot be set back
by a copy tool, so a file replaced in place (even with the same size and mtime) is hashed again, while an unchanged
checkpoint is hashed once per machine, not once per job, worker or actor.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable

CACHE_DIR = os.environ.get("MODALMILL_WEIGHTS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "modalmill",
                                                                   "weights"))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(path: str) -> list[str]:
    """``path`` itself, or every file under the directory ``path`` (sorted; hidden files left out)."""
    return [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if not f.startswith("."))


def content_hash(path: str) -> str:
    """sha256 (first 16 hex) over a weights file, or over every file of a weights directory (sorted)."""
    h = hashlib.sha256()
    for f in _files(path):
        h.update(os.path.relpath(f, path if os.path.isdir(path) else os.path.dirname(path)).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def files_hash(files: list[str]) -> str:
    """One id (sha256, 16 hex) for weights that are several files found apart (e.g. models bundled in a package):
    over each file's name and :func:`content_hash`, in the order given."""
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.basename(f).encode())
        h.update(content_hash(f).encode())
    return h.hexdigest()[:16]


def stat_key(path: str) -> list:
    """What identifies the bytes of a weights file or directory without reading them: each file's relative name,
    size, inode, mtime and ctime (ctime cannot be set back by a copy tool, so a file rewritten in place changes
    it)."""
    path = os.path.abspath(path)
    base = path if os.path.isdir(path) else os.path.dirname(path)
    out = []
    for f in _files(path):
        st = os.stat(f)
        out.append([os.path.relpath(f, base), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns])
    return out


def _memo(path: str, kind: str) -> str:
    return os.path.join(CACHE_DIR, kind, hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:24] + ".json")


def remember(path: str, kind: str, digest: str, key: list | None = None) -> None:
    """Write down that ``path`` (as it is now, or as ``key`` says it was) has the hash ``digest`` of ``kind``;
    a read-only cache only costs a re-hash next time."""
    memo = _memo(path, kind)
    try:
        os.makedirs(os.path.dirname(memo), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(memo))
        with os.fdopen(fd, "w") as f:
            json.dump({"path": os.path.abspath(path), "files": stat_key(path) if key is None else key,
                       "hash": digest}, f)
        os.replace(tmp, memo)
    except OSError:
        pass


def remembered(path: str, kind: str, compute: Callable[[str], str]) -> str:
    """``compute(path)``, remembered under ``CACHE_DIR/<kind>/`` by :func:`stat_key`: returned from the memo while
    no file of ``path`` changed, computed again (and remembered, unless it changed while being read) otherwise."""
    key = stat_key(path)
    try:
        with open(_memo(path, kind)) as f:
            saved = json.load(f)
        if saved.get("files") == key:
            return saved["hash"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    digest = compute(path)
    if stat_key(path) == key:  # not changed while it was read
        remember(path, kind, digest, key)
    return digest


def cached_content_hash(path: str) -> str:
    """:func:`content_hash` of ``path``, remembered (``CACHE_DIR/hashes/``): a checkpoint that has not changed is
    hashed once per machine; one that is replaced (even at the same path, with the same size) is hashed again.
    Combined with :func:`modalmill.io.fetch.resolve`'s ETag/size/LastModified-keyed copy of ``s3://`` weights, an
    unchanged remote checkpoint is neither downloaded nor read again."""
    return remembered(path, "hashes", content_hash)


def verified_sha256(path: str) -> str:
    """sha256 of the file at ``path`` (links followed), remembered (``CACHE_DIR/verified/``): a large checkpoint is
    hashed once, not at every worker start."""
    return remembered(os.path.realpath(path), "verified", sha256_file)


def remember_sha256(path: str, digest: str) -> None:
    """Record the sha256 just computed of the file at ``path``, so that later checks of it cost nothing."""
    remember(os.path.realpath(path), "verified", digest)
