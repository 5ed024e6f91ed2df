"""Read and write by URL: local paths (plain or ``file://``) and ``s3://bucket/key``.

Everything in the pipeline that touches a shard, a manifest or a marker goes through this module, so the
same job runs against a local folder or an S3 bucket (AWS, SeaweedFS, MinIO, ...) unchanged.

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
import errno
import fnmatch
import glob
import io
import logging
import os
import random
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO, NoReturn, cast
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

__all__ = [
    "arrow_filesystem",
    "atomic_write",
    "clear_s3_client_cache",
    "exists",
    "expand",
    "is_s3",
    "join",
    "list_files",
    "list_pages",
    "io_workers",
    "read_many",
    "open_read",
    "read_bytes",
    "remove",
    "s3_client",
    "s3_env_vars",
    "size",
    "write_bytes",
]

_S3_SCHEME = "s3://"
_FILE_SCHEME = "file://"

#: Objects larger than this are uploaded with multipart upload.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
#: Part size of multipart uploads (s3transfer raises it when 10,000 parts would not suffice).
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
#: Parallel part uploads of one object.
UPLOAD_CONCURRENCY = 4
#: Buffer of the streaming S3 reader.
READ_BUFFER_SIZE = 1024 * 1024
#: Upper bound of the sleep between two resumptions of a dropped GET.
READ_BACKOFF_CAP = 10.0

# Our own temporary files: ".<name>.tmp-<32 hex digits>".
_TMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _env_int(name: str, default: int, fallback: str | None = None) -> int:
    raw = os.environ.get(name) or (os.environ.get(fallback) if fallback else None)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name if os.environ.get(name) else fallback}={raw!r} is not an integer") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


# ============================================================================ URLs


def is_s3(url: str) -> bool:
    """True for ``s3://bucket/key`` URLs (scheme matched case-insensitively)."""
    return url[:5].lower() == _S3_SCHEME


def _is_file_url(url: str) -> bool:
    return url[:7].lower() == _FILE_SCHEME


def _local_path(url: str) -> str:
    """The filesystem path of a local URL: plain paths pass through; ``file:///a/b`` and
    ``file://localhost/a/b`` become ``/a/b``. File URLs are taken literally (no percent-decoding), so that
    :func:`join` on a ``file://`` root round-trips any file name."""
    if not _is_file_url(url):
        return url
    rest = url[7:]
    if rest.lower().startswith("localhost/"):
        rest = rest[9:]
    if rest and not rest.startswith("/"):
        raise ValueError(f"{url}: only local file:// URLs (file:///path) are supported")
    return rest


def _split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; the key may be empty."""
    if not is_s3(url):
        raise ValueError(f"{url}: not an s3:// URL")
    bucket, _, key = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket name in S3 URL")
    return bucket, key


def join(root: str, *parts: str) -> str:
    """Join path components onto a local path, ``file://`` URL or ``s3://`` URL.

    S3 parts are joined with exactly one ``/`` between them (leading/trailing slashes of the parts are
    dropped; empty parts are skipped). Local parts follow :func:`os.path.join`.
    """
    if is_s3(root):
        pieces = [root.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
        return "/".join(pieces)
    if _is_file_url(root):
        return root[:7] + os.path.join(root[7:], *parts)
    return os.path.join(root, *parts)


# ============================================================================ S3 client


_clients: dict[int, Any] = {}  # pid -> boto3 client; a client must not be shared across fork()
_clients_lock = threading.Lock()


def _reinit_after_fork() -> None:
    # A fork while another thread held the lock would leave it locked forever in the child.
    global _clients_lock
    _clients_lock = threading.Lock()
    _clients.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)


def _is_aws_host(endpoint_url: str | None) -> bool:
    host = (urlsplit(endpoint_url).hostname or "") if endpoint_url else ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws"))


def _make_client() -> Any:
    import boto3
    from botocore.config import Config

    attempts = _env_int("MODALMILL_S3_MAX_ATTEMPTS", 10, fallback="AWS_MAX_ATTEMPTS")
    mode = os.environ.get("MODALMILL_S3_RETRY_MODE") or os.environ.get("AWS_RETRY_MODE") or "standard"
    config = Config(
        # botocore retries throttling (503 SlowDown), 500/502/503/504 and connection errors with
        # exponential backoff and jitter. "standard" rather than "adaptive" by default: adaptive adds a
        # process-wide client-side rate limiter that can stall every thread after one throttling burst.
        retries={"max_attempts": attempts, "mode": mode},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max(16, UPLOAD_CONCURRENCY * 4, io_workers(True) + 8),
        tcp_keepalive=True,
    )
    endpoint = os.environ.get("MODALMILL_S3_ENDPOINT") or None  # None: boto3 resolves AWS_ENDPOINT_URL[_S3]
    session = boto3.session.Session()
    client = session.client("s3", endpoint_url=endpoint, config=config)
    if not _is_aws_host(client.meta.endpoint_url):
        # A custom endpoint (SeaweedFS, MinIO, a loopback test server): virtual-host addressing
        # (bucket.host) rarely resolves there, so address buckets in the path.
        client = session.client(
            "s3", endpoint_url=endpoint, config=config.merge(Config(s3={"addressing_style": "path"}))
        )
    return client


def s3_client() -> Any:
    """The process's boto3 S3 client (thread-safe), created on first use and again after a fork."""
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        with _clients_lock:
            client = _clients.get(pid)
            if client is None:
                _clients.clear()  # a client inherited from a parent process is unusable here
                client = _clients[pid] = _make_client()
    return client


def clear_s3_client_cache() -> None:
    """Forget the cached client, so the next call re-reads the environment (tests, credential rotation)."""
    with _clients_lock:
        _clients.clear()


s3_client.cache_clear = clear_s3_client_cache  # type: ignore[attr-defined]  # functools.lru_cache-style


# ============================================================================ S3 errors

_DENIED_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidSecurity",
    "AccountProblem",
    "403",
    "Forbidden",
}


def s3_env_vars() -> dict[str, str]:
    """This process' S3 settings from the environment (``AWS_*``, ``MODALMILL_S3_*``, credentials included): what a
    worker process on this machine that did not inherit them (a Ray started before they were set) needs to reach
    the same storage the same way."""
    return {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MODALMILL_S3_"))}


def _secrets() -> list[str]:
    """Credential strings that must never appear in a message: the configured key id, secret and token."""
    values = {os.environ.get(v, "") for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    client = _clients.get(os.getpid())
    if client is not None:
        # The credentials the client actually signs with (a private attribute: best effort).
        creds = getattr(getattr(client, "_request_signer", None), "_credentials", None)
        if creds is not None and hasattr(creds, "get_frozen_credentials"):
            frozen = creds.get_frozen_credentials()
            values |= {frozen.access_key or "", frozen.secret_key or "", frozen.token or ""}
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


def _scrub(text: str) -> str:
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


def _client_error_of(exc: BaseException) -> Any | None:
    """The botocore ClientError behind ``exc`` (itself, or the cause/context of boto3's S3UploadFailedError)."""
    from botocore.exceptions import ClientError

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ClientError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _translate(exc: BaseException, url: str, action: str) -> BaseException:
    """Map a botocore/boto3 exception to a clear built-in exception naming ``url`` (credentials scrubbed)."""
    from botocore.exceptions import (
        BotoCoreError,
        HTTPClientError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )

    bucket = _split_s3(url)[0] if is_s3(url) else ""
    client_error = _client_error_of(exc)
    if client_error is not None:
        err = client_error.response.get("Error", {})
        code = str(err.get("Code") or "")
        status = client_error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = _scrub(str(err.get("Message") or ""))
        if code == "NoSuchBucket":
            return FileNotFoundError(f"{url}: no such bucket {bucket!r}")
        if code in ("NoSuchKey", "NotFound", "404") or (status == 404 and code not in ("NoSuchUpload",)):
            return FileNotFoundError(f"{url}: no such object")
        if code in _DENIED_CODES or status == 403:
            detail = f"{code}: {message}" if message and message != code else code or "HTTP 403"
            return PermissionError(f"{url}: access denied while trying to {action} ({detail}); check the AWS "
                                   "credentials and the bucket policy")
        if status == 503 and code in ("503", "ServiceUnavailable", ""):  # HEAD answers carry no error code
            code = "SlowDown/ServiceUnavailable"
        detail = f"{code} (HTTP {status})" + (f": {message}" if message and message != code else "")
        retries = client_error.response.get("ResponseMetadata", {}).get("RetryAttempts")
        if retries:
            detail += f", after {retries} retries"
        return OSError(f"{url}: cannot {action}: {detail}")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return PermissionError(f"{url}: no usable AWS credentials found (set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY, or a profile)")
    if isinstance(exc, ParamValidationError):
        return ValueError(f"{url}: invalid S3 request: {_scrub(str(exc))}")
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return ConnectionError(f"{url}: cannot {action}: S3 endpoint unreachable or connection lost "
                               f"({type(exc).__name__}: {_scrub(str(exc))})")
    if isinstance(exc, BotoCoreError):
        return OSError(f"{url}: cannot {action}: {type(exc).__name__}: {_scrub(str(exc))}")
    return exc


def _raise_translated(exc: BaseException, url: str, action: str) -> NoReturn:
    new = _translate(exc, url, action)
    if new is exc:
        raise exc
    # Auth failures drop the botocore context: its response may echo the access key id.
    if isinstance(new, PermissionError):
        raise new from None
    raise new from exc


def _is_botocore_error(exc: BaseException) -> bool:
    try:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (BotoCoreError, ClientError, Boto3Error))


@contextlib.contextmanager
def _s3_errors(url: str, action: str) -> Iterator[None]:
    """Translate botocore/boto3 exceptions raised inside the block."""
    try:
        yield
    except Exception as e:
        if _is_botocore_error(e):
            _raise_translated(e, url, action)
        raise


def _retryable_read_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the connection broke while the body was streaming": resume with a Range GET."""
    import http.client

    import urllib3.exceptions
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )
    from botocore.exceptions import (
        HTTPClientError,
        IncompleteReadError,
    )

    return (
        HTTPClientError,  # ResponseStreamingError, ConnectionClosedError, ReadTimeoutError
        BotoConnectionError,  # EndpointConnectionError, ConnectTimeoutError
        IncompleteReadError,  # body shorter than Content-Length
        urllib3.exceptions.ProtocolError,
        urllib3.exceptions.ReadTimeoutError,
        http.client.IncompleteRead,
        http.client.RemoteDisconnected,
        ConnectionError,  # ConnectionResetError, BrokenPipeError, ...
        TimeoutError,  # socket.timeout
        _PrematureEOF,
    )


class _PrematureEOF(Exception):
    """The body ended before the object's size was reached without the HTTP layer noticing."""


# ============================================================================ S3 streaming reader


class _S3RawReader(io.RawIOBase):
    """Unbuffered, seekable reader over S3 GET that resumes a dropped body with a Range GET.

    The first GET is issued by the constructor, so a missing object or bucket, or denied access, raises
    right away (FileNotFoundError / PermissionError) rather than at the first read.
    """

    def __init__(self, url: str, retries: int, backoff: float):
        self._body: Any = None  # botocore StreamingBody positioned at self._pos (set first: close() uses it)
        super().__init__()
        self.url = url
        self._bucket, self._key = _split_s3(url)
        self._retries = retries
        self._backoff = backoff
        self._client = s3_client()
        self._retryable = _retryable_read_errors()
        self._pos = 0
        self._size: int | None = None
        self._etag: str | None = None
        self._body = self._get(0)

    # -- io.RawIOBase protocol
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_closed()
        if whence == io.SEEK_SET:
            new = offset
        elif whence == io.SEEK_CUR:
            new = self._pos + offset
        elif whence == io.SEEK_END:
            new = self._object_size() + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if new < 0:
            raise OSError(errno.EINVAL, "negative seek position", self.url)
        if new != self._pos:
            self._drop_body()  # the next read re-GETs from the new position
            self._pos = new
        return self._pos

    def readinto(self, buffer: Any) -> int:
        self._check_closed()
        view = memoryview(buffer).cast("B")
        if len(view) == 0:
            return 0
        failures = 0  # consecutive failures without progress; reset by every successful read
        while True:
            if self._size is not None and self._pos >= self._size:
                return 0
            try:
                if self._body is None:
                    self._body = self._get(self._pos)
                    if self._body is None:
                        return 0
                got = self._body.readinto(view)
                if got == 0:
                    if self._size is None:
                        return 0
                    raise _PrematureEOF(f"body ended at byte {self._pos} of {self._size}")
                self._pos += got
                return got
            except self._retryable as e:
                self._drop_body()
                failures += 1
                if failures > self._retries:
                    raise ConnectionError(
                        f"{self.url}: connection lost at byte {self._pos} of {self._size}; gave up after "
                        f"{self._retries} resumed GET(s) ({type(e).__name__}: {_scrub(str(e))})"
                    ) from e
                delay = min(READ_BACKOFF_CAP, self._backoff * 2 ** (failures - 1)) * (0.5 + random.random() / 2)
                logger.warning(
                    "%s: connection lost at byte %d of %s (%s); resuming with a Range GET in %.2fs (retry %d/%d)",
                    self.url, self._pos, self._size, type(e).__name__, delay, failures, self._retries,
                )
                time.sleep(delay)

    def readall(self) -> bytes:
        # The default readall() reads 8 KiB at a time; read straight into one buffer of the right size.
        self._check_closed()
        if self._size is None:
            chunks = []
            while chunk := self.read(READ_BUFFER_SIZE):
                chunks.append(chunk)
            return b"".join(chunks)
        out = bytearray(max(0, self._size - self._pos))
        view = memoryview(out)
        filled = 0
        while filled < len(out):
            got = self.readinto(view[filled:])
            if not got:
                break
            filled += got
        del view
        return bytes(out[:filled]) if filled < len(out) else bytes(out)

    def close(self) -> None:
        if not self.closed:
            self._drop_body()
        super().close()

    # -- internals
    def _check_closed(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def _object_size(self) -> int:
        if self._size is None:
            self._size = size(self.url)
        return self._size

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):
                body.close()

    def _get(self, start: int) -> Any:
        """GET the object from byte ``start`` on; None when ``start`` is at or past the end."""
        from botocore.exceptions import ClientError

        if self._size is not None and start >= self._size:
            return None
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if start > 0:
            kwargs["Range"] = f"bytes={start}-"
        if self._etag:
            kwargs["IfMatch"] = self._etag  # a replaced object must fail, not be spliced onto the old one
        try:
            resp = self._client.get_object(**kwargs)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 416 or code == "InvalidRange":
                self._size = start if self._size is None else self._size
                return None
            if status == 412 or code == "PreconditionFailed":
                raise OSError(f"{self.url}: object was replaced while it was being read") from None
            _raise_translated(e, self.url, "read")
        except Exception as e:
            if isinstance(e, self._retryable):
                raise  # connection trouble: readinto's retry loop (or the caller) handles it
            if _is_botocore_error(e):
                _raise_translated(e, self.url, "read")
            raise
        self._etag = self._etag or resp.get("ETag")
        total = _total_size(resp)
        if self._size is None:
            self._size = total
        elif total is not None and total != self._size:
            raise OSError(f"{self.url}: object size changed while reading ({self._size} -> {total} bytes)")
        body = resp["Body"]
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if start > 0 and status == 200:
            _skip(body, start)  # the server ignored Range and sent the whole object: skip to ``start``
        return body


def _total_size(resp: dict) -> int | None:
    content_range = resp.get("ContentRange")  # "bytes 100-199/200"
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = resp.get("ContentLength")
    return int(length) if length is not None else None


def _skip(body: Any, n: int) -> None:
    while n > 0:
        chunk = body.read(min(n, READ_BUFFER_SIZE))
        if not chunk:
            raise _PrematureEOF(f"body ended while skipping to byte {n}")
        n -= len(chunk)


# ============================================================================ reading


def open_read(url: str) -> BinaryIO:
    """Open ``url`` for streaming binary reading (a context manager).

    Supports ``read(n)``, ``read()``, ``readinto``, ``seek``/``tell`` and ``tarfile.open(fileobj=f,
    mode="r|*")``. On S3 at most about one buffer (1 MiB) of the body is held in memory, and a connection
    dropped mid-body is resumed with a Range GET (``MODALMILL_S3_READ_RETRIES`` consecutive failures without
    progress are tolerated, with exponential backoff and jitter from ``MODALMILL_S3_READ_BACKOFF`` seconds).
    Raises FileNotFoundError for a missing object/bucket and PermissionError when access is denied.
    """
    if not is_s3(url):
        return open(_local_path(url), "rb")
    raw = _S3RawReader(
        url,
        retries=_env_int("MODALMILL_S3_READ_RETRIES", 6),
        backoff=_env_float("MODALMILL_S3_READ_BACKOFF", 0.5),
    )
    return cast(BinaryIO, io.BufferedReader(raw, buffer_size=READ_BUFFER_SIZE))


def read_bytes(url: str) -> bytes:
    """The whole content of ``url``."""
    with open_read(url) as f:
        return f.read()


def exists(url: str) -> bool:
    """Whether ``url`` exists: a file or directory locally; an object, or a "directory" (a prefix with
    objects below it), or a bucket for ``s3://bucket``, on S3. Denied access raises PermissionError."""
    if not is_s3(url):
        return os.path.exists(_local_path(url))
    from botocore.exceptions import ClientError

    bucket, key = _split_s3(url)
    client = s3_client()
    with _s3_errors(url, "check existence"):
        try:
            if not key:
                client.head_bucket(Bucket=bucket)
                return True
            if not key.endswith("/"):
                client.head_object(Bucket=bucket, Key=key)
                return True
        except ClientError as e:
            if not isinstance(_translate(e, url, "check existence"), FileNotFoundError):
                raise
            if not key:
                return False
        try:
            listing = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
        except ClientError as e:
            if isinstance(_translate(e, url, "check existence"), FileNotFoundError):
                return False  # no such bucket
            raise
        return bool(listing.get("KeyCount") or listing.get("Contents"))


def size(url: str) -> int:
    """Size in bytes of the file or object at ``url``."""
    if not is_s3(url):
        return os.path.getsize(_local_path(url))
    from botocore.exceptions import ClientError

    bucket, key = _split_s3(url)
    client = s3_client()
    with _s3_errors(url, "get the size"):
        try:
            return int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as e:
            # HEAD has no body, so a 404 does not say whether the key or the bucket is missing.
            if isinstance(_translate(e, url, "get the size"), FileNotFoundError):
                _check_bucket(bucket, url)
            raise


def _check_bucket(bucket: str, url: str) -> None:
    """Raise FileNotFoundError naming the bucket when it does not exist (other errors are ignored)."""
    from botocore.exceptions import ClientError

    try:
        s3_client().head_bucket(Bucket=bucket)
    except ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404 or e.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404", "NotFound"):
            raise FileNotFoundError(f"{url}: no such bucket {bucket!r}") from None


def list_files(prefix: str, suffix: str = "") -> list[str]:
    """All files below the directory ``prefix`` (recursively) whose names end with ``suffix``, as sorted
    full paths/URLs in the style of ``prefix``. A missing directory gives an empty list (a missing S3 bucket
    raises FileNotFoundError). Our own in-progress temporary files are never listed."""
    if is_s3(prefix):
        return _list_s3(prefix, suffix)
    root = _local_path(prefix)
    scheme = prefix[:7] if _is_file_url(prefix) else ""
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if name.endswith(suffix) and not _TMP_NAME.match(name):
                out.append(scheme + os.path.join(dirpath, name))
    return sorted(out)


def _list_s3(prefix: str, suffix: str = "", raw_prefix: bool = False) -> list[str]:
    """Objects under ``prefix``; treated as a directory (a ``/`` is appended) unless ``raw_prefix``."""
    bucket, key = _split_s3(prefix)
    if key and not key.endswith("/") and not raw_prefix:
        key += "/"
    out = []
    with _s3_errors(prefix, "list"):
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", ()):
                k = obj["Key"]
                if k.endswith(suffix) and not k.endswith("/"):
                    out.append(f"s3://{bucket}/{k}")
    return sorted(out)


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
        with _s3_errors(prefix, "list"):
            paginator = s3_client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=key, PaginationConfig={"PageSize": page_size}):
                out = [(f"s3://{bucket}/{o['Key']}", str(o.get("ETag", "")).strip('"') + f":{o.get('Size', '')}")
                       for o in page.get("Contents", ()) if o["Key"].endswith(suffix) and not o["Key"].endswith("/")]
                yield out
        return
    root = _local_path(prefix)
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
        return pafs.LocalFileSystem(), [_local_path(u) for u in urls]
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


def expand(pattern: str) -> list[str]:
    """Expand a shard pattern into a sorted, de-duplicated list of paths/URLs.

    Braces are expanded first (``shard-{00000..00009}.tar``, ``{a,b}``); a brace-expanded name without glob
    characters is kept even when it does not exist (the reader then reports the missing shard). Names with
    glob characters (``*``, ``?``, ``[...]``) are matched: locally with :mod:`glob` (``**`` recurses; only
    files are returned), on S3 by listing the prefix before the first glob character and filtering the keys
    with :func:`fnmatch.fnmatchcase` (there ``*`` also matches ``/``). A glob that matches nothing raises
    FileNotFoundError naming the pattern.
    """
    from braceexpand import braceexpand

    out: set[str] = set()
    listings: dict[str, list[str]] = {}  # S3 prefix -> keys, shared by the brace expansions
    for name in braceexpand(pattern):
        if not _GLOB_CHARS.search(name):
            out.add(name)
            continue
        if is_s3(name):
            cut = _GLOB_CHARS.search(name)
            assert cut is not None
            list_prefix = name[: cut.start()]
            if list_prefix not in listings:
                _split_s3(list_prefix)  # validates the bucket part
                listings[list_prefix] = _list_s3(list_prefix, raw_prefix=True)
            matches = [u for u in listings[list_prefix] if fnmatch.fnmatchcase(u, name)]
        else:
            scheme = name[:7] if _is_file_url(name) else ""
            matches = [scheme + p for p in glob.glob(_local_path(name), recursive=True) if not os.path.isdir(p)]
        if not matches:
            where = f" (from {pattern!r})" if name != pattern else ""
            raise FileNotFoundError(f"{name}: no files match the pattern{where}")
        out.update(matches)
    return sorted(out)


# ============================================================================ writing


def _with_path(exc: OSError, path: str) -> OSError:
    """``exc`` if it already names a file, else an equivalent OSError naming ``path``
    (a write() hitting ENOSPC, for instance, carries no file name)."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), path)  # OSError() picks the errno's subclass


class _PathNamingWriter(io.BufferedWriter):
    """A BufferedWriter whose OSErrors name ``label`` (the final path or URL being written)."""

    def __init__(self, raw: io.RawIOBase, label: str):
        super().__init__(raw, buffer_size=READ_BUFFER_SIZE)
        self._label = label

    def write(self, data: Any) -> int:
        try:
            return super().write(data)
        except OSError as e:
            new = _with_path(e, self._label)
            if new is e:
                raise
            raise new from e

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            new = _with_path(e, self._label)
            if new is e:
                raise
            raise new from e


@contextlib.contextmanager
def atomic_write(url: str) -> Iterator[BinaryIO]:
    """Yield a writable binary file whose content appears at ``url`` only if the block succeeds.

    Local: writes ``.<name>.tmp-<uuid>`` next to the target (creating parent directories), then flush,
    fsync and ``os.replace``. S3: spools to a temporary file under ``$TMPDIR`` and uploads it on success
    (multipart above 64 MiB). On any exception the temporary file is removed, nothing is uploaded, and the
    exception propagates; errors name the path/URL.
    """
    if is_s3(url):
        with _atomic_write_s3(url) as f:
            yield f
        return
    path = _local_path(url)
    directory, name = os.path.split(os.path.abspath(path))
    if not name:
        raise IsADirectoryError(errno.EISDIR, "cannot write to a directory path", path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        raw = io.FileIO(tmp, "xb")  # mode 0o666 & ~umask, like open()
    except OSError as e:  # name the file the caller asked for; the temporary name is a detail
        raise OSError(e.errno, f"{e.strerror} (creating the temporary file {tmp})", path) from None
    f = _PathNamingWriter(raw, path)
    try:
        yield cast(BinaryIO, f)
        f.flush()
        try:
            os.fsync(f.fileno())
        except OSError as e:
            raise _with_path(e, path) from e
        f.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()  # may fail again (ENOSPC while flushing the rest): the first error is the one to see
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Make a rename durable (best effort: not every filesystem supports fsync on a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _atomic_write_s3(url: str) -> Iterator[BinaryIO]:
    bucket, key = _split_s3(url)
    if not key or key.endswith("/"):
        raise ValueError(f"{url}: an S3 object URL needs a key (s3://bucket/key)")
    fd, spool = tempfile.mkstemp(prefix=".modalmill-s3-", suffix=".part")
    try:
        f = _PathNamingWriter(io.FileIO(fd, "wb"), f"{url} (spooled in {spool})")
        try:
            yield cast(BinaryIO, f)
            f.flush()
        finally:
            with contextlib.suppress(Exception):
                f.close()
        _upload_file(spool, bucket, key, url)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(spool)


def _upload_file(path: str, bucket: str, key: str, url: str) -> None:
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNKSIZE,
        max_concurrency=UPLOAD_CONCURRENCY,
        use_threads=True,
    )
    with _s3_errors(url, "upload"):
        s3_client().upload_file(path, bucket, key, Config=config)


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` atomically (a single PUT on S3, which is atomic by itself)."""
    if is_s3(url):
        bucket, key = _split_s3(url)
        if len(data) > MULTIPART_THRESHOLD:
            with atomic_write(url) as f:
                f.write(data)
            return
        with _s3_errors(url, "write"):
            s3_client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
        return
    with atomic_write(url) as f:
        f.write(data)


def remove(url: str, missing_ok: bool = True) -> None:
    """Delete the file/object at ``url``; a missing one is fine unless ``missing_ok`` is False."""
    if not is_s3(url):
        try:
            os.remove(_local_path(url))
        except FileNotFoundError:
            if not missing_ok:
                raise
        return
    from botocore.exceptions import ClientError

    bucket, key = _split_s3(url)
    client = s3_client()
    with _s3_errors(url, "delete"):
        try:
            if not missing_ok:
                client.head_object(Bucket=bucket, Key=key)  # DELETE succeeds on a missing key
            client.delete_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if isinstance(_translate(e, url, "delete"), FileNotFoundError):
                if missing_ok:
                    return
                _check_bucket(bucket, url)
            raise
