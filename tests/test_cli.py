"""The `modalmill` command: exit codes, one-line errors, job specs, status, registries."""

import json
import os

import pytest
import yaml
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.jobs.democorpus import jpeg_bytes, photos, write_shard
from modalmill.jobs.spec import JobSpecError, job_from_dict, load_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_label_then_status(ray_local, demo_corpus, tmp_path):
    out = tmp_path / "out"
    r = run("label", os.path.join(demo_corpus, "shard-{00000..00001}.tar"), out, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "10 sample(s) written" in r.output
    r = run("status", out, "--json")
    st = json.loads(r.output)
    assert st["shards_done"] == 2 and st["shards_pending"] == 0 and st["samples_ok"] == 10
    assert st["modalities"] == {m: 2 for m in ["rgb", "crop_settings", "canny_edge", "color_palette", "metadata"]}
    r = run("status", out)
    assert "2 done, 0 failed, 0 pending (of 2)" in r.output


def test_failed_samples_give_exit_code_3(ray_local, tmp_path):
    pics = photos()
    write_shard(str(tmp_path / "in" / "shard-00000.tar"),
                [("ok", {"jpg": jpeg_bytes(pics["coffee"][:100, :100])}), ("bad", {"jpg": b"\xff\xd8\xffgarbage"})])
    r = run("label", tmp_path / "in" / "shard-00000.tar", tmp_path / "out", "--no-progress")
    assert r.exit_code == 3, r.output
    assert "1 failed" in r.output and "decode" in r.output
    st = json.loads(run("status", tmp_path / "out", "--json").output)
    assert st["samples_failed"] == 1
    assert [r.split(":")[0] for r in st["errors_by_reason"]] == ["decode"]


@pytest.mark.parametrize("args, message", [
    (["label", "nowhere/shard-{00000..00001}.tar", "out", "-m", "rgb,canny"], "unknown modality 'canny'"),
    (["label", "no-such-dir/*.tar", "out"], "no-such-dir"),
    (["run", "missing.yaml"], "no such job file"),
    (["status", "not-an-output"], "not a modalmill output"),
])
def test_errors_are_one_line_with_exit_1(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run(*args)
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_job_spec_validation_names_the_key():
    base = {"input": "x.tar", "output": "o", "modalities": ["rgb"]}
    with pytest.raises(JobSpecError, match="unknown key 'modalites'.*did you mean 'modalities'"):
        job_from_dict({**base, "modalites": []})
    with pytest.raises(JobSpecError, match="decode: unknown key 'max_sise'.*'max_size'"):
        job_from_dict({**base, "decode": {"max_sise": 3}})
    with pytest.raises(JobSpecError, match="'seed' must be int"):
        job_from_dict({**base, "seed": "zero"})
    with pytest.raises(JobSpecError, match="unknown labeler 'cany_edge'.*'canny_edge'"):
        job_from_dict({**base, "labelers": {"cany_edge": {}}})
    with pytest.raises(JobSpecError, match="labelers.canny_edge.config: .*unknown setting"):
        job_from_dict({**base, "labelers": {"canny_edge": {"config": {"nope": 1}}}})
    with pytest.raises(JobSpecError, match="'output' is required"):
        job_from_dict({"input": "x", "modalities": ["rgb"]})


@pytest.mark.parametrize("path", ["modalmill/jobs/demo.yaml", "examples/corpus-4m21.yaml",
                                  "examples/reprocess-one-modality.yaml"])
def test_shipped_job_specs_are_valid(path):
    spec = load_job(os.path.join(ROOT, path))
    assert spec.modalities and spec.output
    assert yaml.safe_load(open(os.path.join(ROOT, path)))["name"] == spec.name


def test_registries_are_listed():
    r = run("modalities")
    assert r.exit_code == 0 and "tok_dinov2@224" in r.output and "8192" in r.output
    r = run("labelers")
    assert r.exit_code == 0 and "canny_edge" in r.output and "color_palette" in r.output
    lines = r.output.splitlines()
    assert max(map(len, lines)) <= 100, max(lines, key=len)  # fits a 100-column terminal
    assert any("…" in line for line in lines)  # long cells (weights, licences) shortened
    wide = run("labelers", "--wide").output.splitlines()
    assert max(map(len, wide)) > 100 and not any("…" in line for line in wide)
    sam = next(line for line in wide if line.startswith("sam "))
    assert "sam_vit_h_4b8939.pth" in sam and "Apache-2.0" in sam  # every cell in full


def test_run_job_file_with_relative_paths(ray_local, demo_corpus, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"input: '{demo_corpus}/shard-00000.tar'\noutput: rel-out\nmodalities: [rgb, metadata]\n")
    r = run("run", job, "--no-progress")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rel-out" / "metadata" / "shard-00000.tar").exists()
