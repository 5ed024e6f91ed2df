"""Write token shards: the existing pipeline in ``--only`` mode with tokenizer labelers configured.

``tokenize_output(OUT, ["canny_edge"], {"canny_edge": CKPT})`` builds a job spec for the output root ``OUT``
(shard sources from its completion markers, settings from its last run record) whose labelers are the tokenizer
labelers (:mod:`modalmill.tokenize.labelers`) with their checkpoints, and calls
:func:`modalmill.jobs.runner.run_job` with ``only=[tok_...]``. The runner's update tasks read each shard's stored
``rgb``, ``crop_settings`` and source modality in lockstep and write ``tok_X@224/shard-N.tar`` aligned with the
other modalities; reruns skip what is done, and tokens made with another checkpoint need ``force=True``.
"""

from __future__ import annotations

import os
from typing import Any

from ..jobs.spec import job_from_dict
from ..pipeline import manifest, storage
from ..schemas.modalities import get_modality
from .checkpoint import model_location
from .labelers import labeler_for_token_modality
from .train import default_out


def _abs(location: str) -> str:
    if storage.is_s3(location) or "://" in location:
        return location
    return os.path.abspath(os.path.expanduser(location))


def _last_spec(root: str) -> dict[str, Any]:
    runs = [r for r in manifest.list_runs(root) if isinstance(r.get("spec"), dict)]
    runs.sort(key=lambda r: r.get("run_id", ""))
    return runs[-1]["spec"] if runs else {}


def tokenize_spec(data: str, modalities: list[str], tokenizers: dict[str, str] | None = None, *,
                  workers: int = 1, gpus_per_worker: float = 0.0, batch_size: int | None = None,
                  shards: str | None = None, device: str = "auto"):
    """The job spec that writes ``modalities`` (sources or token modality names) with the given checkpoints."""
    tokenizers = dict(tokenizers or {})
    markers = manifest.list_markers(data)
    if not markers:
        raise ValueError(f"{data}: no completed shards to tokenize (label it first)")
    by_index = {int(m["index"]): (name, m) for name, m in markers.items()}
    n = max(by_index) + 1
    inputs = [by_index[i][1]["source"] if i in by_index else f"(no output for shard {i})" for i in range(n)]
    done = ",".join(str(i) for i in sorted(by_index))
    last = _last_spec(data)
    labelers: dict[str, Any] = {}
    token_mods: list[str] = []
    given = {labeler_for_token_modality(k).name: v for k, v in tokenizers.items()}
    for m in modalities:
        cls = labeler_for_token_modality(m)
        ckpt = given.pop(cls.name, None)
        if ckpt is None:
            guess = default_out(data, cls.source)
            if storage.exists(model_location(guess)):
                ckpt = guess
            else:
                raise ValueError(f"no tokenizer given for {cls.source!r}: pass --tokenizer {cls.source}=PATH "
                                 f"(or train one into {guess})")
        token_mods.append(cls.outputs[0])
        settings: dict[str, Any] = {"config": {"checkpoint": _abs(ckpt), "device": device}, "workers": workers}
        if gpus_per_worker:
            settings["resources"] = {"num_gpus": gpus_per_worker}
        if batch_size:
            settings["batch_size"] = batch_size
        labelers[cls.name] = settings
    if given:
        raise ValueError(f"--tokenizer given for {sorted(given)} but not asked for in --modalities")
    spec = {
        "name": f"{last.get('name', 'job')}-tokenize", "input": inputs, "output": data,
        "modalities": token_mods, "seed": last.get("seed", 0), "batch_size": last.get("batch_size", 16),
        "shards": shards or done, "labelers": labelers,
    }
    for section in ("decode", "crops"):
        if isinstance(last.get(section), dict):
            spec[section] = last[section]
    ray = last.get("ray") if isinstance(last.get("ray"), dict) else {}
    spec["ray"] = {k: ray[k] for k in ("num_cpus", "shard_cpus", "max_retries") if ray.get(k) is not None}
    return job_from_dict(spec, where="modalmill tokenize")


def tokenize_output(data: str, modalities: list[str], tokenizers: dict[str, str] | None = None, *,
                    force: bool = False, address: str | None = None, shards: str | None = None,
                    workers: int = 1, gpus_per_worker: float = 0.0, batch_size: int | None = None,
                    device: str = "auto", show_progress: bool = True) -> dict:
    """Tokenize an output root in place; returns the run summary (see ``run_job``)."""
    from ..jobs.runner import run_job

    spec = tokenize_spec(data, modalities, tokenizers, workers=workers, gpus_per_worker=gpus_per_worker,
                         batch_size=batch_size, shards=shards, device=device)
    return run_job(spec, only=list(spec.modalities), force=force, address=address, show_progress=show_progress)


def parse_tokenizer_args(items) -> dict[str, str]:
    """``["canny_edge=/ckpt", ...]`` -> ``{"canny_edge": "/ckpt"}`` (``--tokenizer M=PATH``)."""
    out: dict[str, str] = {}
    for item in items or ():
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--tokenizer {item!r}: expected MODALITY=PATH, e.g. canny_edge=/ckpt/canny")
        labeler_for_token_modality(name)  # raises for an unknown modality
        out[name] = path
    return out


DEMO_TOKENIZERS = (("rgb", "vq"), ("canny_edge", "fsq"))  # (source modality, quantizer) trained by `make demo`
DEMO_STEPS = 150


def demo_tokenize(output: str, force: bool = False, show_progress: bool = True, steps: int = DEMO_STEPS) -> dict:
    """The demo's second half: train tiny tokenizers on the demo output (Ray Train, 1 worker) and tokenize it."""
    from .train import default_out, format_report, train_tokenizer

    checkpoints = {}
    for source, quantizer in DEMO_TOKENIZERS:
        print(f"training a tiny {source} tokenizer ({quantizer}, {steps} steps) on {output} ...", flush=True)
        report = train_tokenizer(source, output, preset="tiny", quantizer=quantizer, steps=steps, workers=1,
                                 force=force, show_progress=show_progress)
        for line in format_report(report):
            print(line)
        checkpoints[source] = default_out(output, source)
    summary = tokenize_output(output, list(checkpoints), checkpoints, force=force, show_progress=show_progress)
    mods = list(tokenize_spec(output, list(checkpoints), checkpoints).modalities)
    print(f"tokenized: {summary['shards_processed']} shard(s) written, {summary['shards_skipped']} already done")
    for m in mods:
        print(f"token shards: {storage.join(output, m)}/shard-*.tar  (int16 [n_crops, "
              f"{get_modality(m).n_tokens}] per sample)")
    return summary
