"""4M's WordPiece text tokenizer and the serialisers of structured labels: every sequence maps to known ids."""

import json
import random
import re

import numpy as np
import pytest

from modalmill.tokenize.text_tokenizer import (COCO_CLASSES, METADATA_IDS, color_palette_to_text, det_to_text,
                                               encode_text, fixed_tokens, human_poses_to_text, load_text_tokenizer,
                                               metadata_to_text, sam_instance_to_text, train_text_tokenizer)

CAPTIONS = [
    "A woman in a space suit smiles in front of an American flag.",
    "An orange tabby cat looks at the camera.",
    "A cup of coffee with latte art on a saucer.",
    "A rocket stands on the launch pad under a clear blue sky.",
    "Galaxies and stars in a deep field image from a space telescope.",
    "Two people ride a motorcycle down a dusty road.",
    "A close-up photograph of the retina with branching blood vessels.",
    "Coins of different sizes scattered on a dark table.",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = train_text_tokenizer(CAPTIONS * 4, vocab_size=30_000)
    path = tmp_path_factory.mktemp("text") / "text_tokenizer.json"
    path.write_text(t.to_str())
    return load_text_tokenizer(str(path))  # what the trainer would load: a plain JSON file, no pickle


def _ids(tok, text):
    ids = encode_text(tok, text)
    vocab_size = tok.get_vocab_size()
    assert vocab_size <= 30_000 and all(0 <= i < vocab_size for i in ids)
    assert ids[0] == 2 and ids[-1] == 3  # [SOS] ... [EOS]
    assert 1 not in ids, f"[UNK] in {text!r}"
    return ids


def test_vocabulary_layout_and_caption_round_trip(tok):
    vocab = tok.get_vocab()
    fixed = fixed_tokens()
    assert len(fixed) == 4 + 200 + 4000 + len(COCO_CLASSES)
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[SOS]", "[EOS]", "[S_0]", "[S_199]", "v0=0", "v3=999")] == \
        [0, 1, 2, 3, 4, 203, 204, 204 + 3999]
    assert vocab["teddy bear"] == len(fixed) - len(COCO_CLASSES) + COCO_CLASSES.index("teddy bear")
    assert tok.get_vocab_size() > len(fixed)  # word pieces were learned from the captions
    for c in CAPTIONS:
        ids = _ids(tok, c)
        assert tok.decode(ids[1:-1], skip_special_tokens=False).replace(" - ", "-").replace(" .", ".") == c.lower()
    assert _ids(tok, "a dog and a teddy bear")[-2] == vocab["teddy bear"]  # class names stay one token
    assert len(encode_text(tok, " ".join(CAPTIONS), max_length=16)) == 16


def test_structured_labels_serialise_to_value_tokens(tok):
    vocab = tok.get_vocab()
    meta = {"original_width": 640, "original_height": 480, "brightness": 127.5, "colorfulness": 60.0,
            "n_humans": 2, "watermark_score": 0.7, "aesthetic_score": 5.0, "entropy": 7.2}
    text = metadata_to_text(meta)
    assert text.split()[:2] == [f"v1={METADATA_IDS['original_width']}", "v0=20"]
    assert "v1=19 v0=1" in text  # watermark_score 0.7 -> bin 1
    palette = [{str(k): [int(v) for v in np.random.default_rng(k).integers(0, 256, 3 * k)] for k in range(1, 8)}]
    pal = color_palette_to_text(palette, k=3)
    assert pal.split()[0] == "v1=3" and len(pal.split()) == 10
    det = {"instances": [{"boxes": [0.5, 0.5, 0.9, 0.8], "class_name": "dog", "score": 0.9},
                         {"boxes": [0.1, 0.1, 0.3, 0.4], "class_name": "teddy bear", "score": 0.95},
                         {"boxes": [0.0, 0.0, 1.0, 1.0], "class_name": "car", "score": 0.3}]}
    d = det_to_text(det)
    assert d == "v0=100 v1=100 v2=300 v3=400 teddy bear v0=500 v1=500 v2=899 v3=799 dog"
    flipped = det_to_text(det, crop=[0, 0, 100, 100, 1], image_hw=(100, 100))
    assert flipped.startswith("v0=100 v1=500 v2=500 v3=799 dog")
    people = [{"bbox_xyxy": [10, 20, 110, 220], "pred_cam": [0.9, 0.1, -0.2], "pose_tokenized": [5, 600, 1023, 0,
                                                                                              511, 512, 7, 8],
               "pred_smpl_params": {"global_orient": np.eye(3).tolist(), "body_pose": [np.eye(3).tolist()] * 23,
                                    "betas": [0.1] * 10}}]
    hp = human_poses_to_text(people, original_size=(200, 400))
    assert hp.startswith("human v0=50 v1=50 v2=549 v3=549 pose v0=5 v1=88 v1=511")
    assert human_poses_to_text([], (10, 10)) == "none"
    def box(x0, y0, x1, y1):
        return [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.int32).reshape(-1, 1, 2)]

    sam = {"points": [box(20, 10, 120, 60), box(0, 0, 5, 5)],
           "bbox": np.array([[10, 20, 60, 120], [0, 0, 5, 5]], dtype=np.float32),
           "token_ids": np.arange(32).reshape(2, 16) * 30}
    st = sam_instance_to_text(sam, points=[(50, 30), (3, 3), (200, 200)])  # 4M's layout: query points first
    assert st.split()[:8] == ["point", "v0=30", "v1=50", "polygon", "v0=20", "v1=10", "v2=120", "v3=60"]
    assert len(st.split()) == 3 * 3 + 2 * 21 + 1 and st.endswith("point v0=200 v1=200 none")
    empty = {"points": [], "bbox": np.zeros((0, 4)), "token_ids": np.zeros((0, 16))}
    assert sam_instance_to_text(empty, points=[(1, 2)]) == "point v0=2 v1=1 none"
    with pytest.raises(ValueError, match="outside 0..1023"):
        sam_instance_to_text({"points": [box(0, 0, 9, 9)], "bbox": np.array([[0, 0, 9, 9]]),
                              "token_ids": np.full((1, 16), 1024)}, points=[(1, 1)])
    for seq in (text, pal, d, flipped, hp, st, metadata_to_text(meta, rng=random.Random(0))):
        ids = _ids(tok, seq)
        value_ids = [vocab[w] for w in seq.split() if re.fullmatch(r"v[0-3]=\d+", w)]
        assert [i for i in ids if 204 <= i < 4204] == value_ids, seq  # each value token is exactly its own id
    assert json.loads(tok.to_str())["model"]["type"] == "WordPiece"


def test_a_small_vocabulary_keeps_sequence_words_whole():
    from modalmill.tokenize.text_tokenizer import SEQUENCE_WORDS

    small = train_text_tokenizer(CAPTIONS, vocab_size=len(fixed_tokens()) + len(SEQUENCE_WORDS) + 40)
    for word in SEQUENCE_WORDS:
        ids = small.encode(word, add_special_tokens=False).ids
        assert len(ids) == 1 and ids[0] != 1, (word, small.encode(word, add_special_tokens=False).tokens)
    # a trained word that merely starts with one of them stays whole: the added tokens match single words only
    assert train_text_tokenizer(["a humane cat"] * 4, vocab_size=len(fixed_tokens()) + 60).encode(
        "humane", add_special_tokens=False).tokens == ["humane"]
    with pytest.raises(ValueError, match="vocab_size"):
        train_text_tokenizer(CAPTIONS, vocab_size=len(fixed_tokens()) + 1)
