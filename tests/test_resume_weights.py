"""Resume decides on the weights too: a checkpoint replaced in place (same local path, same s3:// URL) makes the
shards it labelled stale; ``--force`` (here ``--only dinov2_global --force``) recomputes them and only them.

Real parts: a tiny random DINOv2 (transformers ``Dinov2Model``) saved as the hub layout, the session's embedded
Ray, SeaweedFS on loopback for the s3:// case, and the CLI as a subprocess for the one-line error."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from modalmill.io import manifest, storage
from modalmill.jobs.runner import EXIT_OK, JobError, run_job, made_otherwise
from modalmill.jobs.spec import job_from_dict
from modalmill.io import hashes
from modalmill.io.hashes import cached_content_hash, content_hash
from tests.tiny_models import save_tiny_dinov2

BIN = os.path.dirname(sys.executable)
MODS = ["rgb", "crop_settings", "canny_edge", "dinov2_global"]


def digests(root, mod):
    return {u.rsplit("/", 1)[1]: hashlib.sha256(storage.read_bytes(u)).hexdigest()
            for u in storage.list_files(storage.join(str(root), mod), ".tar")}


def job(corpus, out, weights_at):
    return job_from_dict({"input": os.path.join(corpus, "shard-{00000..00001}.tar"), "output": str(out),
                          "modalities": MODS, "batch_size": 5, "decode": {"max_size": 128},
                          "labelers": {"dinov2": {"config": {"weights": weights_at}}}})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(hashes, "CACHE_DIR", str(tmp_path / "wcache"))
    return tmp_path / "wcache"


def test_stale_modalities_tells_settings_from_weights():
    marker = {"modalities": {
        "a": {"labeler": "x", "config_hash": "c1", "checkpoint": "w1"},
        "b": {"labeler": "y", "config_hash": "c2", "checkpoint": "w2"},
        "c": {"labeler": "z", "config_hash": "c3", "checkpoint": ""},
        "p": {"labeler": "tok", "config_hash": "t", "checkpoint": "tw", "refines": {"labeler": "h", "config_hash": "c4",
                                                                                    "checkpoint": "hw"}}}}
    producers = {"a": {"labeler": "x", "config_hash": "c1"}, "b": {"labeler": "y", "config_hash": "other"},
                 "c": {"labeler": "z", "config_hash": "c3"}, "p": {"labeler": "h", "config_hash": "c4"},
                 "new": {"labeler": "n", "config_hash": "n"}}
    same = {"x": "w1", "y": "w2", "z": "", "h": "hw"}
    assert made_otherwise(marker, ["a", "b", "c", "p", "new"], producers, same) == {"b": "settings"}
    replaced = {"x": "W1-new", "y": "w2", "z": "anything", "h": "hw-new"}
    assert made_otherwise(marker, ["a", "b", "c", "p"], producers, replaced) == {
        "a": "weights", "b": "settings", "p": "weights"}
    assert made_otherwise(None, ["a"], producers, replaced) == {}


def test_content_hash_is_remembered_by_file_stat_and_redone_when_replaced(tmp_path, cache):
    d = save_tiny_dinov2(tmp_path / "w")
    h = cached_content_hash(d)
    assert h == content_hash(d) and len(list((cache / "hashes").iterdir())) == 1
    # same bytes, same answer without reading: prove it by making the memo the only source of truth
    memo = next((cache / "hashes").iterdir())
    memo.write_text(memo.read_text().replace(h, "from-the-memo"))
    assert cached_content_hash(d) == "from-the-memo"
    # replaced in place, same size: rehashed
    f = os.path.join(d, "model.safetensors")
    size = os.path.getsize(f)
    save_tiny_dinov2(tmp_path / "w2", seed=1)
    shutil.copyfile(os.path.join(tmp_path, "w2", "model.safetensors"), f)
    assert os.path.getsize(f) == size
    assert cached_content_hash(d) == content_hash(d) != h


def _replace_and_check(corpus, out, weights_at, replace, cache):
    spec = job(corpus, out, weights_at)
    assert run_job(spec, show_progress=False)["exit_code"] == EXIT_OK
    first = {m: digests(out, m) for m in MODS}
    old = manifest.read_marker(str(out), "shard-00000")["modalities"]["dinov2_global"]["checkpoint"]
    assert old
    # unchanged weights: a rerun finds everything done
    again = run_job(spec, show_progress=False)
    assert (again["shards_processed"], again["shards_skipped"]) == (0, 2)

    new = replace()
    assert new != old
    with pytest.raises(JobError) as e:
        run_job(spec, show_progress=False)
    msg = str(e.value)
    for shard in ("shard-00000", "shard-00001"):
        assert f"{shard}: ['dinov2_global'] were made with other weights" in msg, msg
    assert "--only dinov2_global --force" in msg

    forced = run_job(spec, only=["dinov2_global"], force=True, show_progress=False)
    assert forced["exit_code"] == EXIT_OK and forced["shards_processed"] == 2
    for m in ("rgb", "crop_settings", "canny_edge"):  # only the stale modality was recomputed
        assert digests(out, m) == first[m], m
    assert digests(out, "dinov2_global") != first["dinov2_global"]
    for shard in ("shard-00000", "shard-00001"):
        assert manifest.read_marker(str(out), shard)["modalities"]["dinov2_global"]["checkpoint"] == new
    done = run_job(spec, show_progress=False)
    assert (done["shards_processed"], done["shards_skipped"]) == (0, 2)


def test_checkpoint_replaced_in_place_locally(ray_local, demo_corpus, tmp_path, cache):
    w = save_tiny_dinov2(tmp_path / "dinov2")

    def replace():
        shutil.rmtree(w)
        save_tiny_dinov2(w, seed=7)  # same path, same file names and sizes, other weights
        return content_hash(w)

    _replace_and_check(demo_corpus, tmp_path / "out", w, replace, cache)

    # the CLI says it in one line, exit 1, and names the modality and shards
    shutil.rmtree(w)
    save_tiny_dinov2(w, seed=8)
    jobfile = tmp_path / "job.yaml"
    jobfile.write_text(f"input: '{os.path.join(demo_corpus, 'shard-{00000..00001}.tar')}'\noutput: {tmp_path / 'out'}\n"
                       f"modalities: [{', '.join(MODS)}]\nbatch_size: 5\ndecode: {{max_size: 128}}\n"
                       f"labelers: {{dinov2: {{config: {{weights: '{w}'}}}}}}\n")
    r = subprocess.run([f"{BIN}/python", "-m", "modalmill", "run", str(jobfile), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: cannot run this job on the existing output")
    for shard in ("shard-00000", "shard-00001"):  # one line per stale shard, naming the modality
        assert f"{shard}: ['dinov2_global'] were made with other weights" in r.stderr, r.stderr


def test_checkpoint_replaced_in_place_on_s3(ray_local, s3_env, demo_corpus, tmp_path, cache):
    server, bucket = s3_env
    client = server.client()
    url = f"s3://{bucket}/weights/dinov2/"

    def upload(seed):
        d = save_tiny_dinov2(tmp_path / f"dinov2-{seed}", seed=seed)
        for name in sorted(os.listdir(d)):
            client.upload_file(os.path.join(d, name), bucket, f"weights/dinov2/{name}")
        return content_hash(d)

    upload(0)

    def replace():
        versions = len([p for p in (cache / "s3").rglob("*") if p.is_dir() and p.parent.parent == cache / "s3"])
        assert versions == 1  # the unchanged checkpoint was fetched once, not once per run
        return upload(5)

    _replace_and_check(demo_corpus, f"s3://{bucket}/out", url, replace, cache)
