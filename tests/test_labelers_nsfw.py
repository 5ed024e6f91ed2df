"""LAION's CLIP-based NSFW detector (labelers/nsfw.py): the released Keras SavedModel converted without TensorFlow
(every variable and vocabulary found, checked against the graph's own constants), the torch head equal to a
plain numpy transcription of the Keras layers, and the labeler on a tiny random CLIP + head equal to a direct
open_clip computation. Not fidelity-tested against TensorFlow itself (no TensorFlow 2.8 for this Python)."""

import hashlib
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from modalmill.jobs.democorpus import photos
from modalmill.labelers.base import LabelInput
from modalmill.labelers.nsfw import (NSFW_PIN, LaionNsfwLabeler, code, convert_keras_nsfw, load_nsfw_head,
                                     nsfw_head)
from modalmill.labelers.tf_savedmodel import graph_nodes
from tests.tiny_models import save_tiny_clip

ZIP = os.path.join(os.path.dirname(__file__), "fixtures", "laion_nsfw", "clip_autokeras_binary_nsfw.zip")


def test_the_released_keras_model_converts_and_matches_its_graph():
    data = open(ZIP, "rb").read()
    assert hashlib.sha256(data).hexdigest() == NSFW_PIN.sha256 and len(data) == NSFW_PIN.size
    state = convert_keras_nsfw(ZIP)
    head = load_nsfw_head(ZIP)
    assert [tuple(head.layers[i].weight.shape) for i in (0, 2, 4, 6)] == [(64, 768), (512, 64), (256, 512), (1, 256)]
    assert head.columns == (180, 316, 413, 440, 644)  # the "int"-encoded columns of AutoKeras's encoding layer
    sizes = [len(state[f"vocab_{c}_codes"]) for c in head.columns]
    assert sizes == [10425, 2266, 2190, 2293, 2241]
    for c in head.columns:  # StringLookup's indices: 1..V (0 is the OOV index), every string distinct
        assert sorted(state[f"vocab_{c}_index"].tolist()) == list(range(1, len(state[f"vocab_{c}_index"]) + 1))
        assert len(set(state[f"vocab_{c}_codes"].tolist())) == len(state[f"vocab_{c}_codes"])
    # Keras folded the normalisation into two graph constants: they equal the variables the head loaded
    with zipfile.ZipFile(ZIP) as z:
        pb = z.read(next(n for n in z.namelist() if n.endswith("saved_model.pb")))
    nodes, _ = graph_nodes(pb)
    floats = [n.tensor() for n in nodes if n.op == "Const" and n.attrs.get("dtype") == b"0\x01"]
    vectors = [f.reshape(-1) for f in floats if f.size == 768]
    assert any(np.allclose(v, head.mean.numpy(), rtol=1e-6) for v in vectors)
    assert any(np.allclose(v, head.variance.numpy(), rtol=1e-6) for v in vectors)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 768)).astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)
    enc = head.encode(x)
    assert (enc[:, list(head.columns)] > 0).any()  # float16 values do hit the vocabularies
    with torch.no_grad():
        p = head(torch.from_numpy(enc)).numpy()
    assert ((p > 0) & (p < 1)).all() and p.std() > 0


def _keras_numpy(head, x):
    """The Keras layers transcribed in numpy: encoding (as_string '%f' + lookup), normalisation, MLP, sigmoid."""
    sd = {k: v.numpy().astype(np.float64) for k, v in head.state_dict().items()}
    z = np.where(np.isnan(x), 0, x).astype(np.float64)
    for c in head.columns:
        table = {int(k): int(i) for k, i in zip(sd[f"vocab_{c}_codes"], sd[f"vocab_{c}_index"])}
        z[:, c] = [table.get(code(f"{np.float32(v):f}"), 0) for v in x[:, c]]
    z = (z - sd["mean"]) / np.maximum(np.sqrt(sd["variance"]), 1e-7)
    for i in (0, 2, 4):
        z = np.maximum(z @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"], 0)
    z = z @ sd["layers.6.weight"].T + sd["layers.6.bias"]
    return 1 / (1 + np.exp(-z[:, 0]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("nsfw")
    clip = save_tiny_clip(str(d))
    torch.manual_seed(3)
    head = nsfw_head(16, (8, 12, 6), {2: 5, 9: 3})
    rng = np.random.default_rng(3)
    vocab = {}
    with torch.no_grad():
        for c, n in ((2, 5), (9, 3)):  # vocabularies of float16 values, as LAION's were
            vals = vocab[c] = np.float16(rng.uniform(-0.5, 0.5, n)).astype(np.float32)
            getattr(head, f"vocab_{c}_codes").copy_(torch.tensor([code(f"{np.float32(v):f}") for v in vals]))
            getattr(head, f"vocab_{c}_index").copy_(torch.arange(1, n + 1))
        head.mean.copy_(torch.from_numpy(rng.normal(0, 0.05, 16).astype(np.float32)))
        head.variance.copy_(torch.from_numpy(rng.uniform(0.001, 0.01, 16).astype(np.float32)))
        head._tables = None
    torch.save(head.state_dict(), str(d / "nsfw.pth"))
    return {"config": {"weights": clip["weights"], "arch": clip["arch"], "head": str(d / "nsfw.pth"),
                       "device": "cpu"}, "clip": clip, "head": head.eval(), "vocab": vocab}


def test_the_torch_head_is_the_keras_computation(tiny):
    head = tiny["head"]
    rng = np.random.default_rng(4)
    x = rng.normal(0, 0.3, (40, 16)).astype(np.float32)
    x[:10, 2] = np.tile(tiny["vocab"][2], 2)  # vocabulary values: looked up
    x[10, 5] = np.nan
    with torch.no_grad():
        got = head(torch.from_numpy(head.encode(x))).numpy()
    assert (head.encode(x)[:10, 2] > 0).all() and head.encode(x)[10, 5] == 0
    assert np.allclose(got, _keras_numpy(head, x), atol=1e-5)


def test_labeler_scores_a_direct_open_clip_computation(tiny):
    import open_clip

    pics = list(photos().values())[:3]
    inputs = [LabelInput(key=f"k{i}", image=p, original_size=p.shape[1::-1], crops=np.zeros((1, 5), np.int64))
              for i, p in enumerate(pics)]
    got = [float(r["nsfw_score"]) for r in LaionNsfwLabeler(tiny["config"]).process_batch(inputs)]
    model = open_clip.create_model("tiny-clip-b16", pretrained=tiny["clip"]["weights"]).eval()
    _, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-b16", pretrained=None)
    with torch.no_grad():
        e = torch.cat([model.encode_image(preprocess(Image.fromarray(p))[None]).float() for p in pics])
        e = (e / e.norm(dim=-1, keepdim=True)).half().float().numpy()
    want = _keras_numpy(tiny["head"], e)
    assert np.allclose(got, want, atol=2e-3), (got, want)
    assert all(0 <= g <= 1 for g in got)


def test_a_head_for_other_embeddings_is_a_clear_error(tiny, tmp_path):
    torch.save(nsfw_head(32, (4,), {}).state_dict(), str(tmp_path / "bad.pth"))
    with pytest.raises(Exception, match="32-d embeddings"):
        LaionNsfwLabeler({**tiny["config"], "head": str(tmp_path / "bad.pth")}).setup()
