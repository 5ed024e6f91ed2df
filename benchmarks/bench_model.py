"""Benchmark 3: the model path's overhead, the pipeline against a plain loop around the same labeler.

3a. DINOv2 (``transformers.Dinov2Model``, randomly initialised, saved and loaded through the labeler's own
    loading path) through the full pipeline (``modalmill run`` on a job with the ``dinov2`` labeler: read, decode,
    crop settings, the labeler's crop + resize, Ray actor, float16 features, npy encoding, tar writing, markers,
    manifests) against a plain loop in one process over the **same corpus tars**: read, decode, crop settings,
    the labeler's own ``prepare`` and ``process_batch`` in batches of ``BATCH`` per shard (the calls the pipeline's
    shard task and actor make), every output encoded to the bytes the pipeline stores.
3b. The tokenize stage (:func:`modalmill.jobs.tokenize_output.tokenize_output`, the ``--only tok_rgb@224`` update run
    that ``modalmill tokenize`` calls: read the stored rgb and crop_settings tars, decode, crop + resize, Ray actor,
    encoder + quantizer, int16 tokens, tar writing, realigned markers) against a plain loop over the **same stored
    tars** (read in lockstep, decoded, the tokenizer labeler's ``prepare`` and ``process_batch``, tokens encoded).
    Both sides use the same checkpoint (the ``MODALMILL_BENCH_TOKENIZER`` preset, default ``small``: ml-4m's vit_s)
    and the same batches of ``BATCH`` samples: the labeler's ``process_batch`` encodes a batch's crops in one
    encoder call on both sides (``crops_per_forward`` 64 >= 32 single-crop samples).

Like for like: the model runs on one thread on both sides (a labeler actor asks Ray for 1 CPU, and Ray gives it
``OMP_NUM_THREADS=1``; the loop calls ``torch.set_num_threads(1)``); the loop does everything in its one process,
one thing after another, while the pipeline (an embedded Ray of 2 CPUs) reads, decodes and writes in its shard
tasks beside the model's core, as a GPU pipeline has its CPUs. The outputs must equal the loop's (dinov2_global bit
for bit as stored; tokens id for id), so both did the same work.

Each repetition runs the loop and the pipeline once each, in fresh processes, on the corpus's first ``MODEL_IMAGES``
JPEGs (default 200) repacked ``MODEL_PER_SHARD`` (100) a shard, the same bytes. Start-up
is timed the same way on both sides and counted in the end-to-end figure: the pipeline's from before Ray's start
(Ray, planning, workers importing torch and transformers, the actor loading the model, the run record), the loop's
from its process start (importing torch and transformers, loading the model). The figure with the target is the
**end-to-end** ratio, pipeline images/s over the loop's, both with their start-up. Reported separately: each
side's start-up to its first labelled batch, and the **steady state**, computed the same way on both sides from
when each batch came back (the pipeline's from its shard tasks' timelines in the run record): the images of the
batches back after the first one / the time from the first batch back to the last. Only what finished in that
window is counted, so batches in flight when it opens do not inflate it. Each figure is the median of ``REPEATS``
repetitions (default 3), with min and max; every repetition checks the pipeline's output against the loop's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (ROOT, WORK, Figure, Monitor, Phase, bench_env, count_images, ensure_corpus,
                               not_measured, resharded, shard_pattern, start_ray)

MARK = "@@PHASE "
B3 = "3. model path overhead"
TARGET = 0.9
BATCH = 32  # the dinov2 labeler's default batch size
# DINOv2 sizes (transformers Dinov2Config); the real labeler's default checkpoint is ViT-B/14
DINOV2_SIZES = {"vits14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
                "vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
                "vitl14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)}
# the largest that fits the 15-minute suite on 2 cores: ViT-S/14 (one thread: ~0.15-0.2 s an image)
DINOV2_SIZE = os.environ.get("MODALMILL_BENCH_DINOV2", "vits14")
TOKENIZER_PRESET = os.environ.get("MODALMILL_BENCH_TOKENIZER", "small")  # modalmill.tokenize.train presets
# the corpus's first MODEL_IMAGES images, repacked MODEL_PER_SHARD a shard (2 shards: the pipeline crosses a shard
# boundary). 200 images, 100 a shard: fewer would let the pipeline's fixed start-up decide the end-to-end figure
# (12 cold runs: 2 models x 2 sides x 3 repetitions of ~20-30 s start-up plus ~0.3 s an image of model time each)
MODEL_IMAGES = int(os.environ.get("MODALMILL_BENCH_MODEL_IMAGES", "200"))
MODEL_PER_SHARD = int(os.environ.get("MODALMILL_BENCH_MODEL_PER_SHARD", "100"))
REPEATS = int(os.environ.get("MODALMILL_BENCH_REPEATS", "3"))
# Ray CPUs per shard task in the model jobs (the job spec's ray.shard_cpus)
SHARD_CPUS = float(os.environ.get("MODALMILL_BENCH_SHARD_CPUS", "1"))


def model_corpus(log=print) -> list[str]:
    """The shards both sides read: the corpus's first MODEL_IMAGES JPEGs, MODEL_PER_SHARD a shard (bytes as stored)."""
    return resharded(ensure_corpus(log), MODEL_IMAGES, MODEL_PER_SHARD, log)


# ---------------------------------------------------------------------- models (random weights, made once)


def dinov2_dir(size: str = DINOV2_SIZE) -> str:
    """A randomly initialised (seed 0) Dinov2Model of ``size``, saved with save_pretrained."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    d = os.path.join(WORK, "models", f"dinov2-{size}-random")
    if not os.path.exists(os.path.join(d, "config.json")):
        torch.manual_seed(0)
        dims = DINOV2_SIZES[size]
        cfg = Dinov2Config(**dims, intermediate_size=4 * dims["hidden_size"], patch_size=14, image_size=518)
        Dinov2Model(cfg).save_pretrained(d + ".tmp")
        os.replace(d + ".tmp", d)
    return d


def tokenizer_dir(preset: str = TOKENIZER_PRESET) -> str:
    """A randomly initialised (seed 0) rgb tokenizer of a modalmill.tokenize preset, saved as a checkpoint."""
    import torch

    from modalmill.tokenize.fourm import FourMTokenizer
    from modalmill.tokenize.train import default_config, export_config, save_fourm

    cfg = default_config("rgb", preset)
    # the preset's architecture in the folder's name: a preset redefined since (``small`` is now ml-4m's vit_s)
    # never reuses a tokenizer saved for its old definition
    arch = hashlib.sha256(json.dumps(cfg["model"], sort_keys=True, default=str).encode()).hexdigest()[:10]
    d = os.path.join(WORK, "models", f"tok_rgb-{preset}-{arch}-random")
    if not os.path.exists(os.path.join(d, "model.safetensors")):
        torch.manual_seed(0)
        save_fourm(FourMTokenizer(cfg["model"]), export_config(cfg, "(random initialisation, untrained)", 0, 1), d)
    return d


def _dinov2_labeler(weights: str):
    from modalmill.labelers.dinov2 import DINOv2Labeler

    lab = DINOv2Labeler({"weights": weights, "device": "cpu"})
    lab.setup()
    return lab


def _tok_labeler(checkpoint: str):
    from modalmill.tokenize.labelers import labeler_for_token_modality

    lab = labeler_for_token_modality("tok_rgb@224")({"checkpoint": checkpoint, "device": "cpu"})
    lab.setup()
    return lab


# ---------------------------------------------------------------------- the bare loops (from the same tar bytes)


def _input_batches(paths: list[str], size: int, side: int | None = None):
    """Batches of ``size`` LabelInputs per shard, read from the corpus tars as a full-mode shard task reads them:
    the tar read, the image decoded, the crop settings made (a generator: this work is timed with the loop). With
    ``side`` (the labeler's ``crop_side()``), each JPEG is decoded reduced by the same rule as the shard task's
    (``modalmill.pipeline.shard._needed``: the smallest crop keeps DRAFT_GAP x ``side`` pixels a side), so both
    sides decode the same pixels."""
    from modalmill.labelers.base import LabelInput
    from modalmill.io.crops import CropConfig, make_crop_settings
    from modalmill.io.decode import DecodeConfig, decode_image
    from modalmill.io.readers import iter_tar, pick_image_member
    from modalmill.pipeline.shard import _needed

    for p in paths:
        batch = []
        for raw in iter_tar(p):
            draft = None if side is None else (
                lambda w, h, k=raw.key: _needed(w, h, make_crop_settings(k, h, w, CropConfig(), 0), side))
            dec = decode_image(pick_image_member(raw.members)[1], DecodeConfig(), draft=draft)
            w, h = dec.stored_size
            batch.append(LabelInput(key=raw.key, image=dec.image, original_size=dec.original_size,
                                    crops=make_crop_settings(raw.key, h, w, CropConfig(), 0),
                                    stored_size=dec.stored_size if dec.reduced else None))
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch


def _stored_batches(data: str, shards: list[str], size: int):
    """Batches of ``size`` LabelInputs per shard from an output's stored rgb and crop_settings tars, read in
    lockstep and decoded as the tokenize run's update tasks read them (a generator, timed with the loop)."""
    from modalmill.labelers.base import LabelInput
    from modalmill.io.decode import decode_stored_rgb
    from modalmill.io.readers import zip_output
    from modalmill.schemas.modalities import get_modality

    for s in shards:
        batch = []
        for key, files in zip_output(data, s, ["rgb", "crop_settings"]):
            batch.append(LabelInput(key=key, image=decode_stored_rgb(files["rgb"]), original_size=None,
                                    crops=get_modality("crop_settings").decode(files["crop_settings"])))
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch


def bare_loop(kind: str, lab, batches, keep: str, out: str) -> dict:
    """The plain loop a user would write around the labeler, in one process: for each batch (read and decoded
    by ``batches``), the labeler's own ``prepare`` and ``process_batch`` (the calls the pipeline's shard task and
    actor make) and every output encoded to the bytes the pipeline stores. Saves ``keep`` per key (the check);
    records when each batch came back (the steady state)."""
    import numpy as np

    from modalmill.schemas.modalities import get_modality

    kept, back, nbytes = {}, [], 0
    with Monitor(kind) as ph:
        for batch in batches:
            results = lab.process_batch(lab.prepare(batch))
            for inp, res in zip(batch, results):
                if not isinstance(res, dict):
                    raise RuntimeError(f"bare loop: {inp.key}: {res}")
                hw = inp.image.shape[:2]
                nbytes += sum(len(get_modality(m).encode(res[m], inp.key, hw)) for m in lab.outputs)
                kept[inp.key] = np.asarray(res[keep])
            back.append([round(time.time(), 3), len(batch)])
        os.makedirs(out, exist_ok=True)
        np.savez(os.path.join(out, "kept.npz"), **kept)
    return {"phase": ph.as_dict(), "images": len(kept), "batches": back, "encoded_bytes": nbytes}


def bare_dinov2(paths: list[str], weights: str, out: str) -> dict:
    """The DINOv2 labeler in a plain loop over the corpus tars (batches of BATCH per shard, as the pipeline's)."""
    t = time.time()  # the bare loop's start-up: importing torch and transformers, loading the model
    preloaded = "torch" in sys.modules
    import torch

    torch.set_num_threads(1)
    lab = _dinov2_labeler(weights)
    startup = {"started": t, "startup_s": round(time.time() - t, 3), "torch_preloaded": preloaded}
    r = bare_loop("dinov2 bare", lab, _input_batches(paths, BATCH, lab.crop_side()), "dinov2_global", out)
    return {**r, **startup, "threads": torch.get_num_threads()}


def bare_tokenizer(data: str, checkpoint: str, shards: list[str], out: str, batch_size: int) -> dict:
    """The tokenizer labeler in a plain loop over the stored rgb and crop_settings tars (batches of
    ``batch_size`` per shard: its ``process_batch`` encodes a batch's crops in the same encoder calls as the
    pipeline's actor)."""
    t = time.time()  # the bare loop's start-up: importing torch, loading the tokenizer
    preloaded = "torch" in sys.modules
    import torch

    torch.set_num_threads(1)
    lab = _tok_labeler(checkpoint)
    startup = {"started": t, "startup_s": round(time.time() - t, 3), "torch_preloaded": preloaded}
    r = bare_loop("tokenize bare", lab, _stored_batches(data, shards, batch_size), "tok_rgb@224", out)
    return {**r, **startup, "threads": torch.get_num_threads(),
            "crops_per_forward": int(lab.config.crops_per_forward)}


# ---------------------------------------------------------------------- the pipeline runs


def _run_record(out: str) -> dict:
    runs_dir = os.path.join(out, "_modalmill", "runs")
    with open(os.path.join(runs_dir, sorted(os.listdir(runs_dir))[-1])) as f:
        return json.load(f)


def _record_extras(record: dict) -> dict:
    stages: dict[str, float] = {}
    for s in record.get("shards", []):
        for k, v in (s.get("seconds") or {}).items():
            stages[k] = round(stages.get(k, 0.0) + v, 3)
    shards = record.get("shards", [])
    back = sorted(b for s in shards for b in (s.get("timeline") or {}).get("batches", []))
    return {"images": record["samples_written"], "failed": record["samples_failed"] + record["samples_dropped"],
            "batches": back, "timelines": [s.get("timeline") for s in shards],
            "last_commit": max((s["finished_at"] for s in shards if s.get("finished_at")), default=None),
            "shard_stage_seconds": stages, "shard_seconds_sum": stages.get("total", 0.0),
            "exit_code": record.get("exit_code")}


def pipeline_dinov2(paths: list[str], weights: str, out: str) -> dict:
    """``modalmill run JOB.yaml`` (rgb, crop_settings, dinov2, dinov2_global) on an embedded Ray of 2 CPUs."""
    import ray
    import yaml

    from modalmill.cli import main

    job = {"name": "bench-dinov2", "input": shard_pattern(paths), "output": out,
           "modalities": ["rgb", "crop_settings", "dinov2", "dinov2_global"], "batch_size": BATCH,
           "labelers": {"dinov2": {"config": {"weights": weights, "device": "cpu"}, "batch_size": BATCH,
                                   "workers": 1}}, "ray": {"shard_cpus": SHARD_CPUS}}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    job_file = out.rstrip("/") + ".yaml"
    with open(job_file, "w") as f:
        yaml.safe_dump(job, f)
    extra = {"started": time.time(), "ray_start_s": start_ray(2)}  # Ray's start counts as the pipeline's
    try:
        with Monitor("dinov2 pipeline") as ph:
            try:
                main(["run", job_file, "--no-progress"], standalone_mode=False)
            except SystemExit as e:
                if e.code:
                    raise RuntimeError(f"modalmill run exited with {e.code}") from None
    finally:
        ray.shutdown()
    return {"phase": ph.as_dict(), **extra, **_record_extras(_run_record(out))}


def pipeline_tokenize(data: str, checkpoint: str) -> dict:
    """``tokenize_output(DATA, ["rgb"], ...)`` (the --only tok_rgb@224 run, the tokenizer labeler called on batches
    of ``BATCH`` as the bare loop) on an embedded Ray of 2 CPUs."""
    import ray

    from modalmill.jobs.tokenize_output import tokenize_output

    extra = {"started": time.time(), "ray_start_s": start_ray(2)}  # Ray's start counts as the pipeline's
    try:
        with Monitor("tokenize pipeline") as ph:
            summary = tokenize_output(data, ["rgb"], {"rgb": checkpoint}, workers=1, device="cpu", batch_size=BATCH,
                                      show_progress=False)
    finally:
        ray.shutdown()
    if summary["exit_code"]:
        raise RuntimeError(f"tokenize_output: exit code {summary['exit_code']}: {summary['failed_shards']}")
    return {"phase": ph.as_dict(), **extra, **_record_extras(_run_record(data))}


def _phase(kind: str, args: dict) -> dict:
    paths = model_corpus()
    if kind == "dinov2 bare":
        return bare_dinov2(paths, args["weights"], args["out"])
    if kind == "dinov2 pipeline":
        return pipeline_dinov2(paths, args["weights"], args["out"])
    if kind == "tokenize bare":
        return bare_tokenizer(args["data"], args["weights"], args["shard_names"], args["out"], args["batch_size"])
    if kind == "tokenize pipeline":
        return pipeline_tokenize(args["data"], args["weights"])
    raise ValueError(kind)


def run_phase(kind: str, args: dict, log=print) -> tuple[Phase, dict]:
    """Run one phase in a fresh Python process; returns its Phase and extras."""
    cmd = [sys.executable, "-m", "benchmarks.bench_model", "--phase", kind, "--args", json.dumps(args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"phase {kind!r} failed (exit {proc.returncode}): "
                           f"{tail[-1] if tail else ''}\n  " + "\n  ".join(tail))
    data = json.loads(lines[-1][len(MARK):])
    ph = Phase.from_dict(data.pop("phase"))
    log(f"  {kind:18s} {ph.wall_s:7.1f} s  {ph.own_cpu_s:7.1f} CPU s  ({ph.own_cores:.2f} cores; other processes "
        f"used {ph.foreign_cores:.2f})")
    return ph, data


# ---------------------------------------------------------------------- checks and figures


def _same_dinov2(out: str, bare_out: str, shards: list[str]) -> tuple[int, int, float]:
    """(samples compared, bit-identical dinov2_global, max |difference|) of the pipeline's output vs the bare loop."""
    import numpy as np

    from modalmill.io.writers import iter_tar_members
    from modalmill.schemas.modalities import get_modality

    bare = np.load(os.path.join(bare_out, "kept.npz"))
    n = same = 0
    worst = 0.0
    for s in shards:
        for key, _, data in iter_tar_members(os.path.join(out, "dinov2_global", f"{s}.tar")):
            got = get_modality("dinov2_global").decode(data)
            ref = bare[key].astype(got.dtype)  # stored as the modality's dtype (float16)
            n += 1
            same += int(np.array_equal(got, ref))
            worst = max(worst, float(np.abs(got.astype(np.float32) - ref.astype(np.float32)).max()))
    return n, same, worst


def _same_tokens(data: str, bare_out: str, shards: list[str]) -> tuple[int, int]:
    import numpy as np

    from modalmill.io.writers import iter_tar_members
    from modalmill.schemas.modalities import get_modality

    bare = np.load(os.path.join(bare_out, "kept.npz"))
    n = same = 0
    for s in shards:
        for key, _, blob in iter_tar_members(os.path.join(data, "tok_rgb@224", f"{s}.tar")):
            n += 1
            same += int(np.array_equal(get_modality("tok_rgb@224").decode(blob).astype(np.int64),
                                       bare[key].astype(np.int64)))
    return n, same


def _disturbance(*phases: Phase) -> str:
    busy = [p for p in phases if p.disturbed]
    return ("shared machine: other processes used " + ", ".join(
        f"{p.foreign_cores:.2f} cores during '{p.name}'" for p in busy)) if busy else ""


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _spread(values: list[float]) -> dict:
    import statistics

    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": [round(v, 4) for v in values]}


def _steady_rate(x: dict) -> float:
    """Images per second once the first labelled batch is back, counting only what was finished in the window:
    the images of the batches that came back after the first one / the time from the first batch back to the
    last (the same formula for the pipeline, from its shard tasks' timelines, and for the bare loop). Batches
    still in flight when the window opens are counted only once they are back, at their own time."""
    back = sorted(x.get("batches") or [])
    if len(back) < 2 or back[-1][0] <= back[0][0]:
        return 0.0
    return sum(n for _, n in back[1:]) / (back[-1][0] - back[0][0])


def _side(phase: Phase, x: dict, startup_key: str) -> dict:
    """One side's figures: end-to-end seconds (its start-up included: Ray's start for the pipeline, imports and the
    model's load for the loop), start-up to the first labelled batch back, and the steady rate."""
    total = phase.wall_s + x[startup_key]
    first = (x["batches"][0][0] - x["started"]) if x.get("batches") else float("nan")
    return {"e2e_s": total, "e2e_rate": x["images"] / total, "first_back_s": first, "steady": _steady_rate(x)}


def _pair_figures(what: str, reps: list[dict], valid: bool, same_note: str, model_note: str) -> list[Figure]:
    """``reps``: per repetition {bare, bare_x, pipe, pipe_x} -> the figures (medians of the repetitions)."""
    sides = [(_side(r["bare"], r["bare_x"], "startup_s"), _side(r["pipe"], r["pipe_x"], "ray_start_s")) for r in reps]
    e = _spread([p["e2e_rate"] / b["e2e_rate"] for b, p in sides])
    st = _spread([p["steady"] / b["steady"] if b["steady"] else 0.0 for b, p in sides])
    be, bs = _spread([b["e2e_rate"] for b, _ in sides]), _spread([b["steady"] for b, _ in sides])
    fb, fp = _spread([b["first_back_s"] for b, _ in sides]), _spread([p["first_back_s"] for _, p in sides])
    su, rs = _spread([r["bare_x"]["startup_s"] for r in reps]), _spread([r["pipe_x"]["ray_start_s"] for r in reps])
    last = reps[-1]
    spread = f"median of {e['n']} repetitions"
    phases = [p for r in reps for p in (r["bare"], r["pipe"])]
    preloaded = any(r["bare_x"].get("torch_preloaded") for r in reps)
    n = last["bare_x"]["images"]
    return [
        Figure(B3, f"{what}: bare loop end to end", round(be["median"], 3), "images/s",
               note=f"{spread} (min {be['min']:.3g}, max {be['max']:.3g}); {n} images (the corpus's first "
                    f"{MODEL_IMAGES}, {MODEL_PER_SHARD} a shard) from the same tar bytes as the pipeline: read, "
                    f"decode, crops, the labeler's prepare "
                    f"and process_batch in batches of {BATCH}, outputs encoded; one process, torch threads "
                    f"{last['bare_x']['threads']}; "
                    f"{model_note}; start-up (importing torch{' (already imported)' if preloaded else ''}, "
                    f"loading the model) {su['median']:.1f} s; steady state {bs['median']:.3g} images/s",
               detail={"bare": last["bare"].summary(), "sides": sides}),
        Figure(B3, f"{what}: pipeline end to end / bare loop end to end (both incl. start-up)", round(e["median"], 3),
               "x", f">= {TARGET}", met=bool(valid and e["median"] >= TARGET),
               note=_join(f"{spread} (min {e['min']:.3f}, max {e['max']:.3f}); the whole command on "
                          f"{last['pipe_x']['images']} images with Ray's start ({rs['median']:.1f} s) against the "
                          f"bare loop with its start-up (the steady state and the start-ups below, apart)",
                          same_note, _disturbance(*phases)),
               detail={"ratios": e["values"], "all": last["pipe"].summary(),
                       "shard_stage_seconds": last["pipe_x"]["shard_stage_seconds"],
                       "timelines": last["pipe_x"]["timelines"]}),
        Figure(B3, f"{what}: pipeline steady state / bare loop steady state", round(st["median"], 3), "x",
               note=f"{spread} (min {st['min']:.3f}, max {st['max']:.3f}); each side: images of the batches back "
                    "after its first labelled batch / the time from that batch to its last (only what finished "
                    "in the window)", detail={"ratios": st["values"]}),
        Figure(B3, f"{what}: start-up to the first labelled batch, pipeline", round(fp["median"], 2), "s",
               note=f"{spread} (min {fp['min']:.1f}, max {fp['max']:.1f}); from before Ray's start (Ray "
                    f"{rs['median']:.1f} s, planning, workers importing torch, the actor loading the model, the first "
                    f"batch read and labelled); the bare loop from its process start (imports, model load, first "
                    f"batch): {fb['median']:.1f} s (min {fb['min']:.1f}, max {fb['max']:.1f})"),
    ]


def run(log=print) -> list[Figure]:
    paths = model_corpus(log)
    if len(paths) < 2:
        raise RuntimeError("the model benchmark needs at least 2 shards (MODALMILL_BENCH_MODEL_IMAGES / _PER_SHARD)")
    shards = [f"shard-{i:05d}" for i in range(len(paths))]
    n_images = count_images(paths)
    base = os.path.join(WORK, "model")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    figs: list[Figure] = []
    out = os.path.join(base, "dinov2-all")

    # 3a: DINOv2
    what = f"DINOv2 {DINOV2_SIZE} at 224"
    log(f"model path: DINOv2 {DINOV2_SIZE} (random weights) at 224 on {n_images} images in {len(paths)} shards "
        f"(pipeline: shard_cpus {SHARD_CPUS:g})")
    try:
        weights = dinov2_dir()
        reps, valid, same_note = [], True, ""
        for rep in range(REPEATS):
            log(f"  repetition {rep + 1}/{REPEATS}")
            shutil.rmtree(out, ignore_errors=True)
            r = {}
            r["bare"], r["bare_x"] = run_phase("dinov2 bare", {"shards": len(paths), "weights": weights,
                                                               "out": os.path.join(base, "dinov2-bare")}, log)
            r["pipe"], r["pipe_x"] = run_phase("dinov2 pipeline", {"shards": len(paths), "weights": weights,
                                                                   "out": out}, log)
            n, same, worst = _same_dinov2(out, os.path.join(base, "dinov2-bare"), shards)
            if valid and not (n == r["bare_x"]["images"] == n_images and same == n):
                valid = False
                same_note = (f"INVALID (repetition {rep + 1}): {same}/{n} dinov2_global identical to the bare "
                             f"loop's (max diff {worst:.3g}), {n_images} images in the corpus")
            reps.append(r)
        if valid:
            same_note = f"dinov2_global bit-identical to the bare loop's for all {n} images in every repetition"
        figs += _pair_figures(what, reps, valid, same_note,
                              f"transformers Dinov2Model, random weights, batch {BATCH}, float32 on the CPU")
    except Exception as e:  # noqa: BLE001 - report the failure as a figure, run the rest
        log(f"DINOv2 benchmark failed: {e}")
        figs.append(not_measured(B3, f"{what}: pipeline end to end / bare loop end to end (both incl. start-up)",
                                 str(e).splitlines()[0][:300],
                                 f">= {TARGET}"))

    # 3b: tokenize, on the DINOv2 runs' outputs (their stored rgb and crop_settings)
    what = "tokenize rgb -> tok_rgb@224"
    try:
        if not os.path.exists(os.path.join(out, "rgb")):
            raise RuntimeError("the DINOv2 pipeline runs, whose outputs the tokenize runs read, did not complete")
        ckpt = tokenizer_dir()
        log(f"model path: tokenize rgb -> tok_rgb@224 with a random '{TOKENIZER_PRESET}' ViT VQ tokenizer")
        reps, valid = [], True
        for rep in range(REPEATS):
            log(f"  repetition {rep + 1}/{REPEATS}")
            data = {"all": os.path.join(base, "tok-data")}  # each repetition tokenizes a fresh copy of the output
            shutil.rmtree(data["all"], ignore_errors=True)
            shutil.copytree(out, data["all"])
            r = {}
            r["bare"], r["bare_x"] = run_phase("tokenize bare", {"shards": len(paths), "weights": ckpt,
                                                                 "data": data["all"], "shard_names": shards,
                                                                 "batch_size": BATCH,
                                                                 "out": os.path.join(base, "tok-bare")}, log)
            r["pipe"], r["pipe_x"] = run_phase("tokenize pipeline", {"shards": len(paths), "weights": ckpt,
                                                                     "data": data["all"]}, log)
            n, same = _same_tokens(data["all"], os.path.join(base, "tok-bare"), shards)
            valid = valid and n == r["bare_x"]["images"] == n_images and same == n
            reps.append(r)
        same_note = (f"tokens identical to the bare loop's for all {n} images in every repetition" if valid else
                     f"INVALID: {same}/{n} token arrays identical to the bare loop's")
        with open(os.path.join(ckpt, "config.json")) as f:
            m = json.load(f)  # ml-4m's VQVAE arguments
        # both sides tokenize in batches of BATCH: the pipeline is given it as the tokenizer labeler's batch_size
        # (without it the labeler would be called on chunks of its own default_batch_size)
        figs += _pair_figures(what, reps, valid, same_note,
                              f"modalmill.tokenize '{TOKENIZER_PRESET}' 4M-format ViT VQ encoder ({m['enc_type']}, "
                              f"{m['quant_type']} quantizer, {m['codebook_size']} codes), the same checkpoint on both "
                              f"sides, random weights, batch {BATCH} (one encoder call of up to "
                              f"{reps[-1]['bare_x']['crops_per_forward']} crops per batch), float32")
    except Exception as e:  # noqa: BLE001
        log(f"tokenize benchmark failed: {e}")
        figs.append(not_measured(B3, f"{what}: pipeline end to end / bare loop end to end (both incl. start-up)",
                                 str(e).splitlines()[0][:300],
                                 f">= {TARGET}"))
    shutil.rmtree(base, ignore_errors=True)
    return figs


if __name__ == "__main__":
    bench_env()
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["dinov2 bare", "dinov2 pipeline", "tokenize bare", "tokenize pipeline"])
    ap.add_argument("--args", default="{}")
    a = ap.parse_args()
    if a.phase:
        t = time.perf_counter()
        result = _phase(a.phase, json.loads(a.args))
        result["process_s"] = round(time.perf_counter() - t, 1)
        print(MARK + json.dumps(result), flush=True)
    else:
        for fig in run():
            print(json.dumps(fig.as_dict()))
