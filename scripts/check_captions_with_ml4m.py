"""Read a modalmill output's captions with apple/ml-4m's own data path and say what 4M's trainer gets, per crop row.

Runs in ml-4m's environment, not modalmill's (ml-4m is not a package; modalmill is not imported here)::

    cd /work/ref/ml-4m/src && /work/ref/ml-4m/venv/bin/python /path/to/modalmill/scripts/check_captions_with_ml4m.py \
        OUTPUT --ml4m /work/ref/ml-4m/src

For every completed shard (one with ``_modalmill/shards/shard-N.json``), ml-4m's ``multi_tarfile_samples`` zips
``OUTPUT/[caption,crop_settings(,t5_caption)]/shard-N.tar`` as 4M's loader does, ``wds.decode(wds_decoder)``
decodes the members, ``remove_extensions`` names them, and ml-4m's ``UnifiedDataTransform`` with 4M-21's
``MODALITY_TRANSFORMS`` (``CaptionTransform(aligned_captions=True)``, ``CaptionEmbTransform``) and the
``PreTokenizedImageAugmenter`` of pre-tokenized training runs once per row of ``crop_settings``: the augmenter's
random row (``np.random.randint``) is set to each row in turn, so every row 4M could pick is read.

Prints one JSON line: ``samples``, ``crop_rows_read``, ``captions`` (key -> the caption of crop row 0),
``t5_rows_read`` and ``errors`` (key, row, exception); exits 1 when there is any error (for example the
``IndexError`` a one-entry caption list gives with several crops).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from functools import partial


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", help="a modalmill output root (local)")
    ap.add_argument("--ml4m", required=True, help="apple/ml-4m's source tree (the folder holding fourm/)")
    args = ap.parse_args()
    sys.path.insert(0, args.ml4m)

    import numpy as np
    import webdataset as wds

    import fourm.data.image_augmenter as augmenter_module
    from fourm.data.image_augmenter import PreTokenizedImageAugmenter
    from fourm.data.modality_info import MODALITY_TRANSFORMS
    from fourm.data.modality_transforms import IdentityTransform, UnifiedDataTransform
    from fourm.data.unified_datasets import multi_tarfile_samples, remove_extensions, wds_decoder

    root = os.path.abspath(args.output)
    mods = ["caption", "crop_settings"] + (["t5_caption"] if os.path.isdir(os.path.join(root, "t5_caption")) else [])
    transforms = {m: MODALITY_TRANSFORMS[m] for m in mods if m != "crop_settings"}
    transforms["__key__"] = IdentityTransform()
    unified = UnifiedDataTransform(transforms_dict=transforms, image_augmenter=PreTokenizedImageAugmenter(224))

    shards = sorted(os.path.basename(p)[: -len(".json")]
                    for p in glob.glob(os.path.join(root, "_modalmill", "shards", "shard-*.json")))
    urls = [os.path.join(root, "[" + ",".join(mods) + "]", f"{s}.tar") for s in shards]
    pipe = wds.DataPipeline(wds.SimpleShardList(urls), partial(multi_tarfile_samples, handler=wds.reraise_exception),
                            wds.decode(wds_decoder), wds.map(remove_extensions))

    report = {"samples": 0, "crop_rows_read": 0, "t5_rows_read": 0, "captions": {}, "errors": []}
    real_randint = np.random.randint
    for sample in pipe:
        key = sample["__key__"]
        sample = {k: v for k, v in sample.items() if k in mods or k == "__key__"}
        report["samples"] += 1
        for row in range(len(sample["crop_settings"])):
            augmenter_module.np.random.randint = lambda n, row=row: row  # the augmenter picks this row
            try:
                out = unified(dict(sample))
                if not isinstance(out["caption"], str):
                    raise TypeError(f"caption is {type(out['caption']).__name__}")
                report["crop_rows_read"] += 1
                if row == 0:
                    report["captions"][key] = out["caption"]
                if "t5_caption" in out:
                    report["t5_rows_read"] += 1
            except Exception as e:  # noqa: BLE001 - reported per key and row
                report["errors"].append([key, row, f"{type(e).__name__}: {e}"])
            finally:
                augmenter_module.np.random.randint = real_randint
    report["captions"] = dict(sorted(report["captions"].items()))
    print(json.dumps(report, ensure_ascii=False))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
