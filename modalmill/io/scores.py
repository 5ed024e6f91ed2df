"""Quality scores a corpus already carries: the columns of its source json that fill 4M-21 ``metadata`` fields.

COYO-700M's parquet files have ``aesthetic_score_laion_v2`` (LAION's aesthetic predictor v2, 0..10) and
``watermark_score`` (LAION's watermark detector, 0..1) per image; :mod:`modalmill.io.readers` turns every
non-binary parquet column (and a tar's ``KEY.json``) into the sample's source json. :data:`DEFAULT_INPUT_SCORES`
maps those columns to the ``metadata`` fields ``aesthetic_score`` (id 20) and ``watermark_score`` (id 19); the
``metadata`` labelers' ``input_scores`` setting changes the mapping (``{}``: never read scores from the input).

:func:`input_scores` reads one sample's scores: a column that is missing, null, not a number, NaN or infinite
gives no value (the model labeler, if the job has one, fills it); values are kept as given (the clipping into
4M's range happens where the record is made). :func:`score_sources` says, per field, where the value came
from, for the manifest's ``score_sources`` column.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

__all__ = ["DEFAULT_INPUT_SCORES", "input_scores", "normalise_mapping", "parse_source", "score_sources"]

DEFAULT_INPUT_SCORES: tuple[tuple[str, str], ...] = (
    ("aesthetic_score", "aesthetic_score_laion_v2"),
    ("watermark_score", "watermark_score"),
)


def normalise_mapping(mapping: Any) -> tuple[tuple[str, str], ...]:
    """``{field: column}`` (or pairs) as sorted pairs; ValueError for anything else."""
    if mapping is None:
        return ()
    items = mapping.items() if isinstance(mapping, Mapping) else mapping
    try:
        pairs = tuple(sorted((str(f), str(c)) for f, c in items))
    except (TypeError, ValueError):
        raise ValueError(f"input_scores must map metadata fields to source columns, got {mapping!r}") from None
    for f, c in pairs:
        if not f or not c:
            raise ValueError(f"input_scores: empty field or column in {mapping!r}")
    return pairs


def parse_source(source_json: str | None) -> dict | None:
    """The source json of a manifest row / sample as a dict (None when absent or not an object)."""
    if not source_json:
        return None
    try:
        value = json.loads(source_json)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def input_scores(source: Mapping[str, Any] | None, mapping) -> dict[str, float]:
    """``{field: value}`` of the mapped columns the sample's source json holds as finite numbers."""
    if not source:
        return {}
    out = {}
    for field, column in mapping:
        v = _number(source.get(column))
        if v is not None:
            out[field] = v
    return out


def score_sources(source: Mapping[str, Any] | None, mapping) -> dict[str, str]:
    """``{field: "input:<column>"}`` for the fields :func:`input_scores` fills."""
    found = input_scores(source, mapping)
    return {f: f"input:{c}" for f, c in mapping if f in found}
