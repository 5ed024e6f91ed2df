"""What an input sample already says about itself: its text (alt-text caption) and its source metadata.

Image-text corpora reach users the way img2dataset writes them: ``KEY.jpg`` + ``KEY.txt`` (the alt-text) +
``KEY.json`` (url, original size, licence, similarity scores, ...), in webdataset tars, image folders or parquet
files (where :mod:`modalmill.io.readers` turns each row into the same members). This module reads those
members of a :class:`~modalmill.io.readers.RawSample`:

- :func:`input_text`: the sample's caption text. The ``member`` extension (default ``txt``) is read first, then
  the ``json_key`` field (default ``caption``) of the sample's ``json``. Bytes are decoded strictly as UTF-8 (a
  leading byte-order mark is dropped); anything else is that sample's error, never a replacement character.
  Whitespace is normalised (every run of Unicode whitespace becomes one space; leading and trailing whitespace
  goes). Text is never truncated. An empty text (after normalising) counts as no text.
- :func:`source_metadata`: the sample's ``json`` member as canonical JSON (sorted keys, compact) plus its
  ``url``, for the manifest. Malformed JSON is recorded as an error string; it never fails the sample.

:class:`TextConfig` is the job's ``text:`` section; ``caption_source`` says where ``caption`` comes from:
``input`` (the sample's text; a sample without one fails, recorded), ``model`` (the captioning labeler; input
text is ignored) or ``input_or_model`` (the input text, and the captioner only for samples that have none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

INPUT, MODEL, INPUT_OR_MODEL = "input", "model", "input_or_model"
CAPTION_SOURCES = (INPUT, MODEL, INPUT_OR_MODEL)


@dataclass(frozen=True)
class TextConfig:
    caption_source: str = INPUT  # input | model | input_or_model
    member: str = "txt"  # the member extension that holds a sample's text
    json_key: str | None = "caption"  # the field of the sample's json that holds its text (None: not read)

    def __post_init__(self):
        if self.caption_source not in CAPTION_SOURCES:
            raise ValueError(f"caption_source must be one of {', '.join(CAPTION_SOURCES)}, got {self.caption_source!r}")
        if not isinstance(self.member, str) or not self.member or "/" in self.member:
            raise ValueError(f"member must be a member extension such as 'txt', got {self.member!r}")
        if self.member.lower() == "json":
            raise ValueError("member 'json' is the source metadata; use json_key to read text from it")
        if self.json_key is not None and (not isinstance(self.json_key, str) or not self.json_key):
            raise ValueError(f"json_key must be a field name or null, got {self.json_key!r}")

    @property
    def uses_input(self) -> bool:
        return self.caption_source in (INPUT, INPUT_OR_MODEL)

    @property
    def uses_model(self) -> bool:
        return self.caption_source in (MODEL, INPUT_OR_MODEL)


class TextError(ValueError):
    """The sample's text cannot be read (bad encoding, wrong type): that sample's error row."""


def normalise(text: str) -> str:
    """Every run of whitespace (Unicode's definition, as ``str.split``) becomes one space; ends are stripped."""
    return " ".join(text.split())


def decode_utf8(data: bytes, what: str) -> str:
    """``data`` decoded strictly as UTF-8 (a leading BOM dropped); TextError names the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad = data[e.start:e.start + 4].hex(" ")
        raise TextError(f"{what} is not valid UTF-8: byte {e.start} ({bad}): {e.reason}") from None


def parse_json_member(members: dict[str, bytes]) -> tuple[Any, str | None]:
    """(the decoded ``json`` member or None, an error string when it is there but malformed)."""
    data = members.get("json")
    if data is None:
        return None, None
    try:
        return json.loads(decode_utf8(data, ".json")), None
    except TextError as e:
        return None, str(e)
    except ValueError as e:  # json.JSONDecodeError
        return None, f".json is malformed: {e}"


def input_text(members: dict[str, bytes], config: TextConfig) -> tuple[str | None, str]:
    """(the sample's normalised text or None, where it came from or why there is none).

    Raises :class:`TextError` for text that is there but unreadable (invalid UTF-8, a non-string JSON field)."""
    data = members.get(config.member)
    if data is not None:
        text = normalise(decode_utf8(data, f".{config.member}"))
        if text:
            return text, f".{config.member}"
    if config.json_key is not None and "json" in members:
        meta, err = parse_json_member(members)
        if err is None and isinstance(meta, dict) and meta.get(config.json_key) is not None:
            value = meta[config.json_key]
            if not isinstance(value, str):
                raise TextError(f".json field {config.json_key!r} is a {type(value).__name__}, not a string")
            text = normalise(value)
            if text:
                return text, f".json[{config.json_key!r}]"
        if err is not None and data is None:
            return None, f"no .{config.member} member and the .json is unreadable ({err})"
    where = f".{config.member}" + (f" or .json field {config.json_key!r}" if config.json_key else "")
    return None, f"no text in the input sample (empty or missing {where})"


def source_metadata(members: dict[str, bytes]) -> tuple[str | None, str | None, str | None]:
    """(canonical JSON of the ``json`` member, its ``url`` field, the error when the member is malformed)."""
    meta, err = parse_json_member(members)
    if err is not None:
        return None, None, err
    if meta is None:
        return None, None, None
    try:
        canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError) as e:  # pragma: no cover - json.loads output always serialises
        return None, None, f".json cannot be re-serialised: {e}"
    url = meta.get("url") if isinstance(meta, dict) else None
    return canonical, url if isinstance(url, str) else None, None
