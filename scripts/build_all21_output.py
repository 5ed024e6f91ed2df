"""Build a small modalmill output holding all 21 of 4M-21's modalities, with tiny random test models.

What it writes under OUT (default /tmp/modalmill-all21):

- ``corpus/``: 2 tar shards of real photos (scikit-image), 4 per shard;
- ``out/``: one job with every labeler of 4M-21's modalities in the tiny configurations of
  ``tests/test_all_labelers.py`` (DETR favouring people, so HMR 2.0 has persons), ``n_crops`` 4, then tiny
  tokenizers trained by ``train_tokenizer`` (preset tiny, a few steps) for every token modality, the SAM-instance and
  pose tokenizers, and ``tokenize_output`` with all of them, so ``out/`` has ``tok_rgb@224`` ... ``sam_instance`` and
  ``human_poses`` with ``pose_tokenized``;
- with ``--plugin``: the example plugin's ``grayscale`` modality (examples/third_party_labeler) labelled and
  tokenized into ``tok_grayscale@224`` by a tokenizer modalmill trains (see ``scripts/check_with_ml4m.py``).

This is the input of ``scripts/check_with_ml4m.py`` (4M's own trainer) and of
``scripts/make_4m_text_fixture.py``. It runs outside CI (several minutes on 2 CPU cores)::

    cd REPO && PYTHONPATH=$PWD RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 \\
        /path/to/venv/bin/python scripts/build_all21_output.py --out /tmp/modalmill-all21 [--plugin]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(k, v)

# 4M-21's 21 modalities (cfgs/default/4m/data/cc12m+coyo+c4/main/mix_mod21_all2allmix_rgb2all_capT5bias_C4.yaml)
FOURM21 = ["caption", "t5_caption", "det", "metadata", "rgb", "tok_rgb@224", "tok_normal@224", "tok_depth@224",
           "tok_semseg@224", "tok_clip@224", "human_poses", "tok_dinov2@224", "tok_dinov2_global",
           "tok_imagebind@224", "tok_imagebind_global", "tok_sam_edge@224", "tok_canny_edge@224", "color_palette",
           "sam_instance"]  # + crop_settings, and rgb read as rgb@224: 21 with the metadata/caption pair counted
# the labelled modalities the tokens are made from
LABELS = ["rgb", "crop_settings", "caption", "t5_caption", "det", "metadata", "color_palette", "depth", "normal",
          "semseg_coco", "canny_edge", "clip", "clip_global", "dinov2", "dinov2_global", "imagebind",
          "imagebind_global", "sam_mask", "sam_edge", "human_poses"]
# tokenizer source modality -> token modality (sam_instance and human_poses write into 4M's own files)
TOKENIZERS = {"rgb": "tok_rgb@224", "depth": "tok_depth@224", "normal": "tok_normal@224",
              "semseg_coco": "tok_semseg@224", "clip": "tok_clip@224", "canny_edge": "tok_canny_edge@224",
              "sam_edge": "tok_sam_edge@224", "dinov2": "tok_dinov2@224", "imagebind": "tok_imagebind@224",
              "dinov2_global": "tok_dinov2_global", "imagebind_global": "tok_imagebind_global",
              "sam_instance": "sam_instance", "human_poses": "human_poses"}
CPU = {"num_cpus": 0.1, "num_gpus": 0, "memory_mb": 0}
GROUPS = (("rgb", "crop_settings", "canny_edge", "color_palette"), ("caption", "det", "depth"),
          ("normal", "semseg_coco", "t5_caption"), ("clip", "clip_global", "dinov2", "dinov2_global"),
          ("imagebind", "imagebind_global", "sam_mask", "sam_edge"), ("human_poses", "metadata"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tiny_weights(d: str) -> dict:
    from tests.tiny_models import (TEST_SETTINGS, save_official_omnidata, save_tiny_blip, save_tiny_clip,
                                   save_tiny_detr, save_tiny_dinov2, save_tiny_hmr2, save_tiny_imagebind,
                                   save_tiny_mask2former, save_tiny_sam, save_tiny_t5)

    os.makedirs(d, exist_ok=True)
    imagebind, _ = save_tiny_imagebind(d)
    return {
        "sam": {"weights": save_tiny_sam(os.path.join(d, "sam_tiny.pth")), **TEST_SETTINGS["sam"]},
        "dinov2": {"weights": save_tiny_dinov2(os.path.join(d, "dinov2"))},
        "imagebind": imagebind,
        "clip": save_tiny_clip(d),
        "detr_coco": {"weights": save_tiny_detr(os.path.join(d, "detr"), favour="person"),
                      **TEST_SETTINGS["detr_coco"]},
        "hmr2": {"weights": save_tiny_hmr2(os.path.join(d, "hmr2_tiny.safetensors"))},
        "omnidata_depth": {"weights": save_official_omnidata(os.path.join(d, "omnidata_dpt_depth_v2.ckpt"), 1)},
        "omnidata_normal": {"weights": save_official_omnidata(os.path.join(d, "omnidata_dpt_normal_v2.ckpt"), 3,
                                                              seed=1)},
        "caption": {"weights": save_tiny_blip(os.path.join(d, "blip"))},
        "t5_caption": {"weights": save_tiny_t5(os.path.join(d, "t5"))},
        "mask2former_coco": {"weights": save_tiny_mask2former(os.path.join(d, "mask2former")),
                             **TEST_SETTINGS["mask2former_coco"]},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/modalmill-all21")
    ap.add_argument("--n-crops", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="training steps of each tiny tokenizer")
    ap.add_argument("--plugin", action="store_true", help="also label + tokenize the example plugin's grayscale")
    ap.add_argument("--plugin-only", action="store_true", help="only add the plugin's modality to an existing OUT")
    args = ap.parse_args()
    args.plugin = args.plugin or args.plugin_only

    import ray

    from modalmill.jobs.check import check_output
    from modalmill.jobs.democorpus import build_corpus
    from modalmill.jobs.runner import EXIT_OK, run_job
    from modalmill.jobs.spec import job_from_dict
    from modalmill.jobs.tokenize_output import tokenize_output
    from modalmill.tokenize.train import train_tokenizer

    corpus, out = os.path.join(args.out, "corpus"), os.path.join(args.out, "out")
    hook = {"worker_process_setup_hook": "scripts.check_with_ml4m.plugin_setup"} if args.plugin else None
    if args.plugin:
        from scripts.check_with_ml4m import plugin_setup

        plugin_setup()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=hook)
    if args.plugin_only:
        from scripts.check_with_ml4m import add_plugin_modality

        add_plugin_modality(out, os.path.join(args.out, "tokenizers"), steps=args.steps)
        report = check_output(out)
        log(f"modalmill check: {'ok' if report.ok else 'VIOLATIONS'}: " + "; ".join(v.line() for v in
                                                                                   report.violations[:10]))
        return 0 if report.ok else 1
    if not os.path.isdir(corpus):
        build_corpus(corpus, n_shards=2, per_shard=4, size_range=(200, 320))
    log("tiny weights")
    weights = tiny_weights(os.path.join(args.out, "weights"))
    labelers = {name: {"config": config, "resources": CPU} for name, config in weights.items()}
    labelers["metadata_derived_full"] = {}
    def spec(modalities):
        return job_from_dict({"input": os.path.join(corpus, "shard-{00000..00001}.tar"), "output": out,
                              "modalities": list(modalities), "batch_size": 4, "decode": {"max_size": 128},
                              "crops": {"n_crops": args.n_crops}, "labelers": labelers, "ray": {"shard_cpus": 0.4}})

    # a few labelers per run (the pipeline's --only mode): eleven model actors at once need more memory than a
    # shared small machine has; later groups read what earlier ones wrote (t5_caption: caption, hmr2: det, ...)
    for group in GROUPS:
        log(f"labelling {', '.join(group)}")
        first = group is GROUPS[0]
        s = run_job(spec(group if first else LABELS), only=None if first else list(group), show_progress=False)
        if s["exit_code"] != EXIT_OK:
            log(f"labelling {group} failed: {s.get('errors_by_reason')} {s.get('failed_shards')}")
            return 1
    ck = {}
    for source, tok in TOKENIZERS.items():
        ck[tok] = os.path.join(args.out, "tokenizers", source)
        if not os.path.exists(os.path.join(ck[tok], "model.safetensors")):
            log(f"training the tiny {source} tokenizer")
            train_tokenizer(source, out, ck[tok], preset="tiny", steps=args.steps, use_ray=False,
                            show_progress=False)
    log("tokenizing")
    s = tokenize_output(out, list(TOKENIZERS.values()), ck, show_progress=False)
    if s["exit_code"] != EXIT_OK:
        log(f"tokenizing failed: {s}")
        return 1
    if args.plugin:
        from scripts.check_with_ml4m import add_plugin_modality

        add_plugin_modality(out, os.path.join(args.out, "tokenizers"), steps=args.steps)
    report = check_output(out)
    log(f"modalmill check: {'ok' if report.ok else 'VIOLATIONS'} ({report.samples} samples, "
        f"{len(report.modalities)} folders)")
    for v in report.violations[:20]:
        log("  " + v.line())
    ray.shutdown()
    log(f"done: {out}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
