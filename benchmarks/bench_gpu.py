"""Benchmark 5 (GPU): the pipeline against the bare model on the same GPU, and whether the GPU is kept busy.

Models (random weights of the real architectures, made once under ``benchmarks/_work/models``; no download):

  dinov2_vitb14   transformers Dinov2Model ViT-B/14 at 224, the ``dinov2`` labeler, bf16 autocast
  dinov2_vitl14   the same at ViT-L/14
  sam_vit_h       segment-anything's ViT-H image encoder at 1024 (SAM's own resize + pad), bf16 autocast, through
                  a benchmark labeler that runs the ``sam`` labeler's ``embed`` (no mask generation) and stores the
                  mean-pooled embedding (``bench_sam_pooled``, float16 [256]), so the pipeline does the encoder's work
  tok_rgb_vitb    the ViT-B VQ tokenizer (modalmill.tokenize preset ``base``: dim 768, 12 encoder blocks, 16384
                  codes) through the tokenize run (``--only tok_rgb@224``); float32, as the tokenizer labeler runs

Per model, each in a fresh process: the bare loop (inputs decoded, preprocessed by the labeler's own code, batched
and moved to the GPU before timing; only the model calls are timed, with a final synchronize) and the pipeline
on an embedded Ray with every CPU of the machine (one 1-GPU actor; shard tasks decode on the CPUs), run on a
small and on the full corpus: the pipeline's rate is the marginal one, (N_full - N_small) / (T_full - T_small), so
the one-off start (Ray workers, imports, model load) cancels out. GPU utilisation is sampled with
``nvidia-smi -lms 100`` during every timed phase (mean, and the share of samples at 0 %: idle gaps).
Before a ratio is reported, the pipeline's output is checked against what the bare loop computed (saved after
timing): every sample present, features within 5 % of the largest value (bf16 on the GPU, batches composed
differently), token ids at least 99.9 % equal; a ratio whose outputs differ is marked INVALID and not met.

Without a GPU every figure is "not measured: no GPU in this session". ``--smoke`` runs the same code with tiny
models on the CPU, on 2 shards unless ``--shards`` says otherwise (a check of the script, not a benchmark; a few
minutes on 2 cores).

    python -m benchmarks.bench_gpu [--models dinov2_vitb14,sam_vit_h] [--shards 20] [--smoke]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks.common import (ROOT, WORK, Figure, bench_env, count_images, ensure_corpus, not_measured,
                               shard_pattern, start_ray)
from benchmarks.sam_encoder import BenchSamEncoder  # a module of its own: Ray workers import it by name

B5 = "5. GPU"
TARGET = 0.9
MARK = "@@PHASE "
MODELS = ("dinov2_vitb14", "dinov2_vitl14", "sam_vit_h", "tok_rgb_vitb")
BATCH = {"dinov2_vitb14": 64, "dinov2_vitl14": 64, "sam_vit_h": 8, "tok_rgb_vitb": 64}

# ---------------------------------------------------------------------- model files (random weights)


@dataclass(frozen=True)
class Setup:
    smoke: bool = False

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    @property
    def dtype(self) -> str:
        return "float32" if self.smoke else "bfloat16"


def model_dir(name: str, smoke: bool) -> str:
    import torch

    d = os.path.join(WORK, "models", f"gpu-{name}{'-smoke' if smoke else ''}")
    done = os.path.join(d, ".done")
    if os.path.exists(done):
        return d
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    torch.manual_seed(0)
    if name.startswith("dinov2"):
        from transformers import Dinov2Config, Dinov2Model

        dims = {"dinov2_vitb14": (768, 12, 12), "dinov2_vitl14": (1024, 24, 16)}[name]
        if smoke:
            dims = (64, 2, 2)
        h, n, heads = dims
        Dinov2Model(Dinov2Config(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                                 intermediate_size=4 * h, patch_size=14, image_size=518)).save_pretrained(d)
    elif name == "sam_vit_h":
        from safetensors.torch import save_file

        from modalmill.labelers.sam import SAM_VARIANTS, build_sam

        enc = SAM_VARIANTS["vit_h"] if not smoke else {"embed_dim": 64, "depth": 2, "num_heads": 2,
                                                          "global_attn_indexes": (1,)}
        sam = build_sam(enc)
        save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, os.path.join(d, "sam.safetensors"))
    elif name == "tok_rgb_vitb":
        from modalmill.tokenize.fourm import FourMTokenizer
        from modalmill.tokenize.train import default_config, export_config, save_fourm

        cfg = default_config("rgb", "tiny" if smoke else "base")
        save_fourm(FourMTokenizer(cfg["model"]), export_config(cfg, "(random initialisation, untrained)", 0, 1), d)
    else:
        raise ValueError(name)
    open(done, "w").close()
    return d


def labeler_settings(name: str, weights: str, s: Setup) -> tuple[str, list[str], dict]:
    """(labeler name, modalities, job-spec labeler settings) of a model's pipeline run."""
    res = {"num_gpus": 0 if s.smoke else 1}
    if name.startswith("dinov2"):
        return "dinov2", ["dinov2", "dinov2_global"], {
            "config": {"weights": weights, "device": s.device, "dtype": s.dtype}, "workers": 1, "resources": res}
    if name == "sam_vit_h":
        return "bench_sam_encoder", ["bench_sam_pooled"], {
            "config": {"weights": weights, "device": s.device, "dtype": s.dtype,
                       "model_type": "auto" if s.smoke else "vit_h"}, "workers": 1, "resources": res}
    raise ValueError(name)


# ---------------------------------------------------------------------- GPU utilisation


class GpuSampler:
    """``nvidia-smi --query-gpu=utilization.gpu -lms 100`` in the background: mean and idle share of the samples."""

    def __init__(self):
        self.samples: list[float] = []
        self.proc = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
            self.proc = subprocess.Popen(["nvidia-smi", "-i", gpu, "--query-gpu=utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.thread.join(timeout=5)
        return False

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_idle_share": None, "samples": 0}
        a = np.asarray(self.samples)
        return {"gpu_util_mean": round(float(a.mean()), 1), "gpu_idle_share": round(float((a == 0).mean()), 3),
                "samples": len(a)}


# ---------------------------------------------------------------------- bare loops


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(s: Setup, enabled: bool = True):
    import contextlib

    import torch

    if s.smoke or not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def bare(name: str, weights: str, paths: list[str], s: Setup, data: str | None = None, out: str | None = None) -> dict:
    """Time only the model calls on batches made (by the labeler's own preprocessing) and moved beforehand; the
    outputs are saved to ``out`` (npz, per key) after timing, for the same-work check."""
    import torch

    from benchmarks.bench_model import _full_inputs

    bs = BATCH[name]
    inputs = [i for shard in _full_inputs(paths) for i in shard]
    if name.startswith("dinov2"):
        from modalmill.labelers.dinov2 import DINOv2Labeler

        lab = DINOv2Labeler({"weights": weights, "device": s.device, "dtype": s.dtype})
        lab.setup()
        xs = [lab.to_tensor(list(lab.prepare(inputs[i:i + bs])), size=224) for i in range(0, len(inputs), bs)]
        keys = [[inp.key for inp in inputs[i:i + bs]] for i in range(0, len(inputs), bs)]

        def call(x):
            return lab.model(pixel_values=x).last_hidden_state

        def keep(y):  # the class token: what the pipeline stores as dinov2_global
            return y[:, 0].float().cpu().numpy()
    elif name == "sam_vit_h":
        lab = BenchSamEncoder({"weights": weights, "device": s.device, "dtype": s.dtype,
                               "model_type": "auto" if s.smoke else "vit_h"})
        lab.setup()
        lab._gen = lab.generator()
        xs = []
        for i in range(0, len(inputs), bs):
            parts = []
            for inp in inputs[i:i + bs]:
                t = lab._gen.predictor.transform.apply_image(inp.image)
                x = torch.as_tensor(t, device=lab.device).permute(2, 0, 1).contiguous()[None]
                parts.append(lab.model.preprocess(x))
            xs.append(torch.cat(parts))
        keys = [[inp.key for inp in inputs[i:i + bs]] for i in range(0, len(inputs), bs)]

        def call(x):
            return lab.model.image_encoder(x)

        def keep(y):  # the mean-pooled embedding: what the pipeline stores as bench_sam_pooled
            return y.float().mean(dim=(2, 3)).cpu().numpy()
    elif name == "tok_rgb_vitb":
        from modalmill.io.decode import decode_stored_rgb
        from modalmill.io.writers import iter_tar_members
        from modalmill.schemas.modalities import get_modality
        from modalmill.tokenize.labelers import labeler_for_token_modality

        lab = labeler_for_token_modality("tok_rgb@224")({"checkpoint": weights, "device": s.device})
        lab.setup()
        crops_of, crop_keys = [], []
        for p in sorted(os.listdir(os.path.join(data, "rgb"))):
            crops = {k: get_modality("crop_settings").decode(b)
                     for k, _, b in iter_tar_members(os.path.join(data, "crop_settings", p))}
            for k, _, b in iter_tar_members(os.path.join(data, "rgb", p)):
                from modalmill.labelers.base import LabelInput

                mine = list(lab._crops_of(LabelInput(key=k, image=decode_stored_rgb(b), original_size=None,
                                                     crops=crops[k])))
                crops_of += mine
                crop_keys += [k] * len(mine)
        inputs = crops_of
        xs = [lab.adapter.to_input(torch.from_numpy(np.stack(crops_of[i:i + bs])).to(lab.device))
              for i in range(0, len(crops_of), bs)]
        keys = [crop_keys[i:i + bs] for i in range(0, len(crops_of), bs)]

        def call(x):
            return lab.model.encode_ids(x)

        def keep(y):  # token ids, one row per crop
            return y.cpu().numpy().reshape(y.shape[0], -1)
    else:
        raise ValueError(name)
    with torch.inference_mode(), _autocast(s, enabled=name != "tok_rgb_vitb"):
        call(xs[0])  # warm-up (kernels, cuDNN/cuBLAS autotuning), not timed
        _sync(s.device)
        ys = []
        with GpuSampler() as gpu:
            t = time.perf_counter()
            for x in xs:
                ys.append(call(x))
            _sync(s.device)
            wall = time.perf_counter() - t
        # after timing: what the bare loop computed, per key, for the comparison with the pipeline's output
        results: dict[str, list] = {}
        for ks, y in zip(keys, ys):
            for k, row in zip(ks, keep(y)):
                results.setdefault(k, []).append(row)
    if out:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        np.savez(out, **{k: np.stack(v) for k, v in results.items()})
    return {"images": len(inputs), "wall_s": wall, **gpu.summary()}


# ---------------------------------------------------------------------- pipeline runs


def pipeline(name: str, weights: str, paths: list[str], out: str, s: Setup) -> dict:
    """The pipeline on ``paths``: ``run_job`` (what ``modalmill run`` calls) on an embedded Ray with all CPUs."""
    import ray

    from modalmill.jobs.runner import run_job
    from modalmill.jobs.spec import job_from_dict

    shutil.rmtree(out, ignore_errors=True)
    extra = {"ray_start_s": start_ray(os.cpu_count())}
    try:
        if name == "tok_rgb_vitb":
            from modalmill.jobs.tokenize_output import tokenize_output

            spec = job_from_dict({"input": shard_pattern(paths), "output": out, "modalities": ["rgb", "crop_settings"],
                                  "batch_size": BATCH[name]}, where="bench")
            run_job(spec, show_progress=False)  # the stored rgb + crop settings the tokenize run reads: not timed
            with GpuSampler() as gpu:
                t = time.perf_counter()
                summary = tokenize_output(out, ["rgb"], {"rgb": weights}, workers=1, device=s.device,
                                          gpus_per_worker=0 if s.smoke else 1, show_progress=False)
                wall = time.perf_counter() - t
        else:
            labeler, mods, settings = labeler_settings(name, weights, s)
            spec = job_from_dict({"input": shard_pattern(paths), "output": out,
                                  "modalities": ["rgb", "crop_settings", *mods], "batch_size": BATCH[name],
                                  "labelers": {labeler: settings}}, where="bench")
            with GpuSampler() as gpu:
                t = time.perf_counter()
                summary = run_job(spec, show_progress=False)
                wall = time.perf_counter() - t
    finally:
        ray.shutdown()
    if summary["exit_code"]:
        raise RuntimeError(f"pipeline exit code {summary['exit_code']}: {summary['failed_shards'][:1]}")
    return {"images": summary["samples_written"], "wall_s": wall, **extra, **gpu.summary()}


def _phase(kind: str, a: dict) -> dict:
    s = Setup(smoke=a["smoke"])
    paths = ensure_corpus()[:a["shards"]]
    if kind == "bare":
        return bare(a["model"], a["weights"], paths, s, a.get("data"), a.get("bare_out"))
    return pipeline(a["model"], a["weights"], paths, a["out"], s)


def run_phase(kind: str, args: dict, log=print) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_gpu", "--phase", kind, "--args", json.dumps(args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"phase {kind!r} of {args['model']} failed (exit {proc.returncode}): "
                           f"{tail[-1] if tail else ''}\n  "
                           + "\n  ".join(tail))
    r = json.loads(lines[-1][len(MARK):])
    log(f"  {args['model']:14s} {kind:9s} {args['shards']:3d} shards: {r['images']} images in {r['wall_s']:.1f} s, "
        f"GPU util {r.get('gpu_util_mean')} % (idle share {r.get('gpu_idle_share')})")
    return r


# ---------------------------------------------------------------------- same work


OUTPUT_OF = {"dinov2_vitb14": "dinov2_global", "dinov2_vitl14": "dinov2_global", "sam_vit_h": "bench_sam_pooled",
             "tok_rgb_vitb": "tok_rgb@224"}
ID_AGREEMENT = 0.999  # token ids: batch composition may flip a near-tie on the GPU
FLOAT_RTOL = 0.05  # bf16 features: |pipeline - bare| <= 5 % of the largest |bare| value


def same_work(model: str, bare_npz: str, out: str) -> tuple[bool, str]:
    """Whether the pipeline's output (``out``) equals the bare loop's, within the stated tolerance."""
    from modalmill.io.writers import iter_tar_members
    from modalmill.schemas.modalities import get_modality

    modality = OUTPUT_OF[model]
    bare = np.load(bare_npz)
    spec = get_modality(modality)
    seen, agree, total, worst = set(), 0, 0, 0.0
    folder = os.path.join(out, modality)
    for tar in sorted(os.listdir(folder)):
        for key, _, blob in iter_tar_members(os.path.join(folder, tar)):
            got, ref = np.asarray(spec.decode(blob)), bare[key]
            got = got.reshape(ref.shape) if got.size == ref.size else got.reshape(-1, ref.shape[-1])[:ref.shape[0]]
            seen.add(key)
            if model == "tok_rgb_vitb":
                agree += int((got.astype(np.int64) == ref.astype(np.int64)).sum())
                total += ref.size
            else:
                scale = float(np.abs(ref).max()) or 1.0
                worst = max(worst, float(np.abs(got.astype(np.float32) - ref.astype(np.float32)).max()) / scale)
    missing = set(bare.files) - seen
    if missing or not seen:
        return False, f"INVALID: {len(missing)} of the bare loop's {len(bare.files)} samples missing from the pipeline"
    if model == "tok_rgb_vitb":
        share = agree / max(1, total)
        return share >= ID_AGREEMENT, f"token ids equal to the bare loop's: {share:.4%} (need {ID_AGREEMENT:.1%})"
    return worst <= FLOAT_RTOL, (f"{modality} within {worst:.2%} of the bare loop's (largest difference / largest "
                                 f"value; need <= {FLOAT_RTOL:.0%}) for all {len(seen)} samples")


# ---------------------------------------------------------------------- the benchmark


def gpu_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no GPU in this session"
    return True, torch.cuda.get_device_name(0)


def run(log=print, models=MODELS, shards: int | None = None, smoke: bool = False) -> list[Figure]:
    ok, what = gpu_available()
    if not ok and not smoke:
        log(f"GPU benchmark: {what}")
        figs = []
        for m in models:
            figs.append(not_measured(B5, f"{m}: pipeline / bare model", what, f">= {TARGET}"))
            figs.append(not_measured(B5, f"{m}: GPU utilisation during the pipeline", what))
        return figs
    s = Setup(smoke=smoke)
    paths = ensure_corpus(log)
    if shards or smoke:  # a smoke run checks the script: 2 shards unless told otherwise
        paths = paths[:shards or 2]
    small = paths[:max(1, len(paths) // 4)]
    device_name = what if ok and not smoke else "CPU (smoke test: tiny models, not a benchmark)"
    log(f"GPU benchmark on {device_name}: {count_images(paths)} images ({count_images(small)} for the small run)")
    base = os.path.join(WORK, "gpu")
    figs: list[Figure] = []
    for m in models:
        try:
            weights = model_dir(m, smoke)
            if m == "sam_vit_h":
                weights = os.path.join(weights, "sam.safetensors")
            common = {"model": m, "weights": weights, "smoke": smoke}
            p_small = run_phase("pipeline", {**common, "shards": len(small), "out": os.path.join(base, "small")}, log)
            p_full = run_phase("pipeline", {**common, "shards": len(paths), "out": os.path.join(base, "full")}, log)
            bare_npz = os.path.join(base, "bare.npz")
            b = run_phase("bare", {**common, "shards": len(paths), "data": os.path.join(base, "full"),
                                   "bare_out": bare_npz}, log)
            valid, same_note = same_work(m, bare_npz, os.path.join(base, "full"))
            log(f"  {m}: {same_note}")
            d_n, d_t = p_full["images"] - p_small["images"], p_full["wall_s"] - p_small["wall_s"]
            rate = d_n / d_t if d_t > 0 else float("nan")
            bare_rate = b["images"] / b["wall_s"]
            unit = "crops/s" if m == "tok_rgb_vitb" else "images/s"
            if m == "tok_rgb_vitb":
                rate *= b["images"] / max(1, p_full["images"])  # crops per image (n_crops)
            prec = "float32 (the tokenizer labeler's precision)" if m == "tok_rgb_vitb" else s.dtype
            figs.append(Figure(B5, f"{m}: bare model loop", round(bare_rate, 1), unit,
                               note=f"{prec}; GPU util {b['gpu_util_mean']} %, idle share {b['gpu_idle_share']}",
                               detail=b))
            figs.append(Figure(B5, f"{m}: pipeline (marginal rate)", round(rate, 1), unit,
                               note=f"({p_full['images']} - {p_small['images']}) images / ({p_full['wall_s']:.1f} - "
                                    f"{p_small['wall_s']:.1f}) s", detail={"small": p_small, "full": p_full}))
            figs.append(Figure(B5, f"{m}: pipeline / bare model", round(rate / bare_rate, 3), "x", f">= {TARGET}",
                               met=None if smoke else bool(valid and rate / bare_rate >= TARGET),
                               note="; ".join(x for x in (same_note, "smoke test on the CPU: not a benchmark figure"
                                                          if smoke else "") if x)))
            figs.append(Figure(B5, f"{m}: GPU utilisation during the pipeline", p_full["gpu_util_mean"], "%",
                               note=f"share of 100 ms samples at 0 %: {p_full['gpu_idle_share']}"))
        except Exception as e:  # noqa: BLE001 - one model's failure is reported, the others still run
            figs.append(not_measured(B5, f"{m}: pipeline / bare model", str(e).splitlines()[0][:300], f">= {TARGET}"))
    shutil.rmtree(base, ignore_errors=True)
    return figs


if __name__ == "__main__":
    bench_env()
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--shards", type=int, default=None,
                    help="corpus shards of 100 images to use (default: all; 2 with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: check the script, measure nothing")
    ap.add_argument("--phase", choices=["bare", "pipeline"])
    ap.add_argument("--args", default="{}")
    a = ap.parse_args()
    if a.phase:
        print(MARK + json.dumps(_phase(a.phase, json.loads(a.args))), flush=True)
    else:
        for fig in run(models=[m for m in a.models.split(",") if m], shards=a.shards, smoke=a.smoke):
            print(json.dumps(fig.as_dict()))
