"""The ``s3://bucket/key`` side of :mod:`modalmill.io.storage`: one boto3 client per process, clear errors, a
streaming reader that resumes a dropped body with a ranged GET, listing, uploads and deletes.

Callers use :mod:`modalmill.io.storage`, which dispatches here for ``s3://`` URLs (and owns the multipart
settings it passes in); this module is its S3 backend.

* **Clear errors.** botocore errors become ``FileNotFoundError`` (missing object or bucket),
  ``PermissionError`` (denied, bad or missing credentials), ``ConnectionError`` (endpoint unreachable,
  retries exhausted) or ``OSError``, each naming the URL and never containing credentials (:func:`errors`).
* **Streaming, resumable reads.** :func:`open_read` streams the GET body and, when the connection drops
  mid-body, re-issues the GET with ``Range: bytes=<offset>-`` (and ``If-Match`` on the ETag, so a replaced
  object is detected instead of spliced) with exponential backoff and jitter.
* **Uploads appear whole.** :func:`atomic_write` spools to a local temporary file and uploads only on success
  (an object appears only when its PUT or multipart upload completes).

Configuration comes from the usual AWS environment / config files that boto3 reads (``AWS_ENDPOINT_URL``,
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
import io
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO, NoReturn, cast
from urllib.parse import urlsplit

from .localfs import PathNamingWriter

logger = logging.getLogger(__name__)

_S3_SCHEME = "s3://"

#: Buffer of the streaming S3 reader.
READ_BUFFER_SIZE = 1024 * 1024
#: Upper bound of the sleep between two resumptions of a dropped GET.
READ_BACKOFF_CAP = 10.0
#: Connections the client keeps: room for several multipart uploads of 4 parallel parts at once.
MAX_POOL_CONNECTIONS = 16


def env_int(name: str, default: int, fallback: str | None = None) -> int:
    raw = os.environ.get(name) or (os.environ.get(fallback) if fallback else None)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name if os.environ.get(name) else fallback}={raw!r} is not an integer") from None


def env_float(name: str, default: float) -> float:
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


def split(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; the key may be empty."""
    if not is_s3(url):
        raise ValueError(f"{url}: not an s3:// URL")
    bucket, _, key = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket name in S3 URL")
    return bucket, key


# ============================================================================ the client


_clients: dict[Any, Any] = {}  # pid (or (pid, "short", ...)) -> boto3 client; a client must not be shared across fork()
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


def _make_client(attempts: int | None = None, connect_timeout: float = 10, read_timeout: float = 60) -> Any:
    import boto3
    from botocore.config import Config

    if attempts is None:
        attempts = env_int("MODALMILL_S3_MAX_ATTEMPTS", 10, fallback="AWS_MAX_ATTEMPTS")
    mode = os.environ.get("MODALMILL_S3_RETRY_MODE") or os.environ.get("AWS_RETRY_MODE") or "standard"
    config = Config(
        # botocore retries throttling (503 SlowDown), 500/502/503/504 and connection errors with
        # exponential backoff and jitter. "standard" rather than "adaptive" by default: adaptive adds a
        # process-wide client-side rate limiter that can stall every thread after one throttling burst.
        retries={"max_attempts": attempts, "mode": mode},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # also room for the bookkeeping readers' parallel GETs (storage.read_many: MODALMILL_IO_WORKERS, 32)
        max_pool_connections=max(MAX_POOL_CONNECTIONS,
                                 int(os.environ.get("MODALMILL_IO_WORKERS", "32") or 32) + 8),
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


def _drop_inherited(pid: int) -> None:
    """Forget clients inherited from a parent process (unusable here); the caller holds ``_clients_lock``."""
    for k in [k for k in _clients if (k[0] if isinstance(k, tuple) else k) != pid]:
        del _clients[k]


def s3_client() -> Any:
    """The process's boto3 S3 client (thread-safe), created on first use and again after a fork."""
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        with _clients_lock:
            client = _clients.get(pid)
            if client is None:
                _drop_inherited(pid)
                client = _clients[pid] = _make_client()
    return client


def short_client(timeout_s: float, attempts: int = 2) -> Any:
    """A separate S3 client for small requests that must answer quickly or fail (the lease's heartbeat and
    fence checks): ``attempts`` tries in all, connect and read timeouts of ``timeout_s`` each, instead of the
    shared client's 10 attempts and 60 s read timeout, and its own connection pool (a heartbeat never queues
    behind the pipeline's uploads). Cached per process and settings, forgotten with the shared client."""
    key = (os.getpid(), "short", float(timeout_s), int(attempts))
    client = _clients.get(key)
    if client is None:
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                _drop_inherited(key[0])
                # botocore's retries["max_attempts"] counts the retries: the attempts in all are one more
                client = _clients[key] = _make_client(attempts=max(0, attempts - 1), connect_timeout=timeout_s,
                                                      read_timeout=timeout_s)
    return client


def clear_s3_client_cache() -> None:
    """Forget the cached clients, so the next call re-reads the environment (tests, credential rotation)."""
    with _clients_lock:
        _clients.clear()


s3_client.cache_clear = clear_s3_client_cache  # type: ignore[attr-defined]  # functools.lru_cache-style


# ============================================================================ errors

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


def scrub(text: str) -> str:
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


def translate(exc: BaseException, url: str, action: str) -> BaseException:
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

    bucket = split(url)[0] if is_s3(url) else ""
    client_error = _client_error_of(exc)
    if client_error is not None:
        err = client_error.response.get("Error", {})
        code = str(err.get("Code") or "")
        status = client_error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = scrub(str(err.get("Message") or ""))
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
        return ValueError(f"{url}: invalid S3 request: {scrub(str(exc))}")
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return ConnectionError(f"{url}: cannot {action}: S3 endpoint unreachable or connection lost "
                               f"({type(exc).__name__}: {scrub(str(exc))})")
    if isinstance(exc, BotoCoreError):
        return OSError(f"{url}: cannot {action}: {type(exc).__name__}: {scrub(str(exc))}")
    return exc


def _raise_translated(exc: BaseException, url: str, action: str) -> NoReturn:
    new = translate(exc, url, action)
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
def translated_errors(url: str, action: str) -> Iterator[None]:
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


# ============================================================================ streaming reader


class _S3RawReader(io.RawIOBase):
    """Unbuffered, seekable reader over S3 GET that resumes a dropped body with a Range GET.

    The first GET is issued by the constructor, so a missing object or bucket, or denied access, raises
    right away (FileNotFoundError / PermissionError) rather than at the first read.
    """

    def __init__(self, url: str, retries: int, backoff: float):
        self._body: Any = None  # botocore StreamingBody positioned at self._pos (set first: close() uses it)
        super().__init__()
        self.url = url
        self._bucket, self._key = split(url)
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
                        f"{self._retries} resumed GET(s) ({type(e).__name__}: {scrub(str(e))})"
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
    """A buffered streaming reader of the object ``url`` (see :func:`modalmill.io.storage.open_read`)."""
    raw = _S3RawReader(
        url,
        retries=env_int("MODALMILL_S3_READ_RETRIES", 6),
        backoff=env_float("MODALMILL_S3_READ_BACKOFF", 0.5),
    )
    return cast(BinaryIO, io.BufferedReader(raw, buffer_size=READ_BUFFER_SIZE))


def exists(url: str) -> bool:
    """Whether ``url`` is an object, or a "directory" (a prefix with objects below it), or a bucket for
    ``s3://bucket``. Denied access raises PermissionError."""
    from botocore.exceptions import ClientError

    bucket, key = split(url)
    client = s3_client()
    with translated_errors(url, "check existence"):
        try:
            if not key:
                client.head_bucket(Bucket=bucket)
                return True
            if not key.endswith("/"):
                client.head_object(Bucket=bucket, Key=key)
                return True
        except ClientError as e:
            if not isinstance(translate(e, url, "check existence"), FileNotFoundError):
                raise
            if not key:
                return False
        try:
            listing = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
        except ClientError as e:
            if isinstance(translate(e, url, "check existence"), FileNotFoundError):
                return False  # no such bucket
            raise
        return bool(listing.get("KeyCount") or listing.get("Contents"))


def size(url: str) -> int:
    """Size in bytes of the object at ``url``."""
    from botocore.exceptions import ClientError

    bucket, key = split(url)
    client = s3_client()
    with translated_errors(url, "get the size"):
        try:
            return int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as e:
            # HEAD has no body, so a 404 does not say whether the key or the bucket is missing.
            if isinstance(translate(e, url, "get the size"), FileNotFoundError):
                check_bucket(bucket, url)
            raise


def check_bucket(bucket: str, url: str) -> None:
    """Raise FileNotFoundError naming the bucket when it does not exist (other errors are ignored)."""
    from botocore.exceptions import ClientError

    try:
        s3_client().head_bucket(Bucket=bucket)
    except ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404 or e.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404", "NotFound"):
            raise FileNotFoundError(f"{url}: no such bucket {bucket!r}") from None


def list_files(prefix: str, suffix: str = "", raw_prefix: bool = False) -> list[str]:
    """Objects under ``prefix`` whose keys end with ``suffix``, as sorted URLs; ``prefix`` is treated as a
    directory (a ``/`` is appended) unless ``raw_prefix``. A missing bucket raises FileNotFoundError."""
    bucket, key = split(prefix)
    if key and not key.endswith("/") and not raw_prefix:
        key += "/"
    out = []
    with translated_errors(prefix, "list"):
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", ()):
                k = obj["Key"]
                if k.endswith(suffix) and not k.endswith("/"):
                    out.append(f"s3://{bucket}/{k}")
    return sorted(out)


# ============================================================================ writing


@contextlib.contextmanager
def atomic_write(url: str, *, threshold: int, chunksize: int, concurrency: int) -> Iterator[BinaryIO]:
    """Spool to a temporary file under ``$TMPDIR`` and upload it when the block succeeds (multipart above
    ``threshold`` bytes); on any exception nothing is uploaded and the spool file is removed."""
    bucket, key = split(url)
    if not key or key.endswith("/"):
        raise ValueError(f"{url}: an S3 object URL needs a key (s3://bucket/key)")
    fd, spool = tempfile.mkstemp(prefix=".modalmill-s3-", suffix=".part")
    try:
        f = PathNamingWriter(io.FileIO(fd, "wb"), f"{url} (spooled in {spool})")
        try:
            yield cast(BinaryIO, f)
            f.flush()
        finally:
            with contextlib.suppress(Exception):
                f.close()
        upload_file(spool, bucket, key, url, threshold=threshold, chunksize=chunksize, concurrency=concurrency)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(spool)


def upload_file(path: str, bucket: str, key: str, url: str, *, threshold: int, chunksize: int,
                concurrency: int) -> None:
    """Upload the local file ``path`` as ``bucket``/``key`` (``url``): one PUT, or a multipart upload of
    ``chunksize`` parts (``concurrency`` at a time) above ``threshold`` bytes."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(
        multipart_threshold=threshold,
        multipart_chunksize=chunksize,
        max_concurrency=concurrency,
        use_threads=True,
    )
    with translated_errors(url, "upload"):
        s3_client().upload_file(path, bucket, key, Config=config)


def put_bytes(url: str, data: bytes) -> None:
    """Write ``data`` as the object ``url`` in a single PUT (atomic by itself)."""
    bucket, key = split(url)
    with translated_errors(url, "write"):
        s3_client().put_object(Bucket=bucket, Key=key, Body=bytes(data))


def remove(url: str, missing_ok: bool = True) -> None:
    """Delete the object at ``url``; a missing one is fine unless ``missing_ok`` is False."""
    from botocore.exceptions import ClientError

    bucket, key = split(url)
    client = s3_client()
    with translated_errors(url, "delete"):
        try:
            if not missing_ok:
                client.head_object(Bucket=bucket, Key=key)  # DELETE succeeds on a missing key
            client.delete_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if isinstance(translate(e, url, "delete"), FileNotFoundError):
                if missing_ok:
                    return
                check_bucket(bucket, url)
            raise
