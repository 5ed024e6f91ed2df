"""The worked example of docs/adding-a-modality.md: examples/third_party_labeler is pip-installed
(into a temporary folder put on PYTHONPATH), and the modalmill command, unchanged, finds its labeler through the
``modalmill.labelers`` entry point, lists it, writes its ``grayscale`` modality aligned with rgb, and checks it."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image



def modalmill(*args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "modalmill", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def plugin_env(example_plugin):
    """The environment of a machine where the example package is installed (pip, the real way), and without it."""
    env, without = example_plugin
    d = env["PYTHONPATH"].split(os.pathsep)[0]
    entry_points = [os.path.join(d, n, "entry_points.txt") for n in os.listdir(d)
                    if n.startswith("modalmill_grayscale-") and n.endswith(".dist-info")]
    assert len(entry_points) == 1 and "[modalmill.labelers]" in open(entry_points[0]).read()
    return env, without


def tar_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def test_without_the_package_the_modality_is_unknown(demo_corpus, plugin_env, tmp_path):
    _, without = plugin_env
    r = modalmill("labelers", env=without)
    assert r.returncode == 0 and "grayscale" not in r.stdout
    r = modalmill("label", os.path.join(demo_corpus, "shard-00000.tar"), str(tmp_path / "out"), "-m", "rgb,grayscale",
                  env=without)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "unknown modality 'grayscale'" in r.stderr and not (tmp_path / "out").exists()


def test_installed_plugin_works_in_every_command(demo_corpus, plugin_env, tmp_path):
    env, _ = plugin_env
    r = modalmill("labelers", env=env)
    assert r.returncode == 0, r.stderr
    row = next(line.split() for line in r.stdout.splitlines() if line.startswith("grayscale "))
    assert row[:3] == ["grayscale", "grayscale", "-"] and "shard" in row  # model-free: runs in the shard task
    r = modalmill("modalities", env=env)
    assert r.returncode == 0 and any(line.split()[:5] == ["grayscale", "pixel", "png", "uint8", "[H,"]
                                     for line in r.stdout.splitlines() if line.strip()), r.stdout

    out = tmp_path / "out"
    r = modalmill("label", os.path.join(demo_corpus, "shard-{00000..00001}.tar"), str(out),
                  "-m", "rgb,crop_settings,canny_edge,grayscale", "--max-size", "96", "--num-cpus", "2",
                  "--no-progress", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "10 sample(s) written, 0 failed" in r.stdout, r.stdout

    keys_by_shard = {}
    for shard in ("shard-00000", "shard-00001"):
        rgb = tar_members(out / "rgb" / f"{shard}.tar")
        gray = tar_members(out / "grayscale" / f"{shard}.tar")
        keys = [n.split(".", 1)[0] for n, _ in rgb]
        assert len(keys) == 5 and [n.split(".", 1)[0] for n, _ in gray] == keys
        keys_by_shard[shard] = keys
        assert [n.split(".", 1)[0] for n, _ in tar_members(out / "canny_edge" / f"{shard}.tar")] == keys
        for (_, rgb_b), (name, gray_b) in zip(rgb, gray):
            assert name.endswith(".png")
            with Image.open(io.BytesIO(rgb_b)) as im:
                stored = im.convert("RGB")
                reference = np.asarray(stored.convert("L"), dtype=np.int16)  # PIL: ITU-R 601-2 luma
            with Image.open(io.BytesIO(gray_b)) as im:
                assert im.mode == "L"
                g = np.asarray(im, dtype=np.int16)
            assert g.shape == reference.shape and np.abs(g - reference).max() <= 1
            assert g.std() > 1  # a photo, not a constant image

    r = modalmill("check", str(out), env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout + r.stderr
    assert "grayscale" not in r.stderr  # known to check: its members were decoded and validated, not skipped
    r = modalmill("status", str(out), env=env)
    assert r.returncode == 0 and "grayscale (2 shards)" in r.stdout, r.stdout

    # the manifest names the plugin as the producer; a job file can set its config, and --only recomputes it
    from modalmill.io import manifest

    first = manifest.read_marker(str(out), "shard-00000")
    assert first["keys"] == keys_by_shard["shard-00000"] and first["modalities"]["grayscale"]["labeler"] == "grayscale"
    assert first["modalities"]["grayscale"]["version"] == "1"
    job = tmp_path / "job.yaml"
    job.write_text(f"input: '{os.path.join(demo_corpus, 'shard-{00000..00001}.tar')}'\noutput: {out}\n"
                   "modalities: [rgb, crop_settings, canny_edge, grayscale]\ndecode: {max_size: 96}\n"
                   "labelers: {grayscale: {config: {standard: bt709}}}\nray: {num_cpus: 2}\n")
    before = {m: (out / m / "shard-00000.tar").read_bytes() for m in ("rgb", "canny_edge", "grayscale")}
    r = modalmill("run", str(job), "--only", "grayscale", "--force", "--no-progress", env=env)
    assert r.returncode == 0 and "2 shard(s) processed" in r.stdout, r.stdout + r.stderr[-3000:]
    assert (out / "rgb" / "shard-00000.tar").read_bytes() == before["rgb"]
    assert (out / "canny_edge" / "shard-00000.tar").read_bytes() == before["canny_edge"]
    assert (out / "grayscale" / "shard-00000.tar").read_bytes() != before["grayscale"]
    again = manifest.read_marker(str(out), "shard-00000")
    assert again["keys"] == keys_by_shard["shard-00000"]
    assert again["modalities"]["grayscale"]["config_hash"] != first["modalities"]["grayscale"]["config_hash"]
