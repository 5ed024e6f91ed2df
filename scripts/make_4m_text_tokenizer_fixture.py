"""Make tests/fixtures/text4m/text_tokenizer_4m_reduced.json: 4M's released text tokenizer cut down to what the
fixture's texts can reach, so that CI checks modalmill's ids against 4M's real ids without shipping 4M's file.

Runs in ml-4m's environment (its ``tokenizers``), after scripts/make_4m_text_fixture.py wrote ``expected.json``.
The reduced file is the released ``fourm/utils/tokenizer/trained/text_tokenizer_4m_wordpiece_30k.json`` with
everything kept unchanged (normaliser, pre-tokeniser, post-processor, decoder, truncation, padding, the WordPiece
model's settings, all 4284 added tokens with their ids and flags) except the WordPiece vocabulary, of which it keeps:

- the fixed head, ids 0..4283 (4M's layout, which modalmill's loader checks);
- for every word the released normaliser and pre-tokeniser make of every fixture text (the whole text, and each
  piece between added tokens as the tokenizer splits it), every substring ``s`` of the word such that ``s`` or
  ``##s`` is in the released vocabulary, with its released id.

WordPiece's greedy longest-match-first only ever looks up substrings of a word (``##``-prefixed after the first
piece), so every lookup the released file answers for these texts the reduced file answers the same way. The ids
stay the released ids: the vocabulary is sparse (the ``tokenizers`` WordPiece model takes a map token -> id and does
not need contiguous ids; this script checks that the file loads and round-trips). The script then encodes every
fixture text with both files, as 4M's masking does (``encode(text).ids + [EOS]``, metadata with ``encode_batch``),
and fails unless the ids are identical to each other and to the ids ``expected.json`` recorded.

Written beside it: ``text_tokenizer_4m_reduced.meta.json`` (the released file's sha256, counts).

Rerun (from the ml-4m source tree, with its venv)::

    cd /work/ref/ml-4m/src && PYTHONPATH=$PWD /work/ref/ml-4m/venv/bin/python \\
        /path/to/modalmill/scripts/make_4m_text_tokenizer_fixture.py --fixture /path/to/modalmill/tests/fixtures/text4m
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

OUT_NAME = "text_tokenizer_4m_reduced.json"
META_NAME = "text_tokenizer_4m_reduced.meta.json"


def fixture_texts(expected: dict) -> list[str | list[str]]:
    """Every text 4M's transforms made in the fixture (a metadata entry is a list of chunks)."""
    out = []
    for s in expected["samples"].values():
        for entry in s["per_crop"]:
            for ref in entry.values():
                if "text" in ref:
                    out.append(ref["text"])
    return out


def words_of(tok, text: str) -> set[str]:
    """The words WordPiece can see for ``text``: pre-tokenised words of the normalised whole text and of each piece
    the tokenizer's added-token split leaves (both, so nothing depends on how added tokens cut the text)."""
    norm, pre = tok.normalizer, tok.pre_tokenizer
    words = {w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))}
    spans: dict[int, tuple[int, int]] = {}  # the words the tokenizer itself made: offsets of their pieces
    enc = tok.encode(text)
    for (a, b), wid in zip(enc.offsets, enc.word_ids):
        if wid is not None:
            lo, hi = spans.get(wid, (a, b))
            spans[wid] = (min(lo, a), max(hi, b))
    for a, b in spans.values():
        words |= {w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text[a:b]))}
    return words


def reachable_vocab(vocab: dict[str, int], words: set[str]) -> dict[str, int]:
    keep = {}
    for w in words:
        for i in range(len(w)):
            for j in range(i + 1, len(w) + 1):
                for piece in (w[i:j], "##" + w[i:j]):
                    if piece in vocab:
                        keep[piece] = vocab[piece]
    return keep


def ids_4m_way(tok, text) -> list[int]:
    eos = tok.token_to_id("[EOS]")
    if isinstance(text, list):
        return [i for e in tok.encode_batch(text) for i in e.ids] + [eos]
    return tok.encode(text).ids + [eos]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", required=True, help="tests/fixtures/text4m (holding expected.json)")
    ap.add_argument("--tokenizer", default="fourm/utils/tokenizer/trained/text_tokenizer_4m_wordpiece_30k.json")
    args = ap.parse_args()

    from tokenizers import Tokenizer

    raw = open(args.tokenizer, "rb").read()
    sha = hashlib.sha256(raw).hexdigest()
    expected = json.load(open(os.path.join(args.fixture, "expected.json")))
    if expected["tokenizer_sha256"] != sha:
        raise SystemExit(f"{args.tokenizer}: sha256 {sha} is not the one expected.json was made with")
    real = Tokenizer.from_str(raw.decode("utf-8"))
    released = json.loads(raw)
    vocab = released["model"]["vocab"]
    n_head = len(released["added_tokens"])
    head = {t: i for t, i in vocab.items() if i < n_head}
    assert sorted(head.values()) == list(range(n_head)), "released vocab: the head is not ids 0..n_added-1"
    assert all(vocab[a["content"]] == a["id"] for a in released["added_tokens"])

    texts = fixture_texts(expected)
    words = set()
    for t in texts:
        for piece in (t if isinstance(t, list) else [t]):
            words |= words_of(real, piece)
    reduced = dict(released)
    reduced["model"] = {**released["model"], "vocab": {**head, **reachable_vocab(vocab, words)}}
    reduced["model"]["vocab"] = dict(sorted(reduced["model"]["vocab"].items(), key=lambda kv: kv[1]))
    small = Tokenizer.from_str(json.dumps(reduced))
    text = small.to_str()  # the tokenizers library's own serialisation of the reduced file
    small = Tokenizer.from_str(text)
    back = json.loads(text)
    assert back["model"]["vocab"] == reduced["model"]["vocab"], "sparse ids did not round-trip"
    for k in released:
        if k != "model":
            assert back[k] == released[k], f"{k} changed"
    assert {k: v for k, v in back["model"].items() if k != "vocab"} == \
        {k: v for k, v in released["model"].items() if k != "vocab"}

    n = 0
    for t in texts:
        a, b = ids_4m_way(real, t), ids_4m_way(small, t)
        if a != b:
            raise SystemExit(f"reduced tokenizer differs from the released one on {t!r}:\n{a}\n{b}")
    for s in expected["samples"].values():
        for entry in s["per_crop"]:
            for ref in entry.values():
                if "ids" in ref:
                    if ids_4m_way(small, ref["text"]) != ref["ids"]:
                        raise SystemExit(f"reduced tokenizer differs from expected.json on {ref['text']!r}")
                    n += 1
    with open(os.path.join(args.fixture, OUT_NAME), "w") as f:
        f.write(text)
    meta = {"source": f"apple/ml-4m {args.tokenizer} (Apache-2.0), vocabulary cut by {os.path.basename(__file__)}",
            "released_file": os.path.basename(args.tokenizer), "released_sha256": sha,
            "released_vocab_size": len(vocab), "kept_vocab": len(back["model"]["vocab"]), "head": n_head,
            "texts_checked": len(texts), "id_lists_checked": n}
    with open(os.path.join(args.fixture, META_NAME), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    print(f"wrote {OUT_NAME}: {meta}")


if __name__ == "__main__":
    main()
