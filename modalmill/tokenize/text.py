"""4M's text side: the shared WordPiece tokenizer and serialisers of structured labels into 4M-21's sequences.

4M stores ``caption``, ``det``, ``metadata``, ``color_palette``, ``human_poses`` and ``sam_instance`` raw and
tokenizes them in the trainer with one 30k WordPiece vocabulary. Its fixed part comes first, in this order:
``[PAD] [UNK] [SOS] [EOS]`` (ids 0-3), 200 sentinels ``[S_0]``..``[S_199]``, the value tokens ``v0=0``..``v0=999``,
``v1=...``, ``v2=...``, ``v3=...`` (coordinates and numbers, quantised to 1000 bins), the 80 COCO class names, then
word pieces learned from the corpus' captions (Hugging Face ``tokenizers``: BERT normaliser, lower case, BERT
pre-tokeniser, ``##`` continuation prefix). Saved as the tokenizers library's JSON file (no pickles).

Serialisers (deterministic by default; pass a ``random.Random`` to get 4M's random orders/choices):

- :func:`metadata_to_text`: ``v1=<id> v0=<bin>`` per metadata name (4M-21's ids and binning);
- :func:`color_palette_to_text`: ``v1=<k> v0=r v0=g v0=b ...`` for one palette size k;
- :func:`det_to_text`: boxes with score >= 0.6, cut to a crop, flipped, ordered by distance to the origin:
  ``v0=xmin v1=ymin v2=xmax v3=ymax <class name>`` each, coordinates x 999;
- :func:`human_poses_to_text`: ``human`` + box tokens, then the ``pose`` (8 pose-tokenizer ids), ``global``
  (9 orientation values), ``camera`` (3) and ``shape`` (10 betas) groups as value tokens; ``none`` without people;
- :func:`sam_instance_to_text`: per instance its crop box and 16 SAM-instance-tokenizer ids as value tokens.

:func:`encode_text` wraps a sequence in ``[SOS] ... [EOS]`` ids.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, Iterator

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[SOS]", "[EOS]")
N_SENTINELS = 200
COORD_BINS = 1000

COCO_CLASSES = (
    "airplane", "apple", "backpack", "banana", "baseball bat", "baseball glove", "bear", "bed", "bench", "bicycle",
    "bird", "boat", "book", "bottle", "bowl", "broccoli", "bus", "cake", "car", "carrot", "cat", "cell phone",
    "chair", "clock", "couch", "cow", "cup", "dining table", "dog", "donut", "elephant", "fire hydrant", "fork",
    "frisbee", "giraffe", "hair drier", "handbag", "horse", "hot dog", "keyboard", "kite", "knife", "laptop",
    "microwave", "motorcycle", "mouse", "orange", "oven", "parking meter", "person", "pizza", "potted plant",
    "refrigerator", "remote", "sandwich", "scissors", "sheep", "sink", "skateboard", "skis", "snowboard", "spoon",
    "sports ball", "stop sign", "suitcase", "surfboard", "teddy bear", "tennis racket", "tie", "toaster", "toilet",
    "toothbrush", "traffic light", "train", "truck", "tv", "umbrella", "vase", "wine glass", "zebra",
)

# 4M-21's metadata ids (value of the v1= token) and binning
METADATA_IDS = {name: i for i, name in enumerate((
    "original_width", "original_height", "caption_n_chars", "caption_n_words", "caption_n_sentences", "n_humans",
    "n_sam_instances", "n_coco_instances", "coco_instance_diversity", "colorfulness", "brightness", "contrast",
    "saturation", "entropy", "walkability", "objectness", "semantic_diversity", "geometric_complexity",
    "occlusion_score", "watermark_score", "aesthetic_score"))}
_IMAGE_DIM = ("original_width", "original_height")  # binned in steps of 32 px
_INTEGER = ("caption_n_chars", "caption_n_words", "caption_n_sentences", "n_humans", "n_sam_instances",
            "n_coco_instances", "coco_instance_diversity", "semantic_diversity")
_MANUAL_BINS = {"watermark_score": (0.5,), "aesthetic_score": (4.5, 5.5)}
_RANGE_BINS = {"colorfulness": (0, 150, 50), "brightness": (0, 255, 50), "contrast": (0, 127, 50),
               "saturation": (0, 255, 50), "entropy": (0, 10, 50), "walkability": (0, 1, 50),
               "objectness": (0, 1, 50), "geometric_complexity": (0, 0.75, 50), "occlusion_score": (0, 0.25, 50)}


# ---------------------------------------------------------------------- the WordPiece tokenizer


def fixed_tokens() -> list[str]:
    """The fixed head of the vocabulary, in id order."""
    return (list(SPECIAL_TOKENS) + [f"[S_{i}]" for i in range(N_SENTINELS)]
            + [f"v{j}={i}" for j in range(4) for i in range(COORD_BINS)] + list(COCO_CLASSES))


def train_text_tokenizer(texts: Iterable[str], vocab_size: int = 30_000, lowercase: bool = True):
    """Train 4M's WordPiece text tokenizer on ``texts`` (an iterable of strings); returns a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Tokenizer, decoders, trainers
    from tokenizers.models import WordPiece
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    n_fixed = len(fixed_tokens())
    if vocab_size <= n_fixed:
        raise ValueError(f"vocab_size must exceed the {n_fixed} fixed tokens, got {vocab_size}")
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                    lowercase=lowercase)
    tok.pre_tokenizer = BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = [AddedToken(t, single_word=True, normalized=False) for t in fixed_tokens()[:-len(COCO_CLASSES)]]
    specials += [AddedToken(c, single_word=True, normalized=True) for c in COCO_CLASSES]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                        continuing_subword_prefix="##", special_tokens=specials)
    tok.train_from_iterator(iter(texts), trainer=trainer)
    vocab = tok.get_vocab()
    for i, t in enumerate(fixed_tokens()):
        if vocab.get(t) != i:
            raise RuntimeError(f"text tokenizer: fixed token {t!r} got id {vocab.get(t)}, expected {i}")
    return tok


def load_text_tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def caption_texts(root: str) -> Iterator[str]:
    """Every caption string in an output root's ``caption`` tars (completed shards only)."""
    from ..pipeline import manifest, storage
    from ..pipeline.readers import ShardTruncated, iter_tar
    from ..schemas.modalities import get_modality

    spec = get_modality("caption")
    for name, marker in sorted(manifest.list_markers(root).items()):
        if "caption" not in marker.get("modalities", {}):
            continue
        for s in iter_tar(storage.join(root, "caption", f"{name}.tar")):
            if isinstance(s, ShardTruncated) or s.error:
                continue
            value = spec.decode(next(iter(s.members.values())))
            for c in value if isinstance(value, list) else [value]:
                text = c.get("caption") if isinstance(c, dict) else c
                if isinstance(text, str) and text.strip():
                    yield text


def train_text_tokenizer_on_output(root: str, out: str, vocab_size: int = 30_000) -> dict[str, Any]:
    """Train the WordPiece tokenizer on an output's captions; writes ``out/text_tokenizer.json``."""
    from ..pipeline import storage

    texts = list(caption_texts(root))
    if not texts:
        raise ValueError(f"{root}: no captions to train the text tokenizer on (label 'caption' first)")
    tok = train_text_tokenizer(texts, vocab_size=vocab_size)
    url = storage.join(out, "text_tokenizer.json")
    storage.write_bytes(url, tok.to_str().encode())
    return {"path": url, "vocab_size": tok.get_vocab_size(), "captions": len(texts),
            "learned_pieces": tok.get_vocab_size() - len(fixed_tokens())}


# ---------------------------------------------------------------------- serialisers


def _v(slot: int, value: float) -> str:
    return f"v{slot}={int(min(max(round(value), 0), COORD_BINS - 1))}"


def metadata_to_text(meta: dict[str, float], keys: list[str] | None = None, rng: random.Random | None = None,
                     chunks: bool = False) -> str | list[str]:
    """``v1=<id> v0=<bin>`` per name (4M-21's ids; sizes in 32 px bins, counts as is, scores in 50 bins)."""
    keys = [k for k in (keys if keys is not None else sorted(meta, key=lambda k: METADATA_IDS.get(k, 1 << 30)))
            if k in METADATA_IDS and k in meta]
    if rng is not None:
        rng.shuffle(keys)
    parts = []
    for k in keys:
        v = meta[k]
        if k in _IMAGE_DIM:
            b = int(v) // 32
        elif k in _INTEGER:
            b = int(v)
        elif k in _MANUAL_BINS:
            b = sum(1 for edge in _MANUAL_BINS[k] if v >= edge)
        else:
            lo, hi, bins = _RANGE_BINS[k]
            b = int((min(max(v, lo), hi) - lo) / (hi - lo) * (bins - 1))
        parts.append(f"v1={METADATA_IDS[k]} {_v(0, b)}")
    return parts if chunks else " ".join(parts)


def color_palette_to_text(value: list, k: int | None = None, rng: random.Random | None = None) -> str:
    """``v1=<k> v0=r v0=g v0=b ...`` for the palette with ``k`` colours (default 7; random 1..7 with ``rng``)."""
    if k is None:
        k = rng.randint(1, 7) if rng is not None else 7
    flat = value[0][str(k)]
    return " ".join([f"v1={k}"] + [_v(0, c) for c in flat])


def _crop_box(box, crop_norm, flip: bool):
    """Cut a normalised xyxy box to a normalised crop (x0, y0, x1, y1); None when nothing of it is left."""
    cx0, cy0, cx1, cy1 = crop_norm
    x0, y0, x1, y1 = ((box[0] - cx0) / (cx1 - cx0), (box[1] - cy0) / (cy1 - cy0),
                      (box[2] - cx0) / (cx1 - cx0), (box[3] - cy0) / (cy1 - cy0))
    x0, y0, x1, y1 = (min(max(c, 0.0), 1.0) for c in (x0, y0, x1, y1))
    if x1 <= x0 or y1 <= y0:
        return None
    if flip:
        x0, x1 = 1 - x1, 1 - x0
    return x0, y0, x1, y1


def _crop_norm(crop, image_hw) -> tuple[tuple[float, float, float, float], bool]:
    if crop is None:
        return (0.0, 0.0, 1.0, 1.0), False
    top, left, h, w, flip = (int(c) for c in crop)
    hh, ww = image_hw
    return (left / ww, top / hh, (left + w) / ww, (top + h) / hh), bool(flip)


def det_to_text(value: dict, crop=None, image_hw: tuple[int, int] | None = None, threshold: float = 0.6,
                rng: random.Random | None = None) -> str:
    """Detections as 4M's sequence, optionally for one crop (``top, left, h, w, hflip`` of the stored rgb)."""
    crop_norm, flip = _crop_norm(crop, image_hw)
    boxes = []
    for inst in value.get("instances", []):
        if inst["score"] < threshold:
            continue
        b = _crop_box(inst["boxes"], crop_norm, flip)
        if b is not None:
            boxes.append((*b, inst["class_name"]))
    if rng is not None:
        rng.shuffle(boxes)
    else:
        boxes.sort(key=lambda b: (b[0] ** 2 + b[1] ** 2, b[4]))
    s = COORD_BINS - 1
    return " ".join(f"{_v(0, x0 * s)} {_v(1, y0 * s)} {_v(2, x1 * s)} {_v(3, y1 * s)} {name}"
                    for x0, y0, x1, y1, name in boxes)


def _people(value: Any) -> list[dict]:
    """Per-person dicts from 4M's dict of per-person lists (or a list of person dicts)."""
    if not value:
        return []
    if isinstance(value, list):
        return value
    params = value["pred_smpl_params"]
    n = len(value["bbox_xyxy"])
    return [{"bbox_xyxy": value["bbox_xyxy"][i], "pred_cam": value["pred_cam"][i],
             "pose_tokenized": (value.get("pose_tokenized") or [None] * n)[i],
             "pred_smpl_params": {k: params[k][i] for k in ("global_orient", "body_pose", "betas")}}
            for i in range(n)]


def human_poses_to_text(value: Any, original_size: tuple[int, int], crop=None,
                        image_hw: tuple[int, int] | None = None, rng: random.Random | None = None) -> str:
    """4M-21's human-pose sequence; ``original_size`` is (width, height) of the image ``bbox_xyxy`` refers to.

    Needs ``pose_tokenized`` (the pose tokenizer's 8 ids per person; see :func:`modalmill.tokenize.labelers`)."""
    crop_norm, flip = _crop_norm(crop, image_hw)
    ow, oh = original_size
    s = COORD_BINS - 1
    out = []
    for p in _people(value):
        x0, y0, x1, y1 = p["bbox_xyxy"]
        b = _crop_box((x0 / ow, y0 / oh, x1 / ow, y1 / oh), crop_norm, False)
        if b is None:
            continue
        tokens = p.get("pose_tokenized")
        if tokens is None:
            raise ValueError("human_poses_to_text needs pose_tokenized (the pose tokenizer's ids) for every person")
        pose = ["pose"] + [f"v0={int(t)}" if t < 512 else f"v1={int(t) - 512}" for t in tokens]
        glob = ["global"] + [_v(0, 499.5 * g + 499.5) for g in np.asarray(p["pred_smpl_params"]["global_orient"],
                                                                          dtype=float).ravel()]
        cam = ["camera"] + [_v(0, 49.95 * min(max(c, -1.0), 19.0) + 49.95) for c in np.asarray(p["pred_cam"],
                                                                                            dtype=float).ravel()]
        shape = ["shape"] + [_v(0, 166.5 * v + 499.5) for v in np.asarray(p["pred_smpl_params"]["betas"],
                                                                          dtype=float).ravel()]
        groups = [pose, glob, cam, shape]
        if rng is not None:
            rng.shuffle(groups)
        out.append(" ".join(["human", _v(0, b[0] * s), _v(1, b[1] * s), _v(2, b[2] * s), _v(3, b[3] * s)]
                            + [t for g in groups for t in g]))
    return " ".join(out) if out else "none"


def _id_token(t: int) -> str:
    """A 0..1023 code id as one value token: ``v0=id`` below 512, else ``v1=id-512`` (as for pose ids)."""
    t = int(t)
    if not 0 <= t < 1024:
        raise ValueError(f"token id {t} outside 0..1023")
    return f"v0={t}" if t < 512 else f"v1={t - 512}"


def sam_instance_to_text(entry: dict, crop_size: int = 224, rng: random.Random | None = None) -> str:
    """One crop of a ``sam_instance`` file (``bbox`` ``[N, 4]`` = ymin, xmin, ymax, xmax in crop pixels, ``token_ids``
    ``[N, 16]``) as a sequence: per instance ``v0=xmin v1=ymin v2=xmax v3=ymax`` (x 999 / crop size) and its 16
    ids as value tokens (:func:`_id_token`), instances ordered by distance to the origin (random with ``rng``);
    ``none`` without instances. The order of the parts follows the pose sequence; it is not checked against
    4M-21's own SAM-instance transform."""
    boxes = np.asarray(entry.get("bbox", np.zeros((0, 4))), dtype=float).reshape(-1, 4)
    ids = np.asarray(entry.get("token_ids", np.zeros((0, 16))), dtype=np.int64).reshape(len(boxes), 16)
    s = (COORD_BINS - 1) / crop_size
    items = [(b[1] * s, b[0] * s, b[3] * s, b[2] * s, tuple(int(t) for t in row)) for b, row in zip(boxes, ids)]
    if rng is not None:
        rng.shuffle(items)
    else:
        items.sort(key=lambda it: (it[0] ** 2 + it[1] ** 2, it[4]))
    out = [" ".join([_v(0, x0), _v(1, y0), _v(2, x1), _v(3, y1)] + [_id_token(t) for t in row])
           for x0, y0, x1, y1, row in items]
    return " ".join(out) if out else "none"


def encode_text(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    """``[SOS] pieces... [EOS]`` ids of ``text`` (truncated to ``max_length`` ids, ``[EOS]`` kept last)."""
    vocab = tokenizer.get_vocab()
    ids = [vocab["[SOS]"]] + tokenizer.encode(text, add_special_tokens=False).ids + [vocab["[EOS]"]]
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length - 1] + [vocab["[EOS]"]]
    return ids
