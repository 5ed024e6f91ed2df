"""Training a tokenizer on a labeled output: presets, the training loop, Ray Train, evaluation and reports.

``train_tokenizer(modality, data=OUT)`` trains a tokenizer for one source modality on the labeled shards of
``OUT`` with Ray Train's ``TorchTrainer`` (``workers`` data-parallel workers on the embedded Ray, on CPU or
GPU, or on a cluster via ``address``), or in this process with ``use_ray=False``; ``OUT`` and the checkpoint
directory may be local or ``s3://`` (on a Ray that runs only on this machine the workers get this process' S3
settings, see :func:`_storage_env`). The loop streams random crops (:mod:`modalmill.tokenize.data`), shows a
tqdm bar with loss, reconstruction error and codebook usage, and writes a resumable training state every
``checkpoint_every`` steps: running the same command again continues from the last state (``force=True`` starts
over). At the end rank 0 exports the checkpoint and evaluates the model on held-out samples: reconstruction
error (MSE/PSNR; accuracy/mIoU for class maps; cosine for features), codebook usage (% of codes used) and
perplexity, before vs after training and against a trivial baseline, saved as ``report.json`` beside a picture
of originals and reconstructions (``reconstructions.png``).

``sam_instance`` trains the SAM-instance tokenizer on every instance of the ``sam_mask`` labels (each instance cut to
a crop resized to 224, then filled into a 64x64 mask spanning its own box: 16 tokens per instance, 1024 codes in
``base``); ``human_poses`` trains the MLP pose tokenizer on every person's 207-d body pose (8 tokens, 1024 codes).

Presets (``tiny`` for tests and the demo, ``small``, ``base`` = 4M's sizes and vocabularies) are merged with a
config file (YAML or JSON with ``model:`` and ``train:`` sections).
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import platform
import random
import shutil
import tempfile
import threading
import time
import warnings
from typing import Any

import numpy as np

from ..io import storage
from ..schemas.modalities import TOKEN_MODALITIES, get_modality
from . import checkpoint as ckpt
from .fourm import VQ_DEFAULTS, VQVAE_DEFAULTS
from .modality_info import write_fourm_entry
from .fourm_inputs import KINDS

MODEL_KEYS = set(VQ_DEFAULTS) | set(VQVAE_DEFAULTS)

PRESETS = ("tiny", "small", "base")

SEMSEG_LABELS = 134  # COCO-panoptic ids 0..132 shifted by one; 0 = unlabelled (4M's semseg tokenizer input)
FEATURE_PATCH = {"clip": 16, "dinov2": 14, "imagebind": 14}  # teacher patch size: 224 / p tokens per side
# source modality -> token modality (4M's folder names)
TOKEN_OF = {src: tok for tok, (src, _v, _n) in TOKEN_MODALITIES.items()}
# sources without a tok_* folder: tokens are stored inside their own JSON/npy (4M's pose_tokenized, token_ids)
EXTRA_TOKENS = {"human_poses": (1024, 8), "sam_instance": (1024, 16)}

TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 20000, "batch_size": 32, "lr": 1e-4, "min_lr": 0.0, "warmup_steps": 500, "weight_decay": 0.05,
    "betas": [0.9, 0.99], "grad_clip": 1.0, "codebook_weight": 1.0, "seed": 0, "crops_per_sample": 2,
    "stored_crop_prob": 0.5, "min_crop_scale": 0.8, "hflip_prob": 0.5, "holdout_fraction": 0.1,
    "shuffle_buffer": 256, "max_eval_items": 256, "log_every": 10, "checkpoint_every": 500, "n_pictures": 8,
}


def vocab_and_tokens(source: str) -> tuple[int, int, str | None]:
    """(registry vocab size, tokens per crop, token modality or None) for a source modality."""
    token_of = {src: tok for tok, (src, _v, _n) in TOKEN_MODALITIES.items()}  # with any registered since import
    if source not in token_of and source not in EXTRA_TOKENS:
        from ..schemas.plugins import load_plugins, plugins_loaded

        if not plugins_loaded():  # a plugin's token modality, in a process (a Ray Train worker) new to plugins
            load_plugins()
            token_of = {src: tok for tok, (src, _v, _n) in TOKEN_MODALITIES.items()}
    if source in token_of:
        spec = get_modality(token_of[source])
        return spec.vocab_size, spec.n_tokens, spec.name
    if source in EXTRA_TOKENS:
        v, n = EXTRA_TOKENS[source]
        return v, n, None
    raise ValueError(f"no tokenizer is defined for modality {source!r}; tokenizable: "
                     f"{', '.join(sorted(list(token_of) + list(EXTRA_TOKENS)))}")


QUANTIZERS = ("lucid", "memcodes")  # 4M's quantizers; "vq" is accepted for lucid


def _quantizer(quantizer: str | None, default: str) -> str:
    q = {"vq": "lucid"}.get(quantizer or default, quantizer or default)
    if q == "fsq":
        raise ValueError("FSQ tokenizers are gone: modalmill now trains 4M's architecture and format (ml-4m loads "
                         "them), whose quantizers are lucid (EMA vector quantizer with normalised codes) and memcodes")
    if q not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {quantizer!r}: lucid (spatial; also 'vq') or memcodes (vectors)")
    return q


def default_config(source: str, preset: str = "base", quantizer: str | None = None,
                   in_channels: int | None = None) -> dict[str, Any]:
    """The model + train config of a preset for ``source``. ``model`` is the constructor arguments of ml-4m's
    ``VQVAE`` (4M's architecture and checkpoint format); ``base`` is 4M's own size and vocabulary."""
    from .fourm import VIT_SIZES, vit_name
    from .fourm_inputs import KINDS

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose {', '.join(PRESETS)}")
    vocab, n_tokens, tok = vocab_and_tokens(source)
    kind = KINDS.get(source)
    train = dict(TRAIN_DEFAULTS)
    if kind in ("global", "pose"):
        width = {"tiny": 64, "small": 256, "base": 1024}[preset]
        blocks = {"tiny": 1, "small": 2, "base": 6}[preset]
        codes = {"tiny": 64, "small": min(vocab, 1024), "base": vocab}[preset]
        if _quantizer(quantizer, "memcodes") != "memcodes":
            raise ValueError(f"{source}: vector tokenizers use memcodes (one code per head)")
        mlp = f"BottleneckMLP/B_{blocks}-Wi_{width}"
        model = {"enc_type": mlp, "dec_type": mlp, "n_channels": 207 if kind == "pose" else int(in_channels or 0),
                 "image_size": 224, "quant_type": "memcodes", "codebook_size": codes, "num_codebooks": n_tokens,
                 "latent_dim": n_tokens * (4 if preset == "tiny" else 64)}
        train.update(crops_per_sample=1, min_crop_scale=0.2, stored_crop_prob=1.0)
    else:
        # small: ml-4m's vit_s (width 512, 8 blocks, 8 heads), base: its vit_b; both load in unmodified ml-4m.
        # tiny (one block of width 64) is test-sized: ml-4m names no such ViT (a warning says so when trained)
        dims = {"tiny": (64, 1, 2), "small": VIT_SIZES["s"], "base": VIT_SIZES["b"]}[preset]
        codes = {"tiny": 64, "small": min(vocab, 4096), "base": vocab}[preset]
        if _quantizer(quantizer, "lucid") != "lucid":
            raise ValueError(f"{source}: spatial tokenizers use the lucid quantizer (memcodes is for vectors)")
        model = {"enc_type": vit_name(*dims, "enc"), "dec_type": vit_name(*dims, "dec"), "image_size": 224,
                 "patch_size": 16, "quant_type": "lucid", "codebook_size": codes,
                 "latent_dim": 16 if preset == "tiny" else 32, "norm_codes": True, "post_mlp": True,
                 # tiny: 8 crops x 196 tokens per batch over 64 codes; a code used fewer than 8 times per batch
                 # (EMA) is re-seeded from the batch's latents, which keeps the small codebook in use
                 "ema_decay": 0.9 if preset == "tiny" else 0.99,
                 "threshold_ema_dead_code": 8.0 if preset == "tiny" else 2.0,
                 "commitment_weight": 1.0, "sync_codebook": False}
        if kind in ("rgb", "normal"):
            model["n_channels"] = 3
        elif kind in ("edge", "gray", "depth"):
            model["n_channels"] = 1
        elif kind == "semseg":
            model.update(n_channels=32 if preset == "tiny" else 64, n_labels=SEMSEG_LABELS)
        elif kind == "feature":
            model.update(n_channels=int(in_channels or 0), patch_proj=False, patch_size=FEATURE_PATCH[source])
            train.update(min_crop_scale=0.2, stored_crop_prob=1.0)  # teacher features exist for stored crops only
        elif kind == "mask":
            model.update(n_channels=1, image_size=64, out_conv=True)
        else:
            raise ValueError(f"no tokenizer is defined for modality {source!r}")
    if preset == "tiny":
        train.update(steps=200, batch_size=8, lr=2e-3, warmup_steps=20, weight_decay=0.0, checkpoint_every=100,
                     max_eval_items=64, holdout_fraction=0.2)
    elif preset == "small":
        train.update(steps=5000, batch_size=16, lr=5e-4, warmup_steps=200)
    return {"modality": source, "token_modality": tok, "vocab_size": vocab, "preset": preset, "model": model,
            "train": train}


def _merge(base: dict, override: dict, where: str = "config") -> dict:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if k not in out and not (where == "model" and k in MODEL_KEYS):
            raise ValueError(f"{where}: unknown key {k!r}; known: {', '.join(sorted(out))}")
        if isinstance(out.get(k), dict) and isinstance(v, dict):
            out[k] = _merge(out[k], v, f"{where}.{k}")
        else:
            out[k] = v
    return out


def load_config_file(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ValueError(f"{path}: no such config file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a tokenizer config is a mapping with 'model:' and/or 'train:' sections")
    bad = sorted(set(data) - {"model", "train", "preset", "quantizer"})
    if bad:
        raise ValueError(f"{path}: unknown section(s) {bad}; use model:, train:, preset:, quantizer:")
    return data


def resolve_config(source: str, data: str, preset: str | None = None, overrides: dict | None = None,
                   quantizer: str | None = None) -> dict[str, Any]:
    """Preset defaults for ``source`` merged with ``overrides`` ({'model': ..., 'train': ...}), checked against the
    registry (tokens per crop, vocabulary) and completed with the data's channel count where needed."""
    from .data import TokenizerData

    overrides = dict(overrides or {})
    preset = overrides.pop("preset", None) or preset or "base"
    quantizer = overrides.pop("quantizer", None) or quantizer
    in_channels = None
    if KINDS.get(source) in ("feature", "global"):
        first = TokenizerData(data, source, 0.0).first_label()
        in_channels = int(np.asarray(first).shape[-1])
    cfg = default_config(source, preset, quantizer, in_channels)
    cfg["model"] = _merge(cfg["model"], overrides.get("model") or {}, "model")
    cfg["train"] = _merge(cfg["train"], overrides.get("train") or {}, "train")
    check_config(cfg)
    return cfg


def check_config(cfg: dict[str, Any]) -> None:
    from .fourm import FourMSpec

    source = cfg["modality"]
    vocab, n_tokens, _ = vocab_and_tokens(source)
    spec = FourMSpec.of(cfg["model"])
    if spec.codebook_size > vocab:
        raise ValueError(f"{source}: the quantizer has {spec.codebook_size} codes, more than the {vocab} the token "
                         f"modality allows")
    if spec.n_tokens != n_tokens:
        raise ValueError(f"{source}: this architecture makes {spec.n_tokens} tokens per crop; 4M's layout needs "
                         f"{n_tokens}")


# ---------------------------------------------------------------------- the loop


def _lr_at(step: int, t: dict) -> float:
    if step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / max(1, t["warmup_steps"])
    progress = (step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"])
    return t["min_lr"] + 0.5 * (t["lr"] - t["min_lr"]) * (1 + math.cos(math.pi * min(1.0, progress)))


def _usage(indices, size: int) -> tuple[float, float, int]:
    import torch

    counts = torch.bincount(indices.reshape(-1).long(), minlength=size).double()
    p = counts / counts.sum().clamp_min(1)
    nz = p[p > 0]
    perplexity = float(torch.exp(-(nz * nz.log()).sum()))
    used = int((counts > 0).sum())
    return used / size, perplexity, used


def evaluate(model, adapter, targets, device, batch_size: int = 32) -> dict[str, Any]:
    """Reconstruction metrics, codebook usage and perplexity on ``targets`` (eval mode, no state change)."""
    import torch

    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    all_idx = []
    with torch.inference_mode():
        for i in range(0, len(targets), batch_size):
            t = targets[i:i + batch_size].to(device)
            pred, q = model(adapter.to_input(t))
            all_idx.append(q.indices.cpu())
            for k, v in adapter.metrics(pred.float().cpu(), t.cpu()).items():
                sums[k] = sums.get(k, 0.0) + v
    model.train(was_training)
    out = adapter.summarise(sums)
    usage, ppl, used = _usage(torch.cat(all_idx), model.quantizer.codebook_size)
    out.update(codebook_usage=usage, codes_used=used, codebook_size=model.quantizer.codebook_size,
               perplexity=ppl, items=len(targets))
    return out


def baseline_metrics(adapter, targets) -> dict[str, Any]:
    """The metrics of a trivial prediction (the held-out mean everywhere / the most frequent class)."""
    pred = adapter.baseline(targets)
    return adapter.summarise(adapter.metrics(pred, targets))


def reconstruction_picture(model, adapter, targets, device, n: int) -> bytes | None:
    """PNG: one row per held-out crop, original | reconstruction."""
    import torch
    from PIL import Image

    if adapter.kind == "vector" or n <= 0:
        return None
    t = targets[:n].to(device)
    with torch.inference_mode():
        pred, _ = model.eval()(adapter.to_input(t))
    rec = adapter.reconstruct(pred.float()).cpu()
    rows = [np.concatenate([adapter.to_rgb(a.cpu()), np.full((a.shape[-2], 4, 3), 255, np.uint8),
                            adapter.to_rgb(b)], axis=1) for a, b in zip(t, rec)]
    pic = np.concatenate([np.concatenate([r, np.full((4, r.shape[1], 3), 255, np.uint8)]) for r in rows])
    scale = max(1, 128 // targets.shape[-1])
    img = Image.fromarray(pic)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def machine() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


class _ReadLog:
    """The training data as one worker reads it, noting the shards it reads and how many training (not held-out)
    samples it read through; everything else is the wrapped :class:`TokenizerData`."""

    def __init__(self, data):
        self._data, self.shards_read, self.samples_read = data, [], 0

    def __getattr__(self, name: str):
        return getattr(self._data, name)

    def samples(self, shard: str):
        first = shard not in self.shards_read
        if first:
            self.shards_read.append(shard)
        n = 0
        for s in self._data.samples(shard):
            n += s.key not in self._data.holdout
            yield s
        if first:  # counted once per shard, when its first pass ends
            self.samples_read += n


def _params_digest(model) -> str:
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def train_loop(loop: dict[str, Any]) -> None:
    """The per-worker training function (Ray Train's ``train_loop_per_worker``, or called directly): place the
    worker, build (or resume) the model, train it, gather what every worker read and, on rank 0, export the
    tokenizer and write its report."""
    from .data import TokenizerData, holdout_items

    cfg, out, data_root = loop["config"], loop["out"], loop["data"]
    t = cfg["train"]
    rank, world, device = _place_worker(loop)
    t0 = time.perf_counter()
    data = TokenizerData(data_root, cfg["modality"], t["holdout_fraction"])
    model, adapter, optim, start, extra = _build_or_resume(cfg, out)
    model.to(device)
    held = holdout_items(data, adapter, t["max_eval_items"]) if rank == 0 else None
    if rank == 0 and extra.get("before") is None:
        extra["before"] = evaluate(model, adapter, held, device)
    read_log = _ReadLog(data)
    step, run_t0 = _train_steps(loop, model, adapter, optim, read_log, start, extra, rank, world, device)
    # what each worker trained on, and a digest of its parameters (equal on every rank: DDP averages gradients)
    workers_info = _gather_workers_info(read_log, model, rank, world, step - start)
    if loop.get("ray", False):
        _report_to_ray_train(step, extra["history"])
    if rank != 0:
        return
    extra["train_seconds"] = extra.get("train_seconds", 0.0) + time.perf_counter() - run_t0
    model.eval()
    location = save_fourm(model, export_config(cfg, data_root, step, world), out)
    write_fourm_entry(out, cfg)  # 4M's MODALITY_INFO entry for the token modality, beside the checkpoint
    _write_report(cfg, out, model, adapter, data, held, device, location, step, world, extra, workers_info, t0,
                  loop.get("fingerprint", {}))


def _place_worker(loop: dict[str, Any]):
    """(rank, world size, torch device) of this worker: Ray Train's, or rank 0 of 1 in-process."""
    import torch

    if loop.get("ray", False):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    return 0, 1, torch.device(loop.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def _build_or_resume(cfg: dict[str, Any], out: str):
    """(model, train adapter, AdamW optimizer, first step, extra state): seeded fresh, or resumed from the
    training state saved in ``out`` (which must have been trained with the same config, steps aside)."""
    import torch

    from .fourm import FourMTokenizer
    from .fourm_train import train_adapter_for

    t = cfg["train"]
    torch.manual_seed(t["seed"])
    model = FourMTokenizer(cfg["model"], with_decoder=True)
    adapter = train_adapter_for(cfg["modality"], model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith("pos_emb") else decay).append(p)
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                               {"params": no_decay, "weight_decay": 0.0}], lr=t["lr"], betas=tuple(t["betas"]))
    start, extra = 0, {"history": [], "before": None, "train_seconds": 0.0}
    state = ckpt.load_train_state(out)
    if state is not None:
        if _without_steps(state["config"]) != _without_steps(cfg):
            raise ValueError(f"{out} holds a tokenizer trained with another config; use another --out or --force")
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        start, extra = state["step"], state["extra"]
    return model, adapter, optim, start, extra


def _train_steps(loop, model, adapter, optim, read_log, start, extra, rank, world, device):
    """Train from step ``start`` to the configured steps (DDP across workers when several), logging the loss and
    codebook usage into ``extra["history"]`` and saving the training state on rank 0 every ``checkpoint_every``
    steps; returns (the last step, when the time not yet counted in ``extra["train_seconds"]`` began)."""
    import torch

    from .data import train_batches

    cfg, t = loop["config"], loop["config"]["train"]
    net = model
    if world > 1:
        import ray.train.torch

        net = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    net.train()
    batches = train_batches(read_log, adapter, batch_size=t["batch_size"], rank=rank, world=world,
                            seed=t["seed"] + start, crops_per_sample=t["crops_per_sample"],
                            stored_crop_prob=t["stored_crop_prob"], min_crop_scale=t["min_crop_scale"],
                            hflip_prob=t["hflip_prob"], shuffle_buffer=t["shuffle_buffer"])
    bar = _progress_bar(loop, rank, start)
    window_idx: list = []
    size = model.quantizer.codebook_size
    run_t0 = time.perf_counter()
    step = start
    while step < t["steps"]:
        target = next(batches).to(device)
        for g in optim.param_groups:
            g["lr"] = _lr_at(step, t)
        pred, q = net(adapter.to_input(target))
        rec_loss = adapter.loss(pred, target)
        loss = rec_loss + t["codebook_weight"] * q.aux_loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if t["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(net.parameters(), t["grad_clip"])
        optim.step()
        step += 1
        window_idx.append(q.indices.detach().cpu())
        window_idx = window_idx[-20:]
        if step % t["log_every"] == 0 or step == t["steps"]:
            usage, ppl, _ = _usage(torch.cat(window_idx), size)
            loss_v, rec_v = loss.item(), rec_loss.item()
            extra["history"].append([step, round(loss_v, 6), round(rec_v, 6), round(usage, 4)])
            if bar is not None:
                bar.show(f"loss {loss_v:.4f} recon {rec_v:.4f} usage {usage:.0%}")
        if bar is not None:
            bar.update(1)
        if rank == 0 and (step % t["checkpoint_every"] == 0 or step == t["steps"]):
            extra["train_seconds"] = extra.get("train_seconds", 0.0) + time.perf_counter() - run_t0
            run_t0 = time.perf_counter()
            ckpt.save_train_state(loop["out"], model, optim, step, cfg, extra)
    if bar is not None:
        bar.close()
    return step, run_t0


def _progress_bar(loop: dict[str, Any], rank: int, start: int):
    """The training progress bar: drawn by the driver under Ray Train, here otherwise; None when not shown."""
    cfg, t = loop["config"], loop["config"]["train"]
    show = rank == 0 and loop.get("progress", True) and os.environ.get("TQDM_DISABLE") != "1"
    if loop.get("progress_actor") is not None:  # the driver draws the bar (Ray Train)
        return _RemoteBar(loop["progress_actor"], start) if rank == 0 else None
    return _StepBar(f"train {cfg['modality']}", t["steps"], start) if show else None


def _gather_workers_info(read_log, model, rank: int, world: int, steps: int) -> list[dict]:
    """Every worker's shards, training samples read, steps and parameter digest, sorted by rank."""
    workers_info = [{"rank": rank, "shards": read_log.shards_read, "samples_read": read_log.samples_read,
                     "steps": steps, "params_sha256": _params_digest(model)}]
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, workers_info[0])
        workers_info = sorted(gathered, key=lambda w: w["rank"])
    return workers_info


def _report_to_ray_train(step: int, history: list) -> None:
    """Once, from every worker (Ray Train's report is collective): the last logged metrics."""
    import ray.train

    ray.train.report({"step": step, **({"loss": history[-1][1], "recon": history[-1][2],
                                        "usage": history[-1][3]} if history else {})})


def _write_report(cfg, out, model, adapter, data, held, device, location, step, world, extra, workers_info, t0,
                  fingerprint: dict):
    """``report.json`` (metrics before/after/baseline on the held-out crops, history, machine, what each worker
    read) and ``reconstructions.png`` next to the exported tokenizer."""
    after = evaluate(model, adapter, held, device)
    report = {
        "modality": cfg["modality"], "token_modality": cfg["token_modality"], "checkpoint": location,
        "checkpoint_hash": ckpt.checkpoint_hash(location), "preset": cfg["preset"],
        "quantizer": cfg["model"]["quant_type"], "codebook_size": model.quantizer.codebook_size, "steps": step,
        "workers": world, "device": str(device), "train_seconds": round(extra["train_seconds"], 2),
        "seconds_this_run": round(time.perf_counter() - t0, 2), "machine": machine(),
        "held_out": {"samples": len(data.holdout), "items": int(len(held)), "of_samples": data.n_keys},
        "before": extra["before"], "after": after, "baseline": baseline_metrics(adapter, held),
        "history": extra["history"], "data": {"per_worker": workers_info},
        **fingerprint,  # what it trained on: a rerun with the same hashes skips training
    }
    pic = reconstruction_picture(model, adapter, held, device, cfg["train"]["n_pictures"])
    if pic is not None:
        storage.write_bytes(storage.join(out, ckpt.PICTURE_FILE), pic)
        report["picture"] = storage.join(out, ckpt.PICTURE_FILE)
    storage.write_bytes(storage.join(out, ckpt.REPORT_FILE), json.dumps(report, indent=1, sort_keys=True).encode())


def _without_steps(cfg: dict) -> dict:
    c = copy.deepcopy(cfg)
    c["train"].pop("steps", None)
    return c


def export_config(cfg: dict[str, Any], data_root: str, steps: int, world: int) -> dict[str, Any]:
    """config.json of a trained tokenizer: ml-4m's constructor arguments (what ``VQVAE.from_pretrained`` passes
    to ``VQVAE(**config)``) plus a ``modalmill`` entry (ml-4m ignores unknown keys) with the source modality,
    the token modality and the entry 4M's ``MODALITY_INFO`` needs for it."""
    from .fourm import FourMSpec

    spec = FourMSpec.of(cfg["model"])
    vocab, n_tokens, tok = vocab_and_tokens(cfg["modality"])
    return {**cfg["model"], "modalmill": {
        "modality": cfg["modality"], "token_modality": cfg["token_modality"], "vocab_size": cfg["vocab_size"],
        "n_tokens": n_tokens, "input_size": spec.image_size,
        "modality_info": modality_info_entry(cfg["modality"], spec, tok),
        "training": {"data": data_root, "steps": steps, "workers": world, "preset": cfg["preset"],
                     **{k: cfg["train"][k] for k in ("batch_size", "lr", "seed", "holdout_fraction")}}}}


def modality_info_entry(source: str, spec, token_modality: str | None) -> dict[str, Any] | None:
    """The entry 4M's ``MODALITY_INFO`` (``fourm/data/modality_info.py``) needs to register this token modality:
    an ``img`` modality at input size 224 whose ``n_tokens`` ids form a square grid (patch size 224 / side, as
    4M's own: 16 for 196 tokens, 14 for 256, 56 for the 16 global tokens, which take no sin-cos position
    embedding); the embeddings are ``ImageTokenEncoderEmbedding`` / ``ImageTokenDecoderEmbedding`` with these
    keyword arguments."""
    if token_modality is None:  # pose / SAM-instance ids live inside 4M's human_poses / sam_instance sequences
        return None
    side = int(round(math.sqrt(spec.n_tokens)))
    if side * side != spec.n_tokens:
        raise ValueError(f"{source}: {spec.n_tokens} tokens do not form a square grid 4M's embeddings can take")
    kwargs = {"vocab_size": spec.codebook_size, **({"sincos_pos_emb": False} if spec.is_global else {})}
    entry = {"type": "img", "vocab_size": spec.codebook_size, "patch_size": 224 // side, "min_tokens": 0,
             "max_tokens": spec.n_tokens, "encoder_embedding": ["ImageTokenEncoderEmbedding", kwargs],
             "decoder_embedding": ["ImageTokenDecoderEmbedding", kwargs], "pretokenized": True,
             "name": token_modality or f"tok_{source}"}
    if not spec.is_global:
        entry["input_size"] = 224
    return entry


def save_fourm(model, config: dict[str, Any], out: str) -> str:
    """Write the hub layout into ``out``: ``model.safetensors`` (every tensor of the model under ml-4m's names)
    and ``config.json``; returns the location of model.safetensors."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    url = storage.join(out, ckpt.MODEL_FILE)
    storage.write_bytes(url, ckpt.canonical_safetensors(save(tensors, metadata={"format": "pt"})))
    storage.write_bytes(storage.join(out, ckpt.CONFIG_FILE), json.dumps(config, indent=1, sort_keys=True).encode())
    return url


# ---------------------------------------------------------------------- the driver


class NotStockML4MWarning(UserWarning):
    """A tokenizer whose ViT size unmodified ml-4m cannot build (a test-sized preset or a custom size)."""


def warn_if_not_stock_ml4m(cfg: dict[str, Any]) -> bool:
    """Warn when unmodified ml-4m's ``VQVAE.from_pretrained`` cannot build the tokenizer ``cfg`` describes (its
    ``vit_models`` has only ``vit_s/b/l``); True when it can."""
    from .fourm import stock_ml4m_builders

    odd = [t for t in (cfg["model"].get("enc_type"), cfg["model"].get("dec_type")) if not stock_ml4m_builders(t)]
    if not odd:
        return True
    what = f"preset {cfg.get('preset')!r}" if cfg.get("preset") == "tiny" else "this configuration"
    warnings.warn(f"{cfg['modality']}: {what} builds {', '.join(odd)}, a test-sized ViT that unmodified ml-4m cannot "
                  "load (its vit_models names only vit_s/b/l); use --preset small (vit_s) or base (vit_b) for a "
                  "tokenizer 4M's trainer loads", NotStockML4MWarning, stacklevel=3)
    return False


def default_out(data: str, source: str) -> str:
    return storage.join(data, "_modalmill", "tokenizers", source)


def _config_hash(cfg: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def _fingerprint(cfg: dict, data: str) -> dict[str, str]:
    """What a training run is made of: the sha256 of its config and of the labels it reads (report.json keeps it)."""
    from .data import TokenizerData

    return {"config_sha256": _config_hash(cfg),
            "data_sha256": TokenizerData(data, cfg["modality"], cfg["train"]["holdout_fraction"]).fingerprint}


def already_trained(modality: str, data: str, out: str | None = None, *, preset: str | None = None,
                    quantizer: str | None = None, steps: int | None = None) -> dict | None:
    """The report of the tokenizer :func:`train_tokenizer` would train with these arguments, when ``out`` already
    holds it trained to the end on the same labels with the same config (nothing to do); else None."""
    overrides = {"train": {"steps": int(steps)}} if steps is not None else {}
    cfg = resolve_config(modality, data, preset, overrides, quantizer)
    return finished_report(out or default_out(data, cfg["modality"]), _fingerprint(cfg, data))


def finished_report(out: str, fingerprint: dict[str, str]) -> dict | None:
    """The report of a tokenizer in ``out`` that finished training with this config on this data (the hashes in
    ``fingerprint``, as its report records them) and whose checkpoint is still the one the report names; else
    None."""
    try:
        report = json.loads(storage.read_bytes(storage.join(out, ckpt.REPORT_FILE)))
    except (FileNotFoundError, ValueError, OSError):
        return None
    if any(report.get(k) != v for k, v in fingerprint.items()):
        return None
    try:
        if ckpt.checkpoint_hash(report["checkpoint"]) != report.get("checkpoint_hash"):
            return None
    except Exception:  # noqa: BLE001 - a missing or unreadable checkpoint: train
        return None
    return report


def train_tokenizer(modality: str, data: str, out: str | None = None, *, config: dict | str | None = None,
                    preset: str | None = None, quantizer: str | None = None, steps: int | None = None,
                    workers: int = 1, use_gpu: bool = False, cpus_per_worker: float | None = None,
                    address: str | None = None, use_ray: bool = True, force: bool = False,
                    show_progress: bool = True, max_failures: int = 1) -> dict[str, Any]:
    """Train (or resume) a tokenizer for ``modality`` on the labeled output ``data``; returns the report."""
    if modality == "sam_mask":  # the SAM-instance tokenizer trains on the sam_mask labels
        modality = "sam_instance"
    # absolute here, on the driver: Ray Train workers run in a directory of their own (and maybe on another node)
    data = storage.absolute(data)
    out = storage.absolute(out) if out else None
    overrides = load_config_file(config) if isinstance(config, str) else dict(config or {})
    if steps is not None:
        overrides.setdefault("train", {})
        overrides["train"] = {**overrides["train"], "steps": int(steps)}
    cfg = resolve_config(modality, data, preset, overrides, quantizer)
    warn_if_not_stock_ml4m(cfg)
    out = out or default_out(data, modality)
    fingerprint = _fingerprint(cfg, data)
    if not force:
        done = finished_report(out, fingerprint)
        if done is not None:  # trained to the end on these very labels with this config: nothing to do
            return {**done, "skipped": True}
    if force:
        for name in (ckpt.STATE_FILE, ckpt.MODEL_FILE, ckpt.REPORT_FILE, ckpt.PICTURE_FILE, ckpt.CONFIG_FILE):
            storage.remove(storage.join(out, name), missing_ok=True)
    loop = {"config": cfg, "out": out, "data": data, "progress": show_progress, "fingerprint": fingerprint}
    if not use_ray:
        train_loop(loop)
    else:
        _fit_on_ray(loop, workers, use_gpu, cpus_per_worker, address, max_failures)
    return json.loads(storage.read_bytes(storage.join(out, ckpt.REPORT_FILE)))


class _StepBar:
    """The training progress bar where the training runs in this process."""

    def __init__(self, desc: str, total: int, start: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=desc, total=total, initial=start, unit="step")

    def show(self, figures: str) -> None:
        self.bar.set_postfix_str(figures)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _RemoteBar:
    """Rank 0's side of the bar of a Ray Train run: the step and the latest figures go to a small actor (calls
    not waited for), and the driver draws them (:func:`_fit_on_ray`), so the bar works wherever the worker runs
    and whether or not worker logs reach the driver."""

    EVERY_S = 0.2  # at most five calls a second, however fast the steps

    def __init__(self, actor, start: int):
        self.actor, self.step, self.figures, self.sent = actor, start, "", 0.0
        actor.begin.remote(start)

    def show(self, figures: str) -> None:
        self.figures = figures

    def update(self, n: int) -> None:
        self.step += n
        if time.monotonic() - self.sent >= self.EVERY_S:
            self.close()

    def close(self) -> None:
        self.actor.set.remote(self.step, self.figures)
        self.sent = time.monotonic()


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class TrainProgress:
        def __init__(self):
            self.start, self.step, self.figures = None, 0, ""

        def begin(self, start: int) -> None:
            self.start = self.step = start

        def set(self, step: int, figures: str) -> None:
            self.step, self.figures = step, figures

        def get(self) -> tuple[int | None, int, str]:
            return self.start, self.step, self.figures

    return TrainProgress.remote()


def _fit_with_bar(fit, actor, desc: str, total: int):
    """Run ``fit()`` on a thread while this thread draws the bar from ``actor``; returns what ``fit`` returns."""
    import ray
    from tqdm.auto import tqdm

    box: dict[str, Any] = {}

    def run():
        try:
            box["result"] = fit()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="modalmill-train-fit", daemon=True)
    thread.start()
    with tqdm(desc=desc, total=total, unit="step") as bar:
        started = False
        while True:
            alive = thread.is_alive()
            try:
                start, step, figures = ray.get(actor.get.remote(), timeout=5)
                if not started and start is not None:  # a resumed run starts where it left off: not progress
                    bar.initial = bar.n = start
                    started = True
                bar.update(max(0, step - bar.n))
                if figures:
                    bar.set_postfix_str(figures, refresh=False)
            except (ray.exceptions.RayError, TimeoutError):
                pass
            if not alive:
                break
            thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _worker_cpus(workers: int, use_gpu: bool, cpus_per_worker: float | None, cluster: dict) -> float:
    """CPUs per Ray Train worker. The default shares the cluster's CPUs (whole CPUs while there are enough, else
    a fraction each); a request the cluster can never meet is a clear error, not a run that waits forever."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    total, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if use_gpu and workers > gpus:
        raise ValueError(f"{workers} worker(s) with one GPU each, but the Ray cluster has {gpus:g} GPU(s)")
    if cpus_per_worker is None:
        if use_gpu or total >= workers:
            return float(max(1, int(total // workers))) if not use_gpu else 1.0
        return max(0.01, math.floor(100 * total / workers) / 100)  # more workers than CPUs: a fraction each
    if cpus_per_worker <= 0 or workers * cpus_per_worker > total + 1e-9:
        raise ValueError(f"{workers} worker(s) x {cpus_per_worker:g} CPU(s) do not fit the Ray cluster's {total:g} "
                         "CPU(s): lower cpus_per_worker or workers")
    return float(cpus_per_worker)


def _fit_on_ray(loop: dict, workers: int, use_gpu: bool, cpus_per_worker: float | None, address: str | None,
                max_failures: int) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..io.cluster import init_ray

    show = loop.get("progress", True) and os.environ.get("TQDM_DISABLE") != "1"
    # an embedded Ray's worker logs (Ray Train's controller chatter) stay out of the way of the bar; errors come
    # back in the result
    started = init_ray(address, quiet_embedded=show)
    tmp = tempfile.mkdtemp(prefix="modalmill-train-")
    actor = None
    try:
        cpus_per_worker = _worker_cpus(workers, use_gpu, cpus_per_worker, ray.cluster_resources())
        env = _storage_env(loop)
        actor = _progress_actor() if show else None
        trainer = TorchTrainer(
            train_loop, train_loop_config={**loop, "ray": True, "progress_actor": actor},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker,
                                                               **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(name=f"tokenizer-{loop['config']['modality']}-{random.getrandbits(32):08x}",
                                 storage_path=tmp, failure_config=FailureConfig(max_failures=max_failures),
                                 worker_runtime_env={"env_vars": env} if env else None))
        if actor is None:
            result = trainer.fit()
        else:
            result = _fit_with_bar(trainer.fit, actor, f"train {loop['config']['modality']}",
                                   loop["config"]["train"]["steps"])
        if result.error is not None:
            raise RuntimeError(f"tokenizer training failed: {result.error}")
    finally:
        if actor is not None:
            ray.kill(actor)
        shutil.rmtree(tmp, ignore_errors=True)
        if started:
            ray.shutdown()


def _storage_env(loop: dict) -> dict[str, str]:
    """The S3 settings the training workers get from this process (see
    :func:`modalmill.io.cluster.local_s3_env`) when the data or the checkpoint is on S3."""
    from ..io.cluster import local_s3_env

    return local_s3_env(loop["data"], loop["out"])


def format_report(r: dict[str, Any]) -> list[str]:
    """A few lines summarising a training report."""
    def fmt(m: dict) -> str:
        keys = [k for k in ("mse", "psnr", "accuracy", "miou", "edge_f1", "cosine") if k in m]
        return ", ".join(f"{k} {m[k]:.4g}" for k in keys)

    a, b, base = r["after"], r["before"], r["baseline"]
    return [
        f"{r['modality']} tokenizer ({r['quantizer']}, {r['codebook_size']} codes, {r['steps']} steps, "
        f"{r['workers']} worker(s), {r['train_seconds']:.0f} s training): {r['checkpoint']}",
        f"  held-out ({r['held_out']['samples']} samples, {r['held_out']['items']} items): before {fmt(b)}",
        f"  after {fmt(a)}  |  trivial baseline {fmt(base)}",
        f"  codebook usage {a['codebook_usage']:.0%} ({a['codes_used']}/{a['codebook_size']}), perplexity "
        f"{a['perplexity']:.1f} (before: {b['codebook_usage']:.0%}, {b['perplexity']:.1f})",
    ] + ([f"  picture: {r['picture']}"] if r.get("picture") else [])
