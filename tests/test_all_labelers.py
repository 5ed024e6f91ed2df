"""One job with every labeler of issue 3 (tiny random configurations of the real architectures, saved and loaded
through the real loading paths) on the embedded Ray, on the CPU: every modality is written for every shard,
aligned by key with rgb, every member validates against its spec, the markers and the parquet manifest name each
labeler with its version and the content hash of the checkpoint it loaded, and ``modalmill check`` is clean."""

from __future__ import annotations

import os
import tarfile

import pytest
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.jobs.runner import EXIT_OK, run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.labelers import LABELERS
from modalmill.labelers.derived import SOURCES
from modalmill.io.hashes import content_hash
from modalmill.io import manifest
from modalmill.jobs.check import check_output
from modalmill.schemas.modalities import get_modality
from tests.tiny_models import (TEST_SETTINGS, save_official_omnidata, save_tiny_blip, save_tiny_clip,
                               save_tiny_dfine, save_tiny_dinov2, save_tiny_hmr2, save_tiny_imagebind,
                               save_tiny_mask2former, save_tiny_sam, save_tiny_t5)

# no GPU, no memory reservation, and small CPU shares: eleven actor pools and two shard tasks fit 2 CPUs
CPU = {"num_cpus": 0.1, "num_gpus": 0, "memory_mb": 0}
DERIVED = "metadata_derived_4m21"  # the derived metadata variant that reads det, semseg_coco, normal, caption, sam_mask
# modality -> the labeler that must have produced it. Labelers that read other modalities (t5_caption: caption;
# hmr2: det; the derived metadata: det, semseg_coco, normal, caption, sam_mask) are listed after those. det: the
# default detector (D-FINE).
PRODUCER = {
    "canny_edge": "canny_edge", "color_palette": "color_palette", "caption": "caption", "det": "dfine_coco",
    "depth": "omnidata_depth", "normal": "omnidata_normal", "semseg_coco": "mask2former_coco",
    "clip": "clip", "clip_global": "clip", "dinov2": "dinov2", "dinov2_global": "dinov2",
    "imagebind": "imagebind", "imagebind_global": "imagebind", "sam_mask": "sam", "sam_edge": "sam",
    "t5_caption": "t5_caption", "human_poses": "hmr2", "metadata": DERIVED,
}
MODALITIES = ["rgb", "crop_settings", *PRODUCER]
SHARDS = ("shard-00000", "shard-00001")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Each model labeler's config: a tiny checkpoint in the layout its real weights come in."""
    d = tmp_path_factory.mktemp("all-weights")
    imagebind, _ = save_tiny_imagebind(d)
    return {
        "sam": {"weights": save_tiny_sam(d / "sam_tiny.pth"), **TEST_SETTINGS["sam"]},
        "dinov2": {"weights": save_tiny_dinov2(d / "dinov2")},
        "imagebind": imagebind,
        "clip": save_tiny_clip(d),
        # a tiny D-FINE (the default detector) that sees people, so that HMR 2.0 has persons to regress
        "dfine_coco": {"weights": save_tiny_dfine(str(d / "dfine"), favour="person"), **TEST_SETTINGS["dfine_coco"]},
        "hmr2": {"weights": save_tiny_hmr2(d / "hmr2_tiny.safetensors")},
        "omnidata_depth": {"weights": save_official_omnidata(str(d / "omnidata_dpt_depth_v2.ckpt"), 1)},
        "omnidata_normal": {"weights": save_official_omnidata(str(d / "omnidata_dpt_normal_v2.ckpt"), 3, seed=1)},
        "caption": {"weights": save_tiny_blip(d / "blip")},
        "t5_caption": {"weights": save_tiny_t5(d / "t5")},
        "mask2former_coco": {"weights": save_tiny_mask2former(str(d / "mask2former")),
                             **TEST_SETTINGS["mask2former_coco"]},
    }


def tar_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


@pytest.mark.slow  # eleven actor pools start (each imports torch and its model package): ~1-2 min on 2 cores
def test_one_job_with_every_labeler(ray_local, demo_corpus, weights, tmp_path):
    model_labelers = set(weights)
    assert model_labelers | {"canny_edge", "color_palette", DERIVED} == set(PRODUCER.values())
    out = tmp_path / "out"
    labelers = {name: {"config": config, "resources": CPU} for name, config in weights.items()}
    labelers[DERIVED] = {}  # listed: preferred over the model-free metadata labeler
    data = {"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": str(out),
            "modalities": MODALITIES, "batch_size": 5, "decode": {"max_size": 128},
            "labelers": labelers, "ray": {"shard_cpus": 0.4}}
    s = run_job(job_from_dict(data), show_progress=False)
    assert s["exit_code"] == EXIT_OK and s["samples_written"] == 10 and s["samples_failed"] == 0, (
        s["errors_by_reason"], s["failed_shards"])

    people = sam_instances = 0
    for shard in SHARDS:
        members = {m: tar_members(out / m / f"{shard}.tar") for m in MODALITIES}
        keys = [name.split(".", 1)[0] for name, _ in members["rgb"]]
        assert len(keys) == 5 and len(set(keys)) == 5
        for m in MODALITIES:
            assert [name.split(".", 1)[0] for name, _ in members[m]] == keys, f"{m} is not aligned with rgb"
            assert all(name.endswith("." + get_modality(m).ext) for name, _ in members[m]), m
        for i, key in enumerate(keys):
            rgb = get_modality("rgb").decode(members["rgb"][i][1])
            hw = rgb.shape[:2]
            assert max(hw) <= 128
            labels = {}
            for m in MODALITIES[1:]:
                spec = get_modality(m)
                labels[m] = value = spec.decode(members[m][i][1])
                spec.encode(value, key, hw)  # validates dtype, shape (pixel labels at the rgb's size), ranges
            det_people = [d for d in labels["det"]["instances"] if d["class_name"] == "person" and d["score"] >= 0.5
                          and d["boxes"][2] > d["boxes"][0] and d["boxes"][3] > d["boxes"][1]]
            poses = labels["human_poses"]
            assert len(poses["bbox_xyxy"] if poses else []) == len(det_people)
            people += len(det_people)
            sam_instances += len(labels["sam_mask"]["instances"])
            derived = {f for src in ("det", "semseg_coco", "normal", "caption", "sam_mask") for f in SOURCES[src]}
            assert derived <= set(labels["metadata"]), sorted(derived - set(labels["metadata"]))
            assert labels["metadata"]["n_sam_instances"] == len(labels["sam_mask"]["instances"])
            assert labels["metadata"]["caption_n_words"] == len(labels["caption"][0].split())
            assert labels["t5_caption"]["emb"].shape[0] == len(labels["caption"])
            n_crops = len(labels["crop_settings"])  # teacher features: one row per crop
            assert labels["clip"].shape[0] == n_crops and labels["clip"].ndim == 4
            assert labels["dinov2_global"].shape[0] == n_crops and labels["dinov2_global"].ndim == 2
    assert people > 0, "the person-favouring detector found nobody: HMR 2.0 never ran on a crop"
    assert sam_instances > 0

    # markers and the parquet manifest: each modality's labeler, its version and its checkpoint's content hash
    expected = {}
    for m, name in PRODUCER.items():
        path = weights[name]["weights"] if name in weights else None
        expected[m] = (name, LABELERS[name].version, content_hash(path) if path else "")
    assert all(len(h) == 16 for m, (_, _, h) in expected.items() if PRODUCER[m] in weights)
    assert len({h for _, _, h in expected.values() if h}) == len(weights)  # one distinct checkpoint per model
    for shard in SHARDS:
        marker = manifest.read_marker(str(out), shard)
        assert marker["keys"] == [n.split(".", 1)[0] for n, _ in tar_members(out / "rgb" / f"{shard}.tar")]
        got = {m: (marker["modalities"][m]["labeler"], marker["modalities"][m]["version"],
                   marker["modalities"][m]["checkpoint"]) for m in PRODUCER}
        assert got == expected
    rows = manifest.read_manifest(str(out)).to_pylist()
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        got = {p["modality"]: (p["labeler"], p["version"], p["checkpoint"]) for p in r["producers"]}
        assert {m: got[m] for m in PRODUCER} == expected, r["key"]

    report = check_output(str(out))
    assert report.ok and not report.violations and report.samples == 10, [v.line() for v in report.violations]
    assert set(report.modalities) == set(MODALITIES) and report.markers == 2
    cli = CliRunner().invoke(main, ["check", str(out)])
    assert cli.exit_code == 0 and cli.output.strip().endswith("clean"), cli.output
