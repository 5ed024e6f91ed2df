"""The entry 4M's ``MODALITY_INFO`` needs for a token modality, written next to a tokenizer checkpoint.

4M's trainer (apple/ml-4m, ``fourm/data/modality_info.py``) knows a modality through one ``MODALITY_INFO`` entry:
its type (``img`` for pre-tokenized image-like tokens), vocabulary size, token budget (``max_tokens``), patch and
input size (their ratio gives the token grid), whether it is pre-tokenized, and which encoder / decoder embedding
classes turn its ids into model inputs and predictions (``ImageTokenEncoderEmbedding`` /
``ImageTokenDecoderEmbedding`` with the vocabulary size, as 4M's own ``tok_*`` entries: a spatial token grid keeps
the classes' default 2D sin-cos position embedding, only the ``*_global`` modalities turn it off with
``sincos_pos_emb=False``). :func:`fourm_entry` builds that entry as JSON (embedding classes by name with their
keyword arguments, since functions do not serialise); :func:`write_fourm_entry` writes it as
``fourm_modality_info.json`` next to a checkpoint, where ``scripts/check_with_ml4m.py --modality-info`` (or a
trainer of your own) registers it:
``MODALITY_INFO[name] = {..., "encoder_embedding": partial(ImageTokenEncoderEmbedding, **kwargs), ...,
"id": generate_uint15_hash(name)}`` and ``MODALITY_TRANSFORMS[name.split("@")[0]] = TokTransform()``.
"""

from __future__ import annotations

import json
import math
from typing import Any

MODALITY_INFO_FILE = "fourm_modality_info.json"


def fourm_entry(token_modality: str, vocab_size: int, n_tokens: int, *, input_size: int = 224,
                source: str | None = None) -> dict[str, Any]:
    """4M's ``MODALITY_INFO`` entry for an image-like token modality with ``n_tokens`` ids per crop (a square grid:
    196 = 14 x 14, 256, 16, ...) from a vocabulary of ``vocab_size``, at ``input_size`` (the ``@224`` suffix)."""
    grid = math.isqrt(int(n_tokens))
    if grid * grid != n_tokens or n_tokens < 1:
        raise ValueError(f"{token_modality}: 4M's image-token modalities have a square grid of tokens, got {n_tokens}")
    if input_size % grid:
        raise ValueError(f"{token_modality}: input size {input_size} is not a multiple of the {grid} x {grid} grid")
    emb: dict[str, Any] = {"vocab_size": int(vocab_size)}
    if token_modality.split("@", 1)[0].endswith("_global"):  # 4M: False only for tok_*_global, else the default
        emb["sincos_pos_emb"] = False
    return {
        "name": token_modality,
        "type": "img",
        "vocab_size": int(vocab_size),
        "input_size": int(input_size),
        "patch_size": input_size // grid,
        "min_tokens": 0,
        "max_tokens": int(n_tokens),
        "pretokenized": True,
        "encoder_embedding": {"class": "ImageTokenEncoderEmbedding", "kwargs": emb},
        "decoder_embedding": {"class": "ImageTokenDecoderEmbedding", "kwargs": emb},
        "id": f"generate_uint15_hash({token_modality!r})",
        "path": token_modality,  # the folder its shards are in
        "source": source,
    }


def write_fourm_entry(out_dir: str, config: dict[str, Any]) -> str | None:
    """Write :func:`fourm_entry` for the tokenizer whose ``config`` (its training config: the source ``modality``
    and the ``token_modality``, whose registry spec gives the vocabulary and token count) is in ``out_dir`` (local
    or ``s3://``); returns the file's URL, or None when ``config`` names no token modality (the tokenizers whose ids
    live inside another modality's file: SAM instances, body poses)."""
    from ..io import storage
    from ..schemas.modalities import get_modality

    tok = config.get("token_modality")
    if not tok:
        return None
    spec = get_modality(tok)
    size = int(tok.split("@", 1)[1]) if "@" in tok else 224
    entry = fourm_entry(tok, int(spec.vocab_size), int(spec.n_tokens), input_size=size, source=config.get("modality"))
    url = storage.join(out_dir, MODALITY_INFO_FILE)
    storage.write_bytes(url, (json.dumps(entry, indent=1, sort_keys=True) + "\n").encode())
    return url
