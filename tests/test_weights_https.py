"""Default weights at https:// URLs, served by a real HTTP server on loopback that this file starts: downloaded once
into the weights cache, checked against the pinned sha256, resumed after an interrupted download, installed
atomically; a member of a tarball; what `modalmill weights` shows about them.

The labelers are the real ones (SAM, HMR 2.0) with tiny random weights; only their registry default is pointed at
the loopback server (monkeypatched class attributes), so the path exercised is the one a user's default takes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from modalmill.labelers import get_labeler
from modalmill.io import fetch as W
from modalmill.io import hashes
from modalmill.labelers.humans import OFFICIAL_CKPT
from modalmill.io.fetch import WeightsError, resolve
from modalmill.io.hashes import content_hash
from modalmill.labelers.pins import Pin
from tests.tiny_models import save_tiny_hmr2, save_tiny_sam


class _Server:
    """Serves ``files`` ({url path: bytes}) with HTTP Range support. ``cut[path] = n``: the next GET of ``path``
    announces the whole length but sends only ``n`` bytes and drops the connection (a broken download).
    ``requests`` logs (method, path, Range header or None, bytes sent)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.ranges = True
        self.requests: list[tuple[str, str, str | None, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):  # noqa: N802 - http.server's naming
                data = server.files.get(self.path)
                rng = self.headers.get("Range")
                if data is None:
                    server.requests.append(("GET", self.path, rng, 0))
                    self.send_error(404)
                    return
                start = 0
                if rng and server.ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        server.requests.append(("GET", self.path, rng, 0))
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                n = server.cut.pop(self.path, None)
                sent = body if n is None else body[:n]
                self.wfile.write(sent)
                self.wfile.flush()
                server.requests.append(("GET", self.path, rng, len(sent)))
                if n is not None:
                    self.close_connection = True
                    self.connection.shutdown(2)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def gets(self, path):
        return [r for r in self.requests if r[0] == "GET" and r[1] == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "weights-cache"
    monkeypatch.setattr(hashes, "CACHE_DIR", str(d))
    monkeypatch.setattr(W, "HTTP_BACKOFF_S", 0.0)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest turns downloads off; these tests download
    monkeypatch.delenv("MODALMILL_WEIGHTS_OFFLINE", raising=False)
    return d


@pytest.fixture(scope="module")
def sam_bytes(tmp_path_factory):
    path = save_tiny_sam(str(tmp_path_factory.mktemp("sam") / "sam_vit_h_tiny.pth"))
    with open(path, "rb") as f:
        return path, f.read()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _leftovers(cache) -> list[str]:
    return [n for _, ds, fs in os.walk(cache) for n in ds + fs if n.startswith((".tmp-", ".partial-"))]


def test_https_default_is_verified_resumed_and_then_a_cache_hit(server, cache, sam_bytes, monkeypatch):
    src, data = sam_bytes
    server.files["/models/sam_vit_h_tiny.pth"] = data
    url = server.url + "/models/sam_vit_h_tiny.pth"
    cls = get_labeler("sam")
    monkeypatch.setattr(cls, "weights", url)
    monkeypatch.setattr(cls, "weights_pin", Pin(sha256=_sha(data), size=len(data)))
    cut = len(data) // 3
    server.cut["/models/sam_vit_h_tiny.pth"] = cut  # the first download breaks off after a third

    lab = cls({"model_type": "auto"})
    lab.setup()  # the registry default: downloaded, resumed where it broke off, verified, loaded
    gets = server.gets("/models/sam_vit_h_tiny.pth")
    assert [(r[2], r[3]) for r in gets] == [(None, cut), (f"bytes={cut}-", len(data) - cut)], gets
    assert sum(r[3] for r in gets) == len(data)  # nothing was downloaded twice
    expected = torch.load(src, weights_only=True)
    assert all(torch.equal(v, expected[k]) for k, v in lab.model.state_dict().items())
    path = W.cached(url, cls.weights_pin)
    assert path and path.startswith(str(cache)) and open(path, "rb").read() == data
    assert lab.checkpoint_id() == content_hash(path) == content_hash(src)
    assert not _leftovers(cache)

    # a second run (another worker, the next job): a cache hit, no request at all
    again = cls({"model_type": "auto"})
    again.setup()
    assert len(server.gets("/models/sam_vit_h_tiny.pth")) == 2
    assert again.checkpoint_id() == lab.checkpoint_id()
    stamp = os.stat(path)
    assert resolve(url, pin=cls.weights_pin) == path and os.stat(path).st_mtime_ns == stamp.st_mtime_ns


def test_a_wrong_sha256_names_the_file_and_both_hashes(server, cache, sam_bytes, monkeypatch):
    _, data = sam_bytes
    server.files["/sam_vit_h_tiny.pth"] = data
    url = server.url + "/sam_vit_h_tiny.pth"
    wrong = "0" * 64
    cls = get_labeler("sam")
    monkeypatch.setattr(cls, "weights", url)
    monkeypatch.setattr(cls, "weights_pin", Pin(sha256=wrong, size=len(data)))
    with pytest.raises(WeightsError) as e:
        cls({"model_type": "auto"}).setup()
    msg = str(e.value)
    assert "sam_vit_h_tiny.pth" in msg and wrong in msg and _sha(data) in msg and "sha256 mismatch" in msg
    assert "\n" not in msg and "facebookresearch/segment-anything" in msg  # the labeler's hint follows
    # nothing was installed, and the wrong bytes are not kept to be resumed from
    assert W.cached(url, cls.weights_pin) is None and not _leftovers(cache)
    # a user's own copy of the file (weights: set) is not held to the default's pin
    lab = cls({"model_type": "auto", "weights": url})
    lab.setup()
    assert lab.checkpoint_id() == content_hash(W.cached(url))


def test_an_interrupted_download_is_resumed_by_the_next_run(server, cache, sam_bytes, monkeypatch):
    _, data = sam_bytes
    server.files["/w/sam.pth"] = data
    url = server.url + "/w/sam.pth"
    pin = Pin(sha256=_sha(data), size=len(data))
    monkeypatch.setattr(W, "HTTP_ATTEMPTS", 1)  # one attempt per run: the run fails, the next one resumes
    cut = 1000
    server.cut["/w/sam.pth"] = cut
    with pytest.raises(WeightsError, match=rf"{cut} bytes are kept in the cache and the next run resumes"):
        resolve(url, pin=pin)
    assert W.cached(url, pin) is None
    path = resolve(url, pin=pin)
    assert [(r[2], r[3]) for r in server.gets("/w/sam.pth")] == [(None, cut), (f"bytes={cut}-", len(data) - cut)]
    assert open(path, "rb").read() == data and not _leftovers(cache)

    # a server that ignores Range: the partial download is started over, and the result is still verified
    server.files["/w/other.pth"] = data
    server.ranges = False
    server.cut["/w/other.pth"] = cut
    monkeypatch.setattr(W, "HTTP_ATTEMPTS", 3)
    path2 = resolve(server.url + "/w/other.pth", pin=pin)
    gets = server.gets("/w/other.pth")
    assert [(r[2], r[3]) for r in gets] == [(None, cut), (f"bytes={cut}-", len(data))]
    assert open(path2, "rb").read() == data


def test_concurrent_fetches_download_once(server, cache, sam_bytes):
    _, data = sam_bytes
    server.files["/c.pth"] = data
    url = server.url + "/c.pth"
    pin = Pin(sha256=_sha(data))
    out, errors = [], []

    def fetch():
        try:
            out.append(resolve(url, pin=pin))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(out)) == 1 and len(server.gets("/c.pth")) == 1


def test_offline_and_missing_are_one_line_errors(server, cache, monkeypatch):
    with pytest.raises(WeightsError, match=r"cannot download .*/nothing.pth: HTTP 404"):
        resolve(server.url + "/nothing.pth")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as e:
        resolve(server.url + "/x.pth", how_to_get="stage it with modalmill weights fetch")
    assert "downloads are off" in str(e.value) and "/x.pth" in str(e.value) and "weights fetch" in str(e.value)
    assert not server.gets("/x.pth")


def _tarball(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def test_a_member_of_a_tarball_default(server, cache, tmp_path, monkeypatch, caplog):
    """HMR 2.0's default is a file inside 4D-Humans' hmr2_data.tar.gz: the tarball is downloaded once, the member
    extracted once; here the member is a converted tiny HMR 2.0 (the official one is ViT-H sized)."""
    weights_file = save_tiny_hmr2(str(tmp_path / "hmr2.safetensors"))
    blob = open(weights_file, "rb").read()
    member = OFFICIAL_CKPT.replace(".ckpt", ".safetensors")
    tar = _tarball({"./data/smpl_mean_params.npz": b"x" * 100, f"./{member}": blob,
                    "./logs/train/multiruns/hmr2/0/model_config.yaml": b"MODEL: {}\n"})
    server.files["/4dhumans/hmr2_data.tar.gz"] = tar
    location = f"{server.url}/4dhumans/hmr2_data.tar.gz#{member}"
    cls = get_labeler("hmr2")
    monkeypatch.setattr(cls, "weights", location)
    monkeypatch.setattr(cls, "weights_pin", Pin(note="no published hash"))  # as the real entry: unpinned
    with caplog.at_level("WARNING", logger="modalmill.io.fetch"):
        lab = cls()
        lab.setup()
    assert any("no pinned sha256" in r.getMessage() and _sha(tar) in r.getMessage() for r in caplog.records)
    path = W.cached(location)
    assert path and os.path.basename(path) == os.path.basename(member) and open(path, "rb").read() == blob
    assert lab.checkpoint_id() == content_hash(path)  # the member's own bytes (and name)
    assert len(server.gets("/4dhumans/hmr2_data.tar.gz")) == 1
    cls().setup()  # cached: no second download, no second extraction
    assert len(server.gets("/4dhumans/hmr2_data.tar.gz")) == 1 and W.cached(location) == path
    with pytest.raises(WeightsError, match=r"no member 'logs/missing.ckpt' in the tarball .*smpl_mean_params"):
        resolve(f"{server.url}/4dhumans/hmr2_data.tar.gz#logs/missing.ckpt")
    with pytest.raises(WeightsError, match="refusing the tarball member"):
        resolve(f"{server.url}/4dhumans/hmr2_data.tar.gz#../../etc/passwd")


def _fake_hub_snapshot(hub_cache, repo: str, files: dict[str, bytes], revision: str = "a" * 40) -> str:
    """A model in the local hub cache, laid out as huggingface_hub lays it out (refs/main -> snapshots/<rev>)."""
    root = hub_cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    snap = root / "snapshots" / revision
    snap.mkdir(parents=True)
    for name, blob in files.items():
        (snap / name).write_bytes(blob)
    return str(snap)


def test_hub_default_with_a_pinned_file(tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub (here from its local cache: HF_HUB_OFFLINE=1) and the pinned
    file of the snapshot is checked: a different model.safetensors is an error naming it and both hashes."""
    import huggingface_hub.constants

    monkeypatch.setattr(hashes, "CACHE_DIR", str(tmp_path / "weights-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    blob = b"safetensors bytes"
    snap = _fake_hub_snapshot(tmp_path / "hub", "org/detector", {"config.json": b"{}", "model.safetensors": blob})
    good = Pin(sha256=_sha(blob), file="model.safetensors")
    assert resolve("org/detector", pin=good) == snap
    assert resolve("org/detector@" + "a" * 40, pin=good) == snap  # a pinned revision
    assert W.cached("org/detector", good) == snap
    bad = Pin(sha256="1" * 64, file="model.safetensors")
    with pytest.raises(WeightsError) as e:
        resolve("org/detector", pin=bad, how_to_get="the hub id org/detector")
    msg = str(e.value)
    assert "model.safetensors" in msg and "1" * 64 in msg and _sha(blob) in msg and "org/detector" in msg
    with pytest.raises(WeightsError, match="the pinned file weights.bin is not in the hub snapshot"):
        resolve("org/detector", pin=Pin(sha256=_sha(blob), file="weights.bin"))
    with pytest.raises(WeightsError, match="cannot get 'org/missing' from the model hub .downloads are off"):
        resolve("org/missing")


def test_a_same_size_file_with_the_same_mtime_is_hashed_again_and_refused(cache, tmp_path):
    """The sha256 check remembers what it hashed by size, inode, mtime *and* ctime: a same-size file with other
    bytes, given the old mtime back (as a copy tool keeping times does), is hashed again and refused."""
    good, bad = b"pinned weights " * 1000, b"other weights! " * 1000
    assert len(good) == len(bad)
    path = tmp_path / "w.pth"
    path.write_bytes(good)
    pin = Pin(sha256=_sha(good), size=len(good))
    assert resolve(str(path), pin=pin) == str(path)  # hashed and remembered
    assert len(list((cache / "verified").iterdir())) == 1
    st = os.stat(path)
    path.write_bytes(bad)  # in place: same inode, same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(WeightsError, match=f"sha256 mismatch: expected {_sha(good)}, got {_sha(bad)}"):
        resolve(str(path), pin=pin)
    # copied in under the same name (a new inode), the mtime kept: refused too
    other = tmp_path / "copy.pth"
    other.write_bytes(bad)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve(str(path), pin=pin)
    path.write_bytes(good)  # the right bytes again: accepted
    assert resolve(str(path), pin=pin) == str(path)
