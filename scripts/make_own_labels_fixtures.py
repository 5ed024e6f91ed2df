"""Make the imported-semseg reference fixture with apple/ml-4m's own code (tests/fixtures/own_labels/).

Writes:
- ``semseg/<photo>.png``: hand-made class-index masks (1-channel PNG, 255 = unlabelled) at the size the test
  stores each photo (rectangles of COCO-panoptic ids 0, 15, 41, 80, 132 over the photo);
- ``semseg_ids.npz``: for each mask, ``<photo>/crop`` (the centre square crop row ``(top, left, h, w, flip)``: crop
  0 of every sample) and ``<photo>/ids``: the token ids ml-4m gives for that crop with the committed semseg
  tokenizer fixture (tests/fixtures/ml4m_tokenizers/semseg, loaded with ml-4m's ``VQVAE``), computed as
  ``save_vq_tokens.py`` does: ``MODALITY_TRANSFORMS_DIVAE['semseg_coco'].preprocess -> image_augment(crop, flip,
  (224, 224)) -> postprocess`` (ids + 1, 255 -> 0, nearest resizing), then ``model.tokenize``.

Rerun (an ml-4m checkout and its environment)::

    cd /path/to/ml-4m/src && PYTHONPATH=$PWD HF_HUB_OFFLINE=1 /path/to/ml4m-venv/bin/python \\
        /path/to/modalmill/scripts/make_own_labels_fixtures.py /path/to/modalmill/tests/fixtures
"""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

# (height, width) each photo is stored at in tests/test_own_labels.py, and the rectangles (top, left, h, w, id)
MASKS = {
    "astronaut": ((160, 160), [(10, 40, 70, 60, 0), (90, 0, 70, 160, 80), (0, 0, 10, 160, 132)]),
    "chelsea": ((128, 192), [(20, 30, 90, 120, 15), (0, 150, 40, 42, 132)]),
    "coffee": ((100, 200), [(10, 60, 80, 80, 41), (0, 0, 100, 40, 80), (70, 150, 30, 50, 0)]),
}


def make_mask(hw, rects):
    m = np.full(hw, 255, np.uint8)
    for top, left, h, w, cid in rects:
        m[top:top + h, left:left + w] = cid
    return m


def main(fixtures):
    import torch
    from fourm.data.modality_info import MODALITY_TRANSFORMS_DIVAE
    from fourm.vq.vqvae import VQVAE

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    from make_ml4m_tokenizer_fixtures import register_tiny_builders

    register_tiny_builders()
    out = os.path.join(fixtures, "own_labels")
    os.makedirs(os.path.join(out, "semseg"), exist_ok=True)
    model = VQVAE.from_pretrained(os.path.join(fixtures, "ml4m_tokenizers", "semseg")).eval()
    t = MODALITY_TRANSFORMS_DIVAE["semseg_coco"]
    res = {}
    with torch.no_grad():
        for name, (hw, rects) in MASKS.items():
            mask = make_mask(hw, rects)
            Image.fromarray(mask).save(os.path.join(out, "semseg", f"{name}.png"))
            h, w = hw
            s = min(h, w)
            crop = np.array([(h - s) // 2, (w - s) // 2, s, s, 0], np.int64)
            im = t.preprocess(Image.open(os.path.join(out, "semseg", f"{name}.png")))
            im = t.image_augment(im, tuple(int(v) for v in crop[:4]), False, None, (224, 224), None, "bilinear")
            x = t.postprocess(im)[None]
            res[f"{name}/crop"] = crop
            res[f"{name}/ids"] = model.tokenize(x).reshape(1, -1).numpy().astype(np.int16)
            print(name, res[f"{name}/ids"].shape, "distinct ids", len(np.unique(res[f"{name}/ids"])))
    np.savez_compressed(os.path.join(out, "semseg_ids.npz"), **res)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
