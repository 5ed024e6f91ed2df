"""Training 4M-format tokenizers: the objective, metrics and pictures of each source modality, in 4M's input space.

The training targets are exactly the tokenizer's inputs as 4M (and ``modalmill tokenize``) prepares them
(:mod:`modalmill.tokenize.fourm_inputs`), so a tokenizer is trained on what it later tokenizes. The decoder
predicts the input back:

==============  ===========================================  ==============================================
source          loss                                         held-out metrics
==============  ===========================================  ==============================================
rgb, normal     MSE in [-1, 1]                               mse, psnr (of the [0, 1] picture)
edges           BCE on logits vs. edge/no edge (pos_weight)  mse, psnr, edge_f1
grey maps       MSE in [-1, 1]                               mse, psnr (a plugin's 1-channel map)
depth           L1 on the standardised depth                 mse, mae
semseg          cross-entropy over the class ids (+1 shift)  accuracy, miou (unlabelled ignored)
feature maps    smooth L1 + (1 - cosine)                     mse, cosine
global vectors  1 - cosine                                   mse, cosine
human poses     smooth L1                                    mse, cosine
SAM instances   BCE on logits vs. the 0/1 mask               mse, iou
==============  ===========================================  ==============================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .fourm_inputs import FourMInput

EDGE_POS_WEIGHT = 4.0  # edges are ~5-10 % of pixels: weighted up so the tokenizer cannot settle on "no edges"


@dataclass(frozen=True)
class FourMTrainAdapter:
    """Adapter API of :mod:`modalmill.tokenize.train` for a 4M-format tokenizer (``items``, ``to_input``,
    ``loss``, ``metrics``, ``summarise``, ``baseline``, ``reconstruct``, ``to_rgb``, ``normalisation``)."""

    inp: FourMInput
    n_labels: int | None = None

    @property
    def kind(self) -> str:
        k = self.inp.kind
        return "vector" if k in ("global", "pose") else k

    @property
    def source(self) -> str:
        return self.inp.source

    @property
    def size(self) -> int:
        return self.inp.size

    # ------------------------------------------------------------------ data
    def prepare(self, label: Any, crop=None, image_hw=None) -> torch.Tensor:
        index = int(crop[5]) if crop is not None and len(crop) > 5 else None
        x = self.inp.prepare(label, crop, image_hw, index)
        return x

    def items(self, label: Any, crop, image_hw) -> list[torch.Tensor]:
        if self.inp.kind == "mask":
            return [self.inp.prepare(inst["mask"]) for inst in self.inp.instances(label, crop, image_hw)]
        if self.inp.kind == "pose":
            return [self.inp.prepare(label)]
        return [self.prepare(label, crop, image_hw)]

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.inp.to_input(x)

    def normalisation(self) -> dict:
        return {"input": "4M's MODALITY_TRANSFORMS_DIVAE preprocessing (modalmill.tokenize.fourm_inputs)",
                "resample": self.inp.resample, "kind": self.inp.kind}

    # ------------------------------------------------------------------ objective
    def _edge_target(self, t):
        return (t[:, :1] > 0).float()

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = self.inp.kind
        if k in ("rgb", "normal", "gray"):
            return F.mse_loss(pred, target)
        if k == "edge":
            w = torch.tensor(EDGE_POS_WEIGHT, dtype=pred.dtype, device=pred.device)
            return F.binary_cross_entropy_with_logits(pred[:, :1], self._edge_target(target), pos_weight=w)
        if k == "depth":
            return F.l1_loss(pred, target)
        if k == "semseg":
            return F.cross_entropy(pred, target, ignore_index=0)
        if k == "feature":
            return F.smooth_l1_loss(pred, target) + (1 - F.cosine_similarity(pred, target, dim=1).mean())
        if k == "global":
            return 1 - F.cosine_similarity(pred.flatten(1), self.to_input(target).flatten(1), dim=1).mean()
        if k == "pose":
            return F.smooth_l1_loss(pred.flatten(1), target.flatten(1))
        if k == "mask":
            return F.binary_cross_entropy_with_logits(pred, target)
        raise ValueError(k)

    def reconstruct(self, pred: torch.Tensor) -> torch.Tensor:
        """Decoder output -> the input's space (edges and masks: probabilities as [-1, 1] / [0, 1]; semseg: ids)."""
        k = self.inp.kind
        if k == "edge":
            p = torch.sigmoid(pred[:, :1] - math.log(EDGE_POS_WEIGHT))
            return (p * 2 - 1).expand(-1, self.inp.n_channels, -1, -1)
        if k == "mask":
            return torch.sigmoid(pred)
        if k == "semseg":
            return pred.argmax(dim=1)
        return pred

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        k = self.inp.kind
        n = float(target.shape[0])
        if k == "semseg":
            rec, t = self.reconstruct(pred), target
            valid = t != 0
            c = int(self.n_labels or int(pred.shape[1]))
            inter = torch.bincount(t[valid & (rec == t)], minlength=c)[:c]
            area_t = torch.bincount(t[valid], minlength=c)[:c]
            area_p = torch.bincount(rec[valid], minlength=c)[:c]
            out = {"n": n, "correct": float(inter.sum()), "valid": float(valid.sum())}
            for i in range(c):
                if area_t[i] or area_p[i]:
                    out[f"inter_{i}"] = float(inter[i])
                    out[f"union_{i}"] = float(area_t[i] + area_p[i] - inter[i])
            return out
        rec = self.reconstruct(pred).float()
        tgt = target.float()
        if k in ("global", "pose"):
            rec, tgt = rec.flatten(1), self.to_input(tgt).flatten(1)
        out = {"n": n, "se": float(((rec - tgt) ** 2).sum()), "n_values": float(tgt.numel()),
               "ae": float((rec - tgt).abs().sum())}
        if k in ("rgb", "normal", "edge", "gray"):
            mse = ((rec.clamp(-1, 1) - tgt) ** 2).flatten(1).mean(1) / 4  # in [0, 1] units
            out["psnr_sum"] = float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).sum())
        if k == "edge":
            p, t = rec[:, 0] > 0, tgt[:, 0] > 0
            out.update(tp=float((p & t).sum()), fp=float((p & ~t).sum()), fn=float((~p & t).sum()))
        if k in ("feature", "global", "pose"):
            dim = 1
            out["cos_sum"] = float(F.cosine_similarity(rec, tgt, dim=dim).flatten(1).mean(1).sum()) \
                if rec.ndim > 2 else float(F.cosine_similarity(rec, tgt, dim=dim).sum())
        if k == "mask":
            hard, t = rec > 0.5, tgt > 0.5
            out.update(iou_inter=float((hard & t).sum()), iou_union=float((hard | t).sum()))
        return out

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        k = self.inp.kind
        if k == "semseg":
            c = int(self.n_labels or 0) or 1 + max((int(x.split("_")[1]) for x in sums if x.startswith("union_")),
                                                   default=0)
            ious = [sums[f"inter_{i}"] / sums[f"union_{i}"] for i in range(c) if sums.get(f"union_{i}", 0) > 0]
            return {"accuracy": sums["correct"] / max(sums["valid"], 1), "miou": float(np.mean(ious)) if ious else 0.0}
        out = {"mse": sums["se"] / max(sums["n_values"], 1), "mae": sums["ae"] / max(sums["n_values"], 1)}
        if "psnr_sum" in sums:
            out["psnr"] = sums["psnr_sum"] / max(sums["n"], 1)
        if k == "edge":
            tp, fp, fn = sums["tp"], sums["fp"], sums["fn"]
            out["edge_f1"] = 2 * tp / max(2 * tp + fp + fn, 1)
        if "cos_sum" in sums:
            out["cosine"] = sums["cos_sum"] / max(sums["n"], 1)
        if k == "mask":
            out["iou"] = sums["iou_inter"] / max(sums["iou_union"], 1)
        return out

    def baseline(self, target: torch.Tensor) -> torch.Tensor:
        """A trivial prediction in the decoder's output space: the held-out mean (most frequent class)."""
        k = self.inp.kind
        if k == "semseg":
            ids = target[target != 0]
            cls = int(torch.mode(ids).values) if ids.numel() else 0
            out = torch.full((target.shape[0], int(self.n_labels or 1), *target.shape[-2:]), -10.0)
            out[:, cls] = 10.0
            return out
        if k in ("edge", "mask"):
            p = (self._edge_target(target) if k == "edge" else target).mean().clamp(1e-4, 1 - 1e-4)
            logit = float(torch.log(p / (1 - p))) + (math.log(EDGE_POS_WEIGHT) if k == "edge" else 0.0)
            return torch.full_like(target, logit)
        if k in ("global", "pose"):
            return target.mean(dim=0, keepdim=True).expand_as(target)
        return target.mean(dim=(0, 2, 3), keepdim=True).expand_as(target)

    def to_rgb(self, x: torch.Tensor) -> np.ndarray:
        """One input-space tensor (or reconstruction) -> uint8 [S, S, 3] picture."""
        k = self.inp.kind
        if k in ("global", "pose"):
            raise ValueError(f"{self.source}: vectors have no picture")
        if k == "semseg":
            ids = x.long().clamp(0, 255).numpy()
            palette = np.random.default_rng(0).integers(0, 256, size=(256, 3), dtype=np.uint8)
            palette[0] = 0
            return palette[ids]
        if k == "mask":
            v = x.clamp(0, 1)
        elif k in ("depth", "feature"):
            v = x[:3] if x.shape[0] >= 3 else x[:1]
            lo = v.flatten(1).min(1).values[:, None, None]
            hi = v.flatten(1).max(1).values[:, None, None]
            v = (v - lo) / (hi - lo).clamp_min(1e-6)
        else:
            v = ((x + 1) / 2).clamp(0, 1)
        if v.shape[0] == 1:
            v = v.expand(3, -1, -1)
        return (v.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def train_adapter_for(source: str, model_or_spec, resample: str = "bilinear") -> FourMTrainAdapter:
    from .fourm_inputs import fourm_input_for

    src = "sam_instance" if source == "sam_mask" else source
    return FourMTrainAdapter(fourm_input_for(src, model_or_spec, resample), getattr(model_or_spec, "n_labels", None))
