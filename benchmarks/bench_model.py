"""Benchmark 3: the model path's overhead, the pipeline against the bare model.

3a. DINOv2 (``transformers.Dinov2Model``, randomly initialised, saved and loaded through the labeler's own
    loading path) through the full pipeline (``modalmill run`` on a job with the ``dinov2`` labeler: read, decode,
    crop settings, the labeler's crop + resize, Ray actor, float16 features, npy encoding, tar writing, markers,
    manifests) against a bare loop that only calls the same model on already decoded, already batched tensors.
3b. The tokenize stage (:func:`modalmill.jobs.tokenize_output.tokenize_output`, the ``--only tok_rgb@224`` update run
    that ``modalmill tokenize`` calls: read the stored rgb and crop_settings tars, decode, crop + resize,
    Ray actor, encoder + quantizer, int16 tokens, tar writing, realigned markers) against a bare loop that only
    calls the same tokenizer's ``encode`` on already prepared, already batched crops.

Like for like: the model runs on one thread in both (a labeler actor asks Ray for 1 CPU, and Ray gives it
``OMP_NUM_THREADS=1``; the bare loop calls ``torch.set_num_threads(1)``), with the same batches, so the pipeline
has the machine's second core for everything around the model, as a GPU pipeline has its CPUs. The outputs must
equal the bare loop's (dinov2_global bit for bit; tokens id for id), so both did the same work.

Each repetition runs the bare loop and the pipeline once each, in fresh processes (the pipeline on a fresh
embedded Ray of 2 CPUs, started before timing), on ``MODEL_SHARDS`` shards. The figure with the target is the
**end-to-end** ratio, both sides with their start-up: the pipeline's images / wall time of the whole command
(planning, Ray workers importing torch and transformers, the actor loading the model, the run record: everything
but starting Ray) against the bare loop's images / (its own start-up: importing torch and transformers and loading
the model, the first thing its fresh process does + its model calls). Reported beside it: the pipeline end to end
against the bare model calls alone (the bare loop's start-up left out), and the steady-state ratio, the
pipeline's images after its first labelled batch came back / the time from then to the last shard's commit (from
the run record), from which the one-off start of a run cancels out, as over a real corpus. Each
is the median of ``REPEATS`` repetitions (default 3), with min and max; every repetition checks the pipeline's
output against the bare loop's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (ROOT, WORK, Figure, Monitor, Phase, bench_env, count_images, ensure_corpus,
                               not_measured, shard_pattern, start_ray)

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
MODEL_SHARDS = int(os.environ.get("MODALMILL_BENCH_MODEL_SHARDS", "2"))  # shards of 100 images
REPEATS = int(os.environ.get("MODALMILL_BENCH_REPEATS", "3"))
# Ray CPUs per shard task in the model jobs (the job spec's ray.shard_cpus)
SHARD_CPUS = float(os.environ.get("MODALMILL_BENCH_SHARD_CPUS", "1"))


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

    d = os.path.join(WORK, "models", f"tok_rgb-{preset}-random")
    if not os.path.exists(os.path.join(d, "model.safetensors")):
        torch.manual_seed(0)
        cfg = default_config("rgb", preset)
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


# ---------------------------------------------------------------------- the bare loops (inputs made before timing)


def _batches(items: list, size: int):
    return [items[i:i + size] for i in range(0, len(items), size)]


def _full_inputs(paths: list[str]):
    """Per shard, the LabelInputs a full-mode shard task makes (stored rgb decode + crop settings)."""
    from modalmill.labelers.base import LabelInput
    from modalmill.io.crops import CropConfig, make_crop_settings
    from modalmill.io.decode import DecodeConfig, decode_image
    from modalmill.io.readers import iter_tar, pick_image_member

    out = []
    for p in paths:
        shard = []
        for raw in iter_tar(p):
            dec = decode_image(pick_image_member(raw.members)[1], DecodeConfig())
            h, w = dec.image.shape[:2]
            shard.append(LabelInput(key=raw.key, image=dec.image, original_size=dec.original_size,
                                    crops=make_crop_settings(raw.key, h, w, CropConfig(), 0)))
        out.append(shard)
    return out


def bare_dinov2(paths: list[str], weights: str, out: str) -> dict:
    """Time only ``model(pixel_values=x)`` over the same batches the pipeline makes (per shard, BATCH each)."""
    t = time.perf_counter()  # the bare loop's own start-up: importing torch and transformers, loading the model
    preloaded = "torch" in sys.modules
    import numpy as np
    import torch

    torch.set_num_threads(1)
    lab = _dinov2_labeler(weights)
    startup = {"startup_s": round(time.perf_counter() - t, 3), "torch_preloaded": preloaded}
    batches = []  # (keys, crops per key, float tensor [crops, 3, 224, 224]): the labeler's own prepare + to_tensor
    for shard in _full_inputs(paths):
        for b in _batches(shard, BATCH):
            prepared = list(lab.prepare(b))  # per sample uint8 [n_crops, 224, 224, 3]: the teacher runs on every crop
            batches.append(([i.key for i in b], [len(p) for p in prepared],
                            lab.to_tensor([im for p in prepared for im in p], size=224)))
    with torch.inference_mode():
        lab.model(pixel_values=batches[0][2][:2])  # warm-up, not timed
        cls = {}
        with Monitor("dinov2 bare") as ph:
            for keys, counts, x in batches:
                hidden = lab.model(pixel_values=x).last_hidden_state[:, 0].float().numpy()
                pos = 0
                for k, n in zip(keys, counts):
                    cls[k] = hidden[pos:pos + n]  # [n_crops, C], as the pipeline stores dinov2_global
                    pos += n
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "cls.npz"), **{k: v.astype(np.float16) for k, v in cls.items()})
    return {"phase": ph.as_dict(), "images": len(cls), "threads": torch.get_num_threads(), **startup}


def bare_tokenizer(data: str, checkpoint: str, shards: list[str], out: str, batch_size: int) -> dict:
    """Time only ``model.encode_ids(x)`` over the crops the tokenize run prepares, in its batches (``batch_size``
    samples of a shard, all their crops in one encoder call)."""
    t = time.perf_counter()  # the bare loop's own start-up: importing torch, loading the tokenizer
    preloaded = "torch" in sys.modules
    import numpy as np
    import torch

    torch.set_num_threads(1)
    lab = _tok_labeler(checkpoint)
    startup = {"startup_s": round(time.perf_counter() - t, 3), "torch_preloaded": preloaded}

    from modalmill.labelers.base import LabelInput
    from modalmill.io.decode import decode_stored_rgb
    from modalmill.io.writers import iter_tar_members
    from modalmill.schemas.modalities import get_modality
    step = max(1, int(lab.config.crops_per_forward))
    batches = []  # (keys, n_crops per key, input tensor)
    for s in shards:
        rgb = list(iter_tar_members(os.path.join(data, "rgb", f"{s}.tar")))
        crops = {k: get_modality("crop_settings").decode(b)
                 for k, _, b in iter_tar_members(os.path.join(data, "crop_settings", f"{s}.tar"))}
        inputs = [LabelInput(key=k, image=decode_stored_rgb(b), original_size=None, crops=crops[k]) for k, _, b in rgb]
        for b in _batches(inputs, batch_size):
            flat = np.concatenate([p[0] for p in lab.prepare(b)])  # the labeler's own preprocessing
            if len(flat) > step:
                raise RuntimeError("bench: a shard batch spans several encoder calls; lower the batch size")
            batches.append(([inp.key for inp in b], [len(inp.crops) for inp in b],
                            lab.adapter.to_input(torch.from_numpy(flat))))
    with torch.inference_mode():
        lab.model.encode_ids(batches[0][2][:2])  # warm-up, not timed
        tokens = {}
        with Monitor("tokenize bare") as ph:
            for keys, counts, x in batches:
                ids = lab.model.encode_ids(x).numpy()
                pos = 0
                for k, n in zip(keys, counts):
                    tokens[k] = ids[pos:pos + n]
                    pos += n
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "tokens.npz"), **{k: v.astype(np.int64) for k, v in tokens.items()})
    return {"phase": ph.as_dict(), "images": len(tokens), "threads": torch.get_num_threads(), **startup}


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
    firsts = sorted(tuple(s["first_batch"]) for s in shards if s.get("first_batch"))
    return {"images": record["samples_written"], "failed": record["samples_failed"] + record["samples_dropped"],
            "first_batch": list(firsts[0]) if firsts else None,
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
    extra = {"ray_start_s": start_ray(2)}
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

    extra = {"ray_start_s": start_ray(2)}
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
    paths = ensure_corpus()[:args["shards"]]
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

    bare = np.load(os.path.join(bare_out, "cls.npz"))
    n = same = 0
    worst = 0.0
    for s in shards:
        for key, _, data in iter_tar_members(os.path.join(out, "dinov2_global", f"{s}.tar")):
            got = get_modality("dinov2_global").decode(data)
            ref = bare[key]
            n += 1
            same += int(np.array_equal(got, ref))
            worst = max(worst, float(np.abs(got.astype(np.float32) - ref.astype(np.float32)).max()))
    return n, same, worst


def _same_tokens(data: str, bare_out: str, shards: list[str]) -> tuple[int, int]:
    import numpy as np

    from modalmill.io.writers import iter_tar_members
    from modalmill.schemas.modalities import get_modality

    bare = np.load(os.path.join(bare_out, "tokens.npz"))
    n = same = 0
    for s in shards:
        for key, _, blob in iter_tar_members(os.path.join(data, "tok_rgb@224", f"{s}.tar")):
            n += 1
            same += int(np.array_equal(get_modality("tok_rgb@224").decode(blob).astype(np.int64), bare[key]))
    return n, same


def _disturbance(*phases: Phase) -> str:
    busy = [p for p in phases if p.disturbed]
    return ("shared machine: other processes used " + ", ".join(
        f"{p.foreign_cores:.2f} cores during '{p.name}'" for p in busy)) if busy else ""


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _spread(values: list[float]) -> dict:
    import statistics

    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _steady_rate(x: dict) -> float:
    """Images per second from the first labelled batch's return to the last shard's commit: (N - n_first) /
    (t_last_commit - t_first_batch), from the run record (the run's one-off start -- workers, imports, weights,
    the first batch -- cancels out, as over a real corpus)."""
    if not x.get("first_batch") or not x.get("last_commit"):
        return 0.0
    (t1, n1), t2 = x["first_batch"], x["last_commit"]
    return (x["images"] - n1) / (t2 - t1) if t2 > t1 else 0.0


def _pair_figures(what: str, reps: list[dict], valid: bool, same_note: str, model_note: str) -> list[Figure]:
    """``reps``: per repetition {bare, bare_x, pipe, pipe_x} -> the figures (medians of the repetitions)."""
    bare_rate, bare_e2e, e2e, e2e_vs_calls, steady, startups = [], [], [], [], [], []
    for r in reps:
        n_bare = r["bare_x"]["images"]
        br = n_bare / r["bare"].wall_s  # model calls only
        be = n_bare / (r["bare"].wall_s + r["bare_x"]["startup_s"])  # with its start-up (imports, model load)
        pe = r["pipe_x"]["images"] / r["pipe"].wall_s
        bare_rate.append(br)
        bare_e2e.append(be)
        startups.append(r["bare_x"]["startup_s"])
        e2e.append(pe / be)
        e2e_vs_calls.append(pe / br)
        steady.append(_steady_rate(r["pipe_x"]) / br)
    b, be, e, ec, st, su = (_spread(v) for v in (bare_rate, bare_e2e, e2e, e2e_vs_calls, steady, startups))
    last = reps[-1]
    spread = f"median of {e['n']} repetitions"
    phases = [p for r in reps for p in (r["bare"], r["pipe"])]
    preloaded = any(r["bare_x"].get("torch_preloaded") for r in reps)
    return [
        Figure(B3, f"{what}: bare model loop", round(b["median"], 3), "images/s",
               note=f"{spread} (min {b['min']:.3g}, max {b['max']:.3g}); model calls only; {last['bare_x']['images']} "
                    f"images, torch threads {last['bare_x']['threads']}; {model_note}; its start-up (importing torch"
                    f"{' (already imported: not counted)' if preloaded else ''}, loading the model) "
                    f"{su['median']:.1f} s", detail={"bare": last["bare"].summary(), "startup_s": startups}),
        Figure(B3, f"{what}: pipeline end to end / bare loop end to end (both incl. start-up)", round(e["median"], 3),
               "x", f">= {TARGET}", met=bool(valid and e["median"] >= TARGET),
               note=_join(f"{spread} (min {e['min']:.3f}, max {e['max']:.3f}); the whole command on "
                          f"{last['pipe_x']['images']} images (Ray started before timing) against the bare loop's "
                          f"start-up + model calls ({be['median']:.3g} images/s)", same_note, _disturbance(*phases)),
               detail={"ratios": e2e, "all": last["pipe"].summary(),
                       "shard_stage_seconds": last["pipe_x"]["shard_stage_seconds"]}),
        Figure(B3, f"{what}: pipeline end to end / bare model calls only", round(ec["median"], 3), "x",
               note=f"{spread} (min {ec['min']:.3f}, max {ec['max']:.3f}); the bare loop's start-up left out: "
                    "the pipeline's start-up against nothing", detail={"ratios": e2e_vs_calls}),
        Figure(B3, f"{what}: pipeline steady state / bare model calls only", round(st["median"], 3), "x",
               note=f"{spread} (min {st['min']:.3f}, max {st['max']:.3f}); images after the first labelled batch came "
                    "back / time from then to the last commit (the run's start cancels out)",
               detail={"ratios": steady, "first_batch": last["pipe_x"]["first_batch"],
                       "last_commit": last["pipe_x"]["last_commit"]}),
    ]


def run(log=print) -> list[Figure]:
    paths = ensure_corpus(log)[:MODEL_SHARDS]
    if len(paths) < 2:
        raise RuntimeError("the model benchmark needs at least 2 corpus shards (MODALMILL_BENCH_MODEL_SHARDS)")
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
                              f"{m['quant_type']} quantizer, {m['codebook_size']} codes), random "
                              f"weights, batch {BATCH}, float32")
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
