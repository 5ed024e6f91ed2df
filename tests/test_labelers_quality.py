"""LAION's aesthetic predictor and watermark detector (labelers/quality.py) with tiny random configurations of the
same classes: loading, preprocessing and scores equal a direct computation with open_clip / timm; in a job, the
scores reach `metadata` through `metadata_quality`, and a score the input carries wins."""

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from modalmill.io import manifest
from modalmill.io.tars import iter_tar_groups
from modalmill.jobs.democorpus import photos
from modalmill.jobs.runner import EXIT_OK, run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.labelers.base import LabelInput
from modalmill.labelers.quality import (AESTHETIC_HEAD_PIN, LaionAestheticLabeler, LaionWatermarkLabeler,
                                        aesthetic_head, watermark_net)
from tests.tiny_models import save_tiny_clip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("quality")
    clip = save_tiny_clip(str(d))
    torch.manual_seed(1)
    head = aesthetic_head(16)
    with torch.no_grad():  # spread the random head's output over the score range
        head.layers[7].bias.fill_(5.0)
        head.layers[7].weight.mul_(50.0)
    torch.save(head.state_dict(), str(d / "head.pth"))
    torch.manual_seed(2)
    wm = watermark_net("test_efficientnet")
    torch.save({"weights": wm.state_dict()}, str(d / "watermark.pt"))  # LAION's training-script layout
    return {"aesthetic": {"weights": clip["weights"], "arch": clip["arch"], "head": str(d / "head.pth"),
                          "device": "cpu"},
            "watermark": {"weights": str(d / "watermark.pt"), "arch": "test_efficientnet", "device": "cpu"},
            "head": head.eval(), "wm": wm.eval(), "clip": clip}


def _inputs(n=3):
    pics = list(photos().values())[:n]
    return [LabelInput(key=f"k{i}", image=p, original_size=p.shape[1::-1], crops=np.zeros((1, 5), np.int64))
            for i, p in enumerate(pics)]


def test_aesthetic_matches_a_direct_open_clip_computation(tiny):
    import open_clip

    lab = LaionAestheticLabeler(tiny["aesthetic"])
    got = [float(r["aesthetic_score"]) for r in lab.process_batch(_inputs())]
    model = open_clip.create_model("tiny-clip-b16", pretrained=tiny["clip"]["weights"]).eval()
    _, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-b16", pretrained=None)
    want = []
    with torch.no_grad():
        for inp in _inputs():
            e = model.encode_image(preprocess(Image.fromarray(inp.image))[None]).float()
            want.append(float(tiny["head"](e / e.norm(dim=-1, keepdim=True))))
    want = np.clip(want, 0, 10)
    # open_clip's preprocessing resizes with PIL as modalmill's prepare does; tolerance for float order differences
    assert np.allclose(got, want, atol=2e-3), (got, want)
    assert all(0 <= g <= 10 for g in got) and len(set(np.round(got, 3))) > 1


def test_watermark_matches_laions_preprocessing_and_head(tiny):
    from torchvision import transforms as T

    lab = LaionWatermarkLabeler(tiny["watermark"])
    got = [float(r["watermark_score"]) for r in lab.process_batch(_inputs())]
    pre = T.Compose([T.Resize((256, 256)), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.no_grad():
        x = torch.stack([pre(Image.fromarray(i.image)) for i in _inputs()])
        want = torch.softmax(tiny["wm"](x), dim=1)[:, 0].numpy()
    assert np.allclose(got, want, atol=1e-3), (got, want)


def test_default_weights_are_pinned():
    assert LaionAestheticLabeler.weights and LaionWatermarkLabeler.weights.startswith("https://")
    assert AESTHETIC_HEAD_PIN.sha256 and AESTHETIC_HEAD_PIN.size == 3714759


def test_wrong_weights_are_a_clear_error(tiny, tmp_path):
    torch.save(aesthetic_head(32).state_dict(), str(tmp_path / "bad.pth"))
    lab = LaionAestheticLabeler({**tiny["aesthetic"], "head": str(tmp_path / "bad.pth")})
    with pytest.raises(Exception, match="aesthetic head"):
        lab.setup()


def _jpeg(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_job_fills_metadata_from_the_input_else_the_models(ray_local, tiny, tmp_path):
    pics = list(photos().values())[:4]
    rows = [{"id": f"s{i}", "image": _jpeg(np.asarray(Image.fromarray(p).resize((96, 80)))),
             "aesthetic_score_laion_v2": 6.25 if i < 2 else None, "watermark_score": 0.75 if i < 2 else None}
            for i, p in enumerate(pics)]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "c.parquet"))
    out = tmp_path / "out"
    job = job_from_dict({"input": str(tmp_path / "c.parquet"), "output": str(out),
                         "modalities": ["rgb", "crop_settings", "aesthetic_score", "watermark_score", "metadata"],
                         "crops": {"n_crops": 1}, "parquet": {"image_column": "image", "id_column": "id"},
                         "labelers": {"laion_aesthetic": {"config": tiny["aesthetic"]},
                                      "laion_watermark": {"config": tiny["watermark"]}, "metadata_quality": {}}})
    assert run_job(job, show_progress=False)["exit_code"] == EXIT_OK
    (shard,) = manifest.list_markers(str(out))
    meta = {k: json.loads(m["json"]) for k, m in iter_tar_groups(os.path.join(out, "metadata", f"{shard}.tar"))}
    aes = {k: float(np.load(io.BytesIO(m["npy"])).reshape(-1)[0])
           for k, m in iter_tar_groups(os.path.join(out, "aesthetic_score", f"{shard}.tar"))}
    wm = {k: float(np.load(io.BytesIO(m["npy"])).reshape(-1)[0])
          for k, m in iter_tar_groups(os.path.join(out, "watermark_score", f"{shard}.tar"))}
    for k in ("s0", "s1"):
        assert meta[k]["aesthetic_score"] == 6.25 and meta[k]["watermark_score"] == 0.75
    for k in ("s2", "s3"):
        assert meta[k]["aesthetic_score"] == pytest.approx(aes[k], abs=1e-4)
        assert meta[k]["watermark_score"] == pytest.approx(wm[k], abs=1e-4)
    rows = {r.key: r for r in manifest.read_rows(str(out), shard)}
    assert rows["s0"].score_sources and rows["s2"].score_sources is None


TINY_CLIP_TEXT = {"embed_dim": 16, "quick_gelu": True,
                  "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


def test_clip_score_is_the_image_caption_cosine_of_open_clip(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    from modalmill.labelers.quality import ClipScoreLabeler

    arch = str(tmp_path / "tiny-clip-text.json")
    with open(arch, "w") as f:
        json.dump(TINY_CLIP_TEXT, f)
    open_clip.add_model_config(arch)
    torch.manual_seed(3)
    model = open_clip.create_model("tiny-clip-text", pretrained=None).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    lab = ClipScoreLabeler({"weights": str(tmp_path), "arch": arch, "device": "cpu"})
    caps = ["a cat", "a red cup of coffee on a table", "the surface of the moon"]
    inputs = _inputs()
    for inp, c in zip(inputs, caps):
        inp.labels["caption"] = [c]
    got = [float(r["clip_score"]) for r in lab.process_batch(inputs)]
    _, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-text", pretrained=None)
    tok = open_clip.get_tokenizer("tiny-clip-text")
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(i.image)) for i in _inputs()]))
        txt = model.encode_text(tok(caps))
        want = torch.nn.functional.cosine_similarity(img, txt).numpy()
    assert np.allclose(got, want, atol=1e-3), (got, want)
    assert all(-1 <= g <= 1 for g in got)
