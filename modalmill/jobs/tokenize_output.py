"""Write token shards: the existing pipeline in ``--only`` mode with tokenizer labelers configured.

``tokenize_output(OUT, ["canny_edge"], {"canny_edge": CKPT})`` builds a job spec for the output root ``OUT``
(shard sources from its completion markers, settings from its last run record) whose labelers are the tokenizer
labelers (:mod:`modalmill.tokenize.labelers`) with their checkpoints, and calls
:func:`modalmill.jobs.runner.run_job` with ``only=[tok_...]``. The runner's update tasks read each shard's stored
``rgb``, ``crop_settings`` and source modality in lockstep and write ``tok_X@224/shard-N.tar`` aligned with the
other modalities; reruns skip what is done, and tokens made with another checkpoint need ``force=True``.

``sam_instance`` (from ``sam_mask``) is written as 4M's own file, and ``human_poses`` is rewritten in place with
``pose_tokenized`` filled: shards whose ``human_poses`` still comes from its labeler (HMR 2.0) are rewritten without
``force``; after that the file's producer is ``tok_human_poses`` and the marker records what it ``refines`` (HMR
2.0's producer), so re-running the original labeling job over the same output still finds ``human_poses`` done.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .spec import job_from_dict
from ..io import manifest, storage
from ..schemas.modalities import get_modality
from ..tokenize.checkpoint import model_location
from ..tokenize.labelers import in_place, labeler_for_token_modality
from ..tokenize.train import default_out


def _abs(location: str) -> str:
    from ..tokenize.hub import is_hub_id

    if storage.is_s3(location) or "://" in location or is_hub_id(location):
        return location
    return os.path.abspath(os.path.expanduser(location))


def _last_spec(root: str) -> dict[str, Any]:
    runs = [r for r in manifest.list_runs(root) if isinstance(r.get("spec"), dict)]
    runs.sort(key=lambda r: r.get("run_id", ""))
    return runs[-1]["spec"] if runs else {}


def token_modalities(modalities: list[str]) -> list[str]:
    """``["canny_edge", "tok_rgb@224", ...]`` (sources, labeler names or token modalities) -> token modalities."""
    return list(dict.fromkeys(labeler_for_token_modality(m).outputs[0] for m in modalities))


def tokenize_spec(data: str, modalities: list[str], tokenizers: dict[str, str] | None = None, *,
                  workers: int = 1, gpus_per_worker: float = 0.0, batch_size: int | None = None,
                  shards: str | None = None, device: str = "auto"):
    """The job spec that adds ``modalities`` (sources or token modality names) to the output ``data``.

    It is the output's last recorded job (same input, decoding, crops, seed and labelers, so everything already
    written stays valid) with the token modalities and their tokenizer labelers added; without a run record the
    shard sources come from the completion markers."""
    tokenizers = dict(tokenizers or {})
    data = storage.absolute(data)
    markers = manifest.list_markers(data)
    if not markers:
        raise ValueError(f"{data}: no completed shards to tokenize (label it first)")
    by_index = {int(m["index"]): (name, m) for name, m in markers.items()}
    done = ",".join(str(i) for i in sorted(by_index))
    have = {m for _, mk in by_index.values() for m in mk.get("modalities", {})}
    last = _last_spec(data)
    labelers: dict[str, Any] = {}
    token_mods: list[str] = []
    given = {labeler_for_token_modality(k).name: v for k, v in tokenizers.items()}
    for m in modalities:
        cls = labeler_for_token_modality(m)
        if cls.source not in have:
            raise ValueError(f"{data} has no {cls.source!r} labels to tokenize (it has {', '.join(sorted(have))}); "
                             f"label it first")
        ckpt = given.pop(cls.name, None)
        if ckpt is None:
            tm = cls.tok_modality()
            guess = default_out(data, tm)
            if storage.exists(model_location(guess)):
                ckpt = guess
            else:
                raise ValueError(f"no tokenizer given for {tm!r}: pass --tokenizer {tm}=PATH "
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
    if last:
        spec = {k: v for k, v in last.items() if k not in ("name", "modalities", "labelers", "shards", "output")}
        mods = list(last.get("modalities") or [])
        old_labelers = dict(last.get("labelers") or {})
    else:
        n = max(by_index) + 1
        spec = {"input": [by_index[i][1]["source"] if i in by_index else f"(no output for shard {i})"
                          for i in range(n)], "seed": 0}
        mods, old_labelers = [], {}
    # every modality the tokenizers read must be part of the job (as it is in the output)
    sources = [labeler_for_token_modality(t).source for t in token_mods]
    mods = list(dict.fromkeys(mods + [s for s in sources if s != "rgb"] + token_mods))
    # the tokenizer labelers come first: the runner picks the first listed labeler that makes a modality, and the
    # pose tokenizer makes human_poses as HMR 2.0 does
    spec.update(name=f"{(last or {}).get('name', 'job').removesuffix('-tokenize')}-tokenize", output=data,
                modalities=mods, shards=shards or done,
                labelers={**labelers, **{k: v for k, v in old_labelers.items() if k not in labelers}})
    if isinstance(spec.get("ray"), dict):
        spec["ray"] = {k: v for k, v in spec["ray"].items() if k != "address" and v is not None}
    return job_from_dict(spec, where="modalmill tokenize")


def tokenize_output(data: str, modalities: list[str], tokenizers: dict[str, str] | None = None, *,
                    force: bool = False, address: str | None = None, shards: str | None = None,
                    workers: int = 1, gpus_per_worker: float = 0.0, batch_size: int | None = None,
                    device: str = "auto", show_progress: bool = True, wait: bool = False) -> dict:
    """Tokenize an output root in place; returns the combined run summary (see ``run_job``), with the summary of
    each modality's run under ``runs``.

    One pipeline run per token modality: a run holds one tokenizer actor pool next to its shard tasks, so a
    2-CPU machine is never asked for two 1-CPU tokenizer actors *and* a shard task at once."""
    from ..io import lease

    data = storage.absolute(data)  # the workers' working directory is not the driver's
    # argument checks before the lease, so that a wrong DATA or modality leaves nothing behind
    token_modalities(modalities)
    if not any(page for page in storage.list_pages(manifest.meta_url(data, "shards"), suffix=".json")):
        raise ValueError(f"{data}: no completed shards to tokenize (label it first)")
    with lease.hold(data, wait=wait):  # one writer for all the per-modality runs (run_job's own hold nests)
        return _tokenize_output(data, modalities, tokenizers, force=force, address=address, shards=shards,
                                workers=workers, gpus_per_worker=gpus_per_worker, batch_size=batch_size,
                                device=device, show_progress=show_progress)


def _tokenize_output(data, modalities, tokenizers, *, force, address, shards, workers, gpus_per_worker, batch_size,
                     device, show_progress) -> dict:
    from .runner import run_job

    tokenizers = dict(tokenizers or {})
    given = {labeler_for_token_modality(k).outputs[0]: v for k, v in tokenizers.items()}
    unknown = sorted(set(given) - set(token_modalities(modalities)))
    if unknown:
        raise ValueError(f"--tokenizer given for {unknown} but not asked for in --modalities")
    summaries = []
    for tok in token_modalities(modalities):
        spec = tokenize_spec(data, [tok], {tok: given[tok]} if tok in given else None, workers=workers,
                             gpus_per_worker=gpus_per_worker, batch_size=batch_size, shards=shards, device=device)
        cls = labeler_for_token_modality(tok)
        if in_place(cls) and not force:
            # human_poses still as its labeler wrote it is not "made with other settings": adding pose_tokenized
            # is this step's job, so those shards are rewritten (force) and the ones already tokenized with this
            # checkpoint are skipped; ones tokenized with another checkpoint need --force
            todo = _untokenized_shards(spec, cls)
            if todo:
                summaries.append(run_job(dataclasses.replace(spec, shards=",".join(map(str, todo))), only=[tok],
                                         force=True, address=address, show_progress=show_progress))
                rest = [i for i in _selected(spec) if i not in todo]
                if not rest:
                    continue
                spec = dataclasses.replace(spec, shards=",".join(map(str, rest)))
        summaries.append(run_job(spec, only=[tok], force=force, address=address, show_progress=show_progress))
        if summaries[-1].get("lease_lost"):  # another driver owns the output now: no further modality
            break
    return combine_summaries(summaries)


def _selected(spec) -> list[int]:
    from .spec import parse_shard_selection

    markers = manifest.list_markers(spec.output)
    n = max(int(m["index"]) for m in markers.values()) + 1
    done = {int(m["index"]) for m in markers.values()}
    return [i for i in parse_shard_selection(spec.shards, n) if i in done]


def _untokenized_shards(spec, cls) -> list[int]:
    """Shards whose ``cls.outputs[0]`` was written by another labeler (not yet tokenized in place)."""
    out = cls.outputs[0]
    wanted = set(_selected(spec))
    todo = []
    for m in manifest.list_markers(spec.output).values():
        i = int(m["index"])
        prod = (m.get("modalities") or {}).get(out)
        if i in wanted and prod is not None and prod.get("labeler") != cls.name:
            todo.append(i)
    return sorted(todo)


def combine_summaries(summaries: list[dict]) -> dict:
    """Several run summaries of one output as one (counts added, worst exit code); ``runs`` holds them all."""
    out = {"output": summaries[0]["output"], "runs": summaries,
           "modalities": [m for s in summaries for m in (s.get("only") or [])],
           "exit_code": max(s["exit_code"] for s in summaries), "errors_by_reason": {}, "failed_shards": []}
    for k in ("shards_processed", "shards_skipped", "shards_failed", "samples_read", "samples_written",
              "samples_failed", "samples_dropped", "seconds"):
        out[k] = sum(s[k] for s in summaries)
    lost = [s["lease_lost"] for s in summaries if s.get("lease_lost")]
    if lost:
        out["lease_lost"] = lost[0]
    for s in summaries:
        out["failed_shards"] += s["failed_shards"]
        for reason, n in s["errors_by_reason"].items():
            out["errors_by_reason"][reason] = out["errors_by_reason"].get(reason, 0) + n
    return out


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


DEMO_TOKENIZERS = (("rgb", "lucid"), ("canny_edge", "lucid"))  # (source modality, quantizer) trained by `make demo`
DEMO_STEPS = 150


def demo_tokenize(output: str, force: bool = False, show_progress: bool = True, steps: int = DEMO_STEPS) -> dict:
    """The demo's second half: train tiny tokenizers on the demo output (Ray Train, 1 worker) and tokenize it."""
    print(f"\nlabel -> train-tokenizer -> tokenize: tiny tokenizers ({steps} steps on the CPU, about 0.2 M parameters "
          f"each) trained on the demo's own labels. This shows the workflow; it is not a quality "
          f"run (4M's tokenizers train for days on millions of images).", flush=True)
    import ray

    from ..tokenize.train import already_trained

    if not force and all(already_trained(source, output, preset="tiny", quantizer=q, steps=steps)
                         for source, q in DEMO_TOKENIZERS):
        return _demo_tokenize(output, force, show_progress, steps)  # nothing to train: no Ray to start
    # one quiet embedded Ray for all of it (Ray Train's controller logs would drown the demo's own lines)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        return _demo_tokenize(output, force, show_progress, steps)
    finally:
        if started:
            ray.shutdown()


def _demo_tokenize(output: str, force: bool, show_progress: bool, steps: int) -> dict:
    from ..tokenize.train import format_report, train_tokenizer

    checkpoints = {}
    for source, quantizer in DEMO_TOKENIZERS:
        print(f"training a tiny {source} tokenizer ({quantizer}, {steps} steps) on {output} ...", flush=True)
        report = train_tokenizer(source, output, preset="tiny", quantizer=quantizer, steps=steps, workers=1,
                                 cpus_per_worker=1, force=force, show_progress=show_progress)
        if report.get("skipped"):
            print(f"{source}: already trained with this config on these labels: kept as it is "
                  f"({report['checkpoint']})")
        else:
            for line in format_report(report):
                print(line)
        used, size = report["after"]["codes_used"], report["codebook_size"]
        print(f"{source}: held-out codebook usage {used}/{size} codes"
              + ("" if 2 * used >= size else " - BELOW HALF: this tokenizer has collapsed onto a few codes"))
        checkpoints[source] = default_out(output, source)
    summary = tokenize_output(output, list(checkpoints), checkpoints, force=force, show_progress=show_progress)
    print(f"tokenized: {summary['shards_processed']} shard(s) written, {summary['shards_skipped']} already done")
    for m in token_modalities(list(checkpoints)):
        print(f"token shards: {storage.join(output, m)}/shard-*.tar  (int16 [n_crops, "
              f"{get_modality(m).n_tokens}] per sample)")
    for source in checkpoints:
        print(f"tokenizer: {checkpoints[source]}  (model.safetensors, config.json, report.json, "
              f"reconstructions.png)")
    return summary
