"""Make tests/fixtures/fourm_crops/crops.npz: what apple/ml-4m's own training transforms make of one crop row.

Runs in ml-4m's environment (not modalmill's). For small random images (a photograph-like rgb, a surface-normal
map, a semantic map of class ids; non-square, so crops differ in shape) and crop rows with and without a flip,
it applies the ``image_augment`` of ml-4m's ``RGBTransform``, ``NormalTransform`` and ``SemsegTransform``
(``fourm/data/modality_transforms.py``): a PIL crop, a PIL resize to the target size (``resample_mode=None``,
PIL's default, as 4M's training loader leaves it; semseg always nearest) and the horizontal flip (normals: the
x channel mirrored). The inputs are saved next to the outputs, so ``tests/test_dataset_transforms.py`` can run
modalmill's ``FourMCrops`` on the same arrays. No ml-4m file is copied.

Rerun (from the ml-4m source tree, with its venv)::

    cd /work/ref/ml-4m/src && PYTHONPATH=$PWD /work/ref/ml-4m/venv/bin/python \\
        /path/to/modalmill/scripts/make_4m_crop_fixture.py --out /path/to/modalmill/tests/fixtures/fourm_crops
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from fourm.data.modality_transforms import NormalTransform, RGBTransform, SemsegTransform

SIZE = 24


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rng = np.random.default_rng(7)
    h, w = 41, 57
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(xx * 4) % 256, (yy * 6) % 256, ((xx + yy) * 3) % 256], -1)  # structure, not only noise
    rgb = np.clip(smooth + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    normal = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    semseg = (rng.integers(0, 6, (h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)[:h, :w] * 20).astype(np.uint8)
    crops = np.array([[0, 8, 41, 41, 0], [3, 5, 30, 40, 1], [10, 20, 17, 33, 0], [0, 0, 41, 57, 1]], np.int64)
    out = {"rgb": rgb, "normal": normal, "semseg": semseg, "crops": crops, "size": np.array(SIZE)}
    transforms = {"rgb": RGBTransform(), "normal": NormalTransform(), "semseg": SemsegTransform()}
    for name, t in transforms.items():
        img = Image.fromarray(out[name])
        if name == "semseg":
            img = t.preprocess(img)  # 4M's semseg is a 'P' image
        made = []
        for top, left, ch, cw, flip in crops:
            res = t.image_augment(img, (int(top), int(left), int(ch), int(cw)), bool(flip), (h, w), (SIZE, SIZE),
                                  None, resample_mode=None)
            made.append(np.asarray(res))
        out[f"{name}_4m"] = np.stack(made)
    os.makedirs(args.out, exist_ok=True)
    np.savez_compressed(os.path.join(args.out, "crops.npz"), **out)
    print({k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main()
