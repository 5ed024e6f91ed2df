"""Read and write by URL: local paths (plain or ``file://``) and ``s3://bucket/key``.

Everything in the pipeline that touches a shard, a manifest or a marker goes through this module, so the
same job runs against a local folder or an S3 bucket (AWS, SeaweedFS, MinIO, ...) unchanged. It dispatches on
the URL: :mod:`modalmill.io.localfs` does local paths, :mod:`modalmill.io.s3` does ``s3://`` URLs.

Guarantees:

* **Atomic writes.** :func:`atomic_write` never lets a half-written file be seen under its final name:
  locally it writes ``.<name>.tmp-<uuid>`` in the same directory and ``os.replace``-s it on success; on S3
  it spools to a local temporary file and uploads only on success (S3 objects appear only when the PUT or
  the multipart upload completes). On any exception nothing is left behind.
* **Streaming, resumable reads.** :func:`open_read` on S3 streams the GET body and, when the connection
  drops mid-body, re-issues the GET with ``Range: bytes=<offset>-`` (and ``If-Match`` on the ETag, so a
  replaced object is detected instead of spliced) with exponential backoff and jitter.
* **Clear errors.** botocore errors become ``FileNotFoundError`` (missing object or bucket),
  ``PermissionError`` (denied, bad or missing credentials), ``ConnectionError`` (endpoint unreachable,
  retries exhausted) or ``OSError``, each naming the URL and never containing credentials.

S3 configuration comes from the usual AWS environment / config files that boto3 reads (``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ...). On top of that:

* ``MODALMILL_S3_ENDPOINT`` overrides the endpoint URL;
* ``MODALMILL_S3_MAX_ATTEMPTS`` (else ``AWS_MAX_ATTEMPTS``, default 10) and ``MODALMILL_S3_RETRY_MODE``
  (else ``AWS_RETRY_MODE``, default ``standard``) configure botocore's per-request retries;
* ``MODALMILL_S3_READ_RETRIES`` (default 6) and ``MODALMILL_S3_READ_BACKOFF`` (seconds, default 0.5)
  configure how often a dropped GET body is resumed.

boto3/botocore are imported lazily, so purely local pipelines do not pay for them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from . import localfs, s3
from .s3 import READ_BACKOFF_CAP as READ_BACKOFF_CAP  # the S3 reader's tuning constants, re-exported
from .s3 import READ_BUFFER_SIZE as READ_BUFFER_SIZE
from .s3 import _is_aws_host, clear_s3_client_cache, is_s3, s3_client, s3_env_vars

__all__ = [
    "absolute",
    "missing",
    "arrow_filesystem",
    "atomic_write",
    "clear_s3_client_cache",
    "exists",
    "expand",
    "is_s3",
    "join",
    "list_files",
    "list_pages",
    "local_path",
    "io_workers",
    "read_many",
    "open_read",
    "read_bytes",
    "remove",
    "s3_client",
    "s3_errors",
    "s3_env_vars",
    "size",
    "write_bytes",
]

#: Objects larger than this are uploaded with multipart upload.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
#: Part size of multipart uploads (s3transfer raises it when 10,000 parts would not suffice).
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
#: Parallel part uploads of one object.
UPLOAD_CONCURRENCY = 4

_GLOB_CHARS = re.compile(r"[*?\[]")

#: The filesystem path of a plain path or ``file://`` URL: for callers that must use the OS on it
#: directly (``link(2)``, ``os.path.abspath``).
local_path = localfs.local_path
#: ``with s3_errors(url, "what it was doing"):`` turns botocore errors raised inside into the built-in errors
#: listed above (``FileNotFoundError``, ``PermissionError``, ``ConnectionError``, ``OSError``), naming the URL and
#: scrubbed of credentials: for callers that use :func:`s3_client` directly.
s3_errors = s3.translated_errors

# Helpers of the two backends that other modules of modalmill.io and their tests have used under these names.
_is_file_url = localfs.is_file_url
_TMP_NAME = localfs.TMP_NAME
_split_s3 = s3.split
_translate = s3.translate
_scrub = s3.scrub
_env_int = s3.env_int
_env_float = s3.env_float


def join(root: str, *parts: str) -> str:
    """Join path components onto a local path, ``file://`` URL or ``s3://`` URL.

    S3 parts are joined with exactly one ``/`` between them (leading/trailing slashes of the parts are
    dropped; empty parts are skipped). Local parts follow :func:`os.path.join`.
    """
    if is_s3(root):
        pieces = [root.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
        return "/".join(pieces)
    if localfs.is_file_url(root):
        return root[:7] + os.path.join(root[7:], *parts)
    return os.path.join(root, *parts)


# ============================================================================ reading


def open_read(url: str) -> BinaryIO:
    """Open ``url`` for streaming binary reading (a context manager).

    Supports ``read(n)``, ``read()``, ``readinto``, ``seek``/``tell`` and ``tarfile.open(fileobj=f,
    mode="r|*")``. On S3 at most about one buffer (1 MiB) of the body is held in memory, and a connection
    dropped mid-body is resumed with a Range GET (``MODALMILL_S3_READ_RETRIES`` consecutive failures without
    progress are tolerated, with exponential backoff and jitter from ``MODALMILL_S3_READ_BACKOFF`` seconds).
    Raises FileNotFoundError for a missing object/bucket and PermissionError when access is denied.
    """
    if is_s3(url):
        return s3.open_read(url)
    return open(localfs.local_path(url), "rb")


def read_bytes(url: str) -> bytes:
    """The whole content of ``url``."""
    with open_read(url) as f:
        return f.read()


def exists(url: str) -> bool:
    """Whether ``url`` exists: a file or directory locally; an object, or a "directory" (a prefix with
    objects below it), or a bucket for ``s3://bucket``, on S3. Denied access raises PermissionError."""
    if is_s3(url):
        return s3.exists(url)
    return os.path.exists(localfs.local_path(url))


def size(url: str) -> int:
    """Size in bytes of the file or object at ``url``."""
    if is_s3(url):
        return s3.size(url)
    return os.path.getsize(localfs.local_path(url))


def version(url: str) -> str | None:
    """The version :func:`list_pages` would list for the file at ``url`` (one stat, or one HEAD on S3), or None when
    there is none."""
    if is_s3(url):
        bucket, key = _split_s3(url)
        try:
            with s3_errors(url, "stat"):
                head = s3_client().head_object(Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        return str(head.get("ETag", "")).strip('"') + f":{head.get('ContentLength', '')}"
    try:
        st = os.stat(localfs.local_path(url))
    except FileNotFoundError:
        return None
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def list_files(prefix: str, suffix: str = "") -> list[str]:
    """All files below the directory ``prefix`` (recursively) whose names end with ``suffix``, as sorted
    full paths/URLs in the style of ``prefix``. A missing directory gives an empty list (a missing S3 bucket
    raises FileNotFoundError). Our own in-progress temporary files are never listed."""
    if is_s3(prefix):
        return s3.list_files(prefix, suffix)
    return localfs.list_files(prefix, suffix)


def list_pages(prefix: str, suffix: str = "", page_size: int = 1000) -> Iterator[list[tuple[str, str]]]:
    """The files directly or deeper below the directory ``prefix`` whose names end with ``suffix``, one listing
    page at a time: lists of ``(url, version)`` in key order. On S3 a page is one ListObjectsV2 answer (up to
    1,000 keys) and the version is the object's ETag (the MD5 of a single-PUT object's content); locally pages
    of ``page_size`` files in sorted order and the version is ``inode:size:mtime_ns`` (an atomic write replaces
    the inode, so a rewritten file never keeps its version). A version changes whenever the content does; it is
    what a cache of file contents is validated with (``io.index``). A missing directory gives no pages."""
    if is_s3(prefix):
        bucket, key = _split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"
        with s3_errors(prefix, "list"):
            paginator = s3_client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=key, PaginationConfig={"PageSize": page_size}):
                out = [(f"s3://{bucket}/{o['Key']}", str(o.get("ETag", "")).strip('"') + f":{o.get('Size', '')}")
                       for o in page.get("Contents", ()) if o["Key"].endswith(suffix) and not o["Key"].endswith("/")]
                yield out
        return
    root = local_path(prefix)
    scheme = prefix[:7] if _is_file_url(prefix) else ""
    found: list[tuple[str, str]] = []

    def walk(d: str) -> None:
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            return
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                walk(e.path)
            elif e.name.endswith(suffix) and not _TMP_NAME.match(e.name):
                try:
                    st = e.stat()
                except FileNotFoundError:  # removed while listing
                    continue
                found.append((scheme + e.path, f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"))

    walk(root)
    found.sort()
    for i in range(0, len(found), page_size):
        yield found[i:i + page_size]


def io_workers(s3: bool) -> int:
    """How many requests the bookkeeping readers keep in flight (``MODALMILL_IO_WORKERS``; default 32 on S3,
    where each request waits out the store's latency, 4 locally)."""
    return max(1, _env_int("MODALMILL_IO_WORKERS", 32 if s3 else 4))


def read_many(urls: Iterable[str], workers: int | None = None) -> Iterator[tuple[str, bytes | None]]:
    """``(url, content)`` for every url, in the order given, read with at most ``workers`` requests in flight
    (default :func:`io_workers`); a missing file gives ``None``. Lazy: urls are taken from the iterable only as
    the window has room, so a long (or generated) list is never read ahead by more than the window."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    it = iter(urls)
    first = next(it, None)
    if first is None:
        return
    n = workers or io_workers(is_s3(first))

    def get(url: str) -> bytes | None:
        try:
            return read_bytes(url)
        except FileNotFoundError:
            return None

    if n <= 1:
        yield first, get(first)
        for u in it:
            yield u, get(u)
        return
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="modalmill-read") as pool:
        pending.append((first, pool.submit(get, first)))
        for u in it:
            while len(pending) >= 2 * n:
                url, fut = pending.popleft()
                yield url, fut.result()
            pending.append((u, pool.submit(get, u)))
        while pending:
            url, fut = pending.popleft()
            yield url, fut.result()


def arrow_filesystem(urls: list[str]) -> tuple[Any, list[str]]:
    """A ``pyarrow.fs`` filesystem and the paths in it for ``urls`` (all local or all ``s3://``): for pyarrow's
    dataset readers. On S3 it is configured like :func:`s3_client` (endpoint, region, the credentials boto3
    resolved), path-style addressing for custom endpoints."""
    import pyarrow.fs as pafs

    if not urls or not is_s3(urls[0]):
        return pafs.LocalFileSystem(), [local_path(u) for u in urls]
    client = s3_client()
    creds = client._request_signer._credentials  # the credentials boto3 resolved (env, profile, role)
    frozen = creds.get_frozen_credentials() if creds is not None else None
    endpoint = client.meta.endpoint_url
    options: dict[str, Any] = {"region": client.meta.region_name or "us-east-1"}
    if frozen is not None:
        options.update(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
    if endpoint and not _is_aws_host(endpoint):
        parts = urlsplit(endpoint)
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https", force_virtual_addressing=False)
    return pafs.S3FileSystem(**options), [u[5:] for u in urls]


def absolute(location: str) -> str:
    """A local path made absolute against the current directory (``~`` expanded), so that a worker with another
    working directory (a Ray worker, a Ray Train worker, another node) finds the same file; a URL (``s3://``,
    ``file://``, ``https://``, ...) is returned as it is."""
    if "://" in location:
        return location
    return os.path.abspath(os.path.expanduser(location))


def missing(urls: Iterable[str]) -> list[str]:
    """The ``urls`` that do not exist, found without one request per file: locally one directory scan per
    folder they are in, on S3 one listing of the longest common key prefix per bucket."""
    by_dir: dict[str, list[str]] = {}
    by_bucket: dict[str, list[str]] = {}
    for u in urls:
        if is_s3(u):
            by_bucket.setdefault(s3.split(u)[0], []).append(u)
        else:
            by_dir.setdefault(os.path.dirname(localfs.local_path(u)) or ".", []).append(u)
    out: list[str] = []
    for d, group in by_dir.items():
        try:
            with os.scandir(d) as it:
                files = {e.name for e in it}  # (a folder named like a shard exists: the reader reports it)
        except (FileNotFoundError, NotADirectoryError):
            files = set()
        out += [u for u in group if os.path.basename(localfs.local_path(u)) not in files]
    for bucket, group in by_bucket.items():
        prefix = os.path.commonprefix([s3.split(u)[1] for u in group])
        listed = set(s3.list_files(f"s3://{bucket}/{prefix}", raw_prefix=True))
        out += [u for u in group if u not in listed]
    return sorted(out)


def expand(pattern: str, check: bool = False) -> list[str]:
    """Expand a shard pattern into a sorted, de-duplicated list of paths/URLs.

    Braces are expanded first (``shard-{00000..00009}.tar``, ``{a,b}``); a brace-expanded name without glob
    characters is kept even when it does not exist (the reader then reports the missing shard), unless
    ``check``: then the names are looked up with :func:`missing` (one listing per folder / S3 prefix, not one
    request per file) and any that does not exist raises FileNotFoundError naming them. Names with
    glob characters (``*``, ``?``, ``[...]``) are matched: locally with :mod:`glob` (``**`` recurses; only
    files are returned), on S3 by listing the prefix before the first glob character and filtering the keys
    with :func:`fnmatch.fnmatchcase` (there ``*`` also matches ``/``). A glob that matches nothing raises
    FileNotFoundError naming the pattern.
    """
    from braceexpand import braceexpand

    out: set[str] = set()
    named: list[str] = []  # brace-expanded names without glob characters: not listed yet
    listings: dict[str, list[str]] = {}  # S3 prefix -> keys, shared by the brace expansions
    for name in braceexpand(pattern):
        if not _GLOB_CHARS.search(name):
            out.add(name)
            named.append(name)
            continue
        if is_s3(name):
            cut = _GLOB_CHARS.search(name)
            assert cut is not None
            list_prefix = name[: cut.start()]
            if list_prefix not in listings:
                s3.split(list_prefix)  # validates the bucket part
                listings[list_prefix] = s3.list_files(list_prefix, raw_prefix=True)
            matches = [u for u in listings[list_prefix] if fnmatch.fnmatchcase(u, name)]
        else:
            matches = localfs.glob_files(name)
        if not matches:
            where = f" (from {pattern!r})" if name != pattern else ""
            raise FileNotFoundError(f"{name}: no files match the pattern{where}")
        out.update(matches)
    if check and named:
        absent = missing(named)
        if absent and absent == [pattern]:
            raise FileNotFoundError(f"{pattern}: no such file or folder")
        if absent:
            shown = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
            raise FileNotFoundError(f"{pattern}: {len(absent)} of its {len(named)} file(s) do not exist: {shown}")
    return sorted(out)


# ============================================================================ writing


@contextlib.contextmanager
def atomic_write(url: str) -> Iterator[BinaryIO]:
    """Yield a writable binary file whose content appears at ``url`` only if the block succeeds.

    Local: writes ``.<name>.tmp-<uuid>`` next to the target (creating parent directories), then flush,
    fsync and ``os.replace``. S3: spools to a temporary file under ``$TMPDIR`` and uploads it on success
    (multipart above 64 MiB). On any exception the temporary file is removed, nothing is uploaded, and the
    exception propagates; errors name the path/URL.
    """
    if is_s3(url):
        with s3.atomic_write(url, threshold=MULTIPART_THRESHOLD, chunksize=MULTIPART_CHUNKSIZE,
                             concurrency=UPLOAD_CONCURRENCY) as f:
            yield f
        return
    with localfs.atomic_write(url) as f:
        yield f


def _upload_file(path: str, bucket: str, key: str, url: str) -> None:
    """Upload the local file ``path`` as ``bucket``/``key`` with this module's multipart settings."""
    s3.upload_file(path, bucket, key, url, threshold=MULTIPART_THRESHOLD, chunksize=MULTIPART_CHUNKSIZE,
                   concurrency=UPLOAD_CONCURRENCY)


def upload_file(path: str, url: str) -> None:
    """Copy the local file ``path`` to ``url`` (local path or s3://; multipart on S3 above the threshold). The copy
    appears whole or not at all: a local target is written through :func:`atomic_write`, an S3 object is only
    visible once its upload completed."""
    if is_s3(url):
        bucket, key = _split_s3(url)
        if not key or key.endswith("/"):
            raise ValueError(f"{url}: an S3 object URL needs a key (s3://bucket/key)")
        _upload_file(path, bucket, key, url)
        return
    with open(path, "rb") as src, atomic_write(url) as dst:
        shutil.copyfileobj(src, dst, 8 << 20)


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` atomically (a single PUT on S3, which is atomic by itself)."""
    if is_s3(url):
        s3.split(url)
        if len(data) > MULTIPART_THRESHOLD:
            with atomic_write(url) as f:
                f.write(data)
            return
        s3.put_bytes(url, data)
        return
    with atomic_write(url) as f:
        f.write(data)


def remove(url: str, missing_ok: bool = True) -> None:
    """Delete the file/object at ``url``; a missing one is fine unless ``missing_ok`` is False."""
    if is_s3(url):
        s3.remove(url, missing_ok)
    else:
        localfs.remove(url, missing_ok)
