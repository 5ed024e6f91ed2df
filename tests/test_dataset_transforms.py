"""The training transform: samples of mixed sizes with 4 crops each, cropped, resized and batched by a real torch
DataLoader (two worker processes), checked against a hand computation of each crop from the stored members."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import modalmill
from modalmill.dataset import FourMCrops, collate
from modalmill.io import manifest
from modalmill.io.writers import TarShardWriter
from modalmill.jobs.runner import run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.schemas import get_modality

TOK = "tok_rgb@224"
SIZE = 64
MODS = ["rgb", "crop_settings", "canny_edge", "normal", TOK, "metadata"]


@pytest.fixture(scope="module")
def output(ray_local, demo_corpus, tmp_path_factory):
    """A real output (photos of different sizes, 4 crops each) plus normals and tokens written as labelers would."""
    out = tmp_path_factory.mktemp("transforms") / "out"
    job = job_from_dict({"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": str(out),
                         "modalities": ["rgb", "crop_settings", "canny_edge", "metadata"], "crops": {"n_crops": 4},
                         "decode": {"max_size": 160}})
    assert run_job(job, show_progress=False)["exit_code"] == 0
    rng = np.random.default_rng(0)
    for shard, marker in manifest.list_markers(str(out)).items():
        with tarfile.open(out / "rgb" / f"{shard}.tar") as t:
            sizes = {m.name.split(".")[0]: Image.open(t.extractfile(m)).size for m in t.getmembers()}
        for name, make in ((TOK, lambda hw: rng.integers(0, 16384, (4, 196)).astype(np.int16)),
                           ("normal", lambda hw: rng.integers(0, 256, (*hw, 3)).astype(np.uint8))):
            spec, w = get_modality(name), TarShardWriter(str(out / name / f"{shard}.tar"))
            for key in marker["keys"]:
                hw = sizes[key][::-1]
                w.write(key, spec.ext, spec.encode(make(hw), key, image_hw=hw))
            marker["modalities"][name] = {"labeler": "test", **w.commit()}
        manifest.write_marker(str(out), shard, marker)
    return out


def member(out, modality, shard, key):
    spec = get_modality(modality)
    with tarfile.open(out / modality / f"{shard}.tar") as t:
        return t.extractfile(f"{key}.{spec.ext}").read()


def nearest(plane: np.ndarray, row, size: int) -> np.ndarray:
    """By hand: crop, then for output pixel i take source pixel floor((i + 0.5) * side / size); flip."""
    top, left, h, w, flip = row
    ys = np.minimum(((np.arange(size) + 0.5) * h / size).astype(int), h - 1)
    xs = np.minimum(((np.arange(size) + 0.5) * w / size).astype(int), w - 1)
    res = plane[top:top + h, left:left + w][ys][:, xs]
    return res[:, ::-1] if flip else res


def test_the_transform_batches_samples_of_mixed_sizes_with_4_crops(output):
    ds = modalmill.load_dataset(str(output), MODS, seed=1, transform=FourMCrops(size=SIZE, crop="random",
                                                                                interpolation={"normal": "nearest"}))
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=2))
    # 10 samples; each worker reads one shard of 5 and batches it: 4 + 4 + 1 + 1
    assert sorted(len(b["__key__"]) for b in batches) == [1, 1, 4, 4]
    first = batches[0]
    assert first["rgb"].shape == (4, 3, SIZE, SIZE) and first["rgb"].dtype == torch.uint8
    assert first["canny_edge"].shape == (4, 1, SIZE, SIZE) and first["normal"].shape == (4, 3, SIZE, SIZE)
    assert first[TOK].shape == (4, 196) and first[TOK].dtype == torch.long
    assert first["crop_settings"].shape == (4, 5) and first["__crop__"].shape == (4,)
    assert isinstance(first["metadata"], list) and isinstance(first["metadata"][0], dict)  # JSON kept as a list

    stored_sizes, crops_used, flipped = set(), set(), 0
    for b in batches:
        for i, (key, shard) in enumerate(zip(b["__key__"], b["__shard__"])):
            crops = np.load(io.BytesIO(member(output, "crop_settings", shard, key)))
            assert crops.shape == (4, 5)
            idx = int(b["__crop__"][i])
            row = [int(v) for v in crops[idx]]
            assert b["crop_settings"][i].tolist() == row
            crops_used.add(idx)
            flipped += row[4]
            top, left, h, w, flip = row
            rgb = Image.open(io.BytesIO(member(output, "rgb", shard, key))).convert("RGB")
            stored_sizes.add(rgb.size)
            want = rgb.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
            want = np.asarray(want.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else want).transpose(2, 0, 1)
            # the same decoder and filter: at most 1 level apart (rounding), on a few pixels at most
            diff = np.abs(b["rgb"][i].numpy().astype(int) - want.astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (key, diff.max())
            edge = np.asarray(Image.open(io.BytesIO(member(output, "canny_edge", shard, key))))
            assert np.array_equal(b["canny_edge"][i, 0].numpy(), nearest(edge, row, SIZE)), key  # nearest: exact
            normal = np.asarray(Image.open(io.BytesIO(member(output, "normal", shard, key))))
            want_n = np.stack([nearest(normal[..., c], row, SIZE) for c in range(3)])
            if flip:  # 4M's NormalTransform: the x component of a flipped normal is mirrored
                want_n[0] = 255 - want_n[0]
            assert np.array_equal(b["normal"][i].numpy(), want_n), key
            tokens = np.load(io.BytesIO(member(output, TOK, shard, key)))
            assert b[TOK][i].tolist() == tokens[idx].astype(int).tolist()
    assert len(stored_sizes) > 1, stored_sizes  # mixed sizes really were batched
    assert flipped and len(crops_used) > 1, (flipped, crops_used)


def test_the_centre_crop_and_errors():
    t = FourMCrops(size=8, crop="center")
    img = torch.arange(2 * 12 * 10, dtype=torch.uint8).reshape(2, 12, 10)[:1]  # [1, 12, 10]
    crops = torch.tensor([[1, 0, 10, 10, 0], [0, 0, 4, 4, 1]])
    out = t({"__key__": "k", "crop_settings": crops, "canny_edge": img, "caption": ["a", "b"]})
    assert out["__crop__"] == 0 and out["canny_edge"].shape == (1, 8, 8) and out["caption"] == ["a", "b"]
    assert torch.equal(out["canny_edge"][0], torch.from_numpy(nearest(img[0].numpy(), [1, 0, 10, 10, 0], 8)))
    with pytest.raises(ValueError, match="needs crop_settings"):
        t({"__key__": "k", "rgb": img})
    with pytest.raises(ValueError, match="crop must be"):
        FourMCrops(crop="middle")
    with pytest.raises(ValueError, match="lies outside"):
        FourMCrops(size=8, crop=1)({"__key__": "k", "crop_settings": torch.tensor([[0, 0, 4, 4, 0], [9, 9, 9, 9, 0]]),
                                    "canny_edge": img})
    json.dumps(collate([{"a": 1}, {"a": 2}])["a"].tolist())


def test_the_crops_equal_those_of_4ms_own_transforms():
    """tests/fixtures/fourm_crops/crops.npz holds what ml-4m's RGBTransform, NormalTransform and SemsegTransform
    (``image_augment``: PIL crop, PIL resize with 4M's default resampling, flip; normals' x mirrored) made of
    the same arrays and rows (scripts/make_4m_crop_fixture.py, run in ml-4m's environment)."""
    f = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "fourm_crops", "crops.npz"))
    size = int(f["size"])
    sample = {"__key__": "k", "crop_settings": torch.from_numpy(f["crops"]),
              "rgb": torch.from_numpy(f["rgb"].transpose(2, 0, 1).copy()),
              "normal": torch.from_numpy(f["normal"].transpose(2, 0, 1).copy()),
              "semseg_coco": torch.from_numpy(f["semseg"][None].copy())}
    for i, row in enumerate(f["crops"]):
        out = FourMCrops(size=size, crop=i)(sample)
        assert out["crop_settings"].tolist() == row.tolist()
        for name, theirs in (("rgb", f["rgb_4m"][i]), ("normal", f["normal_4m"][i])):
            mine = out[name].numpy().transpose(1, 2, 0).astype(int)
            # the same PIL filter; Pillow versions may round a level apart
            assert np.abs(mine - theirs.astype(int)).max() <= 1, (name, i)
        assert np.array_equal(out["semseg_coco"][0].numpy(), f["semseg_4m"][i]), i  # nearest: exact
