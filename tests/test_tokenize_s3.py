"""Tokenizers on an ``s3://`` output (real SeaweedFS on loopback, credentials enforced): a labeled output in a bucket,
a tokenizer trained on it with Ray Train and in this process, the checkpoints loaded, token shards written into the
bucket."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from modalmill.jobs.runner import EXIT_OK, run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.io import hashes
from modalmill.io import manifest
from modalmill.jobs.check import check_output
from modalmill.schemas import get_modality
from modalmill.tokenize import checkpoint as ckpt
from modalmill.tokenize.fourm_inputs import fourm_input_for
from modalmill.tokenize.modality_info import MODALITY_INFO_FILE
from modalmill.tokenize.train import _storage_env, default_out, train_tokenizer

# slow: Ray Train and a tokenize pipeline on S3. `modalmill tokenize` runs in this process (click's entry point) on the
# session's Ray, started before the S3 settings existed: its actors get them from this process, the harder path (a new
# interpreter would start a Ray that inherits them; the CLI in new interpreters is tested on local outputs)
pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
N_CROPS = 2
FILES = (ckpt.MODEL_FILE, ckpt.CONFIG_FILE, ckpt.STATE_FILE, ckpt.REPORT_FILE, ckpt.PICTURE_FILE,
         MODALITY_INFO_FILE)  # + 4M's MODALITY_INFO entry for tok_canny_edge@224


def _run(cmd):
    from click.testing import CliRunner

    from modalmill.cli import main

    r = CliRunner().invoke(main, [*cmd, "--no-progress"])
    assert r.exit_code == 0, (r.output[-4000:], r.exception)
    return r.stdout


def _tar(client, bucket, key):
    data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def test_train_and_tokenize_an_s3_output(ray_local, s3_env, demo_corpus, tmp_path, monkeypatch):
    server, bucket = s3_env
    client = server.client()
    cache = tmp_path / "weights-cache"  # s3:// checkpoints are downloaded here, not into ~/.cache
    monkeypatch.setattr(hashes, "CACHE_DIR", str(cache))
    out = f"s3://{bucket}/out"

    # a small labeled output in the bucket, written by a job on the session's embedded Ray. That Ray started before
    # this test's S3 settings existed: its shard tasks get them from this process (Ray runs on this machine only)
    spec = job_from_dict({"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": out,
                          "modalities": ["rgb", "crop_settings", "canny_edge"], "batch_size": 5,
                          "crops": {"n_crops": N_CROPS}, "decode": {"max_size": 256}})
    assert run_job(spec, show_progress=False)["exit_code"] == EXIT_OK
    assert sorted(manifest.list_markers(out)) == ["shard-00000", "shard-00001"]

    # Ray Train (1 worker on the session's embedded Ray), reading the shards from S3 and writing the checkpoint,
    # training state, report and picture under the output's _modalmill/tokenizers/ by default (its workers get the
    # S3 settings the same way)
    assert _storage_env({"data": out, "out": str(tmp_path)})["AWS_ENDPOINT_URL"] == server.endpoint_url
    assert _storage_env({"data": str(tmp_path), "out": str(tmp_path)}) == {}
    remote = train_tokenizer("canny_edge", out, preset="tiny", steps=6, workers=1,
                             cpus_per_worker=1, show_progress=False)
    where = default_out(out, "canny_edge")
    assert where == f"{out}/_modalmill/tokenizers/canny_edge"
    assert remote["checkpoint"] == f"{where}/{ckpt.MODEL_FILE}" and remote["workers"] == 1 and remote["steps"] == 6
    prefix = "out/_modalmill/tokenizers/canny_edge/"
    objects = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert sorted(objects) == sorted(prefix + f for f in FILES) and all(objects.values()), objects
    (worker,) = remote["data"]["per_worker"]
    assert sorted(worker["shards"]) == ["shard-00000", "shard-00001"] and worker["samples_read"] > 0
    assert remote["held_out"]["samples"] >= 1 and remote["held_out"]["items"] >= N_CROPS
    stored_report = json.loads(client.get_object(Bucket=bucket, Key=prefix + ckpt.REPORT_FILE)["Body"].read())
    assert stored_report == remote
    config = json.loads(client.get_object(Bucket=bucket, Key=prefix + ckpt.CONFIG_FILE)["Body"].read())
    assert ckpt.read_config(where) == config and config["modalmill"]["training"]["data"] == out
    model, _ = ckpt.load_tokenizer(where)
    assert model.quantizer.codebook_size == remote["codebook_size"] == 64 and not model.training
    assert ckpt.checkpoint_hash(where) == remote["checkpoint_hash"]
    assert ckpt.load_train_state(where)["step"] == 6
    for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]:  # no temporary objects left
        assert ".tmp" not in o["Key"], o["Key"]
    for key in objects:  # the workers' S3 settings never reach the checkpoint, its state or the report
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert server.secret_key.encode() not in body and server.access_key.encode() not in body, key

    # in this process, from the same S3 data into a local directory: the same data read in the same order with
    # the same seed on one CPU thread gives the very same weights as the Ray Train worker (in-process training
    # takes the GPU when there is one)
    local_dir = str(tmp_path / "edge_tok")
    local = train_tokenizer("canny_edge", out, local_dir, preset="tiny", steps=6, use_ray=False,
                            show_progress=False)
    assert local["checkpoint"] == os.path.join(local_dir, ckpt.MODEL_FILE)
    for name in FILES:
        assert os.path.getsize(os.path.join(local_dir, name)) > 0, name
    assert ckpt.load_tokenizer(local_dir)[1]["modalmill"]["training"]["data"] == out
    if not torch.cuda.is_available():
        assert local["data"]["per_worker"][0]["params_sha256"] == worker["params_sha256"]
        assert local["checkpoint_hash"] == remote["checkpoint_hash"]
    # the same command again resumes from the training state on S3: nothing left to train, same checkpoint
    again = train_tokenizer("canny_edge", out, preset="tiny", steps=6, use_ray=False,
                            show_progress=False)
    assert again["history"] == remote["history"] and again["checkpoint_hash"] == remote["checkpoint_hash"]

    # token shards written into the bucket, with the checkpoint found under the output's _modalmill/tokenizers/
    monkeypatch.setenv("MODALMILL_WEIGHTS_CACHE", str(cache))
    said = _run(["tokenize", "--data", out, "--modalities", "canny_edge"])
    assert "2 shard(s) processed" in said and server.secret_key not in said, said
    ad = fourm_input_for("canny_edge", model)
    for shard in ("shard-00000", "shard-00001"):
        toks = _tar(client, bucket, f"out/tok_canny_edge@224/{shard}.tar")
        edges = dict(_tar(client, bucket, f"out/canny_edge/{shard}.tar"))
        crops = dict(_tar(client, bucket, f"out/crop_settings/{shard}.tar"))
        keys = manifest.read_marker(out, shard)["keys"]
        assert [n.split(".", 1)[0] for n, _ in toks] == keys and len(keys) == 5
        for name, data in toks:
            key = name.split(".", 1)[0]
            ids = np.load(io.BytesIO(data), allow_pickle=False)
            assert ids.dtype == np.int16 and ids.shape == (N_CROPS, 196) and 0 <= ids.min() <= ids.max() < 64
            # row i is stored crop i of the stored edge map, encoded by the checkpoint on S3
            edge = get_modality("canny_edge").decode(edges[f"{key}.png"])
            x = torch.stack([ad.prepare(edge, c, edge.shape[:2], i)
                             for i, c in enumerate(get_modality("crop_settings").decode(crops[f"{key}.npy"]))])
            with torch.inference_mode():
                assert np.array_equal(ids, model.encode_ids(x).numpy()), key
        rec = manifest.read_marker(out, shard)["modalities"]["tok_canny_edge@224"]
        assert rec["checkpoint"] == remote["checkpoint_hash"] and rec["n"] == 5
    report = check_output(out)
    assert report.ok, [v.line() for v in report.violations]
