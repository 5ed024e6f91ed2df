"""Write 4M's own ``MODALITY_INFO`` entries for its pre-tokenized image-like modalities as JSON
(tests/fixtures/ml4m_modality_info/modality_info.json), read from apple/ml-4m's ``fourm.data.modality_info``.

Each entry keeps the fields modalmill's ``fourm_modality_info.json`` also writes (type, vocab_size, input_size,
patch_size, min_tokens, max_tokens, pretokenized) and the encoder / decoder embeddings as
``{"class": <function name>, "kwargs": <the partial's keywords>}``, so a test compares modalmill's entry with 4M's
field by field (e.g. that ``sincos_pos_emb`` is left at its default, True, for spatial token grids and is False only
for the ``*_global`` ones).

Rerun (a checkout of apple/ml-4m and its environment)::

    cd /path/to/ml-4m && PYTHONPATH=$PWD /path/to/ml4m-venv/bin/python \\
        /path/to/modalmill/scripts/make_fourm_modality_info_fixture.py \\
        /path/to/modalmill/tests/fixtures/ml4m_modality_info/modality_info.json
"""

from __future__ import annotations

import json
import sys

FIELDS = ("type", "vocab_size", "input_size", "patch_size", "min_tokens", "max_tokens", "pretokenized")


def embedding(p):
    return {"class": p.func.__name__, "kwargs": dict(sorted(p.keywords.items()))}


def main(out):
    from fourm.data.modality_info import MODALITY_INFO

    entries = {}
    for name, info in sorted(MODALITY_INFO.items()):
        if not name.startswith("tok_") or info.get("type") != "img" or not info.get("pretokenized"):
            continue
        e = {k: info.get(k) for k in FIELDS}
        e["encoder_embedding"] = embedding(info["encoder_embedding"])
        e["decoder_embedding"] = embedding(info["decoder_embedding"])
        entries[name] = e
    with open(out, "w") as f:
        json.dump({"source": "apple/ml-4m fourm/data/modality_info.py MODALITY_INFO", "entries": entries}, f,
                  indent=1, sort_keys=True)
        f.write("\n")
    for name, e in entries.items():
        print(name, e["encoder_embedding"])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/ml4m_modality_info/modality_info.json")
