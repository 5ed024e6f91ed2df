"""The trainer-side loader: a real labeled output (run_job on real photos) streamed through a real DataLoader."""

import io
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import modalmill
import tests.labelers_for_tests  # noqa: F401  (registers the test labelers)
from modalmill.jobs.democorpus import build_corpus
from modalmill.jobs.runner import run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.io import manifest
from modalmill.dataset.loader import AlignmentError
from modalmill.schemas import get_modality

MODS = ["rgb", "crop_settings", "canny_edge", "color_palette", "metadata"]


def _job(inp, out, **kw):
    return job_from_dict({"input": inp, "output": str(out), "modalities": MODS, "batch_size": 4,
                          "crops": {"n_crops": 2}, "decode": {"max_size": 160}, **kw})


@pytest.fixture(scope="module")
def labeled(ray_local, demo_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("labeled") / "out"
    s = run_job(_job(os.path.join(demo_corpus, "shard-{00000..00001}.tar"), out), show_progress=False)
    assert s["exit_code"] == 0
    return str(out)


@pytest.fixture(scope="module")
def six_shards(ray_local, tmp_path_factory):
    """Six shards of two small photos each: enough shards for shuffling and splitting to show."""
    base = tmp_path_factory.mktemp("six")
    build_corpus(str(base / "corpus"), n_shards=6, per_shard=2, size_range=(64, 96))
    out = base / "out"
    s = run_job(_job(str(base / "corpus" / "shard-{00000..00005}.tar"), out), show_progress=False)
    assert s["exit_code"] == 0
    return str(out)


def marker_keys(root):
    return {name: mk["keys"] for name, mk in manifest.list_markers(root).items()}


def tar_member(root, modality, shard, key):
    with tarfile.open(os.path.join(root, modality, f"{shard}.tar")) as t:
        return t.extractfile(f"{key}.{get_modality(modality).ext}").read()


def test_dataloader_with_two_workers_yields_every_sample_once_aligned(labeled):
    ds = modalmill.load_dataset(labeled, modalities=MODS, seed=3)
    expected = marker_keys(labeled)
    assert ds.total_samples == sum(len(k) for k in expected.values()) == 10
    seen = []
    for s in DataLoader(ds, batch_size=None, num_workers=2):
        seen.append((s["__shard__"], s["__key__"]))
        # every modality is this key's own member, decoded as documented
        rgb = s["rgb"]
        assert isinstance(rgb, torch.Tensor) and rgb.dtype == torch.uint8 and rgb.shape[0] == 3
        want = get_modality("rgb").decode(tar_member(labeled, "rgb", s["__shard__"], s["__key__"]))
        assert torch.equal(rgb, torch.from_numpy(want.copy()).permute(2, 0, 1))
        edge = get_modality("canny_edge").decode(tar_member(labeled, "canny_edge", s["__shard__"], s["__key__"]))
        assert s["canny_edge"].shape == (1, *rgb.shape[1:])
        assert torch.equal(s["canny_edge"][0], torch.from_numpy(edge.copy()))
        crops = get_modality("crop_settings").decode(tar_member(labeled, "crop_settings", s["__shard__"], s["__key__"]))
        assert s["crop_settings"].dtype == torch.long and np.array_equal(s["crop_settings"].numpy(), crops)
        meta = get_modality("metadata").decode(tar_member(labeled, "metadata", s["__shard__"], s["__key__"]))
        assert s["metadata"] == meta and s["metadata"]["original_width"] >= rgb.shape[2]
        assert isinstance(s["color_palette"], list) and len(s["color_palette"][0]["7"]) == 21
    assert len(seen) == len(set(seen)) == 10
    for shard, keys in expected.items():  # within a shard, the marker's order
        assert [k for sh, k in seen if sh == shard] == keys
    raw = next(iter(modalmill.load_dataset(labeled, ["rgb"], shuffle_shards=False, decode=False)))
    assert (raw["__shard__"], raw["__key__"]) == ("shard-00000", expected["shard-00000"][0])
    assert raw["rgb"] == tar_member(labeled, "rgb", "shard-00000", raw["__key__"])


def test_shard_shuffling_changes_order_between_epochs_not_the_set(six_shards):
    ds = modalmill.load_dataset(six_shards, modalities=["rgb", "metadata"], seed=0)
    all_keys = sorted(k for keys in marker_keys(six_shards).values() for k in keys)
    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        keys = [s["__key__"] for s in DataLoader(ds, batch_size=None, num_workers=2)]
        assert sorted(keys) == all_keys
        orders.append([s.name for s in ds.shard_order()])
    assert len({tuple(o) for o in orders}) > 1, "shard order never changed between epochs"
    # deterministic: the same seed and epoch give the same order
    again = modalmill.load_dataset(six_shards, modalities=["rgb"], seed=0, epoch=2)
    assert [s.name for s in again.shard_order()] == orders[2]
    assert [s["__key__"] for s in again] == [k for sh in orders[2] for k in marker_keys(six_shards)[sh]]
    unshuffled = modalmill.load_dataset(six_shards, modalities=["rgb"], shuffle_shards=False)
    assert [s.name for s in unshuffled.shard_order()] == sorted(marker_keys(six_shards))


def test_rank_splitting_gives_disjoint_halves_covering_everything(six_shards, monkeypatch):
    all_keys = {k for keys in marker_keys(six_shards).values() for k in keys}
    halves = []
    for rank in (0, 1):
        ds = modalmill.load_dataset(six_shards, modalities=["rgb", "canny_edge"], rank=rank, world_size=2, epoch=1)
        keys = [s["__key__"] for s in DataLoader(ds, batch_size=None, num_workers=2)]
        assert len(keys) == len(set(keys)) == ds.num_samples() == 6
        halves.append(set(keys))
    assert not halves[0] & halves[1] and halves[0] | halves[1] == all_keys
    # the default comes from RANK / WORLD_SIZE when torch.distributed is not initialised
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = modalmill.load_dataset(six_shards, modalities=["rgb"], epoch=1)
    assert (ds.rank, ds.world_size) == (1, 2) and {s["__key__"] for s in ds} == halves[1]
    with pytest.raises(ValueError, match="rank must lie"):
        modalmill.load_dataset(six_shards, modalities=["rgb"], rank=2, world_size=2)


def test_sample_shuffle_buffer_is_seeded(six_shards):
    a = [s["__key__"] for s in modalmill.load_dataset(six_shards, ["rgb"], shuffle_shards=False, shuffle_buffer=8)]
    b = [s["__key__"] for s in modalmill.load_dataset(six_shards, ["rgb"], shuffle_shards=False, shuffle_buffer=8)]
    plain = [s["__key__"] for s in modalmill.load_dataset(six_shards, ["rgb"], shuffle_shards=False)]
    assert a == b and sorted(a) == sorted(plain) and a != plain


def test_missing_modality_for_some_shards_is_a_clear_error(labeled, demo_corpus, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(labeled, out)
    job = _job(os.path.join(demo_corpus, "shard-{00000..00001}.tar"), out, shards="0",
               labelers={"test_caption_or_fail": {"config": {}}})
    assert run_job(job, only=["caption"], show_progress=False)["exit_code"] == 0
    ok = modalmill.load_dataset(str(out), ["rgb", "canny_edge"])
    assert len(list(ok)) == 10
    with pytest.raises(ValueError, match=r"caption missing in 1 of 2 shard\(s\): shard-00001"):
        modalmill.load_dataset(str(out), ["rgb", "caption", "canny_edge"])
    with pytest.raises(ValueError, match="unknown modality 'nope'"):
        modalmill.load_dataset(str(out), ["rgb", "nope"])
    with pytest.raises(FileNotFoundError, match="no completed shards"):
        modalmill.load_dataset(str(tmp_path / "empty"), ["rgb"])


def test_unfinished_shards_are_never_read_and_divergence_is_an_error(labeled, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(labeled, out)
    os.remove(out / "_modalmill" / "shards" / "shard-00001.json")  # shard 1 is "still being written"
    ds = modalmill.load_dataset(str(out), ["rgb", "metadata"])
    assert {s["__shard__"] for s in ds} == {"shard-00000"}

    # reorder the metadata tar of shard 0: the zip sees a different key at position 0
    path = out / "metadata" / "shard-00000.tar"
    with tarfile.open(path) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    members[0], members[1] = members[1], members[0]
    with tarfile.open(path, "w") as t:
        for m, data in members:
            t.addfile(m, io.BytesIO(data))
    keys = manifest.read_marker(str(out), "shard-00000")["keys"]
    with pytest.raises(AlignmentError, match=rf"shard-00000, position 0: .*metadata='{keys[1]}'.*marker '{keys[0]}'"):
        list(modalmill.load_dataset(str(out), ["rgb", "metadata"]))


@pytest.mark.s3
def test_reading_from_s3_gives_the_same_samples(labeled, s3_env):
    server, bucket = s3_env
    client = server.client()
    for dirpath, _, files in os.walk(labeled):
        for name in files:
            path = os.path.join(dirpath, name)
            client.upload_file(path, bucket, "out/" + os.path.relpath(path, labeled).replace(os.sep, "/"))
    local = modalmill.load_dataset(labeled, MODS, seed=5)
    remote = modalmill.load_dataset(f"s3://{bucket}/out", MODS, seed=5)
    a, b = list(local), list(DataLoader(remote, batch_size=None, num_workers=2))
    assert [s["__key__"] for s in a] != [] and sorted(s["__key__"] for s in a) == sorted(s["__key__"] for s in b)
    by_key = {s["__key__"]: s for s in b}
    for s in a:
        r = by_key[s["__key__"]]
        assert r["__shard__"] == s["__shard__"]
        for m in ("rgb", "canny_edge", "crop_settings"):
            assert torch.equal(r[m], s[m]), m
        assert r["metadata"] == s["metadata"] and r["color_palette"] == s["color_palette"]

    # check, stats and show read the same S3 output too
    from modalmill.jobs.show import show_sample
    from modalmill.jobs.stats import corpus_stats
    from modalmill.jobs.check import check_output

    report = check_output(f"s3://{bucket}/out")
    assert report.ok and report.samples == 10 and report.markers == 2, [v.line() for v in report.violations]
    local_stats, remote_stats = corpus_stats(labeled), corpus_stats(f"s3://{bucket}/out")
    assert remote_stats["modalities"] == local_stats["modalities"]
    res = show_sample(f"s3://{bucket}/out", a[0]["__key__"], out=os.path.join(labeled, "..", "s3-show.png"))
    assert {p.modality for p in res.panels if p.ok} == set(MODS)


def test_import_modalmill_stays_light_and_load_dataset_is_lazy():
    import subprocess
    import sys

    code = ("import sys, modalmill; assert 'torch' not in sys.modules and 'webdataset' not in sys.modules; "
            "f = modalmill.load_dataset; "
            "assert 'torch' in sys.modules and f.__module__ == 'modalmill.dataset.loader'")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
