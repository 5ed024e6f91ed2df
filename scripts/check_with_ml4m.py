"""The 4M trainer check: train a tiny FourM on a modalmill output with apple/ml-4m's own training data path.

What it runs, all of it ml-4m's code (a checkout of https://github.com/apple/ml-4m and an environment with its
dependencies; ml-4m is not a package, so this is not part of modalmill's test suite):

1. 4M-21's data config ``cfgs/default/4m/data/cc12m+coyo+c4/main/mix_mod21_all2allmix_rgb2all_capT5bias_C4.yaml``:
   its ``cc12m`` dataset (the 4M-21 modalities, with its alphas mixture config
   ``cfgs/default/4m/alphas_mixture/main/mix_mod21_all2allmix_rgb2all_capT5bias.yaml``), its ``data_path`` pointed
   at the output (``OUT/[folder,...]/shard-{00000..N}.tar``, the folders ``MODALITY_INFO`` names plus
   ``crop_settings``); the coyo and c4 datasets need other data and are left out;
2. ``run_training_4m.setup_modality_info`` + ``fourm.data.setup_sampling_mod_info`` + ``get_train_dataloader`` +
   ``build_mixture_dataloader``, with 4M's released text tokenizer, as ``run_training_4m.setup_data`` does;
3. ``fm_tiny_6e_6d_gelu`` built by ``run_training_4m.get_model``, and ``--steps`` AdamW steps of ``model(mod_dict,
   num_encoder_tokens, num_decoder_tokens, loss_type='mod')`` as ``train_one_epoch`` calls it, on the CPU;
4. the check: every loss finite, and every target modality of the config got a (finite) loss in at least one step
   (the Dirichlet sampling picks targets at random, so it keeps stepping, up to ``--max-steps``, until each had one).

**Adding a modality.** ``--modality-info FILE`` (repeatable) registers a token modality 4M does not have from the
JSON entry modalmill writes next to a tokenizer checkpoint (:func:`modalmill.tokenize.modality_info.write_fourm_entry`,
``fourm_modality_info.json``: type, vocab size, token count, patch and input size, which embeddings): it is added to
``MODALITY_INFO`` (with ml-4m's own embedding classes), gets a ``TokTransform``, joins the dataset's input and
target domains, and gets alphas copied from ``--alphas-like`` (default ``tok_canny_edge@224``) in a copy of the
alphas config. :func:`add_plugin_modality` (run in modalmill's environment, e.g. by
``scripts/build_all21_output.py --plugin``) makes such an output: the example plugin's ``grayscale`` labelled,
a tokenizer trained on it by modalmill, ``tok_grayscale@224`` written.

Rerun (the all-21 output from ``scripts/build_all21_output.py``; ml-4m at /work/ref/ml-4m/src with its venv)::

    cd /work/ref/ml-4m/src && PYTHONPATH=$PWD HF_HUB_OFFLINE=1 /work/ref/ml-4m/venv/bin/python \\
        /path/to/modalmill/scripts/check_with_ml4m.py --data /tmp/modalmill-all21/out [--steps 4] \\
        [--modality-info /tmp/modalmill-all21/tokenizers/grayscale/fourm_modality_info.json] [--exclude caption]

Prints one JSON report (and exits 1 when the check fails): the modalities, the per-step losses, which target
modality got a loss, and what failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback

DATA_CONFIG = "cfgs/default/4m/data/cc12m+coyo+c4/main/mix_mod21_all2allmix_rgb2all_capT5bias_C4.yaml"
TEXT_TOKENIZER = "fourm/utils/tokenizer/trained/text_tokenizer_4m_wordpiece_30k.json"


# ----------------------------------------------------------------------------- modalmill side (its own environment)


PLUGIN_TOKENS = ("tok_grayscale@224", "grayscale", 8192, 196)  # token modality, source, vocab, tokens per crop


def plugin_setup() -> None:
    """Register the example plugin (``grayscale``) and its token modality in this process. Ray workers run it as
    their ``worker_process_setup_hook`` (``scripts.check_with_ml4m.plugin_setup``): the plugin is not installed, so
    its labeler and modality exist only where this has run."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(root, "examples", "third_party_labeler", "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    import modalmill_grayscale  # noqa: F401 - registers the grayscale modality and labeler

    from modalmill.tokenize.labelers import register_token_modality

    register_token_modality(*PLUGIN_TOKENS)


def add_plugin_modality(out: str, tokenizers_dir: str, steps: int = 20) -> str:
    """Label the example plugin's ``grayscale`` modality into ``out``, train a tokenizer for it with modalmill and
    write ``tok_grayscale@224``. Returns the tokenizer directory (its ``fourm_modality_info.json`` is what
    ``--modality-info`` takes). Runs in modalmill's environment, with a Ray already started."""
    from modalmill.jobs.runner import EXIT_OK, run_job
    from modalmill.jobs.spec import job_from_dict
    from modalmill.jobs.tokenize_output import tokenize_output
    from modalmill.tokenize.train import train_tokenizer

    plugin_setup()
    corpus = os.path.join(os.path.dirname(out), "corpus", "shard-{00000..00001}.tar")
    spec = {"input": corpus, "output": out, "modalities": ["rgb", "crop_settings", "grayscale"],
            "decode": {"max_size": 128}}
    s = run_job(job_from_dict(spec), only=["grayscale"], show_progress=False)
    if s["exit_code"] != EXIT_OK:
        raise RuntimeError(f"labelling grayscale failed: {s}")
    ck = os.path.join(tokenizers_dir, "grayscale")
    train_tokenizer("grayscale", out, ck, preset="tiny", steps=steps, use_ray=False, show_progress=False)
    s = tokenize_output(out, ["tok_grayscale@224"], {"tok_grayscale@224": ck}, show_progress=False)
    if s["exit_code"] != EXIT_OK:
        raise RuntimeError(f"tokenizing grayscale failed: {s}")
    return ck


# ----------------------------------------------------------------------------- ml-4m side


def _fix_random_sample() -> None:
    """fourm/models/fm.py calls random.sample on dict items, which Python 3.11 rejects: sample from a list."""
    sample = random.sample

    def patched(population, k, *a, **kw):
        if not isinstance(population, (list, tuple, range, str)):
            population = list(population)
        return sample(population, k, *a, **kw)

    random.sample = patched


def register_entries(paths: list[str], dataset_cfg: dict, alphas_like: str, tmpdir: str) -> list[str]:
    """Add the token modalities described by modalmill's ``fourm_modality_info.json`` files to ml-4m's registries
    and to ``dataset_cfg`` (domains, a copy of its alphas config). Returns their names."""
    from functools import partial

    import yaml

    from fourm.data.modality_info import MODALITY_INFO, MODALITY_TRANSFORMS
    from fourm.data.modality_transforms import TokTransform, get_transform_key
    from fourm.models import decoder_embeddings, encoder_embeddings
    from fourm.utils import generate_uint15_hash

    names = []
    with open(dataset_cfg["alphas_config"]) as f:
        alphas = yaml.safe_load(f)
    mixture = alphas["alphas_mixture"] if "alphas_mixture" in alphas else alphas
    for path in paths:
        with open(path) as f:
            e = json.load(f)
        name = e["name"]
        if name in MODALITY_INFO:
            raise ValueError(f"{path}: {name!r} is already one of 4M's modalities")
        enc = getattr(encoder_embeddings, e["encoder_embedding"]["class"])
        dec = getattr(decoder_embeddings, e["decoder_embedding"]["class"])
        info = {k: e[k] for k in ("type", "vocab_size", "min_tokens", "max_tokens", "pretokenized") if k in e}
        info.update({k: e[k] for k in ("input_size", "patch_size") if e.get(k) is not None})
        info["encoder_embedding"] = partial(enc, **e["encoder_embedding"]["kwargs"])
        info["decoder_embedding"] = partial(dec, **e["decoder_embedding"]["kwargs"])
        info["id"] = generate_uint15_hash(name)
        if e.get("path"):
            info["path"] = e["path"]
        MODALITY_INFO[name] = info
        MODALITY_TRANSFORMS[get_transform_key(name)] = TokTransform()
        mixture[name] = copy.deepcopy(mixture[alphas_like])
        for side in ("in_domains", "out_domains"):
            dataset_cfg[side] = "-".join(dataset_cfg[side].split("-") + [name])
        names.append(name)
    if names:
        new = os.path.join(tmpdir, "alphas_with_added_modalities.yaml")
        with open(new, "w") as f:
            yaml.safe_dump(alphas, f)
        dataset_cfg["alphas_config"] = new
    return names


def _t5_width(data: str) -> int | None:
    """The width of the T5 states stored in the output's first t5_caption member."""
    import io
    import tarfile

    import numpy as np

    path = os.path.join(data, "t5_caption", "shard-00000.tar")
    if not os.path.exists(path):
        return None
    with tarfile.open(path) as t:
        for m in t:
            if m.isfile():
                with np.load(io.BytesIO(t.extractfile(m).read())) as z:
                    return int(z["emb"].shape[-1])
    return None


def run_check(args) -> dict:
    import numpy as np
    import torch
    import yaml
    from tokenizers import Tokenizer

    _fix_random_sample()
    import run_training_4m as rt
    from fourm.data import build_mixture_dataloader, get_train_dataloader, setup_sampling_mod_info

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    report: dict = {"data": args.data, "data_config": DATA_CONFIG, "model": args.model, "ok": False}
    with open(DATA_CONFIG) as f:
        data_config = yaml.safe_load(f)
    dataset_cfg = copy.deepcopy(data_config["train"]["datasets"]["cc12m"])
    tmpdir = tempfile.mkdtemp(prefix="check_with_ml4m_")
    added = register_entries(args.modality_info, dataset_cfg, args.alphas_like, tmpdir)
    for side in ("in_domains", "out_domains"):
        dataset_cfg[side] = "-".join(m for m in dataset_cfg[side].split("-") if m not in args.exclude)
    in_domains = sorted(set(dataset_cfg["in_domains"].split("-")))
    out_domains = sorted(set(dataset_cfg["out_domains"].split("-")))
    all_domains = sorted(set(in_domains) | set(out_domains))
    report.update(in_domains=in_domains, out_domains=out_domains, added_modalities=added, excluded=args.exclude,
                  n_domains=len(all_domains))  # crop_settings is read too (pre-tokenized modalities need it)

    ns = argparse.Namespace(all_domains=all_domains, in_domains=in_domains, out_domains=out_domains,
                            input_size=224, patch_size=16, model=args.model, num_register_tokens=0)
    modality_info = rt.setup_modality_info(ns)
    folders = sorted({modality_info[m].get("path") or m for m in all_domains} | {"crop_settings"})
    missing = [f for f in folders if not os.path.isdir(os.path.join(args.data, f))]
    if missing:
        report["error"] = f"the output lacks folder(s) {missing}"
        return report
    width = _t5_width(args.data) if "t5_caption" in all_domains else None
    if width is not None and width != 4096:  # 4M-21's T5-XXL states are 4096 wide; a tiny test T5's are not
        from functools import partial

        from fourm.models.encoder_embeddings import SequenceEmbEncoderEmbedding

        modality_info["t5_caption"]["encoder_embedding"] = partial(SequenceEmbEncoderEmbedding, max_length=77,
                                                                   padding_idx=0, orig_emb_dim=width)
        report["note_t5_caption"] = (f"the stored T5 states are {width} wide (not T5-XXL's 4096): t5_caption's "
                                     f"encoder embedding is built with orig_emb_dim={width}")
    n_shards = len([n for n in os.listdir(os.path.join(args.data, "rgb")) if n.endswith(".tar")])
    shards = f"shard-{{00000..{n_shards - 1:05d}}}.tar"
    dataset_cfg["data_path"] = os.path.join(args.data, f"[{','.join(folders)}]", shards)
    dataset_cfg["wds_shuffle_buffer_tar"] = dataset_cfg["wds_shuffle_buffer_repeat"] = 8
    report["data_path"] = dataset_cfg["data_path"]

    text_tokenizer = Tokenizer.from_file(args.text_tokenizer)
    dataset_mod_info, sampling_weights = setup_sampling_mod_info(dataset_cfg, modality_info)
    dataiter = get_train_dataloader(
        dataset_config=dataset_cfg, modality_info=dataset_mod_info, sampling_weights=sampling_weights,
        text_tokenizer=text_tokenizer, input_size=224, num_input_tokens=256, num_target_tokens=256,
        min_input_tokens=None, min_target_tokens=None, num_tasks=1, num_workers=1, dataset_batch_size=None,
        epoch_size=None)
    loader = build_mixture_dataloader(data_iters=[dataiter], weights=[1.0], modality_info=modality_info,
                                      batch_size=args.batch_size, num_workers=1,
                                      epoch_size=args.batch_size * args.max_steps, num_gpus=1)
    model = rt.get_model(ns, modality_info)
    model.train()
    report["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    num_in = dataset_cfg.get("num_input_tokens") or 256
    num_out = dataset_cfg.get("num_target_tokens") or 256

    steps, seen, problems = [], {}, []
    it = iter(loader)
    t0 = time.time()
    for step in range(args.max_steps):
        try:
            x = next(it)
        except Exception as e:  # noqa: BLE001 - what 4M's data path raises on this output is the finding
            problems.append(f"step {step}: ml-4m's data path raised {type(e).__name__}: {e}")
            report["traceback"] = traceback.format_exc()[-3000:]
            break
        mod_dict = {m: {k: v for k, v in d.items()} for m, d in x.items() if m in all_domains}
        loss, mod_loss = model(mod_dict, num_encoder_tokens=num_in, num_decoder_tokens=num_out, loss_type="mod")
        values = {m: float(v.detach()) for m, v in mod_loss.items()}
        if not math.isfinite(float(loss)) or not all(math.isfinite(v) for v in values.values()):
            problems.append(f"step {step}: loss not finite: {float(loss)} {values}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps.append({"step": step, "loss": float(loss), "mod_loss": values})
        for m, v in values.items():
            seen.setdefault(m, []).append(v)
        if step + 1 >= args.steps and set(out_domains) <= set(seen):
            break
    report["seconds"] = round(time.time() - t0, 1)
    report["steps"] = steps
    report["targets_with_loss"] = {m: {"steps": len(v), "mean_loss": sum(v) / len(v)} for m, v in sorted(seen.items())}
    report["targets_without_loss"] = [m for m in out_domains if m not in seen]
    if report["targets_without_loss"] and not problems:
        problems.append(f"target modalities without a loss after {len(steps)} steps: {report['targets_without_loss']}")
    report["problems"] = problems
    report["ok"] = bool(steps) and not problems
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description="Train a tiny FourM on a modalmill output with ml-4m's own data path.")
    ap.add_argument("--data", required=True, help="the modalmill output root (local)")
    ap.add_argument("--ml4m", default=os.getcwd(), help="the ml-4m source tree (default: the current directory)")
    ap.add_argument("--text-tokenizer", default=None, help=f"default: ML4M/{TEXT_TOKENIZER}")
    ap.add_argument("--model", default="fm_tiny_6e_6d_gelu")
    ap.add_argument("--steps", type=int, default=4, help="optimiser steps at least")
    ap.add_argument("--max-steps", type=int, default=40, help="steps at most (until every target had a loss)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modality-info", action="append", default=[],
                    help="a fourm_modality_info.json modalmill wrote: register and train that modality too")
    ap.add_argument("--alphas-like", default="tok_canny_edge@224", help="alphas of added modalities copied from")
    ap.add_argument("--exclude", action="append", default=[], help="leave this modality out (repeatable)")
    ap.add_argument("--report", default=None, help="also write the JSON report here")
    args = ap.parse_args()
    os.chdir(args.ml4m)
    sys.path.insert(0, os.path.abspath(args.ml4m))
    args.data = os.path.abspath(args.data)
    args.text_tokenizer = args.text_tokenizer or os.path.join(args.ml4m, TEXT_TOKENIZER)
    try:
        report = run_check(args)
    except Exception as e:  # noqa: BLE001
        report = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    text = json.dumps(report, indent=1)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)
    print(text)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
