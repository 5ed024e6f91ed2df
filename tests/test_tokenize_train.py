"""Training end to end: label the demo corpus, train tiny tokenizers with Ray Train's TorchTrainer, resume."""

import json
import os

import pytest
from PIL import Image

from modalmill.tokenize import checkpoint as ckpt
from modalmill.tokenize.train import default_out, format_report, train_tokenizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def labeled(labeled_edges):
    return labeled_edges


def _check_dir(path, modality):
    for name in (ckpt.MODEL_FILE, ckpt.CONFIG_FILE, ckpt.REPORT_FILE, ckpt.PICTURE_FILE, ckpt.STATE_FILE):
        assert os.path.getsize(os.path.join(path, name)) > 0, name
    config = json.load(open(os.path.join(path, ckpt.CONFIG_FILE)))
    assert config["modality"] == modality and config["n_tokens"] == 196 and config["training"]["steps"] > 0
    assert ckpt.read_config(path) == config  # the same config travels inside model.safetensors
    with Image.open(os.path.join(path, ckpt.PICTURE_FILE)) as im:
        assert im.format == "PNG" and im.width > 2 * 224 * 0.9
    report = json.load(open(os.path.join(path, ckpt.REPORT_FILE)))
    for part in ("before", "after"):
        assert {"mse", "psnr", "codebook_usage", "perplexity", "codes_used"} <= set(report[part])
    assert report["checkpoint_hash"] == ckpt.checkpoint_hash(path)
    assert report["held_out"]["samples"] >= 1 and report["workers"] == 1
    assert len(format_report(report)) >= 4
    return report


def test_edge_tokenizer_trained_with_ray_train_beats_the_trivial_baseline(labeled):
    report = train_tokenizer("canny_edge", labeled, preset="tiny", quantizer="fsq", steps=40, workers=1,
                             cpus_per_worker=1, show_progress=False)
    path = default_out(labeled, "canny_edge")
    assert report["checkpoint"] == os.path.join(path, ckpt.MODEL_FILE)
    _check_dir(path, "canny_edge")
    after, before, base = report["after"], report["before"], report["baseline"]
    assert report["steps"] == 40 and report["quantizer"] == "fsq" and report["codebook_size"] == 240
    # held-out edge maps: lower error than the untrained model and than "edge probability = mean everywhere"
    assert after["mse"] < before["mse"] and after["mse"] < 0.95 * base["mse"], (before, after, base)
    assert after["codes_used"] > before["codes_used"]
    model, _ = ckpt.load_tokenizer(path)
    assert model.quantizer.codebook_size == 240 and not model.training


def test_rgb_tokenizer_resumes_from_its_saved_state(labeled, tmp_path):
    out = str(tmp_path / "rgb_tok")
    first = train_tokenizer("rgb", labeled, out, preset="tiny", quantizer="vq", steps=20, use_ray=False,
                            show_progress=False)
    state = ckpt.load_train_state(out)
    assert state["step"] == 20 and first["steps"] == 20
    # the same command with more steps, now on Ray Train: continues at step 20, keeps the history and the
    # "before" evaluation of the untrained model, and only trains the 10 new steps
    second = train_tokenizer("rgb", labeled, out, preset="tiny", quantizer="vq", steps=30, workers=1,
                             cpus_per_worker=1, show_progress=False)
    report = _check_dir(out, "rgb")
    assert second["steps"] == 30 and ckpt.load_train_state(out)["step"] == 30
    assert [h[0] for h in second["history"]] == [10, 20, 30]
    assert second["history"][:2] == first["history"] and second["before"] == first["before"]
    assert report["checkpoint_hash"] != first["checkpoint_hash"]
    assert second["after"]["codes_used"] > 1
    # a finished run is not retrained; a different architecture in the same directory is refused
    third = train_tokenizer("rgb", labeled, out, preset="tiny", quantizer="vq", steps=30, use_ray=False,
                            show_progress=False)
    assert third["history"] == second["history"] and third["checkpoint_hash"] == second["checkpoint_hash"]
    with pytest.raises(ValueError, match="another config"):
        train_tokenizer("rgb", labeled, out, preset="tiny", quantizer="fsq", steps=30, use_ray=False,
                        show_progress=False)
