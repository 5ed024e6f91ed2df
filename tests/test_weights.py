"""Weights from s3:// (real SeaweedFS on loopback): cached by URL and version, re-fetched when the object changes,
installed atomically."""

import logging
import os
import threading

import pytest
import torch

from modalmill.io import fetch, hashes
from modalmill.io.fetch import WeightsError, resolve
from modalmill.labelers.state_dicts import load_state_dict
from modalmill.io import storage

pytestmark = pytest.mark.s3


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setattr(hashes, "CACHE_DIR", str(d))
    return d


def _ckpt(value: float) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.full((4, 4), value)}, buf)
    return buf.getvalue()


def _put(server, bucket, key, data: bytes) -> None:
    server.client().put_object(Bucket=bucket, Key=key, Body=data)


def _leftovers(cache) -> list[str]:
    return [os.path.join(d, n) for d, ds, fs in os.walk(cache) for n in ds + fs if n.startswith(".tmp-")]


def test_object_is_fetched_once_and_again_when_it_changes(s3_env, cache):
    server, bucket = s3_env
    url = f"s3://{bucket}/models/tiny.pt"
    _put(server, bucket, "models/tiny.pt", _ckpt(1.0))
    first = resolve(url)
    assert os.path.basename(first) == "tiny.pt" and str(first).startswith(str(cache))
    assert load_state_dict(first)["w"].sum() == 16
    stamp = os.stat(first)
    # unchanged object: the cached file itself, not downloaded again
    again = resolve(url)
    assert again == first
    assert (os.stat(again).st_ino, os.stat(again).st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    # replaced at the same URL (new ETag and size): downloaded again, into a version of its own
    _put(server, bucket, "models/tiny.pt", _ckpt(2.0) + b"")
    changed = resolve(url)
    assert changed != first and load_state_dict(changed)["w"].sum() == 32
    assert resolve(url) == changed
    assert load_state_dict(first)["w"].sum() == 16  # a version once installed is never modified
    assert not _leftovers(cache)


def test_same_size_rewrite_is_detected_by_etag(s3_env, cache):
    server, bucket = s3_env
    url = f"s3://{bucket}/w.bin"
    _put(server, bucket, "w.bin", b"A" * 1000)
    old = resolve(url)
    _put(server, bucket, "w.bin", b"B" * 1000)  # same key, same size
    new = resolve(url)
    assert new != old and open(new, "rb").read() == b"B" * 1000 and open(old, "rb").read() == b"A" * 1000


def test_prefix_is_one_version_of_all_its_objects(s3_env, cache):
    server, bucket = s3_env
    url = f"s3://{bucket}/dpt/"
    _put(server, bucket, "dpt/config.json", b'{"a": 1}')
    _put(server, bucket, "dpt/sub/model.safetensors", b"x" * 100)
    d1 = resolve(url)
    assert os.path.isdir(d1)
    assert sorted(os.path.relpath(os.path.join(r, f), d1) for r, _, fs in os.walk(d1) for f in fs
                  if not f.startswith(".")) == ["config.json", os.path.join("sub", "model.safetensors")]
    assert resolve(url) == d1
    assert hashes.content_hash(resolve(url.rstrip("/"))) == hashes.content_hash(d1)  # the prefix without "/"
    _put(server, bucket, "dpt/config.json", b'{"a": 2}')  # one file of the directory changes
    d2 = resolve(url)
    assert d2 != d1 and open(os.path.join(d2, "config.json")).read() == '{"a": 2}'
    assert open(os.path.join(d2, "sub", "model.safetensors"), "rb").read() == b"x" * 100
    _put(server, bucket, "dpt/extra.txt", b"new")  # a file added to the prefix is a new version too
    d3 = resolve(url)
    assert d3 not in (d1, d2) and os.path.exists(os.path.join(d3, "extra.txt"))
    assert hashes.content_hash(d1) != hashes.content_hash(d2)


def test_concurrent_fetches_install_one_complete_copy(s3_env, cache):
    server, bucket = s3_env
    url = f"s3://{bucket}/big.bin"
    data = os.urandom(3 << 20)
    _put(server, bucket, "big.bin", data)
    results, errors = [], []

    def fetch():
        try:
            results.append(resolve(url))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 4 and len(set(results)) == 1
    assert open(results[0], "rb").read() == data
    versions = [d for d in os.listdir(os.path.dirname(os.path.dirname(results[0]))) if not d.startswith(".")]
    assert len(versions) == 1 and not _leftovers(cache)


def test_object_replaced_during_the_download_is_fetched_again(s3_env, cache, monkeypatch, caplog):
    server, bucket = s3_env
    url = f"s3://{bucket}/w.pt"
    _put(server, bucket, "w.pt", _ckpt(1.0))
    real_open, calls = storage.open_read, []

    def open_then_replace(u):  # the object is replaced on the server right after the first GET starts
        f = real_open(u)
        calls.append(u)
        if len(calls) == 1:
            _put(server, bucket, "w.pt", _ckpt(3.0))
        return f

    monkeypatch.setattr(storage, "open_read", open_then_replace)
    with caplog.at_level(logging.WARNING, logger="modalmill.io.fetch"):
        path = resolve(url)
    assert len(calls) == 2 and "changed while it was downloaded" in caplog.text
    assert load_state_dict(path)["w"].sum() == 48  # the new object, in the version dir of the new object
    monkeypatch.setattr(storage, "open_read", real_open)
    assert resolve(url) == path and not _leftovers(cache)


def test_missing_object_and_unreachable_endpoint(s3_env, cache, monkeypatch, caplog):
    server, bucket = s3_env
    with pytest.raises(WeightsError, match="weights not found at .*nothing-here.pt.* Get it: see the docs"):
        resolve(f"s3://{bucket}/nothing-here.pt", how_to_get="see the docs")
    url = f"s3://{bucket}/w.pt"
    _put(server, bucket, "w.pt", _ckpt(1.0))
    cached = resolve(url)
    # the endpoint goes away: the cached copy is used (with a warning); a URL never cached is a clear error
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MODALMILL_S3_MAX_ATTEMPTS", "1")
    storage.clear_s3_client_cache()
    try:
        with caplog.at_level(logging.WARNING, logger="modalmill.io.fetch"):
            assert resolve(url) == cached
        assert "S3 unreachable" in caplog.text
        with pytest.raises(WeightsError, match="cannot reach S3 .* no copy is cached"):
            resolve(f"s3://{bucket}/other.pt")
    finally:
        storage.clear_s3_client_cache()


def test_versions_unused_for_the_keep_time_are_removed_once_another_is_in_use(s3_env, cache, monkeypatch):
    server, bucket = s3_env
    url = f"s3://{bucket}/models/kept.pt"
    _put(server, bucket, "models/kept.pt", _ckpt(1.0))
    v1 = os.path.dirname(resolve(url))
    _put(server, bucket, "models/kept.pt", _ckpt(2.0))
    v2 = os.path.dirname(resolve(url))
    assert v1 != v2 and os.path.isdir(v1)  # v1 was used moments ago: kept (a running job may still load it)
    # a staging directory of a killed download and a half-deleted version (killed while removing it)
    stale, half = os.path.join(os.path.dirname(v1), ".tmp-killed"), os.path.join(os.path.dirname(v1), ".gone-x-1")
    os.makedirs(stale)
    os.makedirs(half)
    week_ago = os.path.getmtime(v1) - fetch.KEEP_UNUSED_S - 60
    os.utime(v1, (week_ago, week_ago))
    os.utime(stale, (week_ago, week_ago))
    assert resolve(url) == os.path.join(v2, "kept.pt")  # the cached v2, used again: v1 and the leftovers go
    assert sorted(os.listdir(os.path.dirname(v2))) == [os.path.basename(v2)]
    # what was used recently is what the offline fallback picks
    assert fetch._newest_version(os.path.dirname(v2)) == v2
    monkeypatch.setattr(fetch, "KEEP_UNUSED_S", 0.0)
    _put(server, bucket, "models/kept.pt", _ckpt(3.0))
    v3 = os.path.dirname(resolve(url))
    assert os.listdir(os.path.dirname(v3)) == [os.path.basename(v3)] and load_state_dict(
        os.path.join(v3, "kept.pt"))["w"].sum() == 48
