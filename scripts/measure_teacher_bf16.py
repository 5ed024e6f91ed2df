"""How many 4M feature-token ids change when the teacher runs in bfloat16 instead of float32.

4M computed the features its feature tokenizers were trained on in float32, so modalmill's DINOv2, CLIP and
ImageBind labelers default to ``dtype: float32``. This script measures what opting into bf16 costs, on this CPU
(torch's CPU autocast runs bf16 as a GPU's does: bf16 matmuls with float32 accumulation, float32 LayerNorm and
softmax):

- teacher: a random-initialised DINOv2 ViT-B/14 (transformers ``Dinov2Model``, 4M-21's teacher size: width 768,
  12 blocks, 12 heads), run through modalmill's own ``dinov2`` labeler code path (official position
  interpolation) on every crop of ``crop_settings`` of three real photos (tests/fixtures/ml4m_tokenizers/
  inputs.npz: astronaut, chelsea, a 2:1 coffee; 4 crops each, 224 x 224, one row per crop as 4M feeds its
  teacher), once in float32 and once under ``torch.autocast("cpu", torch.bfloat16)``;
- both stored as modalmill stores them (float16);
- tokenizer: the DINOv2 feature tokenizer fixture made by apple/ml-4m's own classes
  (tests/fixtures/ml4m_tokenizers/dinov2: ViT encoder, 1x1 patch projection, lucid quantizer with normalised
  codes, 128 codes), fed the first 32 channels of the teacher's (LayerNorm-ed) patch tokens (the fixture takes 32);
  its ids are ml-4m's own (tests/test_tokenize_ml4m.py checks modalmill's tokenizer against ml-4m's ids, 100 %).

Prints the median / 99th percentile relative difference per token and the share of token ids that differ.
Run from the repository root: ``PYTHONPATH=$PWD python scripts/measure_teacher_bf16.py [seeds]``.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch

FIX = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "ml4m_tokenizers")
PHOTOS = ("astronaut", "chelsea", "coffee_2to1")


def teacher(path: str, seed: int):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             patch_size=14, image_size=518)).save_pretrained(path)
    from modalmill.labelers.dinov2 import DINOv2Labeler

    lab = DINOv2Labeler(DINOv2Labeler.Config(weights=path, device="cpu"))
    lab.setup()
    return lab


def features(lab, inputs, bf16: bool) -> np.ndarray:
    """The labeler's ``dinov2`` output for every crop of the three photos, stored as float16. ``bf16``: under
    CPU bf16 autocast (the labeler's own ``autocast`` applies it on a GPU only)."""
    from modalmill.labelers.base import LabelInput

    batch = [LabelInput(key=p, image=inputs[f"{p}/rgb"], original_size=inputs[f"{p}/rgb"].shape[1::-1],
                        crops=inputs[f"{p}/crop_settings"]) for p in PHOTOS]
    lab.autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16
                    else (lambda: torch.autocast("cpu", enabled=False)))
    out = lab.process_batch(batch)
    return np.concatenate([o["dinov2"] for o in out]).astype(np.float16)


def main(seeds: int = 3) -> None:
    from modalmill.tokenize import hub

    inputs = np.load(os.path.join(FIX, "inputs.npz"))
    tok, _ = hub.load(os.path.join(FIX, "dinov2"))
    rel_all, changed, total = [], 0, 0
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as d:
            lab = teacher(d, seed)
            f32, b16 = features(lab, inputs, False), features(lab, inputs, True)
        a, b = f32.astype(np.float32), b16.astype(np.float32)
        rel = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)
        rel_all.append(rel.ravel())
        ids = []
        for f in (a, b):
            x = torch.from_numpy(np.ascontiguousarray(f[..., :32])).permute(0, 3, 1, 2)
            with torch.inference_mode():
                ids.append(tok.tokenize(x).numpy())
        n = int((ids[0] != ids[1]).sum())
        changed, total = changed + n, total + ids[0].size
        print(f"seed {seed}: median rel. diff {np.median(rel):.4f}, ids changed {n} / {ids[0].size} "
              f"({100 * n / ids[0].size:.1f} %)")
    rel = np.concatenate(rel_all)
    print(f"all: median rel. diff per token {100 * np.median(rel):.2f} %, p99 {100 * np.quantile(rel, 0.99):.2f} %; "
          f"token ids changed {changed} / {total} = {100 * changed / total:.1f} %  (CPU: {cpu()})")


def cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
