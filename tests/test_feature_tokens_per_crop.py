"""Feature-map tokens are right on any image: on a 2:1 photo, the ids of every crop of ``tok_dinov2@224``,
``tok_dinov2_global`` and ``tok_clip@224`` equal the ids of the teacher's features computed directly on that crop.

Real parts: a real photo (scikit-image's coffee, cut to 600 x 300), the Ray pipeline with tiny random DINOv2 and
CLIP teachers of the real architectures, tiny tokenizers trained by ``train_tokenizer``, ``modalmill tokenize``'s
code path. The reference is computed here without the labelers or the adapters: each crop cut from the stored rgb
with PIL, resized (bicubic) to 224, flipped when its flag says so, normalised, run through the teacher and encoded
by the tokenizer model.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from modalmill.jobs.check import check_output
from modalmill.jobs.runner import EXIT_OK, run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.jobs.tokenize_output import tokenize_output
from modalmill.labelers import get_labeler
from modalmill.schemas.modalities import get_modality
from modalmill.tokenize.checkpoint import load_tokenizer
from modalmill.tokenize.train import train_tokenizer
from tests.tiny_models import save_tiny_clip, save_tiny_dinov2

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
N_CROPS = 4
CPU = {"num_cpus": 0.25, "num_gpus": 0, "memory_mb": 0}  # no Ray memory reservation: a loaded machine can place it
TOKENS = {"tok_dinov2@224": "dinov2", "tok_dinov2_global": "dinov2_global", "tok_clip@224": "clip"}


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path) as t:
        return {m.name.split(".", 1)[0]: t.extractfile(m).read() for m in t.getmembers()}


def _crop_input(rgb: np.ndarray, row) -> torch.Tensor:
    """One crop as 4M feeds its teacher: cut, PIL resize (bicubic) to 224, hflip, ImageNet mean/std."""
    top, left, h, w, flip = (int(v) for v in row)
    pil = Image.fromarray(np.ascontiguousarray(rgb[top:top + h, left:left + w])).resize((224, 224), Image.BICUBIC)
    if flip:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)[None].float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def tokenized(ray_local, tmp_path_factory):
    from skimage import data

    root = tmp_path_factory.mktemp("percrop")
    photos = root / "photos"
    photos.mkdir()
    Image.fromarray(data.coffee()[50:350]).save(photos / "coffee.jpg", quality=95)  # 600 x 300: 2:1
    Image.fromarray(data.chelsea()).save(photos / "chelsea.jpg", quality=95)  # a second photo: one is held out
    weights = root / "weights"
    weights.mkdir()
    tiny = {"dinov2": {"weights": save_tiny_dinov2(str(weights / "dinov2"))}, "clip": save_tiny_clip(str(weights))}
    out = root / "out"
    mods = ["rgb", "crop_settings", "dinov2", "dinov2_global", "clip", "clip_global"]
    spec = job_from_dict({"input": str(photos), "output": str(out), "modalities": mods, "seed": 3,
                          "crops": {"n_crops": N_CROPS, "scale_min": 0.3},
                          "labelers": {n: {"config": cfg, "resources": CPU} for n, cfg in tiny.items()}})
    assert run_job(spec, show_progress=False)["exit_code"] == EXIT_OK
    ck = {}
    for tok, source in TOKENS.items():
        ck[tok] = str(root / "ck" / source)
        train_tokenizer(source, str(out), ck[tok], preset="tiny", steps=2, use_ray=False, show_progress=False)
    # tok_dinov2@224 through `modalmill tokenize`'s own path (a Ray pipeline run); the other two with the same
    # tokenizer labelers called in-process on the stored labels (one Ray run per token modality would be slow here)
    s = tokenize_output(str(out), ["tok_dinov2@224"], {"tok_dinov2@224": ck["tok_dinov2@224"]}, show_progress=False)
    assert s["exit_code"] == EXIT_OK, s
    return {"out": out, "tiny": tiny, "ck": ck}


def _tokens_in_process(out, tok: str, checkpoint: str, key: str) -> np.ndarray:
    from modalmill.labelers.base import LabelInput
    from modalmill.tokenize.labelers import labeler_for_token_modality

    cls = labeler_for_token_modality(tok)
    m = {d: _members(out / d / "shard-00000.tar")[key] for d in ("rgb", "crop_settings", cls.source)}
    rgb = get_modality("rgb").decode(m["rgb"])
    inp = LabelInput(key, rgb, (rgb.shape[1], rgb.shape[0]), get_modality("crop_settings").decode(m["crop_settings"]),
                     {cls.source: get_modality(cls.source).decode(m[cls.source])})
    lab = cls({"checkpoint": checkpoint, "device": "cpu"})
    (res,) = lab.process_batch(lab.prepare([inp]))
    return res[tok]


def test_every_crop_of_a_2to1_photo_is_tokenized_from_the_teacher_run_on_that_crop(tokenized):
    from transformers import Dinov2Model

    out, tiny, ck = tokenized["out"], tokenized["tiny"], tokenized["ck"]
    m = {d: _members(out / d / "shard-00000.tar") for d in ["rgb", "crop_settings", "dinov2", "tok_dinov2@224"]}
    key = "coffee"
    assert set(m["rgb"]) == {"coffee", "chelsea"}
    rgb = get_modality("rgb").decode(m["rgb"][key])
    crops = np.load(io.BytesIO(m["crop_settings"][key]))
    assert rgb.shape[:2] == (300, 600) and crops.shape == (N_CROPS, 5)
    assert crops[:, 4].any() and not crops[:, 4].all(), "the seed must give flipped and unflipped crops"
    stored = np.load(io.BytesIO(m["dinov2"][key]))
    assert stored.shape == (N_CROPS, 16, 16, 32) and stored.dtype == np.float16

    from modalmill.labelers.dinov2 import official_pos_interpolation

    dino = Dinov2Model.from_pretrained(tiny["dinov2"]["weights"]).eval()
    official_pos_interpolation(dino.embeddings)  # 4M-21's teacher: facebookresearch/dinov2's interpolation
    clip = get_labeler("clip")(tiny["clip"])
    clip.setup()
    visual = clip.model
    models = {tok: load_tokenizer(ck[tok])[0].eval() for tok in TOKENS}
    expected = {tok: [] for tok in TOKENS}
    with torch.no_grad():
        for row in crops:
            x = _crop_input(rgb, row)
            hs = dino(pixel_values=x).last_hidden_state[0]
            out_clip = visual.forward_intermediates(x, indices=1, normalize_intermediates=True, output_fmt="NLC")
            feats = {"tok_dinov2@224": hs[1:].reshape(16, 16, -1), "tok_dinov2_global": hs[0],
                     "tok_clip@224": (out_clip["image_intermediates"][0][0] @ visual.proj).reshape(14, 14, -1)}
            for tok, f in feats.items():
                f = torch.from_numpy(f.numpy().astype(np.float16).astype(np.float32))  # as stored: float16
                f = f.permute(2, 0, 1)[None] if f.ndim == 3 else f[None, :, None, None]  # a map, or a vector
                expected[tok].append(models[tok].encode_ids(f)[0].numpy())
    for tok in TOKENS:
        got = np.load(io.BytesIO(m[tok][key])) if tok in m else _tokens_in_process(out, tok, ck[tok], key)
        want = np.stack(expected[tok]).astype(got.dtype)
        assert got.shape == want.shape == (N_CROPS, get_modality(tok).n_tokens)
        for c in range(N_CROPS):
            assert np.array_equal(got[c], want[c]), f"{tok} crop {c} {crops[c].tolist()}: ids differ"
    # the crops really are different inputs: their features (and the patch tokens) differ
    assert not np.allclose(stored[0], stored[1])
    assert any(not np.array_equal(np.load(io.BytesIO(m["tok_dinov2@224"][key]))[0],
                                  np.load(io.BytesIO(m["tok_dinov2@224"][key]))[c]) for c in range(1, N_CROPS))
    assert check_output(str(out)).ok


def test_old_single_map_features_are_a_clear_error():
    from modalmill.tokenize.fourm_inputs import FourMInput

    dinov2, glob = FourMInput("dinov2", size=224, n_channels=8), FourMInput("clip_global", size=224, n_channels=2)
    with pytest.raises(ValueError, match=r"\[n_crops, h, w, C\].*run the labeler again"):
        dinov2.prepare(np.zeros((16, 16, 8), np.float16), np.array([0, 0, 16, 16, 0]), (16, 16), 0)
    with pytest.raises(ValueError, match=r"no features for crop 2 \(has 2\)"):
        dinov2.prepare(np.zeros((2, 16, 16, 8), np.float16), np.array([0, 0, 16, 16, 0]), (16, 16), 2)
    row = glob.prepare(np.arange(6, dtype=np.float16).reshape(3, 2), None, (16, 16), 2)
    assert row.flatten().tolist() == [4, 5]  # crop 2 reads row 2 of the stored per-crop vectors
    # `modalmill check` (the registry's spec) refuses the old single-map layout too
    from modalmill.jobs.check import validate_value
    from modalmill.schemas.modalities import RecordError

    with pytest.raises(RecordError, match=r"expected 4 dims \('n_crops', 'h', 'w', 'C'\)"):
        validate_value(get_modality("dinov2"), np.zeros((16, 16, 8), np.float16), "k", None)
    with pytest.raises(RecordError, match=r"expected 2 dims"):
        validate_value(get_modality("imagebind_global"), np.zeros(8, np.float16), "k", None)
