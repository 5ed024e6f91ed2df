"""4M's released text tokenizer and 4M-21's text sequences: modalmill's ids for caption, det, metadata,
color_palette, human_poses and sam_instance equal the ids apple/ml-4m's own code gives.

The reference (tests/fixtures/text4m/, made by scripts/make_4m_text_fixture.py with ml-4m's transforms and its
``text_tokenizer_4m_wordpiece_30k.json``) holds a few samples modalmill wrote (n_crops 4) and, per crop, the text
4M's transforms made of each label and the ids its tokenizer gave, with 4M's random choices pinned to the canonical
ones (which ``text_augment=False`` makes).

- Always (CI): modalmill's serialisation of every sample, crop and modality equals 4M's text; and with a tokenizer
  file this test builds with the structure of 4M's (same normaliser, pre-tokeniser, WordPiece model, decoder, the
  4284 added tokens with 4M's flags, no post-processor), modalmill's ids equal that tokenizer's ids of 4M's text,
  encoded as ``fourm/data/masking.py`` does (``encode(text).ids + [EOS]``, metadata chunk by chunk); and
  ``load_dataset`` yields those ids from a written output.
- Always (CI), with 4M's real ids: ``text_tokenizer_4m_reduced.json`` (made by
  scripts/make_4m_text_tokenizer_fixture.py in ml-4m's venv) is the released file with its WordPiece vocabulary cut
  to the fixed head and the pieces the fixture's words can reach, at their released ids; that script checked it
  encodes every fixture text exactly as the released file does. Loaded with modalmill's loader, modalmill's ids for
  every sample, crop and modality equal the ids ml-4m's code recorded; ``load_dataset`` gives them too.
- With ``MODALMILL_4M_TEXT_TOKENIZER`` pointing at 4M's released file (outside CI): modalmill's ids with it equal
  the fixture's ids from ml-4m's code, and the built and reduced files have the released file's structure.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from modalmill.schemas.modalities import get_modality
from modalmill.tokenize.text_tokenizer import (FOURM_TOKENIZER_ENV, as_text_tokenizer, encode_sequence,
                                               load_text_tokenizer, serialise_label)
from tests.fourm_text import build_4m_like_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "text4m"
TEXT = ("caption", "det", "metadata", "color_palette", "human_poses", "sam_instance")
EXT = {"caption": "json", "det": "json", "metadata": "json", "color_palette": "json", "human_poses": "json",
       "sam_instance": "npy", "crop_settings": "npy"}
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
REDUCED = FIXTURE / "text_tokenizer_4m_reduced.json"  # 4M's released file, vocabulary cut (see module docstring)


def _label(key: str, m: str):
    return get_modality(m).decode((FIXTURE / "samples" / f"{key}.{m}.{EXT[m]}").read_bytes())


def _cases():
    for key, s in sorted(EXPECTED["samples"].items()):
        for c, entry in enumerate(s["per_crop"]):
            for m in TEXT:
                yield key, c, m, entry[m]


def _ours(key: str, c: int, m: str):
    s = EXPECTED["samples"][key]
    return serialise_label(m, _label(key, m), crop=s["crops"][c], crop_index=c, image_hw=tuple(s["image_hw"]),
                           rng=None)


def _norm(text):
    return [" ".join(t.split()) for t in text] if isinstance(text, list) else " ".join(text.split())


@pytest.fixture(scope="module")
def built():
    texts = [t for *_, ref in _cases() if "text" in ref for t in (ref["text"] if isinstance(ref["text"], list)
                                                                   else [ref["text"]])]
    return build_4m_like_tokenizer(texts)


def _ids_4m_way(tok, text) -> list[int]:
    """fourm/data/masking.py: ``encode(sequence).ids + [EOS]``; chunks: ``encode_batch`` ids + an [EOS] chunk."""
    eos = tok.token_to_id("[EOS]")
    if isinstance(text, list):
        return [i for e in tok.encode_batch(text) for i in e.ids] + [eos]
    return tok.encode(text).ids + [eos]


def test_fixture_covers_every_text_modality_and_several_crops():
    assert len(EXPECTED["samples"]) >= 2
    cases = list(_cases())
    for m in TEXT:
        ok = [c for c in cases if c[2] == m and "text" in c[3]]
        assert len(ok) >= 2, f"{m}: no reference from ml-4m"
    crops = {c for _, c, _, ref in cases if "text" in ref}
    assert crops >= {0, 1, 2, 3}, crops
    poses = [ref for _, _, m, ref in cases if m == "human_poses" and "text" in ref]
    assert any(r["text"].strip() != "none" for r in poses), "no person in the fixture: poses are not exercised"


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: f"{c[0]}-crop{c[1]}-{c[2]}")
def test_modalmill_text_equals_4ms_text(case):
    key, c, m, ref = case
    assert "error" not in ref, f"4M's own transforms could not read what modalmill stored: {ref['error']}"
    assert _norm(_ours(key, c, m)) == _norm(ref["text"])


@pytest.mark.parametrize("case", [c for c in _cases() if "text" in c[3]], ids=lambda c: f"{c[0]}-crop{c[1]}-{c[2]}")
def test_ids_with_a_4m_structured_tokenizer_equal_4ms_encoding(built, case):
    key, c, m, ref = case
    tok = as_text_tokenizer(built)  # passes modalmill's layout check, as 4M's file does
    assert encode_sequence(tok, _ours(key, c, m)) == _ids_4m_way(tok, ref["text"])


@pytest.fixture(scope="module")
def released():
    """4M's released tokenizer with its vocabulary cut to what the fixture reaches, through modalmill's loader."""
    return as_text_tokenizer(load_text_tokenizer(str(REDUCED)))


def test_reduced_file_is_4ms_released_file_cut_down():
    meta = json.loads((FIXTURE / "text_tokenizer_4m_reduced.meta.json").read_text())
    assert meta["released_sha256"] == EXPECTED["tokenizer_sha256"]
    assert meta["id_lists_checked"] == sum(1 for *_, ref in _cases() if "ids" in ref)
    data = json.loads(REDUCED.read_text())
    ids = sorted(data["model"]["vocab"].values())
    assert ids[:4284] == list(range(4284)) and len(data["added_tokens"]) == 4284
    assert ids[-1] > len(ids) + 1000  # released ids, not renumbered
    assert REDUCED.stat().st_size < 1 << 20


@pytest.mark.parametrize("case", [c for c in _cases() if "ids" in c[3]], ids=lambda c: f"{c[0]}-crop{c[1]}-{c[2]}")
def test_ids_with_4ms_released_vocabulary_equal_ml4m_code(released, case):
    key, c, m, ref = case
    assert encode_sequence(released, _ours(key, c, m)) == ref["ids"]


def test_4m_shorthand_loads_the_released_ids(monkeypatch):
    monkeypatch.setenv(FOURM_TOKENIZER_ENV, str(REDUCED))
    tok = as_text_tokenizer(load_text_tokenizer("4m"))
    key, c, m, ref = next(x for x in _cases() if x[2] == "caption" and "ids" in x[3])
    assert encode_sequence(tok, _ours(key, c, m)) == ref["ids"]


@pytest.mark.parametrize("which", ["built", "released"])
def test_load_dataset_yields_those_ids(built, which, tmp_path):
    """The trainer-side loader on an output holding the fixture's samples gives the same ids (one crop per pass):
    those of the built tokenizer, and with 4M's released vocabulary those ml-4m's code recorded."""
    from modalmill.dataset import load_dataset
    from modalmill.io import manifest

    root = _write_output(tmp_path / "out")
    path = tmp_path / "tok.json"
    if which == "built":
        path.write_text(built.to_str())
    else:
        path = REDUCED
    keys = sorted(EXPECTED["samples"])
    assert manifest.list_markers(str(root))
    for c in range(4):
        ds = load_dataset(str(root), list(TEXT), shuffle_shards=False, text_tokenizer=str(path), crop=c,
                          text_augment=False)
        got = {s["__key__"]: s for s in ds}
        assert sorted(got) == keys
        for key in keys:
            for m in TEXT:
                ref = EXPECTED["samples"][key]["per_crop"][c][m]
                if "text" in ref:
                    want = _ids_4m_way(built, ref["text"]) if which == "built" else ref["ids"]
                    assert got[key][m].tolist() == want, (key, c, m)


@pytest.mark.skipif(not os.environ.get(FOURM_TOKENIZER_ENV), reason=f"set {FOURM_TOKENIZER_ENV} to 4M's released "
                    "text_tokenizer_4m_wordpiece_30k.json (apple/ml-4m) to compare with it")
def test_with_4ms_released_tokenizer_ids_equal_ml4m_code(built):
    path = os.environ[FOURM_TOKENIZER_ENV]
    real = load_text_tokenizer("4m")
    assert hashlib.sha256(open(path if path.endswith(".json") else _real_file(path), "rb").read()).hexdigest() \
        == EXPECTED["tokenizer_sha256"]
    tok = as_text_tokenizer(real)
    n = 0
    for key, c, m, ref in _cases():
        if "ids" in ref:
            assert encode_sequence(tok, _ours(key, c, m)) == ref["ids"], (key, c, m)
            n += 1
    assert n >= 40
    # the file this test builds and the reduced one have the released file's structure; the reduced one its ids
    a = json.loads(real.to_str())
    for b in (json.loads(built.to_str()), json.loads(REDUCED.read_text())):
        for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "truncation", "padding"):
            assert a[k] == b[k], k
        assert {k: v for k, v in a["model"].items() if k != "vocab"} == {k: v for k, v in b["model"].items()
                                                                         if k != "vocab"}
        assert a["added_tokens"] == b["added_tokens"]
    assert json.loads(REDUCED.read_text())["model"]["vocab"].items() <= a["model"]["vocab"].items()


def _real_file(path: str) -> str:
    from modalmill.tokenize.text_tokenizer import resolve_text_tokenizer

    return resolve_text_tokenizer(path)


def _write_output(root: Path) -> Path:
    """A one-shard output with the fixture's samples (rgb: a grey JPEG of the stored size), written with modalmill's
    own tar writer and a completion marker, so load_dataset reads it as any output."""
    from modalmill.io import manifest
    from modalmill.io.writers import ShardWriterSet

    keys = sorted(EXPECTED["samples"])
    mods = {**{m: EXT[m] for m in (*TEXT, "crop_settings")}, "rgb": "jpg"}
    writers = ShardWriterSet(str(root), "shard-00000", mods)
    for key in keys:
        hw = EXPECTED["samples"][key]["image_hw"]
        payload = {m: (FIXTURE / "samples" / f"{key}.{m}.{EXT[m]}").read_bytes() for m in (*TEXT, "crop_settings")}
        payload["rgb"] = get_modality("rgb").encode(np.full((*hw, 3), 128, np.uint8), key)
        writers.write_sample(key, payload)
    manifest.write_marker(str(root), "shard-00000", {"keys": keys, "n_samples": len(keys),
                                                     "modalities": writers.commit()})
    return root


def test_4m_shorthand_needs_the_variable(monkeypatch):
    monkeypatch.delenv(FOURM_TOKENIZER_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=FOURM_TOKENIZER_ENV):
        load_text_tokenizer("4m")
