"""One job with every labeler of issue 3 (tiny random configurations of the real architectures, saved and loaded
through the real loading paths) on the embedded Ray, on the CPU: every modality is written for every shard,
aligned by key with rgb, every member validates against its spec, the markers and the parquet manifest name each
labeler with its version and the content hash of the checkpoint it loaded, and ``modalmill check`` is clean."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.jobs.runner import EXIT_OK
from modalmill.labelers import LABELERS
from modalmill.labelers.derived import SOURCES
from modalmill.io.hashes import content_hash
from modalmill.io import manifest
from modalmill.jobs.check import check_output
from modalmill.schemas.modalities import get_modality
from tests.shared_labels import DERIVED, MODALITIES, MAX_SIZE, MODEL_LABELERS, N_CROPS, PRODUCER, SHARDS, tar_members


@pytest.mark.slow  # the shared job starts eleven actor pools (each imports torch and its model package)
def test_one_job_with_every_labeler(shared_labels):
    """The session's shared job (tests/shared_labels.py) is this test's job: its output is read here."""
    weights, out, s = shared_labels.weights, shared_labels.out, shared_labels.summary
    model_labelers = set(MODEL_LABELERS)
    assert model_labelers | {"canny_edge", "color_palette", DERIVED} == set(PRODUCER.values())
    assert set(shared_labels.data["labelers"]) == model_labelers | {DERIVED}
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
            assert max(hw) <= MAX_SIZE
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
            # one caption per crop row; t5 stores one sequence for a caption repeated over the crops (as 4M uses it)
            assert len(labels["caption"]) == len(labels["crop_settings"])
            assert labels["t5_caption"]["emb"].shape[0] == len(set(labels["caption"])) == 1
            n_crops = len(labels["crop_settings"])  # teacher features: one row per crop
            assert n_crops == N_CROPS
            assert labels["clip"].shape[0] == n_crops and labels["clip"].ndim == 4
            assert labels["dinov2_global"].shape[0] == n_crops and labels["dinov2_global"].ndim == 2
    assert people > 0, "the person-favouring detector found nobody: HMR 2.0 never ran on a crop"
    assert sam_instances > 0

    # markers and the parquet manifest: each modality's labeler, its version and its checkpoint's content hash
    expected = {}
    for m, name in PRODUCER.items():
        path = weights[name]["weights"] if name in model_labelers else None
        expected[m] = (name, LABELERS[name].version, content_hash(path) if path else "")
    assert all(len(h) == 16 for m, (_, _, h) in expected.items() if PRODUCER[m] in model_labelers)
    assert len({h for _, _, h in expected.values() if h}) == len(model_labelers)  # one distinct checkpoint per model
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
