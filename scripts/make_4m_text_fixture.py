"""Make tests/fixtures/text4m/: 4M-21's text sequences and token ids, computed by apple/ml-4m's own code, for a few
samples that modalmill wrote.

Runs in ml-4m's environment (not modalmill's): its transforms (``fourm.data.modality_transforms``, applied through
``UnifiedDataTransform`` with a ``PreTokenizedImageAugmenter`` as 4M's training loader does) and its released text
tokenizer (``fourm/utils/tokenizer/trained/text_tokenizer_4m_wordpiece_30k.json``, encoded as
``fourm/data/masking.py`` does: ``encode(sequence).ids + [EOS]``; metadata chunk by chunk, ``[EOS]`` as a last
chunk). For every sample and every row c of its ``crop_settings`` the augmenter is made to pick crop c
(``rand_aug_idx = c``), and 4M's random choices are pinned to their canonical values so that the result is
comparable: metadata in 4M's id order (``MetadataTransform(shuffle=False)`` on the dict ordered by id), colour
palette size 7 (``random.randint`` -> 7), human-pose groups in the order pose, global, camera, shape
(``torch.randperm`` -> identity), SAM-instance query points on 4M's 7 x 7 grid (``point_order='grid'``) in grid
order (``random.shuffle`` -> no-op). modalmill's canonical serialisation (``text_augment=False``) makes the same
choices.

Input: a modalmill output (e.g. from ``scripts/build_all21_output.py``); the first ``--n`` samples of shard 0 that
have people are preferred. Written: ``samples/<key>.<modality>.<ext>`` (the members as modalmill stored them, no
rgb: only its size is used, kept in ``expected.json``) and ``expected.json`` ({key: {"image_hw", "crops",
"per_crop": [{modality: {"text", "ids"}}]}}, plus the tokenizer file's sha256). No ml-4m file is copied here;
scripts/make_4m_text_tokenizer_fixture.py then cuts the released tokenizer down to what these texts reach (rerun it
after this one).

Rerun (from the ml-4m source tree, with its venv)::

    cd /work/ref/ml-4m/src && PYTHONPATH=$PWD HF_HUB_OFFLINE=1 /work/ref/ml-4m/venv/bin/python \\
        /path/to/modalmill/scripts/make_4m_text_fixture.py --data /tmp/modalmill-all21/out \\
        --out /path/to/modalmill/tests/fixtures/text4m --n 3
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import tarfile

import numpy as np

TEXT = ("caption", "det", "metadata", "color_palette", "human_poses", "sam_instance")
EXT = {"caption": "json", "det": "json", "metadata": "json", "color_palette": "json", "human_poses": "json",
       "sam_instance": "npy", "crop_settings": "npy"}
METADATA_ORDER = ("original_width", "original_height", "caption_n_chars", "caption_n_words", "caption_n_sentences",
                  "n_humans", "n_sam_instances", "n_coco_instances", "coco_instance_diversity", "colorfulness",
                  "brightness", "contrast", "saturation", "entropy", "walkability", "objectness",
                  "semantic_diversity", "geometric_complexity", "occlusion_score", "watermark_score",
                  "aesthetic_score")


def members(path: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


@contextlib.contextmanager
def pinned(crop_index: int):
    """4M's random choices pinned to the canonical ones (see the module docstring)."""
    import torch

    saved = (np.random.randint, random.randint, random.shuffle, torch.randperm)
    np.random.randint = lambda n, *a, **k: crop_index  # PreTokenizedImageAugmenter's rand_aug_idx
    random.randint = lambda a, b: 7  # ColorPaletteTransform: palette size
    random.shuffle = lambda x: None  # SAMInstanceTokTransform: query point / instance order
    torch.randperm = lambda n, *a, **k: torch.arange(n)  # HumanPoseTransform: group order
    try:
        yield
    finally:
        np.random.randint, random.randint, random.shuffle, torch.randperm = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a modalmill output root")
    ap.add_argument("--out", required=True, help="the fixture directory to (re)write")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--shard", default="shard-00000")
    ap.add_argument("--tokenizer", default="fourm/utils/tokenizer/trained/text_tokenizer_4m_wordpiece_30k.json")
    args = ap.parse_args()

    from PIL import Image
    from tokenizers import Tokenizer

    from fourm.data.image_augmenter import PreTokenizedImageAugmenter
    from fourm.data.modality_transforms import (CaptionTransform, ColorPaletteTransform, DetectionTransform,
                                                HumanPoseTransform, MetadataTransform, RGBTransform,
                                                SAMInstanceTokTransform, UnifiedDataTransform)

    tok = Tokenizer.from_file(args.tokenizer)
    eos = tok.token_to_id("[EOS]")
    # MODALITY_TRANSFORMS of fourm/data/modality_info.py, with the random choices made canonical (module docstring)
    transforms = {
        "rgb": RGBTransform(imagenet_default_mean_and_std=True),
        "caption": CaptionTransform(aligned_captions=True),
        "det": DetectionTransform(det_threshold=0.6, det_max_instances=None, bbox_order="dist_to_orig",
                                  coord_bins=1000, min_visibility=0.0),
        "metadata": MetadataTransform(special_vmin=0, special_vmax=999, shuffle=False, random_trunc=False,
                                      return_chunks=True),
        "human_poses": HumanPoseTransform(coord_bins=1000),
        "color_palette": ColorPaletteTransform(coord_bins=1000),
        "sam_instance": SAMInstanceTokTransform(image_size=224, points_per_side=7, point_order="grid"),
    }
    unified = UnifiedDataTransform(transforms_dict=transforms,
                                   image_augmenter=PreTokenizedImageAugmenter(target_size=224, no_aug=False,
                                                                              main_domain="rgb@224"))

    tars = {m: members(os.path.join(args.data, m, f"{args.shard}.tar")) for m in (*TEXT, "crop_settings", "rgb")}
    keys = list(tars["rgb"])
    with_people = [k for k in keys if json.loads(tars["human_poses"][k]["json"])]
    chosen = (with_people + [k for k in keys if k not in with_people])[: args.n]

    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(os.path.join(args.out, "samples"))
    expected = {"tokenizer_sha256": hashlib.sha256(open(args.tokenizer, "rb").read()).hexdigest(),
                "tokenizer": os.path.basename(args.tokenizer), "samples": {}}
    for key in chosen:
        raw = {m: tars[m][key][EXT[m]] for m in (*TEXT, "crop_settings")}
        for m, data in raw.items():
            with open(os.path.join(args.out, "samples", f"{key}.{m}.{EXT[m]}"), "wb") as f:
                f.write(data)
        rgb = Image.open(io.BytesIO(tars["rgb"][key]["jpg"]))
        crops = np.load(io.BytesIO(raw["crop_settings"]))
        per_crop = []
        for c in range(len(crops)):
            values = {m: json.loads(raw[m]) for m in TEXT if EXT[m] == "json"}
            values["metadata"] = {k: values["metadata"][k] for k in METADATA_ORDER if k in values["metadata"]}
            values["sam_instance"] = np.load(io.BytesIO(raw["sam_instance"]), allow_pickle=True)
            entry = {}
            for m in TEXT:  # one modality at a time: what 4M's loader does with each (errors recorded)
                mod_dict = {m: values[m], "rgb@224": rgb.copy(), "crop_settings": crops}
                try:
                    with pinned(c):
                        text = unified(mod_dict)[m]
                except Exception as e:  # noqa: BLE001
                    entry[m] = {"error": f"{type(e).__name__}: {e}"}
                    continue
                if isinstance(text, list):  # metadata chunks: fourm/data/masking.py's chunked encoding
                    ids = [i for chunk in tok.encode_batch(text) for i in chunk.ids] + [eos]
                else:
                    ids = tok.encode(text).ids + [eos]
                entry[m] = {"text": text, "ids": ids}
            per_crop.append(entry)
        expected["samples"][key] = {"image_hw": [rgb.height, rgb.width], "crops": crops.tolist(),
                                    "per_crop": per_crop}
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print(f"wrote {args.out}: {len(chosen)} samples, keys {chosen}")


if __name__ == "__main__":
    main()
