"""Training end to end: label the demo corpus, train tiny tokenizers with Ray Train's TorchTrainer, resume."""

import json
import os

import pytest
from PIL import Image

from modalmill.tokenize import checkpoint as ckpt
from modalmill.tokenize.train import (NotStockML4MWarning, default_config, default_out, format_report,
                                      train_tokenizer, warn_if_not_stock_ml4m)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def labeled(labeled_edges):
    return labeled_edges


def _check_dir(path, modality):
    for name in (ckpt.MODEL_FILE, ckpt.CONFIG_FILE, ckpt.REPORT_FILE, ckpt.PICTURE_FILE, ckpt.STATE_FILE):
        assert os.path.getsize(os.path.join(path, name)) > 0, name
    config = json.load(open(os.path.join(path, ckpt.CONFIG_FILE)))
    mine = config["modalmill"]
    assert mine["modality"] == modality and mine["n_tokens"] == 196 and mine["training"]["steps"] > 0
    assert ckpt.read_config(path) == config
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
    report = train_tokenizer("canny_edge", labeled, preset="tiny", steps=40, workers=1,
                             cpus_per_worker=1, show_progress=False)
    path = default_out(labeled, "canny_edge")
    assert report["checkpoint"] == os.path.join(path, ckpt.MODEL_FILE)
    _check_dir(path, "canny_edge")
    after, before, base = report["after"], report["before"], report["baseline"]
    assert report["steps"] == 40 and report["quantizer"] == "lucid" and report["codebook_size"] == 64
    # held-out edge maps: lower error than the untrained model and than "edge probability = mean everywhere"
    assert after["mse"] < before["mse"] and after["mse"] < 0.95 * base["mse"], (before, after, base)
    assert after["codes_used"] >= 16  # no collapse onto a few codes (the old FSQ edge tokenizer used 1)
    model, _ = ckpt.load_tokenizer(path)
    assert model.quantizer.codebook_size == 64 and not model.training


def test_rgb_tokenizer_resumes_from_its_saved_state(labeled, tmp_path):
    out = str(tmp_path / "rgb_tok")
    first = train_tokenizer("rgb", labeled, out, preset="tiny", quantizer="lucid", steps=20, use_ray=False,
                            show_progress=False)
    state = ckpt.load_train_state(out)
    assert state["step"] == 20 and first["steps"] == 20
    # the same command with more steps, now on Ray Train: continues at step 20, keeps the history and the
    # "before" evaluation of the untrained model, and only trains the 10 new steps
    second = train_tokenizer("rgb", labeled, out, preset="tiny", quantizer="lucid", steps=30, workers=1,
                             cpus_per_worker=1, show_progress=False)
    report = _check_dir(out, "rgb")
    assert second["steps"] == 30 and ckpt.load_train_state(out)["step"] == 30
    assert [h[0] for h in second["history"]] == [10, 20, 30]
    assert second["history"][:2] == first["history"] and second["before"] == first["before"]
    assert report["checkpoint_hash"] != first["checkpoint_hash"]
    assert second["after"]["codes_used"] > 1
    # a finished run is not retrained; a different architecture in the same directory is refused
    third = train_tokenizer("rgb", labeled, out, preset="tiny", quantizer="lucid", steps=30, use_ray=False,
                            show_progress=False)
    assert third["history"] == second["history"] and third["checkpoint_hash"] == second["checkpoint_hash"]
    with pytest.raises(ValueError, match="another config"):
        train_tokenizer("rgb", labeled, out, preset="tiny", steps=30, use_ray=False, show_progress=False,
                        config={"model": {"latent_dim": 8}})
    with pytest.raises(ValueError, match="FSQ tokenizers are gone"):
        train_tokenizer("rgb", labeled, out, preset="tiny", quantizer="fsq", steps=30, use_ray=False,
                        show_progress=False)


# ml-4m's VQVAE constructor arguments (fourm/vq/vqvae.py: VQ + VQVAE); config.json may hold only these (+ modalmill)
ML4M_VQVAE_ARGS = {
    "image_size", "image_size_enc", "n_channels", "n_labels", "enc_type", "patch_proj", "post_mlp", "patch_size",
    "quant_type", "codebook_size", "num_codebooks", "latent_dim", "norm_codes", "norm_latents", "sync_codebook",
    "ema_decay", "threshold_ema_dead_code", "code_replacement_policy", "commitment_weight", "kmeans_init",
    "ckpt_path", "ignore_keys", "freeze_enc", "undo_std", "dec_type", "out_conv", "image_size_dec",
    "patch_size_dec"}


def test_trained_tokenizer_is_in_4ms_format(labeled, tmp_path):
    """Pins the format ml-4m's VQVAE.from_pretrained reads: config keys and state-dict names (a trained folder
    was checked once in ml-4m's own code with scripts/ml4m_tokenize_folder.py --test-builders: identical ids)."""
    from safetensors.torch import load_file

    out = str(tmp_path / "edge4m")
    with pytest.warns(NotStockML4MWarning, match="preset 'tiny' builds vit_d64_l1_h2_enc, vit_d64_l1_h2_dec"):
        train_tokenizer("canny_edge", labeled, out, preset="tiny", steps=2, use_ray=False, show_progress=False)
    config = json.load(open(os.path.join(out, ckpt.CONFIG_FILE)))
    assert set(config) - {"modalmill"} <= ML4M_VQVAE_ARGS
    assert config["enc_type"] == "vit_d64_l1_h2_enc" and config["dec_type"] == "vit_d64_l1_h2_dec"
    assert config["quant_type"] == "lucid" and config["norm_codes"] is True and config["n_channels"] == 1
    info = config["modalmill"]["modality_info"]
    assert info == {"type": "img", "vocab_size": 64, "patch_size": 16, "input_size": 224, "min_tokens": 0,
                    "max_tokens": 196, "encoder_embedding": ["ImageTokenEncoderEmbedding", {"vocab_size": 64}],
                    "decoder_embedding": ["ImageTokenDecoderEmbedding", {"vocab_size": 64}], "pretokenized": True,
                    "name": "tok_canny_edge@224"}
    state = load_file(os.path.join(out, ckpt.MODEL_FILE))
    expected = {"encoder.pos_emb", "encoder.proj.weight", "encoder.proj.bias", "encoder.blocks.0.norm1.weight",
                "encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.attn.proj.weight",
                "encoder.blocks.0.mlp.fc1.weight", "encoder.blocks.0.mlp.fc2.bias", "encoder.norm_mlp.weight",
                "encoder.post_mlp.fc1.weight", "quant_proj.weight", "quantize._codebook.embed",
                "quantize._codebook.cluster_size", "quantize._codebook.initted", "post_quant_proj.weight",
                "decoder.pos_emb", "decoder.blocks.0.attn.qkv.bias", "decoder.out_proj.weight",
                "decoder.post_mlp.fc2.weight"}
    assert expected <= set(state), sorted(expected - set(state))
    assert state["quantize._codebook.embed"].shape == (64, 16) and state["quant_proj.weight"].shape == (16, 64, 1, 1)
    assert all(k.split(".")[0] in {"encoder", "quant_proj", "quantize", "post_quant_proj", "decoder"} for k in state)


@pytest.mark.parametrize("source", ["rgb", "canny_edge", "depth", "normal", "semseg_coco", "sam_instance", "dinov2",
                                    "clip", "imagebind", "dinov2_global", "human_poses"])
def test_small_and_base_presets_are_sizes_unmodified_ml4m_builds(source, recwarn):
    """ml-4m's vit_models names only vit_s/b/l (fourm/vq/models/vit_models.py): small is its vit_s (width 512,
    8 blocks, 8 heads), base its vit_b; vectors use its BottleneckMLP. Only the test-sized tiny warns."""
    kw = {"in_channels": 32} if source in ("dinov2", "clip", "imagebind", "dinov2_global") else {}
    for preset, vit in (("small", "vit_s"), ("base", "vit_b")):
        model = default_config(source, preset, **kw)["model"]
        if source in ("dinov2_global", "human_poses"):
            assert model["enc_type"].startswith("BottleneckMLP/") and model["dec_type"].startswith("BottleneckMLP/")
        else:
            assert (model["enc_type"], model["dec_type"]) == (f"{vit}_enc", f"{vit}_dec"), preset
        assert warn_if_not_stock_ml4m({"modality": source, "preset": preset, "model": model})
    assert not recwarn.list
    tiny = default_config(source, "tiny", **kw)
    if tiny["model"]["enc_type"].startswith("vit_"):
        with pytest.warns(NotStockML4MWarning, match="unmodified ml-4m cannot load"):
            assert not warn_if_not_stock_ml4m(tiny)
