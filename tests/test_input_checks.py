"""Inputs and arguments are checked before Ray starts and before anything is written (issue 27): a brace pattern
naming files that do not exist, a missing image folder, a missing parquet file, a wrong relative input in a job
file, a shard selection out of range: exit 1 with one line, no Ray session, no output folder (no lease either).
And what `show --key` says of a sample that failed, and a scalar (shape ()) modality end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.io import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd, ray_tmp):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=ROOT, RAY_TMPDIR=str(ray_tmp))
    return subprocess.run([sys.executable, "-m", "modalmill", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_missing_inputs_exit_1_before_ray_starts_and_write_nothing(demo_corpus, tmp_path):
    ray_tmp = tmp_path / "ray-tmp"  # where a Ray started by the command would put its session
    shards = os.path.join(demo_corpus, "shard-{00000..00002}.tar")  # the corpus has shards 0 and 1
    cases = [
        (["label", shards, "out", "-m", "rgb"], "1 of its 3 file(s) do not exist: " +
         os.path.join(demo_corpus, "shard-00002.tar")),
        (["label", str(tmp_path / "no-such-folder"), "out", "-m", "rgb"], "no-such-folder: no such file or folder"),
        (["label", str(tmp_path / "pq" / "train-{0..1}.parquet"), "out", "-m", "rgb"], "2 of its 2 file(s)"),
        # the argument checks after the inputs' (shard selection, labeler settings) leave no lease behind either
        (["label", os.path.join(demo_corpus, "shard-00000.tar"), "out", "-m", "rgb", "--shards", "3"],
         "[3] out of range"),
        (["label", os.path.join(demo_corpus, "shard-00000.tar"), "out", "-m", "rgb,no_such_modality"],
         "unknown modality 'no_such_modality'"),
    ]
    for args, message in cases:
        r = run_cli(*args, "--no-progress", cwd=tmp_path, ray_tmp=ray_tmp)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, r.stderr)
        assert not (tmp_path / "out").exists(), args  # no output skeleton, no _modalmill/lease
        assert not ray_tmp.exists(), args  # no Ray session was started

    # a job file's relative input is resolved against its folder: wrong there, nothing written
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "job.yaml").write_text("input: 'corpus/shard-{00000..00001}.tar'\noutput: out\nmodalities: [rgb]\n")
    r = run_cli("run", "jobs/job.yaml", "--no-progress", cwd=tmp_path, ray_tmp=ray_tmp)
    assert r.returncode == 1 and os.path.join(str(jobs), "corpus", "shard-{00000..00001}.tar") in r.stderr, r.stderr
    assert "2 of its 2 file(s) do not exist" in r.stderr
    assert not (jobs / "out").exists() and not (tmp_path / "out").exists() and not ray_tmp.exists()


def test_missing_checks_list_once_per_folder_not_per_file(tmp_path, monkeypatch):
    for i in (0, 2):
        (tmp_path / f"s-{i}.tar").write_bytes(b"")
    scans = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda d: scans.append(d) or real(d))
    names = [str(tmp_path / f"s-{i}.tar") for i in range(3)]
    assert storage.missing(names) == [names[1]] and len(scans) == 1
    with pytest.raises(FileNotFoundError, match=r"1 of its 3 file\(s\) do not exist: .*s-1.tar"):
        storage.expand(str(tmp_path / "s-{0..2}.tar"), check=True)
    assert storage.expand(str(tmp_path / "s-{0..2}.tar")) == names  # without check: kept (the reader reports them)


def test_missing_checks_on_s3_use_one_listing(s3_env):
    bucket = s3_env[1]
    for i in (0, 1):
        storage.write_bytes(f"s3://{bucket}/inputs/shard-{i:05d}.tar", b"x")
    assert storage.missing([f"s3://{bucket}/inputs/shard-{i:05d}.tar" for i in range(3)]) == [
        f"s3://{bucket}/inputs/shard-00002.tar"]
    assert storage.expand(f"s3://{bucket}/inputs/shard-{{00000..00001}}.tar", check=True)
    with pytest.raises(FileNotFoundError, match="1 of its 3 file"):
        storage.expand(f"s3://{bucket}/inputs/shard-{{00000..00002}}.tar", check=True)


def test_tokenize_with_a_wrong_data_folder_leaves_nothing(tmp_path):
    r = CliRunner().invoke(main, ["tokenize", "--data", str(tmp_path / "nothing-here"), "-m", "canny_edge"])
    assert r.exit_code == 1 and "no completed shards to tokenize" in r.output, r.output
    assert not (tmp_path / "nothing-here").exists()


def test_show_key_of_a_failed_sample_says_where_and_why(ray_local, demo_corpus, tmp_path):
    from modalmill.io.readers import iter_tar
    from modalmill.jobs.runner import run_job
    from modalmill.jobs.spec import job_from_dict
    from tests import labelers_for_tests  # noqa: F401 - registers test_caption_or_fail

    bad = [s.key for s in iter_tar(os.path.join(demo_corpus, "shard-00001.tar"))][2]
    out = str(tmp_path / "out")
    spec = job_from_dict({"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": out,
                          "modalities": ["rgb", "caption"], "decode": {"max_size": 64},
                          "labelers": {"test_caption_or_fail": {"config": {"fail_keys": [bad]}}}})
    summary = run_job(spec, show_progress=False)  # fails in a Ray shard task; the manifest records it
    assert summary["samples_failed"] == 1, summary
    r = CliRunner().invoke(main, ["show", out, "--key", bad, "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 1, r.output
    assert f"sample {bad!r} failed (label:test_caption_or_fail: chosen to fail: {bad})" in r.output, r.output
    assert "no tar of shard-00001 (input " in r.output and "shard-00001.tar, position 2)" in r.output, r.output
    assert not (tmp_path / "x.png").exists()
    r = CliRunner().invoke(main, ["show", out, "--key", "no-such-key", "--out", str(tmp_path / "y.png")])
    assert r.exit_code == 1 and "no sample with key 'no-such-key'" in r.output, r.output


def test_a_scalar_modality_is_written_with_shape_and_passes_check(ray_local, demo_corpus, tmp_path):
    from tests import scalar_labeler  # noqa: F401 - registers test_brightness (shape ())
    from modalmill.io.tars import iter_tar_groups
    from modalmill.jobs.check import check_output
    from modalmill.jobs.runner import run_job
    from modalmill.jobs.spec import job_from_dict
    from modalmill.schemas.modalities import get_modality

    out = str(tmp_path / "out")
    spec = job_from_dict({"input": os.path.join(demo_corpus, "shard-00000.tar"), "output": out,
                          "modalities": ["rgb", "crop_settings", "test_brightness"], "decode": {"max_size": 64}})
    summary = run_job(spec, show_progress=False)  # labelled in a Ray shard task, encoded and written there
    assert summary["exit_code"] == 0 and summary["samples_written"] == 5, summary
    spec_b = get_modality("test_brightness")
    values = [spec_b.decode(members["npy"]) for _, members in
              iter_tar_groups(os.path.join(out, "test_brightness", "shard-00000.tar"))]
    assert len(values) == 5 and all(v.shape == () and v.dtype == np.float32 and 0 < float(v) < 1 for v in values)
    report = check_output(out)
    assert report.ok, [v.line() for v in report.violations]
