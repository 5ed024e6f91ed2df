"""Multi-worker tokenizer training: two Ray Train workers (gloo, CPU) on the session's embedded Ray."""

import json
import os

import pytest

from modalmill.io import manifest
from modalmill.tokenize import checkpoint as ckpt
from modalmill.tokenize.data import TokenizerData
from modalmill.tokenize.train import _worker_cpus, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def labeled(labeled_edges):
    return labeled_edges


def test_two_workers_read_disjoint_shards_and_stay_in_sync(labeled, tmp_path):
    out = str(tmp_path / "edge_tok")
    report = train_tokenizer("canny_edge", labeled, out, preset="tiny", steps=12, workers=2,
                             cpus_per_worker=1, show_progress=False)
    assert report["workers"] == 2 and report["steps"] == 12

    # every worker read its own shards (rank r of w: shards r, r + w, ...): disjoint, covering the output
    config = ckpt.read_config(out)
    per_worker = report["data"]["per_worker"]
    assert [w["rank"] for w in per_worker] == [0, 1]
    shards = [set(w["shards"]) for w in per_worker]
    assert all(shards) and not shards[0] & shards[1]
    markers = manifest.list_markers(labeled)
    assert shards[0] | shards[1] == set(markers) and len(markers) == 2
    keys = [{k for s in w for k in markers[s]["keys"]} for w in shards]
    assert not keys[0] & keys[1]
    held = TokenizerData(labeled, "canny_edge", config["modalmill"]["training"]["holdout_fraction"]).holdout
    assert len(held) == report["held_out"]["samples"] >= 1
    for w, own in zip(per_worker, keys):
        assert w["samples_read"] == len(own - held) > 0  # every training sample of its shards, no held-out one
        assert w["steps"] == 12
    # data-parallel, not two separate runs: gradients were averaged, so both replicas end bit-identical
    assert per_worker[0]["params_sha256"] == per_worker[1]["params_sha256"]

    # rank 0 wrote the checkpoint, its config and the report; the checkpoint loads and matches the report
    for name in (ckpt.MODEL_FILE, ckpt.CONFIG_FILE, ckpt.REPORT_FILE, ckpt.PICTURE_FILE, ckpt.STATE_FILE):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert json.load(open(os.path.join(out, ckpt.REPORT_FILE))) == report
    assert report["checkpoint_hash"] == ckpt.checkpoint_hash(out)
    model, config = ckpt.load_tokenizer(out)
    assert config["modalmill"]["training"]["workers"] == 2 and config["modalmill"]["training"]["steps"] == 12
    assert model.quantizer.codebook_size == report["codebook_size"] and not model.training
    assert ckpt.load_train_state(out)["step"] == 12
    assert {"mse", "psnr", "codebook_usage"} <= set(report["after"])


def test_worker_cpus_default_to_a_share_and_impossible_requests_are_clear_errors():
    two = {"CPU": 2.0}
    assert _worker_cpus(2, False, None, two) == 1.0 and _worker_cpus(1, False, None, two) == 2.0
    assert _worker_cpus(3, False, None, two) == 0.66  # more workers than CPUs: a fraction each, not a hang
    assert _worker_cpus(2, False, 0.5, two) == 0.5
    with pytest.raises(ValueError, match="do not fit"):
        _worker_cpus(3, False, 1, two)
    with pytest.raises(ValueError, match="GPU"):
        _worker_cpus(1, True, None, two)
    assert _worker_cpus(2, True, None, {"CPU": 8.0, "GPU": 2.0}) == 1.0
