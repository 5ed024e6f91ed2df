"""Bad weights fail fast, in one line: the driver checks every labeler's weights and every tokenizer checkpoint
before any actor starts (no Ray is even started: its temp dir stays empty), and a set-up error that only the
workers can see (node-local paths on a cluster) comes back as one line without Ray restarting the actor."""

import os
import subprocess
import sys
import time

import pytest

from modalmill.io.fetch import WeightsError
from tests.tiny_models import save_tiny_dinov2

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(tmp_path, *args):
    import pathlib
    import tempfile

    # short: Ray's socket paths under RAY_TMPDIR must stay within AF_UNIX's 107 bytes, should a Ray ever start
    ray_tmp = pathlib.Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_TMPDIR": str(ray_tmp)}
    r = subprocess.run([f"{BIN}/python", "-m", "modalmill", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=180)
    return r, list(ray_tmp.iterdir())


def test_run_with_missing_weights_is_one_line_and_starts_no_actor(demo_corpus, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"input: '{os.path.join(demo_corpus, 'shard-{00000..00001}.tar')}'\noutput: {tmp_path / 'out'}\n"
                   "modalities: [rgb, crop_settings, dinov2_global]\n"
                   f"labelers: {{dinov2: {{config: {{weights: '{tmp_path / 'nowhere' / 'dinov2'}'}}}}}}\n")
    r, ray_files = cli(tmp_path, "run", job, "--no-progress")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: weights not found at"), r.stderr
    assert "Get it:" in lines[0] and "Traceback" not in r.stderr and r.stdout == ""
    assert ray_files == []  # no Ray started, so no actor
    assert not (tmp_path / "out" / "_modalmill" / "shards").exists()
    # MODALMILL_DEBUG=1 shows the traceback
    env = {**os.environ, "PYTHONPATH": ROOT, "MODALMILL_DEBUG": "1"}
    r = subprocess.run([f"{BIN}/python", "-m", "modalmill", "run", str(job), "--no-progress"], capture_output=True,
                       text=True, env=env, timeout=180)
    assert r.returncode == 1 and "Traceback" in r.stderr and "WeightsError" in r.stderr


@pytest.mark.parametrize("what", ["empty folder", "another model's folder", "tokenizer of another modality"])
def test_tokenize_with_a_folder_that_is_not_a_tokenizer(labeled_edges, tmp_path, what):
    d = tmp_path / "not-a-tokenizer"
    if what == "empty folder":
        d.mkdir()
        expect = "weights not found at"
    elif what == "another model's folder":
        save_tiny_dinov2(d)  # a real model.safetensors, but not a modalmill tokenizer
        expect = "not a 4M-format tokenizer"
    else:
        from modalmill.tokenize.train import train_tokenizer

        train_tokenizer("canny_edge", labeled_edges, str(d), preset="tiny", steps=1, use_ray=False,
                        show_progress=False)
        expect = "a tokenizer for 'canny_edge', not 'rgb'"
    args = ["tokenize", "--data", labeled_edges, "-m", "rgb", "--tokenizer", f"rgb={d}", "--no-progress"]
    if what != "another model's folder":  # in-process (faster); the issue's own case below runs the real CLI
        from click.testing import CliRunner

        from modalmill.cli import main

        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and expect in r.output, r.output
        return
    r, ray_files = cli(tmp_path, *args)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert ray_files == []


def test_setup_error_seen_only_by_workers_is_one_line_and_not_retried(ray_local, tmp_path):
    from modalmill.pipeline.execute import LabelerSetupError, make_pools
    from modalmill.pipeline.shard import LabelerRun
    from tests.labelers_for_tests import SetupFailsOnWorkers

    count = tmp_path / "setups.txt"
    run = LabelerRun(labeler="test_setup_fails", config={"count_file": str(count)}, outputs=("caption",),
                     batch_size=4, stateful=True, cls=SetupFailsOnWorkers)
    with pytest.raises(LabelerSetupError) as e:
        make_pools([run], {}, shard_cpus=1.0)
    msg = str(e.value)
    assert "\n" not in msg and "labeler 'test_setup_fails' could not be set up on a Ray worker" in msg
    assert "weights not found at '/node-local/ckpt.pt'" in msg and "Traceback" not in msg
    time.sleep(2)  # a restarted actor would set up again
    assert count.read_text().splitlines() == ["setup"]
    assert issubclass(WeightsError, RuntimeError)


def test_node_local_weights_are_left_to_the_workers_on_a_cluster(tmp_path, capsys):
    """On a cluster the driver may not have a node-local path the workers have: it does not fail there (the
    workers' set-up error would come back as one line); on an embedded Ray it is a one-line error at once."""
    from modalmill.jobs.runner import expected_checkpoints
    from modalmill.labelers import get_labeler
    from modalmill.pipeline.shard import LabelerRun

    missing = str(tmp_path / "node-local" / "dinov2")
    run = LabelerRun(labeler="dinov2", config={"weights": missing}, outputs=("dinov2_global",), batch_size=8,
                     stateful=True, cls=get_labeler("dinov2"))
    with pytest.raises(WeightsError, match="weights not found at"):
        expected_checkpoints([run])
    assert expected_checkpoints([run], cluster=True) == {"dinov2": ""}
    assert f"labeler dinov2: {missing} is not on this machine" in capsys.readouterr().err
    there = save_tiny_dinov2(tmp_path / "here")  # a path this machine has is checked and hashed on a cluster too
    from modalmill.io.hashes import content_hash

    run = LabelerRun(labeler="dinov2", config={"weights": there}, outputs=("dinov2_global",), batch_size=8,
                     stateful=True, cls=get_labeler("dinov2"))
    assert expected_checkpoints([run], cluster=True) == {"dinov2": content_hash(there)}
