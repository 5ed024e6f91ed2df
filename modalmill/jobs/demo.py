"""The demo: build a corpus from real photos, run the packaged demo job on the embedded Ray.

The packaged job (``demo.yaml``) makes the model-free modalities, ``caption`` from the corpus' own text (each
photo's ``.txt``, a description written by a person; a WordPiece text tokenizer in 4M's layout is then trained on
these captions) and ``ocr``, the text RapidOCR's PP-OCRv6 reads in the photos (real weights inside the
``rapidocr`` wheel, a dependency). When the optional MediaPipe extra is usable (``pip install
'modalmill[mediapipe]'``: ``mediapipe==0.10.21`` ships real models inside its wheel), the demo adds its two
labelers, so a new user sees real model labels: ``mediapipe_pose`` -> ``pose_keypoints`` and
``mediapipe_person_mask`` -> ``person_mask``. Either way the demo says which it did in one line.
"""

from __future__ import annotations

import os
import shutil
from importlib.resources import files

import yaml

from ..io import lease
from .democorpus import build_corpus
from .runner import run_job
from .spec import JobSpec, load_job

# MediaPipe labelers the demo adds when mediapipe is usable: labeler -> the modality it writes
MEDIAPIPE_LABELERS = {"mediapipe_pose": "pose_keypoints", "mediapipe_person_mask": "person_mask"}


def mediapipe_status() -> tuple[bool, str]:
    """(usable, one line for the demo's output): whether ``mediapipe`` imports and holds the bundled models that
    the MediaPipe labelers load."""
    from ..labelers import get_labeler
    from ..labelers.mediapipe_labelers import INSTALL_HINT, mediapipe_model_files

    try:
        import mediapipe  # noqa: F401
    except ImportError:
        return False, (f"real-model labels: {INSTALL_HINT}; the demo then adds MediaPipe's pose keypoints and "
                       "person masks (without it, RapidOCR is the demo's only model)")
    except Exception as e:  # noqa: BLE001 - e.g. a protobuf/numpy mismatch raising at import time
        return False, f"mediapipe is installed but does not import ({type(e).__name__}: {e}); {INSTALL_HINT}"
    try:
        for name in MEDIAPIPE_LABELERS:
            mediapipe_model_files(get_labeler(name)().files())
    except Exception as e:  # noqa: BLE001 - WeightsError: not the release that ships its models
        return False, f"mediapipe is installed but unusable for the demo: {e}"
    labels = ", ".join(f"{n} -> {m}" for n, m in MEDIAPIPE_LABELERS.items())
    return True, f"mediapipe found: the demo also runs its real models ({labels})"


def demo_job(workdir: str, mediapipe: bool | None = None) -> tuple[JobSpec, str, str]:
    """Write ``WORKDIR/demo.yaml`` and load it; returns (spec, job file, one line saying whether MediaPipe's
    labelers are in it). ``mediapipe``: add them (True), leave them out (False) or add them when
    :func:`mediapipe_status` finds mediapipe usable (None)."""
    workdir = os.path.abspath(workdir)
    text = files("modalmill.jobs").joinpath("demo.yaml").read_text()
    if mediapipe is None:
        mediapipe, note = mediapipe_status()
    else:
        note = f"MediaPipe labelers {'added' if mediapipe else 'left out'} on request"
    if mediapipe:
        data = yaml.safe_load(text)
        data["modalities"] = list(dict.fromkeys([*data["modalities"], *MEDIAPIPE_LABELERS.values()]))
        data["labelers"] = {**(data.get("labelers") or {}), **{n: {"config": {}} for n in MEDIAPIPE_LABELERS}}
        text = ("# The packaged demo job (modalmill/jobs/demo.yaml) plus MediaPipe's labelers, written by "
                "`modalmill demo`.\n" + yaml.safe_dump(data, sort_keys=False))
    os.makedirs(workdir, exist_ok=True)
    job_path = os.path.join(workdir, "demo.yaml")
    try:
        with open(job_path) as f:
            same = f.read() == text
    except OSError:
        same = False
    if not same:  # a rerun leaves the file as it is
        with open(job_path, "w") as f:
            f.write(text)
    return load_job(job_path), job_path, note


def run_demo(workdir: str, force: bool = False, show_progress: bool = True,
             mediapipe: bool | None = None, tokenizer_steps: int | None = None) -> tuple[dict, str]:
    workdir = os.path.abspath(workdir)
    corpus = os.path.join(workdir, "corpus")
    if force:
        shutil.rmtree(workdir, ignore_errors=True)
    if not os.path.exists(os.path.join(corpus, "shard-00001.tar")):
        build_corpus(corpus, n_shards=2, per_shard=9)
    spec, _, note = demo_job(workdir, mediapipe)
    print(note, flush=True)
    with lease.hold(spec.output):  # labels, tokenizers and tokens: one writer throughout
        summary = dict(run_job(spec, force=force, show_progress=show_progress))
        summary["skipped_steps"] = []
        if summary["exit_code"] == 0:  # label -> train tiny tokenizers -> tokenize (token shards next to the labels)
            from .tokenize_output import DEMO_STEPS, demo_tokenize

            tok = demo_tokenize(spec.output, force=force, show_progress=show_progress,
                                steps=tokenizer_steps or DEMO_STEPS)
            summary["tokenize"] = tok
            summary["exit_code"] = max(summary["exit_code"], tok["exit_code"])
            if "caption" in spec.modalities:
                demo_text_tokenizer(spec.output)
        else:
            why = (f"{summary['shards_failed']} shard(s) failed" if summary["shards_failed"] else
                   f"{summary['samples_failed'] + summary['samples_dropped']} sample(s) failed")
            summary["skipped_steps"].append(
                f"tokenizer training and tokenization, because the labeling job did not finish cleanly ({why}; exit "
                f"{summary['exit_code']}): see `modalmill status {spec.output}`")
    return summary, spec.output


def demo_text_tokenizer(output: str) -> dict:
    """Train 4M's WordPiece text tokenizer layout on the demo's captions (the corpus' own descriptions)."""
    from ..tokenize.text_tokenizer import train_text_tokenizer_on_output
    from ..tokenize.train import default_out

    info = train_text_tokenizer_on_output(output, default_out(output, "text"), keep_if_trained=True)
    print(f"text tokenizer: {info['path']} (4M's WordPiece layout: {info['vocab_size']} tokens, "
          f"{info['learned_pieces']} word pieces learned from {info['captions']} captions"
          + ("; already trained on these captions: kept" if info.get("kept") else "") + ")", flush=True)
    return info
