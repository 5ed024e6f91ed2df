"""modalmill.io.storage against the local filesystem and real S3 servers (SeaweedFS, moto).

The S3 tests run against ``weed mini`` with credentials enforced (fixtures in tests/fixtures_s3.py); the
fault-injection tests go through a loopback proxy that answers 503 SlowDown / 500 or cuts GET bodies.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import pytest

from modalmill.io import storage


def _tmp_leftovers(directory: Path) -> list[str]:
    """Our temporary files (``.<name>.tmp-<uuid>``) anywhere below ``directory``."""
    return sorted(str(p) for p in directory.rglob(".*.tmp-*"))


def _make_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _atomic_write_bytes(url: str, data: bytes) -> None:
    with storage.atomic_write(url) as f:
        f.write(data)


def _read_tar_stream(url: str) -> dict[str, bytes]:
    out = {}
    with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            fobj = tar.extractfile(info)
            assert fobj is not None
            out[info.name] = fobj.read()
    return out


# ============================================================================ URLs


def test_is_s3_and_join() -> None:
    assert storage.is_s3("s3://bucket/key")
    assert storage.is_s3("S3://bucket")
    assert not storage.is_s3("/data/s3://x")
    assert not storage.is_s3("file:///data")
    assert storage.join("s3://b", "out", "rgb", "shard-00000.tar") == "s3://b/out/rgb/shard-00000.tar"
    assert storage.join("s3://b/", "/out/", "x.tar") == "s3://b/out/x.tar"
    assert storage.join("s3://b/root", "", "x") == "s3://b/root/x"
    assert storage.join("/data/out", "rgb", "x.tar") == "/data/out/rgb/x.tar"
    assert storage.join("file:///data/out", "rgb", "x.tar") == "file:///data/out/rgb/x.tar"
    assert storage.join("relative", "x") == os.path.join("relative", "x")


# ============================================================================ local


def test_local_roundtrip(tmp_path: Path) -> None:
    url = str(tmp_path / "a" / "b" / "x.bin")
    data = os.urandom(300_000)
    storage.write_bytes(url, data)  # parent directories are created
    assert storage.exists(url) and storage.size(url) == len(data)
    assert storage.read_bytes(url) == data
    assert storage.read_bytes("file://" + url) == data
    with storage.open_read(url) as f:
        assert f.read(10) == data[:10]
        buf = bytearray(1000)
        assert f.readinto(buf) == 1000 and bytes(buf) == data[10:1010]
        assert f.read() == data[1010:]

    storage.write_bytes(str(tmp_path / "a" / "y.json"), b"{}")
    storage.write_bytes(str(tmp_path / "a" / "b" / "c" / "z.json"), b"[]")
    (tmp_path / "a" / ".y.json.tmp-0123456789abcdef0123456789abcdef").write_bytes(b"in progress")
    assert storage.list_files(str(tmp_path / "a"), suffix=".json") == [
        str(tmp_path / "a" / "b" / "c" / "z.json"),
        str(tmp_path / "a" / "y.json"),
    ]
    assert len(storage.list_files(str(tmp_path / "a"))) == 3  # our temporary files are never listed
    assert storage.list_files("file://" + str(tmp_path / "a"), ".json")[0].startswith("file://")
    assert storage.list_files(str(tmp_path / "missing")) == []

    storage.remove(url)
    assert not storage.exists(url)
    storage.remove(url)  # missing_ok=True by default
    with pytest.raises(FileNotFoundError):
        storage.remove(url, missing_ok=False)
    with pytest.raises(FileNotFoundError, match="x.bin"):
        storage.read_bytes(url)
    with pytest.raises(FileNotFoundError):
        storage.size(url)


def test_local_expand(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"shard-{i:05d}.tar").write_bytes(b"x")
    (tmp_path / "other.txt").write_bytes(b"x")
    (tmp_path / "shard-dir.tar").mkdir()  # directories never match
    root = str(tmp_path)

    # braces: names that do not exist stay (the reader reports them as missing shards)
    assert storage.expand(f"{root}/shard-{{00000..00005}}.tar") == [f"{root}/shard-{i:05d}.tar" for i in range(6)]
    # globs, sorted and de-duplicated
    assert storage.expand(f"{root}/shard-*.tar") == [f"{root}/shard-{i:05d}.tar" for i in range(4)]
    assert storage.expand(f"{root}/shard-0000[13].tar") == [f"{root}/shard-00001.tar", f"{root}/shard-00003.tar"]
    assert storage.expand(f"{root}/{{shard-0000?,shard-*}}.tar") == [f"{root}/shard-{i:05d}.tar" for i in range(4)]
    assert storage.expand(f"file://{root}/shard-0000[0].tar") == [f"file://{root}/shard-00000.tar"]
    assert storage.expand(f"{root}/**/*.txt") == [f"{root}/other.txt"]
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar"):
        storage.expand(f"{root}/nothing-*.tar")
    with pytest.raises(FileNotFoundError, match="no files match"):
        storage.expand(f"{root}/{{shard,none}}-*.tar")  # each glob of the expansion must match


def test_local_atomic_write_success_and_naming(tmp_path: Path) -> None:
    final = tmp_path / "out" / "shard.tar"
    with storage.atomic_write(str(final)) as f:
        f.write(b"hello ")
        f.write(b"world")
        f.flush()
        # written to a hidden temp file in the same directory; the final name is not there yet
        [tmp] = _tmp_leftovers(tmp_path)
        assert Path(tmp).parent == final.parent and Path(tmp).name.startswith(".shard.tar.tmp-")
        assert not final.exists()
    assert final.read_bytes() == b"hello world"
    assert _tmp_leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o666 & ~umask  # like open(), not mkstemp's 0600


def test_local_atomic_write_exception_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "shard.tar"
    with pytest.raises(RuntimeError, match="boom"), storage.atomic_write(str(final)) as f:
        f.write(os.urandom(2_000_000))
        raise RuntimeError("boom")
    assert not final.exists()
    assert _tmp_leftovers(tmp_path) == []

    # an existing file keeps its old content when a rewrite fails
    final.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), storage.atomic_write(str(final)) as f:
        f.write(b"new but incomplete")
        raise KeyboardInterrupt
    assert final.read_bytes() == b"old"
    assert _tmp_leftovers(tmp_path) == []


def test_local_write_below_a_regular_file_fails_with_path(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"i am a file")
    target = blocker / "sub" / "x.tar"
    with pytest.raises(OSError) as info, storage.atomic_write(str(target)) as f:
        f.write(b"data")
    assert info.value.errno in (errno.ENOTDIR, errno.EEXIST)
    assert str(blocker) in str(info.value)
    with pytest.raises(OSError, match="blocker"):
        storage.write_bytes(str(blocker / "y.json"), b"{}")
    assert _tmp_leftovers(tmp_path) == []
    assert blocker.read_bytes() == b"i am a file"


def test_local_permission_denied_propagates(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(PermissionError, match="readonly"):
                storage.write_bytes(str(ro / "x.tar"), b"data")
            assert list(ro.iterdir()) == []
        finally:
            ro.chmod(0o755)
        return

    # Root ignores directory permissions, so the write runs in a forked child that has dropped to an
    # unprivileged user (a real EACCES from the kernel). The directory lives in a world-traversable place.
    base = Path(tempfile.mkdtemp(prefix="modalmill-perm-"))
    try:
        base.chmod(0o755)
        ro = base / "readonly"
        ro.mkdir(mode=0o555)
        ro.chmod(0o555)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code, report = 3, "?"
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                try:
                    with storage.atomic_write(str(ro / "x.tar")) as f:
                        f.write(b"data")
                    code, report = 2, "no error"
                except PermissionError as e:
                    code, report = (0 if str(ro / "x.tar") in str(e) else 1), str(e)
                except BaseException as e:  # noqa: BLE001 - reported to the parent
                    code, report = 1, repr(e)
            finally:
                os.write(write_end, report.encode()[:4000])
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, report
        assert "Permission denied" in report
        assert list(ro.iterdir()) == []  # no temp file left behind
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_local_disk_full_propagates_and_cleans_up(tmp_path: Path) -> None:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"disk-full test needs a tiny tmpfs and mounting one failed here: {res.stderr.strip()}")
    try:
        final = mnt / "big.tar"
        with pytest.raises(OSError) as info, storage.atomic_write(str(final)) as f:
            for _ in range(8):
                f.write(os.urandom(256 * 1024))
        assert info.value.errno in (errno.ENOSPC, errno.EDQUOT)
        assert str(final) in str(info.value)  # the error names the file being written
        assert not final.exists()
        assert list(mnt.iterdir()) == []  # the partial temp file is gone, the space is free again
        storage.write_bytes(str(mnt / "small.json"), b"{}")  # and the filesystem is usable
        assert (mnt / "small.json").read_bytes() == b"{}"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_local_tar_streaming(tmp_path: Path) -> None:
    members = {f"k{i}.jpg": os.urandom(1000 + i) for i in range(5)}
    url = str(tmp_path / "s.tar")
    storage.write_bytes(url, _make_tar(members))
    assert _read_tar_stream(url) == members


# ============================================================================ S3 (SeaweedFS)


@pytest.mark.s3
def test_s3_roundtrip(s3_env) -> None:
    _, bucket = s3_env
    root = f"s3://{bucket}/run1"
    url = storage.join(root, "rgb", "shard-00000.tar")
    data = os.urandom(3 * 1024 * 1024 + 17)
    storage.write_bytes(url, data)
    assert storage.exists(url)
    assert storage.size(url) == len(data)
    assert storage.read_bytes(url) == data

    with storage.open_read(url) as f:
        assert f.read(5) == data[:5]
        buf = bytearray(4096)
        assert f.readinto(buf) == 4096 and bytes(buf) == data[5:4101]
        f.seek(2_000_000)
        assert f.tell() == 2_000_000
        assert f.read(10) == data[2_000_000:2_000_010]
        f.seek(-7, io.SEEK_END)
        assert f.read() == data[-7:]
        assert f.read(10) == b""

    with storage.atomic_write(storage.join(root, "meta", "a.json")) as f:
        f.write(b'{"a": 1}')
    storage.write_bytes(storage.join(root, "meta", "deep", "b.json"), b"{}")
    storage.write_bytes(storage.join(root, "meta", "empty.json"), b"")
    assert storage.read_bytes(storage.join(root, "meta", "empty.json")) == b""
    assert storage.list_files(storage.join(root, "meta"), suffix=".json") == [
        f"{root}/meta/a.json", f"{root}/meta/deep/b.json", f"{root}/meta/empty.json",
    ]
    assert storage.list_files(root) == sorted([url, *storage.list_files(f"{root}/meta")])
    assert storage.list_files(f"s3://{bucket}/run") == []  # a directory, not a raw string prefix
    assert storage.list_files(f"s3://{bucket}/nothing/here") == []

    assert storage.exists(f"{root}/meta")  # a "directory" with objects below it
    assert storage.exists(f"s3://{bucket}")
    assert not storage.exists(f"{root}/nope")
    assert not storage.exists(f"s3://{bucket}-missing/x")

    storage.remove(url)
    assert not storage.exists(url)
    storage.remove(url)  # missing_ok
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/run1/rgb/shard-00000.tar: no such object"):
        storage.remove(url, missing_ok=False)
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.read_bytes(url)
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.open_read(url)  # raised on open, before any read
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.size(url)


@pytest.mark.s3
def test_s3_missing_bucket_is_named(s3_env) -> None:
    missing = s3_env[1] + "-nope"
    for call in (
        lambda: storage.read_bytes(f"s3://{missing}/k"),
        lambda: storage.size(f"s3://{missing}/k"),
        lambda: storage.list_files(f"s3://{missing}/dir"),
        lambda: storage.write_bytes(f"s3://{missing}/k", b"x"),
        lambda: _atomic_write_bytes(f"s3://{missing}/k", b"x"),
        lambda: storage.remove(f"s3://{missing}/k", missing_ok=False),
    ):
        with pytest.raises(FileNotFoundError, match=f"no such bucket '{missing}'"):
            call()


@pytest.mark.s3
def test_s3_expand(s3_env) -> None:
    _, bucket = s3_env
    root = f"s3://{bucket}/in"
    for i in range(5):
        storage.write_bytes(f"{root}/shard-{i:05d}.tar", b"x")
    storage.write_bytes(f"{root}/shard-00001.json", b"x")
    storage.write_bytes(f"{root}/sub/shard-00009.tar", b"x")

    assert storage.expand(f"{root}/shard-{{00000..00006}}.tar") == [f"{root}/shard-{i:05d}.tar" for i in range(7)]
    assert storage.expand(f"{root}/shard-*.tar") == [f"{root}/shard-{i:05d}.tar" for i in range(5)]
    assert storage.expand(f"{root}/*.tar") == sorted(  # fnmatch: on S3 '*' also matches '/'
        [f"{root}/shard-{i:05d}.tar" for i in range(5)] + [f"{root}/sub/shard-00009.tar"]
    )
    assert storage.expand(f"{root}/shard-0000?.json") == [f"{root}/shard-00001.json"]
    assert storage.expand(f"{root}/shard-0000[02].tar") == [f"{root}/shard-00000.tar", f"{root}/shard-00002.tar"]
    assert storage.expand(f"{root}/{{shard-00000,shard-0000*}}.tar") == [f"{root}/shard-{i:05d}.tar" for i in range(5)]
    with pytest.raises(FileNotFoundError, match=r"nothing-\*"):
        storage.expand(f"{root}/nothing-*.tar")


@pytest.mark.s3
def test_s3_atomic_write_exception_uploads_nothing(s3_env, tmp_path: Path, monkeypatch) -> None:
    _, bucket = s3_env
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where atomic_write spools ($TMPDIR)
    url = f"s3://{bucket}/out/shard.tar"

    with pytest.raises(RuntimeError, match="labeler crashed"), storage.atomic_write(url) as f:
        f.write(os.urandom(1_000_000))
        f.flush()
        assert len(list(spool.iterdir())) == 1  # spooled locally, nothing sent yet
        assert not storage.exists(url)
        raise RuntimeError("labeler crashed")
    assert not storage.exists(url)
    assert list(spool.iterdir()) == []

    storage.write_bytes(url, b"old")
    with pytest.raises(RuntimeError), storage.atomic_write(url) as f:
        f.write(b"new")
        raise RuntimeError("again")
    assert storage.read_bytes(url) == b"old"
    assert list(spool.iterdir()) == []

    with storage.atomic_write(url) as f:
        f.write(b"new")
        assert storage.read_bytes(url) == b"old"  # the object changes only when the block succeeds
    assert storage.read_bytes(url) == b"new"
    assert list(spool.iterdir()) == []


@pytest.mark.s3
def test_s3_multipart_70mib_roundtrip(s3_env) -> None:
    server, bucket = s3_env
    url = f"s3://{bucket}/big/shard.tar"
    block = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    n_blocks = 70
    with storage.atomic_write(url) as f:
        for i in range(n_blocks):
            chunk = block[i:] + block[:i]  # distinct blocks without generating 70 MiB of randomness
            digest.update(chunk)
            f.write(chunk)
    assert storage.size(url) == n_blocks * len(block)
    etag = server.client().head_object(Bucket=bucket, Key="big/shard.tar")["ETag"].strip('"')
    assert etag.rsplit("-", 1)[-1].isdigit() and "-" in etag, f"not a multipart upload: ETag {etag}"

    check = hashlib.sha256()
    with storage.open_read(url) as f:
        while chunk := f.read(4 * 1024 * 1024):  # streamed: never the whole object in memory
            check.update(chunk)
    assert check.hexdigest() == digest.hexdigest()


@pytest.mark.s3
def test_s3_tar_streaming(s3_env) -> None:
    _, bucket = s3_env
    members = {f"sample{i:03d}.{ext}": os.urandom(size)
               for i, size in enumerate([10, 5000, 2 * 1024 * 1024 + 3, 0, 700_000]) for ext in ("jpg", "json")}
    url = f"s3://{bucket}/tars/shard-00000.tar"
    with storage.atomic_write(url) as f, tarfile.open(fileobj=f, mode="w|") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert _read_tar_stream(url) == members


@pytest.mark.s3
def test_s3_endpoint_override_and_client_cache(s3_env, monkeypatch) -> None:
    server, bucket = s3_env
    url = f"s3://{bucket}/x"
    storage.write_bytes(url, b"via AWS_ENDPOINT_URL")  # boto3 honours AWS_ENDPOINT_URL by itself
    client = storage.s3_client()
    assert storage.s3_client() is client  # cached
    assert client.meta.endpoint_url == server.endpoint_url

    # MODALMILL_S3_ENDPOINT wins over AWS_ENDPOINT_URL (which now points at a closed port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("MODALMILL_S3_ENDPOINT", server.endpoint_url)
    storage.clear_s3_client_cache()
    assert storage.read_bytes(url) == b"via AWS_ENDPOINT_URL"

    # after fork() the child builds its own client instead of sharing the parent's connections
    parent_client = storage.s3_client()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            ok = storage.s3_client() is not parent_client and storage.read_bytes(url) == b"via AWS_ENDPOINT_URL"
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert storage.s3_client() is parent_client


@pytest.mark.s3
def test_s3_wrong_credentials_permission_error_without_secrets(s3_env, monkeypatch, caplog) -> None:
    server, bucket = s3_env
    url = f"s3://{bucket}/secret/thing.json"
    storage.write_bytes(url, b"{}")
    caplog.set_level(logging.DEBUG, logger="modalmill")

    wrong_secret = "WRONGsecret" + server.secret_key[::-1]
    for key_id, secret in ((server.access_key, wrong_secret), ("AKWRONGKEYID0000001", server.secret_key)):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        storage.clear_s3_client_cache()
        forbidden = (key_id, secret, server.access_key, server.secret_key)

        def atomic() -> None:
            with storage.atomic_write(url) as f:
                f.write(b"x")

        calls = {
            "read_bytes": lambda: storage.read_bytes(url),
            "open_read": lambda: storage.open_read(url),
            "size": lambda: storage.size(url),
            "exists": lambda: storage.exists(url),
            "list_files": lambda: storage.list_files(f"s3://{bucket}/secret"),
            "expand": lambda: storage.expand(f"s3://{bucket}/secret/*.json"),
            "write_bytes": lambda: storage.write_bytes(url, b"x"),
            "atomic_write": atomic,
            "remove": lambda: storage.remove(url),
        }
        for name, call in calls.items():
            with pytest.raises(PermissionError) as info:
                call()
            text = str(info.value)
            assert url in text or f"s3://{bucket}/secret" in text, (name, text)
            rendered = "".join(traceback.format_exception(info.value))
            for value in forbidden:
                assert value not in text, (name, "credential in message")
                assert value not in rendered, (name, "credential in traceback")
    for record in caplog.records:
        for value in (server.access_key, server.secret_key, wrong_secret):
            assert value not in record.getMessage()

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    storage.clear_s3_client_cache()
    assert storage.read_bytes(url) == b"{}"  # the object was never overwritten nor deleted


@pytest.mark.s3
def test_s3_no_credentials_is_permission_error(s3_env, monkeypatch) -> None:
    _, bucket = s3_env
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage.clear_s3_client_cache()
    with pytest.raises(PermissionError, match="credentials"):
        storage.read_bytes(f"s3://{bucket}/x")


# ============================================================================ flaky S3 (fault injection)


@pytest.mark.s3
def test_s3_throttling_503_is_retried(flaky_s3) -> None:
    proxy, bucket = flaky_s3
    url = f"s3://{bucket}/throttled.bin"
    data = os.urandom(200_000)
    proxy.throttle(2, method="PUT")
    storage.write_bytes(url, data)
    proxy.throttle(2, method="GET")
    assert storage.read_bytes(url) == data
    outcomes = [r.outcome for r in proxy.requests_matching(path_contains="throttled.bin")]
    assert outcomes == ["slowdown", "slowdown", "forwarded 200"] * 2

    proxy.throttle(1, method="PUT")  # atomic_write's upload goes through s3transfer: retried as well
    _atomic_write_bytes(url + ".2", data[::-1])
    assert storage.read_bytes(url + ".2") == data[::-1]


@pytest.mark.s3
def test_s3_server_errors_500_are_retried(flaky_s3) -> None:
    proxy, bucket = flaky_s3
    url = f"s3://{bucket}/five-hundred.bin"
    data = os.urandom(100_000)
    proxy.fail(2, status=500)
    storage.write_bytes(url, data)
    proxy.fail(2, status=502)
    assert storage.exists(url)
    proxy.fail(3, status=500)
    assert storage.read_bytes(url) == data
    proxy.fail(2, status=504)
    assert storage.list_files(f"s3://{bucket}") == [url]
    assert len([r for r in proxy.requests if r.outcome.startswith("error")]) == 9


@pytest.mark.s3
def test_s3_multipart_upload_survives_failed_requests(flaky_s3, monkeypatch) -> None:
    proxy, bucket = flaky_s3
    # smaller parts than in production so that a multipart upload through the proxy stays quick
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 6 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    url = f"s3://{bucket}/multi.tar"
    data = os.urandom(12 * 1024 * 1024)
    proxy.fail(1, status=500, method="POST", path_contains="multi.tar")  # CreateMultipartUpload
    proxy.fail(2, status=503, method="PUT", path_contains="partNumber=")  # two UploadPart calls
    _atomic_write_bytes(url, data)
    outcomes = [r.outcome for r in proxy.requests_matching(path_contains="multi.tar")]
    assert outcomes.count("error 500") == 1 and outcomes.count("error 503") == 2
    assert len(proxy.requests_matching("PUT", "partNumber=")) == 3 + 2  # 3 parts, 2 of them sent twice
    etag = proxy.upstream.client().head_object(Bucket=bucket, Key="multi.tar")["ETag"].strip('"')
    assert etag.endswith("-3")
    assert storage.read_bytes(url) == data


@pytest.mark.s3
def test_s3_get_dropped_mid_body_is_resumed(flaky_s3, caplog) -> None:
    proxy, bucket = flaky_s3
    caplog.set_level(logging.DEBUG, logger="modalmill")
    url = f"s3://{bucket}/dropped.bin"
    data = os.urandom(3 * 1024 * 1024)
    storage.write_bytes(url, data)

    proxy.drop_body(2, after_bytes=100_000, path_contains="dropped.bin")
    assert storage.read_bytes(url) == data
    gets = proxy.requests_matching("GET", "dropped.bin")
    assert [r.outcome for r in gets] == ["drop after 100000 B", "drop after 100000 B", "forwarded 206"]
    assert [r.headers.get("Range") for r in gets] == [None, "bytes=100000-", "bytes=200000-"]
    assert all(r.headers.get("If-Match") for r in gets[1:])  # a replaced object would not be spliced in
    assert any("resuming with a Range GET" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        assert proxy.secret_key not in record.getMessage() and proxy.access_key not in record.getMessage()

    # a tar read with tarfile's streaming mode survives a drop too
    members = {f"s{i}.jpg": os.urandom(300_000) for i in range(4)}
    tar_url = f"s3://{bucket}/dropped.tar"
    storage.write_bytes(tar_url, _make_tar(members))
    proxy.drop_body(1, after_bytes=500_000, path_contains="dropped.tar")
    assert _read_tar_stream(tar_url) == members
    assert proxy.requests_matching("GET", "dropped.tar")[0].outcome == "drop after 500000 B"


@pytest.mark.s3
def test_s3_permanently_failing_object_gives_clear_error(flaky_s3, monkeypatch) -> None:
    proxy, bucket = flaky_s3
    monkeypatch.setenv("MODALMILL_S3_READ_RETRIES", "3")
    monkeypatch.setenv("MODALMILL_S3_MAX_ATTEMPTS", "2")
    storage.clear_s3_client_cache()
    url = f"s3://{bucket}/broken.bin"
    storage.write_bytes(url, os.urandom(500_000))

    # every GET body is cut before its first byte: no progress, so the resumptions are bounded
    proxy.drop_body(-1, after_bytes=0, path_contains="broken.bin")
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=r"broken\.bin: connection lost at byte 0 .*gave up after 3"):
        storage.read_bytes(url)
    assert time.monotonic() - start < 20
    assert len(proxy.requests_matching("GET", "broken.bin")) == 4  # the first GET and 3 resumptions

    # a server that keeps answering 500: botocore's bounded retries, then an error naming the object
    proxy.clear_faults()
    proxy.fail(-1, status=500, path_contains="broken.bin")
    start = time.monotonic()
    with pytest.raises(OSError, match=r"broken\.bin: cannot read: InternalError \(HTTP 500\).*after 2 retries"):
        storage.read_bytes(url)
    assert time.monotonic() - start < 20

    # and one that keeps throttling
    proxy.clear_faults()
    proxy.throttle(-1, path_contains="broken.bin")
    start = time.monotonic()
    with pytest.raises(OSError, match=r"broken\.bin: cannot get the size: SlowDown.*\(HTTP 503\)"):
        storage.size(url)
    assert time.monotonic() - start < 20


# ============================================================================ moto


@pytest.mark.s3
def test_moto_roundtrip(moto_env) -> None:
    _, bucket = moto_env
    root = f"s3://{bucket}/m"
    storage.write_bytes(f"{root}/a.json", b"{}")
    with storage.atomic_write(f"{root}/b/c.tar") as f:
        f.write(_make_tar({"k.jpg": b"jpeg"}))
    assert storage.list_files(root) == [f"{root}/a.json", f"{root}/b/c.tar"]
    assert storage.expand(f"{root}/*.json") == [f"{root}/a.json"]
    assert _read_tar_stream(f"{root}/b/c.tar") == {"k.jpg": b"jpeg"}
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.read_bytes(f"{root}/missing")
    storage.remove(f"{root}/a.json")
    assert not storage.exists(f"{root}/a.json")
