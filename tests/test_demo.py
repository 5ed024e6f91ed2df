"""The demo job adds MediaPipe's real-model labelers exactly when mediapipe is usable, and says which it did.

Runs in every environment: where mediapipe (the optional extra, numpy<2 / protobuf<5) is installed, the first
test checks that the demo picks its labelers up; where it is not, that the demo leaves them out and prints how to
get them. The extra's own labels are tested in tests/test_labelers_mediapipe.py."""

import importlib
import os
import sys
from importlib.resources import files

import pytest

from modalmill.jobs.demo import MEDIAPIPE_LABELERS, demo_job, mediapipe_status
from modalmill.jobs.spec import load_job

HINT = "pip install 'modalmill[mediapipe]'"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _importable() -> bool:
    try:
        importlib.import_module("mediapipe")
    except ImportError:
        return False
    return True


def _has_mediapipe_labelers(spec) -> bool:
    labelers = {n for n in MEDIAPIPE_LABELERS if n in spec.labelers}
    modalities = {m for m in MEDIAPIPE_LABELERS.values() if m in spec.modalities}
    assert len(labelers) in (0, 2) and len(modalities) == len(labelers), (spec.labelers, spec.modalities)
    return bool(labelers)


def test_demo_spec_has_the_mediapipe_labelers_iff_mediapipe_imports(tmp_path):
    have = _importable()
    spec, path, note = demo_job(str(tmp_path))
    assert _has_mediapipe_labelers(spec) == have
    assert mediapipe_status()[0] == have
    if have:
        assert note.startswith("mediapipe found") and "mediapipe_pose -> pose_keypoints" in note
    else:
        assert HINT in note and "\n" not in note
    assert load_job(path) == spec  # the job file written next to the corpus is the job that runs
    assert spec.output == str(tmp_path / "output") and "canny_edge" in spec.modalities


def test_without_mediapipe_the_demo_says_how_to_get_real_model_labels(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # `import mediapipe` now raises ImportError
    usable, note = mediapipe_status()
    assert not usable and HINT in note and "\n" not in note
    spec, path, note2 = demo_job(str(tmp_path))
    assert note2 == note and not _has_mediapipe_labelers(spec)
    with open(path) as f:  # the packaged job, unchanged (comments included)
        assert f.read() == files("modalmill.jobs").joinpath("demo.yaml").read_text()


@pytest.mark.parametrize("wanted", [True, False])
def test_the_labelers_can_be_asked_for_or_left_out(tmp_path, wanted):
    spec, path, note = demo_job(str(tmp_path), mediapipe=wanted)
    assert _has_mediapipe_labelers(spec) == wanted and load_job(path) == spec
    assert note == f"MediaPipe labelers {'added' if wanted else 'left out'} on request"
    if wanted:  # appended after the packaged modalities, with default settings (checked by the job loader)
        assert spec.modalities[-2:] == ("pose_keypoints", "person_mask")
        assert all(spec.labelers[n].config == {} for n in MEDIAPIPE_LABELERS)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the demo, its printed commands, and the demo again (seconds: nothing to do)
def test_the_demo_command_runs_end_to_end_with_its_progress_bars(tmp_path, monkeypatch):
    """`modalmill demo` as `make demo` runs it, progress bars on (the suite otherwise sets TQDM_DISABLE, which
    once hid a bar that crashed the demo's tokenizer training): label -> train -> tokenize, exit 0, and it
    prints where the output is. Fewer training steps than the default keep it short. Then the README's first hour
    (what scripts/first_hour.sh runs through `make`): the commands the demo prints work as printed from the
    repository root, and a second run with nothing to do trains and writes nothing. The second run is the same
    command through the CLI's entry point in this process (a new interpreter proves nothing more: the first run
    and the printed commands crossed that boundary; scripts/first_hour.sh runs the second `make demo` itself), with
    Ray's start made to fail: with nothing to do, no Ray may start."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    work = tmp_path / "demo"
    demo = [sys.executable, "-m", "modalmill", "demo", "--workdir", str(work), "--tokenizer-steps", "5"]
    r = subprocess.run(demo, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    out = work / "output"
    assert f"demo output: {out}" in r.stdout
    assert "shards: 100%" in r.stderr  # the labelling job drew its bars, and the driver the training bars
    assert all(f"train {m}: 100%" in r.stderr and "5/5" in r.stderr for m in ("rgb", "canny_edge")), r.stderr[-3000:]
    for m in ("rgb", "canny_edge", "ocr", "tok_rgb@224", "tok_canny_edge@224"):
        assert sorted(p.name for p in (out / m).iterdir()) == ["shard-00000.tar", "shard-00001.tar"], m
    # the real model read the text of the scanned page (one of the demo's photos)
    import json
    import tarfile

    texts = []
    for shard in ("shard-00000.tar", "shard-00001.tar"):
        with tarfile.open(out / "ocr" / shard) as t:
            texts += [line["text"] for m in t.getmembers() for line in json.loads(t.extractfile(m).read())["lines"]]
    assert "Region-based segmentation" in texts, texts
    for m in ("rgb", "canny_edge"):
        assert (out / "_modalmill" / "tokenizers" / m / "reconstructions.png").stat().st_size > 0
        # the demo's tokenizers are in 4M's format (ml-4m's VQVAE arguments; lucid quantizer) and say their usage
        cfg = json.loads((out / "_modalmill" / "tokenizers" / m / "config.json").read_text())
        assert cfg["quant_type"] == "lucid" and cfg["enc_type"].startswith("vit_") and cfg["modalmill"]["modality"] == m
        assert f"{m}: held-out codebook usage" in r.stdout
    # caption is the corpus' own text (each photo's hand-written .txt), once per crop row; the text tokenizer learned it
    from modalmill.jobs.democorpus import DESCRIPTIONS

    with tarfile.open(out / "caption" / "shard-00000.tar") as t:
        first = json.loads(t.extractfile(t.getmembers()[0]).read())
    assert first == [DESCRIPTIONS["astronaut"]] * 4
    assert (out / "_modalmill" / "tokenizers" / "text" / "text_tokenizer.json").stat().st_size > 0
    assert "word pieces learned from 18 captions" in r.stdout

    # the first hour: the commands the demo's last lines print work as printed, from where it ran
    tail = r.stdout.splitlines()[r.stdout.splitlines().index(f"demo output: {out}") + 1:]
    printed = [line.split("look at it: ", 1)[1] if "look at it: " in line else line.strip() for line in tail
               if line.strip()]
    assert len(printed) == 2 and printed[0].endswith(f"status {out}"), tail
    for cmd in printed:
        run = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert run.returncode == 0, (cmd, run.stdout + run.stderr)
    assert (work / "sample.png").stat().st_size > 0

    # a second run with nothing to do trains nothing, tokenizes nothing and changes no file (but the record of the
    # writer's lease it took, under _modalmill/lease/: a writer takes the lease before it knows there is nothing to do)
    def files():
        return {str(p.relative_to(work)): (p.stat().st_size, p.stat().st_mtime_ns) for p in work.rglob("*")
                if p.is_file() and "lease" not in p.relative_to(work).parts}

    import ray
    from click.testing import CliRunner

    from modalmill.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("the demo with nothing to do started Ray")

    before = files()
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a session Ray of the suite is not reused either
    monkeypatch.setattr(ray, "init", no_ray)
    again = CliRunner().invoke(main, demo[3:])
    assert again.exit_code == 0, (again.output[-4000:], again.exception)
    changed = {k for k in set(before) | set(files()) if before.get(k) != files().get(k)}
    assert not changed, sorted(changed)
    assert again.stdout.count("already trained with this config on these labels") == 2, again.stdout
    assert "tokenized: 0 shard(s) written, 4 already done" in again.stdout  # 2 shards x 2 token modalities
    assert "train rgb" not in again.stderr  # no training bar
    assert "already trained on these captions: kept" in again.stdout
