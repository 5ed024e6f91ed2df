"""Load a `modalmill export --layout 4m-folder` with apple/ml-4m's own code (outside CI: needs ml-4m's checkout and
environment).

Two checks, both through ml-4m's functions only:

1. ml-4m's fine-tuning data path as its configs drive it: ``setup_sampling_mod_info`` + ``get_train_dataloader``
   with a ``type: multimodal``, ``use_wds: False`` data config (``MultiModalDatasetFolder`` ->
   ``UnifiedDataTransform`` with ``PreTokenizedImageAugmenter`` -> ``UnifiedMasking``) over ``rgb@224``, ``det``,
   ``tok_rgb@224`` and ``tok_semseg@224``; every sample must come out with every domain's tensor.
2. The same folder dataset with ``UnifiedDataTransform`` alone (no masking) and the centre crop (crop 0,
   ``no_aug``), compared with the files: ``semseg_coco`` (read with ml-4m's tokenizer-side transform
   ``MODALITY_TRANSFORMS_DIVAE['semseg_coco']``, as ``save_vq_tokens.py`` reads it; fine-tuning reads semseg as
   ``tok_semseg@224``) ids after 4M's transform are the stored ids + 1 (255 -> 0)
   of the centre crop resized nearest; ``det`` becomes the box string 4M's transform writes; tokens are row 0.

    cd /path/to/ml-4m/src && PYTHONPATH=$PWD /path/to/ml4m-venv/bin/python \\
        /path/to/modalmill/scripts/check_export_with_ml4m.py EXPORT/val
"""

from __future__ import annotations

import json
import os
import random
import sys

import numpy as np
from PIL import Image

_sample = random.sample
random.sample = lambda pop, k, **kw: _sample(list(pop) if not isinstance(pop, (list, tuple, range)) else pop, k,
                                             **kw)  # Python 3.11 vs fourm/models/fm.py (machine-notes)

TEXT_TOKENIZER = "fourm/utils/tokenizer/trained/text_tokenizer_4m_wordpiece_30k.json"


def data_config(root: str) -> dict:
    # the lines of an ml-4m data config (cfgs/default/4m/data/...) that read this export
    return {"type": "multimodal", "use_wds": False, "data_path": root, "main_augment_domain": "rgb@224",
            "in_domains": "rgb@224-det-tok_rgb@224", "out_domains": "det-tok_rgb@224-tok_semseg@224",
            "input_alphas": "1.0", "target_alphas": "1.0", "tok_train_aug": True}


def check_training_path(root: str, tok) -> int:
    from types import SimpleNamespace

    from fourm.data.pretrain_utils import get_train_dataloader, setup_sampling_mod_info
    from run_training_4m import setup_modality_info

    cfg = data_config(root)
    domains = sorted(set(cfg["in_domains"].split("-")) | set(cfg["out_domains"].split("-")))
    # as run_training_4m.setup_data does: the global modality info (max_tokens), then the dataset's subset
    info = setup_modality_info(SimpleNamespace(all_domains=domains, input_size=224, patch_size=16))
    mod_info, weights = setup_sampling_mod_info(cfg, info)
    loader = get_train_dataloader(cfg, mod_info, weights, tok, input_size=224, num_input_tokens=64,
                                  num_target_tokens=64, min_input_tokens=None, min_target_tokens=None, num_tasks=1,
                                  num_workers=0)
    n = 0
    for sample in loader:
        for dom in ("rgb@224", "det", "tok_rgb@224", "tok_semseg@224"):
            assert dom in sample, (dom, sorted(sample))
            assert "tensor" in sample[dom], (dom, sorted(sample[dom]))
        assert tuple(sample["rgb@224"]["tensor"].shape) == (3, 224, 224)
        assert sample["tok_rgb@224"]["tensor"].numel() == 196
        n += 1
    return n


def check_values(root: str) -> int:
    from fourm.data.image_augmenter import PreTokenizedImageAugmenter
    from fourm.data.modality_info import MODALITY_INFO, MODALITY_TRANSFORMS, MODALITY_TRANSFORMS_DIVAE
    from fourm.data.modality_transforms import CropSettingsTransform, UnifiedDataTransform
    from fourm.data.multimodal_dataset_folder import MultiModalDatasetFolder

    mods = ["rgb@224", "det", "semseg_coco", "tok_rgb@224", "crop_settings"]
    # fine-tuning reads semseg as tokens (tok_semseg@224); the raw class maps are read by ml-4m's tokenizer
    # transforms (save_vq_tokens.py, run_training_vqvae.py): MODALITY_TRANSFORMS_DIVAE['semseg_coco']
    transforms = dict(MODALITY_TRANSFORMS, crop_settings=CropSettingsTransform(),
                      semseg_coco=MODALITY_TRANSFORMS_DIVAE["semseg_coco"])
    paths = {m: MODALITY_INFO[m]["path"] for m in mods if MODALITY_INFO.get(m, {}).get("path")}
    ds = MultiModalDatasetFolder(root, mods, paths, transforms, return_path=True,
                                 transform=UnifiedDataTransform(transforms, PreTokenizedImageAugmenter(
                                     224, no_aug=True, main_domain="rgb@224")))
    for i in range(len(ds)):
        s = ds[i]
        name = s["file_name"]
        folder = os.path.join(root, "semseg_coco", s["class_id"])
        crops = np.load(os.path.join(root, "crop_settings", s["class_id"], f"{name}.npy"))
        top, left, h, w, _ = (int(v) for v in crops[0])
        mask = Image.open(os.path.join(folder, f"{name}.png")).crop((left, top, left + w, top + h))
        want = (np.asarray(mask.resize((224, 224), Image.NEAREST)).astype(np.int64) + 1) % 256
        np.testing.assert_array_equal(s["semseg_coco"].numpy(), want, err_msg=name)
        toks = np.load(os.path.join(root, "tok_rgb@224", s["class_id"], f"{name}.npy"))
        np.testing.assert_array_equal(s["tok_rgb@224"].numpy(), toks[0])
        det = json.load(open(os.path.join(root, "det", s["class_id"], f"{name}.json")))
        classes = [inst["class_name"] for inst in det["instances"]]
        assert all(c in s["det"] for c in classes), (name, s["det"], classes)
        print(f"{name}: semseg ids {sorted(set(np.unique(want)))} (4M's +1), det {s['det']!r}")
    return len(ds)


def main(root: str) -> None:
    from fourm.utils.tokenizer.text_tokenizer import Tokenizer

    tok = Tokenizer.from_file(TEXT_TOKENIZER)
    n_values = check_values(root)
    n_train = check_training_path(root, tok)
    print(f"PASSED: ml-4m's folder dataset read {n_values} samples (values checked) and its fine-tuning loader "
          f"{n_train} samples from {root}")


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]))
