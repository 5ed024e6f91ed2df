"""`modalmill weights` (the table of every labeler's default weights) and `modalmill weights fetch --to` staging to
an s3:// prefix (the real SeaweedFS on loopback) that a job then reads through `weights_from`."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.io import storage
from modalmill.jobs.runner import resolve_labelers
from modalmill.jobs.spec import JobSpecError, job_from_dict
from modalmill.labelers import LABELERS, get_labeler
from modalmill.io import hashes
from modalmill.io.fetch import resolve
from modalmill.io.hashes import content_hash
from modalmill.labelers.pins import Pin
from tests.test_weights_https import _Server
from tests.tiny_models import save_tiny_sam


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def online_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(hashes, "CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache"


def test_the_table_lists_every_default_with_its_pin(tmp_path, monkeypatch):
    monkeypatch.setattr(hashes, "CACHE_DIR", str(tmp_path / "empty-cache"))
    res = CliRunner().invoke(main, ["weights"])
    assert res.exit_code == 0, res.output
    lines = {ln.split()[0]: ln for ln in res.output.splitlines()[2:] if ln.strip()}
    with_defaults = {n for n, c in LABELERS.items() if getattr(c, "weights", None)}
    assert set(lines) == with_defaults and {"sam", "hmr2", "dfine_coco", "omnidata_depth", "imagebind"} <= set(lines)
    sam = get_labeler("sam")
    assert sam.weights in lines["sam"] and sam.weights_pin.sha256 in lines["sam"] and "2.4 GiB" in lines["sam"]
    assert lines["sam"].rstrip().endswith("no") and "Apache-2.0" in lines["sam"]
    assert "not pinned" in lines["hmr2"] and "hmr2_data.tar.gz#logs/" in lines["hmr2"]
    assert "(model.safetensors)" in lines["detr_coco"] and "CC-BY-NC-4.0" in lines["imagebind"]
    assert lines["rapidocr"].rstrip().endswith("bundled")
    rows = json.loads(CliRunner().invoke(main, ["weights", "--json"]).output)
    by = {r["labeler"]: r for r in rows}
    assert by["omnidata_normal"]["sha256"] == get_labeler("omnidata_normal").weights_pin.sha256
    assert by["omnidata_normal"]["size"] == 1947430960 and by["omnidata_normal"]["kind"] == "https"
    assert "mirrors" in by["omnidata_normal"]["pin_source"] and "no published" in by["hmr2"]["note"]
    assert by["dfine_coco"]["kind"] == "hub" and by["dfine_coco"]["cached"] is None


@pytest.mark.s3
def test_fetch_stages_to_s3_and_a_job_reads_it(s3_env, server, online_cache, tmp_path, monkeypatch):
    _, bucket = s3_env
    src = save_tiny_sam(str(tmp_path / "sam_vit_h_tiny.pth"))
    data = open(src, "rb").read()
    server.files["/sam_vit_h_tiny.pth"] = data
    cls = get_labeler("sam")
    monkeypatch.setattr(cls, "weights", server.url + "/sam_vit_h_tiny.pth")
    monkeypatch.setattr(cls, "weights_pin", Pin(sha256=hashlib.sha256(data).hexdigest(), size=len(data)))
    prefix = f"s3://{bucket}/weights"

    res = CliRunner().invoke(main, ["weights", "fetch", "sam", "--to", prefix])
    assert res.exit_code == 0, res.output
    assert f"weights_from: {prefix}" in res.output and len(server.gets("/sam_vit_h_tiny.pth")) == 1
    assert storage.read_bytes(f"{prefix}/sam/sam_vit_h_tiny.pth") == data
    staged = json.loads(storage.read_bytes(f"{prefix}/sam/.modalmill-weights.json"))
    assert staged["files"] == [{"path": "sam_vit_h_tiny.pth", "size": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()}]
    assert staged["pinned_sha256"] == cls.weights_pin.sha256 and staged["licence"] == cls.license
    # now cached here: the table says so
    line = next(ln for ln in CliRunner().invoke(main, ["weights"]).output.splitlines() if ln.startswith("sam "))
    assert "yes: " + str(online_cache) in line

    # a job naming the prefix: the labeler reads PREFIX/sam (the staged folder) without any https request
    mods = ["rgb", "sam_mask"]
    spec = job_from_dict({"input": "/x/s-{0..1}.tar", "output": "/x/out", "modalities": mods,
                          "weights_from": prefix, "labelers": {"sam": {"config": {"model_type": "auto"}}}})
    (run,) = resolve_labelers(spec, mods)
    assert run.config == {"model_type": "auto", "weights": f"{prefix}/sam"}
    lab = cls(run.config)
    lab.setup()
    assert lab.checkpoint_id() == content_hash(src) and len(server.gets("/sam_vit_h_tiny.pth")) == 1
    # the environment variable does the same for every job; a labeler's own weights setting wins
    monkeypatch.setenv("MODALMILL_WEIGHTS_FROM", str(tmp_path / "elsewhere"))
    spec2 = job_from_dict({"input": "/x/s.tar", "output": "/x/out", "modalities": mods,
                           "labelers": {"sam": {"config": {"weights": src}}}})
    assert resolve_labelers(spec2, mods)[0].config == {"weights": src}
    spec3 = job_from_dict({"input": "/x/s.tar", "output": "/x/out", "modalities": [*mods, "ocr", "canny_edge"]})
    configs = {r.labeler: r.config for r in resolve_labelers(spec3, [*mods, "ocr", "canny_edge"])}
    assert configs["sam"] == {"weights": str(tmp_path / "elsewhere" / "sam")}
    assert configs["rapidocr"] == {} and configs["canny_edge"] == {}  # bundled weights / model-free: untouched
    assert resolve(f"{prefix}/sam") == resolve(f"{prefix}/sam")  # cached by object version


def test_fetch_errors(online_cache):
    res = CliRunner().invoke(main, ["weights", "fetch", "canny_edge"])
    assert res.exit_code != 0 and "no downloadable default weights" in res.output
    res = CliRunner().invoke(main, ["weights", "fetch", "rapidocr"])
    assert res.exit_code != 0 and "bundled in rapidocr" in res.output
    res = CliRunner().invoke(main, ["weights", "fetch", "no_such_labeler"])
    assert res.exit_code != 0 and "unknown labeler" in res.output
    with pytest.raises(JobSpecError, match="weights_from"):
        job_from_dict({"input": "/x/s.tar", "output": "/x/out", "modalities": ["rgb"], "weights_from": 3})
