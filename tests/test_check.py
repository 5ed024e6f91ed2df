"""`modalmill check`: a clean real output passes; each kind of contract violation is reported on its own line."""

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.jobs.runner import run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.io import manifest
from modalmill.jobs.check import check_output
from modalmill.io.writers import TarShardWriter
from modalmill.schemas import get_modality

MODS = ["rgb", "crop_settings", "canny_edge", "color_palette", "metadata"]
TOK = "tok_rgb@224"


def read_members(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def write_members(path, members):
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture(scope="module")
def clean(ray_local, demo_corpus, tmp_path_factory):
    """A real output plus a token modality written the way a tokenizer stage writes it (aligned, marker updated)."""
    out = tmp_path_factory.mktemp("check") / "out"
    job = job_from_dict({"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": str(out),
                         "modalities": MODS, "crops": {"n_crops": 2}, "decode": {"max_size": 160}})
    assert run_job(job, show_progress=False)["exit_code"] == 0
    spec = get_modality(TOK)
    rng = np.random.default_rng(0)
    for shard, marker in manifest.list_markers(str(out)).items():
        w = TarShardWriter(str(out / TOK / f"{shard}.tar"))
        for key in marker["keys"]:
            w.write(key, spec.ext, spec.encode(rng.integers(0, spec.vocab_size, (2, 196)).astype(np.int16), key))
        marker["modalities"][TOK] = {"labeler": "test", **w.commit()}
        manifest.write_marker(str(out), shard, marker)
    return out


@pytest.fixture
def out(clean, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(clean, dst)
    return dst


def lines(report):
    return [v.line() for v in report.violations]


def test_clean_output_passes_and_cli_exits_0(clean):
    report = check_output(str(clean))
    assert report.ok, lines(report)
    assert report.shards == 2 and report.samples == 10 and report.markers == 2
    assert sorted(report.modalities) == sorted(MODS + [TOK])
    r = CliRunner().invoke(main, ["check", str(clean)])
    assert r.exit_code == 0 and "clean" in r.output
    r = CliRunner().invoke(main, ["check", str(clean), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["ok"] is True


def test_reordered_tar_is_reported(out):
    path = out / "canny_edge" / "shard-00000.tar"
    members = read_members(path)
    members[1], members[2] = members[2], members[1]
    write_members(path, members)
    moved = members[1][0].split(".")[0]
    got = lines(check_output(str(out)))
    assert any(x.startswith(f"canny_edge shard-00000 {moved}: keys in a different order") for x in got), got
    assert any(x.startswith("canny_edge shard-00000 -: sha256 of the tar") for x in got), got
    # every violation is about that one tar
    assert all(x.startswith("canny_edge shard-00000") for x in got), got
    r = CliRunner().invoke(main, ["check", str(out), "--json"])
    assert r.exit_code == 1
    data = json.loads(r.output)
    assert data["ok"] is False and {v["modality"] for v in data["violations"]} == {"canny_edge"}


def test_dropped_key_is_reported_on_the_modality_that_lacks_it(out):
    path = out / "metadata" / "shard-00001.tar"
    members = read_members(path)
    gone = members[3][0].split(".")[0]
    write_members(path, members[:3] + members[4:])
    got = lines(check_output(str(out)))
    assert f"metadata shard-00001 {gone}: key missing (position 3 in the other modalities" in "\n".join(got), got
    assert not [x for x in got if not x.startswith("metadata shard-00001")], got
    r = CliRunner().invoke(main, ["check", str(out)])
    assert r.exit_code == 1 and f"metadata shard-00001 {gone}: key missing" in r.output


def test_token_id_beyond_the_vocab_is_reported(out):
    path = out / TOK / "shard-00000.tar"
    members = read_members(path)
    name = members[2][0]
    bad = np.zeros((2, 196), np.int16)
    bad[1, 5] = 16384 + 7
    members[2] = (name, npy(bad))
    write_members(path, members)
    got = lines(check_output(str(out)))
    key = name.split(".")[0]
    assert any(x.startswith(f"{TOK} shard-00000 {key}: value: token ids must lie in [0, 16384)") and "16391" in x
               for x in got), got


def test_non_contiguous_shard_numbers_without_markers(out):
    shutil.rmtree(out / "_modalmill")  # an output not written by modalmill: the folder layout alone
    assert check_output(str(out)).ok
    for m in MODS + [TOK]:
        os.rename(out / m / "shard-00001.tar", out / m / "shard-00002.tar")
    os.rename(out / "rgb" / "shard-00000.tar", out / "rgb" / "shard-0.tar")
    report = check_output(str(out))
    got = lines(report)
    assert "* shard-00001 -: gap in the shard numbers: no modality has this shard (numbers must be contiguous " \
           "from 0)" in got, got
    assert "rgb shard-0 -: shard number not zero-padded to 5 digits like the others (brace patterns would miss " \
           "it)" in got, got
    assert report.markers == 0


def test_corrupt_member_and_bad_labels_are_reported(out):
    # a PNG whose bytes are garbage (same length: the tar itself stays valid)
    path = out / "canny_edge" / "shard-00000.tar"
    members = read_members(path)
    name, data = members[0]
    members[0] = (name, bytes(reversed(data)))
    write_members(path, members)
    # a pixel label at the wrong geometry, a crop outside the image, and a key with a dot
    path = out / "canny_edge" / "shard-00001.tar"
    members = read_members(path)
    wrong_name = members[1][0]
    img = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((7, 9), np.uint8)).save(img, format="PNG")
    members[1] = (wrong_name, img.getvalue())
    write_members(path, members)
    path = out / "crop_settings" / "shard-00001.tar"
    members = read_members(path)
    crop_name = members[0][0]
    members[0] = (crop_name, npy(np.array([[0, 0, 5000, 5000, 0]], np.int64)))
    write_members(path, members)
    path = out / "metadata" / "shard-00000.tar"
    members = read_members(path)
    dotted = members[4][0].replace(".json", ".v2.json")
    members[4] = (dotted, members[4][1])
    write_members(path, members)

    got = "\n".join(lines(check_output(str(out))))
    assert f"canny_edge shard-00000 {name.split('.')[0]}: cannot decode {name} with the canny_edge codec" in got, got
    assert f"canny_edge shard-00001 {wrong_name.split('.')[0]}: shape: must match the stored rgb image" in got, got
    assert f"crop_settings shard-00001 {crop_name.split('.')[0]}: crop 0 [0, 0, 5000, 5000, 0] lies outside" in got
    assert f"metadata shard-00000 {dotted.split('.')[0]}: key contains a dot: member '{dotted}'" in got, got


def test_marker_mismatch_and_unfinished_shard(out):
    marker = manifest.read_marker(str(out), "shard-00000")
    marker["keys"] = marker["keys"][:-1]
    manifest.write_marker(str(out), "shard-00000", marker)
    os.remove(out / "_modalmill" / "shards" / "shard-00001.json")
    got = lines(check_output(str(out)))
    assert any(x.startswith("_marker shard-00000 ") and "marker key list: key missing" in x for x in got), got
    assert "_marker shard-00001 -: no completion marker: the shard is unfinished (modalmill's loader skips it)" in got


def _sam_entry(n_inst):
    contour = np.array([[10, 20], [60, 20], [60, 90], [10, 90]], np.int32).reshape(-1, 1, 2)
    return {"points": [[contour] for _ in range(n_inst)], "token_ids": np.full((n_inst, 16), 3, np.int16),
            "bbox": np.tile(np.array([[20, 10, 90, 60]], np.int32), (n_inst, 1))}


def _add_sam_instance(out, n_entries):
    """A sam_instance folder written as the tokenize stage writes it (aligned, recorded in the markers);
    ``n_entries(key)`` entries per sample."""
    spec = get_modality("sam_instance")
    for shard, marker in manifest.list_markers(str(out)).items():
        w = TarShardWriter(str(out / "sam_instance" / f"{shard}.tar"))
        for key in marker["keys"]:
            value = np.empty(n_entries(key), dtype=object)
            for i in range(len(value)):
                value[i] = _sam_entry(i % 2)
            w.write(key, spec.ext, spec.encode(value, key))
        marker["modalities"]["sam_instance"] = {"labeler": "test", **w.commit()}
        manifest.write_marker(str(out), shard, marker)


def test_sam_instance_entries_and_token_rows_must_match_the_crops(out):
    _add_sam_instance(out, lambda key: 2)  # one entry per crop: clean
    report = check_output(str(out))
    assert report.ok and "sam_instance" in report.modalities, lines(report)

    keys = manifest.read_marker(str(out), "shard-00001")["keys"]
    _add_sam_instance(out, lambda key: {keys[0]: 3, keys[4]: 1}.get(key, 2))
    path = out / TOK / "shard-00000.tar"
    members = read_members(path)
    tok_key = members[1][0].split(".")[0]
    members[1] = (members[1][0], npy(np.zeros((1, 196), np.int16)))
    write_members(path, members)
    got = lines(check_output(str(out)))
    assert f"sam_instance shard-00001 {keys[0]}: 3 sam_instance entries but crop_settings has 2 crops " \
           "(entry i = crop i)" in got, got
    assert f"sam_instance shard-00001 {keys[4]}: 1 sam_instance entries but crop_settings has 2 crops " \
           "(entry i = crop i)" in got, got
    assert f"{TOK} shard-00000 {tok_key}: 1 token rows but crop_settings has 2 crops (row i = crop i)" in got, got
    # and nothing else but the edited token tar's hash, which no longer matches its marker
    assert len(got) == 4 and any(x.startswith(f"{TOK} shard-00000 -: sha256 of the tar") for x in got), got


def test_missing_output_is_a_one_line_error(tmp_path):
    r = CliRunner().invoke(main, ["check", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "no modality folders" in r.output
