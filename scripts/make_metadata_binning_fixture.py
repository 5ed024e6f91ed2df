"""Make tests/fixtures/metadata_binning/expected.json: 4M-21's metadata tokens for ``watermark_score`` and
``aesthetic_score`` values, computed by apple/ml-4m's own ``MetadataTransform``.

The scores are the values a COYO-style corpus carries (``aesthetic_score_laion_v2`` 0..10, ``watermark_score``
0..1), chosen on and around 4M's manual bin edges (0.5; 4.5 and 5.5) and at the ends of the ranges. Each record
also holds a few image statistics so the whole record is binned as 4M bins it. ml-4m's transform is built with
``shuffle=False`` (its random key order pinned), ``return_chunks=True``; the record is given in 4M's id order.

Rerun (from the ml-4m source tree, with its venv)::

    cd /work/ref/ml-4m/src && PYTHONPATH=$PWD /work/ref/ml-4m/venv/bin/python \\
        /path/to/modalmill/scripts/make_metadata_binning_fixture.py \\
        --out /path/to/modalmill/tests/fixtures/metadata_binning/expected.json
"""

from __future__ import annotations

import argparse
import json

WATERMARK = (0.0, 0.1, 0.4999, 0.5, 0.5001, 0.93, 1.0)
AESTHETIC = (0.0, 3.2, 4.4999, 4.5, 4.5001, 5.0, 5.4999, 5.5, 5.5001, 7.25, 10.0)


def records() -> list[dict]:
    out = []
    for i, a in enumerate(AESTHETIC):
        w = WATERMARK[i % len(WATERMARK)]
        out.append({"original_width": 640 + 32 * i, "original_height": 480, "brightness": 20.0 * i,
                    "entropy": 7.5, "watermark_score": w, "aesthetic_score": a})
    return out


def main() -> None:
    from fourm.data.modality_transforms import MetadataTransform

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t = MetadataTransform(shuffle=False, random_trunc=False, return_chunks=True)
    order = list(t.metadata_id_map)
    rows = []
    for rec in records():
        ordered = {k: rec[k] for k in order if k in rec}
        rows.append({"metadata": ordered, "chunks": t.postprocess(dict(ordered))})
    with open(args.out, "w") as f:
        json.dump({"made_by": "fourm.data.modality_transforms.MetadataTransform(shuffle=False)",
                   "records": rows}, f, indent=1)


if __name__ == "__main__":
    main()
