"""A text tokenizer file with the structure of 4M's released one, built from words (tests only)."""

from __future__ import annotations

from modalmill.tokenize.text_tokenizer import COCO_CLASSES, fixed_tokens


def build_4m_like_tokenizer(texts: list[str]):
    """A tokenizers file with the structure of 4M's text_tokenizer_4m_wordpiece_30k.json: BertNormalizer (lower case,
    no accent stripping), BertPreTokenizer, WordPiece ([UNK], ##, 100 chars), WordPiece decoder, no post-processor;
    its vocabulary is 4M's fixed head (ids 0..4283, as added tokens with 4M's flags) and then every character and
    word of ``texts``."""
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import WordPiece
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    head = fixed_tokens()
    vocab = {t: i for i, t in enumerate(head)}
    norm = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    pre = BertPreTokenizer()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))})
    for w in words:
        for piece in [w, *list(w), *[f"##{ch}" for ch in w]]:
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    n_plain = len(head) - len(COCO_CLASSES)
    tok.add_special_tokens([AddedToken(t, single_word=i >= 4, normalized=False, special=True)
                            for i, t in enumerate(head[:n_plain])]
                           + [AddedToken(t, single_word=True, normalized=True, special=True) for t in COCO_CLASSES])
    return Tokenizer.from_str(tok.to_str())  # as loaded from its JSON file
