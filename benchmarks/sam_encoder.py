"""Benchmark 5's SAM labeler: the ``sam`` labeler's image encoder only, and the modality it writes.

A module of its own (not ``bench_gpu``, which runs as ``__main__``) so that Ray workers unpickle the class by
reference, importing this module, which registers the ``bench_sam_pooled`` modality there too.
"""

from __future__ import annotations

from modalmill.labelers.base import LabelFailure, register_labeler
from modalmill.labelers.sam import SamLabeler
from modalmill.schemas.modalities import GLOBAL, MODALITIES, ModalitySpec, register_modality

if "bench_sam_pooled" not in MODALITIES:
    register_modality(ModalitySpec("bench_sam_pooled", GLOBAL, "npy", "float16", (256,),
                                   "benchmark only: the mean-pooled SAM image embedding"))


@register_labeler
class BenchSamEncoder(SamLabeler):
    """The ``sam`` labeler's image encoder only (its ``embed``: SAM's resize + pad + ViT encoder), for benchmark 5."""

    name = "bench_sam_encoder"
    outputs = ("bench_sam_pooled",)
    description = "benchmark only: SAM image encoder, mean-pooled embedding"

    def predict(self, batch):
        from modalmill.labelers.dinov2 import to_float16

        if not hasattr(self, "_gen"):
            self._gen = self.generator()
        feats, _ = self.embed([inp.image for inp in batch])
        pooled = feats.float().mean(dim=(2, 3)).cpu().numpy()
        out = []
        for p in pooled:
            v = to_float16(p)
            out.append(LabelFailure("embedding not finite in float16") if v is None else {"bench_sam_pooled": v})
        return out
