"""Tokenize crops of real photos with apple/ml-4m's own code and a tokenizer folder in the hub layout.

Used to check that a tokenizer written by ``modalmill train-tokenizer`` loads in ml-4m's
``VQVAE.from_pretrained`` and gives the same ids there as in modalmill. Run it in ml-4m's environment::

    cd /path/to/ml-4m && PYTHONPATH=$PWD HF_HUB_OFFLINE=1 /path/to/ml4m-venv/bin/python \\
        /path/to/modalmill/scripts/ml4m_tokenize_folder.py TOKENIZER_FOLDER TASK OUT.npz [--test-builders]

TASK is an ml-4m ``MODALITY_TRANSFORMS_DIVAE`` key for the photos (rgb or canny_edge: the Canny map of the photo).
It loads the folder with unmodified ml-4m's ``VQVAE.from_pretrained`` (what a user of a ``small`` or ``base``
tokenizer has); only with ``--test-builders`` does it first register the ``vit_d<width>_l<depth>_h<heads>_enc|dec``
builders of modalmill's test-sized ``tiny`` preset in ml-4m's ``vit_models`` module (ml-4m itself names only
vit_s/b/l). It saves the photos, the crop rows and ml-4m's ids into OUT.npz. Then compare in
modalmill's environment with ``python scripts/ml4m_tokenize_folder.py --compare TOKENIZER_FOLDER OUT.npz``.
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np


def _photos():
    from PIL import Image
    from skimage import data

    coffee = np.asarray(Image.fromarray(data.coffee()[50:350]).resize((320, 160), Image.BILINEAR))
    rocket = np.asarray(Image.fromarray(data.rocket()).resize((240, 160), Image.BILINEAR))
    return {"coffee_2to1": coffee, "rocket": rocket}


def _crops(h, w):
    s = min(h, w)
    return np.array([[(h - s) // 2, (w - s) // 2, s, s, 0], [0, 0, h // 2 + 10, w // 2, 1],
                     [h // 4, w // 3, h // 2, h // 2, 0]], dtype=np.int64)


def run_ml4m(folder: str, task: str, out: str, test_builders: bool = False) -> None:
    import cv2
    import torch
    from PIL import Image

    import fourm.vq.models.vit_models as vm
    from fourm.data.modality_info import MODALITY_TRANSFORMS_DIVAE
    from fourm.vq.vqvae import VQVAE

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    for name in (cfg.get("enc_type", ""), cfg.get("dec_type", "")) if test_builders else ():
        m = re.match(r"vit_d(\d+)_l(\d+)_h(\d+)_(enc|dec)$", name or "")
        if m:
            w, d, h, part = m.groups()
            cls = vm.ViTEncoder if part == "enc" else vm.ViTDecoder
            setattr(vm, name, lambda cls=cls, w=w, d=d, h=h, **kw: cls(dim_tokens=int(w), depth=int(d),
                                                                         num_heads=int(h), **kw))
    model = VQVAE.from_pretrained(folder).eval()
    T = MODALITY_TRANSFORMS_DIVAE[task]
    saved = {}
    with torch.no_grad():
        for name, rgb in _photos().items():
            label = rgb if task == "rgb" else cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 80, 160)
            crops = _crops(*rgb.shape[:2])
            xs = []
            for top, left, h, w, flip in crops:
                im = T.preprocess(Image.fromarray(label).copy())
                im = T.image_augment(im, (top, left, h, w), bool(flip), None, (224, 224), None, "bilinear")
                xs.append(T.postprocess(im))
            x = torch.stack(xs)
            if cfg.get("n_channels", 3) == 1:
                x = x[:, :1]
            saved[f"{name}/label"], saved[f"{name}/crops"] = label, crops
            saved[f"{name}/ids"] = model.tokenize(x).reshape(len(crops), -1).numpy().astype(np.int16)
    np.savez_compressed(out, task=np.array(task), **saved)
    how = "with modalmill's test builders registered" if test_builders else "unmodified"
    print(f"ml-4m ({how}): {folder} ({cfg.get('enc_type')}) loaded with VQVAE.from_pretrained; "
          f"ids of {len(saved) // 3} photos -> {out}")


def compare(folder: str, npz: str) -> int:
    import torch

    from modalmill.tokenize import hub
    from modalmill.tokenize.fourm_inputs import fourm_input_for

    z = np.load(npz)
    task = str(z["task"])
    model, _ = hub.load(folder)
    inp = fourm_input_for(task, model)
    total = same = 0
    for key in z.files:
        if not key.endswith("/ids"):
            continue
        name = key[:-4]
        label, crops = z[f"{name}/label"], z[f"{name}/crops"]
        x = torch.stack([inp.prepare(label, c, label.shape[:2], i) for i, c in enumerate(crops)])
        with torch.inference_mode():
            ids = model.tokenize(x).numpy()
        total += ids.size
        same += int((ids == z[key]).sum())
    print(f"modalmill vs ml-4m: {same}/{total} ids identical ({100.0 * same / max(total, 1):.2f} %)")
    return 0 if same == total and total else 1


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    run_ml4m(sys.argv[1], sys.argv[2], sys.argv[3], test_builders="--test-builders" in sys.argv[4:])
