"""The demo: build a corpus from real photos, run the packaged demo job on the embedded Ray."""

from __future__ import annotations

import os
import shutil
from importlib.resources import files

from .democorpus import build_corpus
from .runner import run_job
from .spec import load_job


def run_demo(workdir: str, force: bool = False, show_progress: bool = True) -> tuple[dict, str]:
    workdir = os.path.abspath(workdir)
    corpus = os.path.join(workdir, "corpus")
    if force:
        shutil.rmtree(workdir, ignore_errors=True)
    if not os.path.exists(os.path.join(corpus, "shard-00001.tar")):
        build_corpus(corpus, n_shards=2, per_shard=9)
    job_path = os.path.join(workdir, "demo.yaml")
    with open(job_path, "w") as f:
        f.write(files("modalmill.jobs").joinpath("demo.yaml").read_text())
    spec = load_job(job_path)
    summary = run_job(spec, force=force, show_progress=show_progress)
    if summary["exit_code"] == 0:  # label -> train tiny tokenizers -> tokenize (token shards next to the labels)
        from ..tokenize.encode import demo_tokenize

        demo_tokenize(spec.output, force=force, show_progress=show_progress)
    return summary, spec.output
