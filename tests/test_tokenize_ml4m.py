"""4M-format tokenizers against reference fixtures made by apple/ml-4m's own code.

tests/fixtures/ml4m_tokenizers/ holds small random-init tokenizers saved by ml-4m's classes in the hub layout
and the ids (and encoder latents) ml-4m computes on crops of real photos the way ``save_vq_tokens.py`` does
(scripts/make_ml4m_tokenizer_fixtures.py says how to rerun it). modalmill's own implementation must give the
same ids, 100 %.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from modalmill.io.fetch import WeightsError
from modalmill.tokenize import hub
from modalmill.tokenize.adapters import instance_mask_in_box
from modalmill.tokenize.fourm import FourMTokenizer
from modalmill.tokenize.fourm_inputs import fourm_input_for

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "ml4m_tokenizers")
PHOTOS = ("astronaut", "chelsea", "coffee_2to1")
IMAGE_TOKENIZERS = {"rgb": "rgb", "edge": "canny_edge", "depth": "depth", "normal": "normal",
                    "semseg": "semseg_coco"}


@pytest.fixture(scope="module")
def data():
    return np.load(os.path.join(FIX, "inputs.npz")), np.load(os.path.join(FIX, "ids.npz"))


def _tokenize(model, source, label, crops, hw, resample="bilinear"):
    inp = fourm_input_for(source, model, resample)
    x = torch.stack([inp.prepare(label, c, hw, i) for i, c in enumerate(crops)])
    with torch.inference_mode():
        ids = model.encode_ids(x).numpy()
        lat = model.quant_proj(model.encoder(model.prepare_input(x))).numpy()
    return ids, lat


@pytest.mark.parametrize("tok", list(IMAGE_TOKENIZERS))
def test_image_tokenizer_ids_equal_ml4m(data, tok):
    inputs, ref = data
    source = IMAGE_TOKENIZERS[tok]
    model, cfg = hub.load(os.path.join(FIX, tok))
    assert not model.has_decoder  # tokenizing loads the encoder and quantizer only
    for photo in PHOTOS:
        rgb = inputs[f"{photo}/rgb"]
        label = rgb if source == "rgb" else inputs[f"{photo}/{source}"]
        crops = inputs[f"{photo}/crop_settings"]
        ids, lat = _tokenize(model, source, label, crops, rgb.shape[:2])
        assert ids.shape == (len(crops), 196)
        np.testing.assert_array_equal(ids, ref[f"{photo}/{tok}"], err_msg=f"{photo} {tok}")
        # the latents before quantization agree to float16 precision (the fixture stores them as float16)
        np.testing.assert_allclose(lat, ref[f"{photo}/{tok}@latents"].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_rgb_with_pils_default_resampling(data):
    inputs, ref = data
    model, _ = hub.load(os.path.join(FIX, "rgb"))
    for photo in PHOTOS:
        rgb = inputs[f"{photo}/rgb"]
        ids, _ = _tokenize(model, "rgb", rgb, inputs[f"{photo}/crop_settings"], rgb.shape[:2], "pil_default")
        np.testing.assert_array_equal(ids, ref[f"{photo}/rgb@pil_default"])
    # bilinear and PIL's default (bicubic) give different inputs: the check above can tell them apart
    rgb = inputs["astronaut/rgb"]
    crops = inputs["astronaut/crop_settings"]
    _, lat_bl = _tokenize(model, "rgb", rgb, crops, rgb.shape[:2], "bilinear")
    _, lat_pd = _tokenize(model, "rgb", rgb, crops, rgb.shape[:2], "pil_default")
    assert np.abs(lat_bl - lat_pd).max() > 1e-2


@pytest.mark.parametrize("tok", ["dinov2", "dinov2_global"])
def test_feature_tokenizers_per_crop_equal_ml4m(data, tok):
    inputs, ref = data
    model, _ = hub.load(os.path.join(FIX, tok))
    n_tokens = 256 if tok == "dinov2" else 16
    for photo in PHOTOS:
        crops = inputs[f"{photo}/crop_settings"]
        feats = inputs[f"{photo}/{tok}"]  # the teacher's output on each crop: [n_crops, ...]
        ids, _ = _tokenize(model, tok, feats, crops, inputs[f"{photo}/rgb"].shape[:2])
        assert ids.shape == (len(crops), n_tokens)
        np.testing.assert_array_equal(ids, ref[f"{photo}/{tok}"])
        # each crop's ids come from that crop's features: crops of the 2:1 photo differ
        assert len({row.tobytes() for row in ids}) > 1


def test_feature_tokenizer_rejects_one_map_for_all_crops(data):
    inputs, _ = data
    model, _ = hub.load(os.path.join(FIX, "dinov2"))
    inp = fourm_input_for("dinov2", model)
    with pytest.raises(ValueError, match=r"features of each crop, \[n_crops, h, w, C\]"):
        inp.prepare(inputs["astronaut/dinov2"][0], inputs["astronaut/crop_settings"][0], (256, 256), 0)


def test_pose_and_sam_instance_tokenizers_equal_ml4m(data):
    inputs, ref = data
    model, _ = hub.load(os.path.join(FIX, "human_poses"))
    inp = fourm_input_for("human_poses", model)
    x = torch.stack([inp.prepare(p, None, None) for p in inputs["poses"]])
    np.testing.assert_array_equal(model.encode_ids(x).numpy(), ref["poses"])
    assert model.n_tokens == 8

    model, _ = hub.load(os.path.join(FIX, "sam_instance"))
    inp = fourm_input_for("sam_instance", model)
    counts, points = inputs["sam_polygons"], inputs["sam_points"]
    masks, start = [], 0
    for i, n in enumerate(counts):  # modalmill's in-box masks of the polygons are ml-4m's
        mask, bbox = instance_mask_in_box(points[start:start + n].reshape(-1, 1, 2), 64)
        start += n
        np.testing.assert_array_equal(mask, inputs["sam_masks"][i])
        np.testing.assert_array_equal(bbox, inputs["sam_bboxes"][i])
        masks.append(inp.prepare(mask, None, None))
    with torch.inference_mode():
        ids = model.encode_ids(torch.stack(masks)).numpy()
    assert ids.shape == (len(counts), 16)
    np.testing.assert_array_equal(ids, ref["sam_instance"])


def test_decoder_loads_on_request_and_divae_says_why_not(data):
    model, _ = hub.load(os.path.join(FIX, "rgb"), with_decoder=True)
    ids = torch.from_numpy(data[1]["astronaut/rgb"][:2].astype(np.int64))
    with torch.inference_mode():
        rec = model.decode_tokens(ids)
    assert rec.shape == (2, 3, 224, 224) and torch.isfinite(rec).all()
    edge, cfg = hub.load(os.path.join(FIX, "edge"), with_decoder=True)  # a DiVAE: diffusion decoder
    assert edge.kind == "DiVAE" and cfg["dec_type"] == "unet_tiny"
    with pytest.raises(ValueError, match="diffusion decoders are not implemented"):
        edge.decode_tokens(ids)


def test_state_dict_names_are_ml4ms(data):
    """Every tensor of the ml-4m-written file has a place in modalmill's model with the same shape, and vice
    versa (the full VQ-VAE, decoder included)."""
    from safetensors.torch import load_file

    for tok in ("rgb", "semseg", "dinov2", "dinov2_global", "human_poses", "sam_instance"):
        with open(os.path.join(FIX, tok, "config.json")) as f:
            cfg = json.load(f)
        ours = FourMTokenizer(cfg, with_decoder=True).state_dict()
        theirs = load_file(os.path.join(FIX, tok, "model.safetensors"))
        assert set(ours) == set(theirs), (tok, sorted(set(ours) ^ set(theirs))[:6])
        assert all(tuple(ours[k].shape) == tuple(theirs[k].shape) for k in ours)


def test_wrong_modality_and_missing_folder_are_clear(data, tmp_path):
    model, _ = hub.load(os.path.join(FIX, "rgb"))
    with pytest.raises(ValueError, match="depth has 1 channel, the tokenizer takes 3"):
        fourm_input_for("depth", model)
    with pytest.raises(ValueError, match="an image tokenizer cannot tokenize dinov2"):
        fourm_input_for("dinov2", model)
    with pytest.raises(WeightsError, match="not found"):
        hub.load(str(tmp_path / "nothing"))
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with pytest.raises(WeightsError, match="cannot get tokenizer 'EPFL-VILAB/4M_tokenizers_nope' from the model "
                                               "hub .HF_HUB_OFFLINE=1"):
            hub.load("EPFL-VILAB/4M_tokenizers_nope")
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def test_fixtures_are_small():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(FIX) for f in fs)
    assert total < 20e6


def test_previous_modalmill_format_is_refused_with_the_retrain_command(tmp_path):
    """A checkpoint of modalmill's previous format (its own ViT/FSQ models: safetensors metadata
    ``modalmill-tokenizer/1``) cannot be converted; loading it names the command that replaces it."""
    from safetensors.torch import save_file

    from modalmill.tokenize import checkpoint as ckpt

    old = tmp_path / "old"
    old.mkdir()
    config = {"format": ckpt.FORMAT, "modality": "canny_edge", "model": {"family": "spatial"}}
    save_file({"patch_embed.weight": torch.zeros(2, 1, 16, 16)}, str(old / "model.safetensors"),
              metadata={"format": ckpt.FORMAT, "config": json.dumps(config)})
    (old / "config.json").write_text(json.dumps(config))
    for call in (ckpt.load_tokenizer, ckpt.read_config):
        with pytest.raises(WeightsError, match=r"modalmill train-tokenizer --modality canny_edge --data OUT --force"):
            call(str(old))
    assert not hub.is_fourm_folder(str(old))
