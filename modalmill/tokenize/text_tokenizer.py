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
- :func:`det_to_text`: boxes with score >= the detector's box threshold (ViTDet-H's 0.6 as in 4M), cut to a
  crop, flipped, ordered by distance to the origin:
  ``v0=xmin v1=ymin v2=xmax v3=ymax <class name>`` each, coordinates x 999;
- :func:`human_poses_to_text`: ``human`` + box tokens, then the ``pose`` (8 pose-tokenizer ids), ``global``
  (9 orientation values), ``camera`` (3) and ``shape`` (10 betas) groups as value tokens; ``none`` without people;
- :func:`sam_instance_to_text`: per query point ``point v0=y v1=x``, then ``polygon`` + box + 16
  SAM-instance-tokenizer ids of each instance containing it (or ``none``), as 4M-21's ``SAMInstanceTokTransform``.

:func:`encode_text` wraps a sequence in ``[SOS] ... [EOS]`` ids. What the trainer-side loader
(:func:`modalmill.load_dataset` with ``text_tokenizer=``) uses instead follows 4M's own loader
(``fourm/data/modality_transforms.py`` for the text, ``fourm/data/masking.py`` for the ids):

- :func:`serialise_label` turns one decoded label of a text-like modality (:data:`TEXT_MODALITIES`) into the
  string 4M's transform returns, for one crop of ``crop_settings`` or the whole image: ``caption`` is the entry
  aligned with the crop; ``det`` is cut to the crop, flipped with it, boxes scoring below its detector's box
  threshold (0.6 for ViTDet-H, as 4M) dropped and ordered by distance to the origin (never random, as in 4M);
  ``metadata`` is a *list* of ``v1=<id> v0=<bin>`` chunks (4M's ``return_chunks``, for chunked span masking) in
  shuffled order; ``color_palette`` uses a random palette size 1..7; ``human_poses`` shuffles its four groups;
  ``sam_instance`` takes the crop's entry. Random choices come
  from the ``rng`` passed in; without one they are canonical (metadata in id order, 7 colours, fixed groups).
- :func:`encode_sequence`: ``tokenizer.encode(text).ids + [EOS]`` (no ``[SOS]``, as 4M's masking does; chunks
  are encoded one by one and concatenated), optionally cut to ``max_tokens`` by 4M's rule.

4M's released tokenizer (``fourm/utils/tokenizer/trained/text_tokenizer_4m_wordpiece_30k.json`` of apple/ml-4m,
not shipped with modalmill) has exactly this fixed head, so it is accepted wherever a text tokenizer is taken
(:func:`load_text_tokenizer`: its path, an ml-4m checkout, or ``4m`` with ``$MODALMILL_4M_TEXT_TOKENIZER``), and
the ids are 4M-21's (``tests/test_text_4m_reference.py`` against ids made by ml-4m's own code).
"""

from __future__ import annotations

import json
import os
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


# plain words the serialisers write besides value tokens and class names: whole tokens right after the fixed head,
# so even a small vocabulary learned from captions alone encodes each of them as one id (never pieces, never [UNK])
SEQUENCE_WORDS = ("human", "pose", "global", "camera", "shape", "none", "point", "polygon")


def train_text_tokenizer(texts: Iterable[str], vocab_size: int = 30_000, lowercase: bool = True):
    """Train 4M's WordPiece text tokenizer on ``texts`` (an iterable of strings); the fixed head
    (:func:`fixed_tokens`) and :data:`SEQUENCE_WORDS` are whole tokens. Returns a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Tokenizer, decoders, trainers
    from tokenizers.models import WordPiece
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    n_fixed = len(fixed_tokens())
    if vocab_size <= n_fixed + len(SEQUENCE_WORDS):
        raise ValueError(f"vocab_size must exceed the {n_fixed + len(SEQUENCE_WORDS)} fixed tokens and sequence "
                         f"words, got {vocab_size}")
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                    lowercase=lowercase)
    tok.pre_tokenizer = BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = [AddedToken(t, single_word=True, normalized=False) for t in fixed_tokens()[:-len(COCO_CLASSES)]]
    specials += [AddedToken(c, single_word=True, normalized=True) for c in COCO_CLASSES + SEQUENCE_WORDS]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                        continuing_subword_prefix="##", special_tokens=specials)
    tok.train_from_iterator(texts, trainer=trainer)
    vocab = tok.get_vocab()
    for i, t in enumerate(fixed_tokens()):
        if vocab.get(t) != i:
            raise RuntimeError(f"text tokenizer: fixed token {t!r} got id {vocab.get(t)}, expected {i}")
    return tok


TOKENIZER_FILE = "text_tokenizer.json"
# 4M's released text tokenizer: a file of apple/ml-4m (not shipped with modalmill); "4m" names it through this variable
FOURM_TOKENIZER_FILE = "text_tokenizer_4m_wordpiece_30k.json"
FOURM_TOKENIZER_PATH = f"fourm/utils/tokenizer/trained/{FOURM_TOKENIZER_FILE}"
FOURM_TOKENIZER_ENV = "MODALMILL_4M_TEXT_TOKENIZER"


def resolve_text_tokenizer(path: str) -> str:
    """The JSON file a text-tokenizer location names (local or ``s3://``).

    ``path`` is a ``.json`` file (4M's ``text_tokenizer_4m_wordpiece_30k.json`` or one modalmill wrote); a directory
    holding ``text_tokenizer.json`` or 4M's file; an apple/ml-4m checkout (its ``fourm/utils/tokenizer/trained/``
    file); or ``4m``: 4M's released tokenizer at ``$MODALMILL_4M_TEXT_TOKENIZER`` (a file or a checkout)."""
    from ..io import storage

    url = str(path)
    if url.lower() in ("4m", "4m-21", "fourm"):
        env = os.environ.get(FOURM_TOKENIZER_ENV)
        if not env:
            raise FileNotFoundError(f"text tokenizer '4m': set {FOURM_TOKENIZER_ENV} to 4M's released tokenizer, "
                                    f"{FOURM_TOKENIZER_PATH} in a checkout of https://github.com/apple/ml-4m (or "
                                    "the checkout itself), or pass that path")
        url = env
    if url.endswith(".json"):
        return url
    for rel in (TOKENIZER_FILE, FOURM_TOKENIZER_FILE, FOURM_TOKENIZER_PATH):
        cand = storage.join(url, rel)
        if storage.exists(cand):
            return cand
    raise FileNotFoundError(f"{storage.join(url, TOKENIZER_FILE)}: no text tokenizer here (train one with `modalmill "
                            f"train-tokenizer --modality caption --data OUT`, or use 4M's: {FOURM_TOKENIZER_PATH} "
                            "of apple/ml-4m)")


def load_text_tokenizer(path: str):
    """The tokenizer at ``path`` (see :func:`resolve_text_tokenizer`: a ``.json`` file, a directory holding one, an
    ml-4m checkout or ``4m``), local or ``s3://``."""
    from tokenizers import Tokenizer

    from ..io import storage

    url = resolve_text_tokenizer(path)
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no text tokenizer here (train one with `modalmill train-tokenizer "
                                f"--modality caption --data OUT`, or use 4M's: {FOURM_TOKENIZER_PATH} of "
                                "apple/ml-4m)") from None
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises a bare Exception on malformed JSON
        raise ValueError(f"{url}: not a Hugging Face tokenizers JSON file: {e}") from None


def as_text_tokenizer(tokenizer):
    """A ``tokenizers.Tokenizer`` from a tokenizer object or a path (see :func:`load_text_tokenizer`).

    The tokenizer must hold 4M's fixed tokens at their ids (``[PAD] [UNK] [SOS] [EOS]``, sentinels, values, ...)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_text_tokenizer(os.fspath(tokenizer))
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"text_tokenizer must be a path or a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    vocab = tokenizer.get_vocab()
    for i, t in enumerate(fixed_tokens()):
        if vocab.get(t) != i:
            raise ValueError(f"text tokenizer: token {t!r} has id {vocab.get(t)}, 4M's layout puts it at {i} "
                             "(train it with modalmill.tokenize.text_tokenizer.train_text_tokenizer)")
    return tokenizer


def install_text_tokenizer(source: str, out: str) -> dict[str, Any]:
    """Copy an existing text tokenizer (4M's released one, ``4m``, or any file :func:`as_text_tokenizer` accepts)
    to ``out/text_tokenizer.json``, where ``load_dataset(..., text_tokenizer=True)`` finds it for an output whose
    ``out`` is ``ROOT/_modalmill/tokenizers/text``. The bytes are copied unchanged (4M's ids stay 4M's)."""
    from ..io import storage

    src = resolve_text_tokenizer(source)
    data = storage.read_bytes(src)
    tok = as_text_tokenizer(load_text_tokenizer(src))  # validates 4M's fixed layout before anything is written
    url = storage.join(out, TOKENIZER_FILE)
    storage.write_bytes(url, data)
    return {"path": url, "source": src, "vocab_size": tok.get_vocab_size()}


def caption_texts(root: str) -> Iterator[str]:
    """Every caption string in an output root's ``caption`` tars (completed shards only), each distinct caption of a
    sample once."""
    from ..io import manifest, storage
    from ..io.readers import ShardTruncated, iter_tar
    from ..schemas.modalities import get_modality

    spec = get_modality("caption")
    for name, marker in sorted(manifest.list_markers(root).items()):
        if "caption" not in marker.get("modalities", {}):
            continue
        for s in iter_tar(storage.join(root, "caption", f"{name}.tar")):
            if isinstance(s, ShardTruncated) or s.error:
                continue
            value = spec.decode(next(iter(s.members.values())))
            seen = set()  # a caption repeated for each crop row counts once
            for c in value if isinstance(value, list) else [value]:
                text = c.get("caption") if isinstance(c, dict) else c
                if isinstance(text, str) and text.strip() and text not in seen:
                    seen.add(text)
                    yield text


TRAINED_ON_FILE = "trained_on.json"  # beside the tokenizer: the sha256 of the captions and the vocabulary size


def train_text_tokenizer_on_output(root: str, out: str, vocab_size: int = 30_000,
                                   keep_if_trained: bool = False) -> dict[str, Any]:
    """Train the WordPiece tokenizer on an output's captions; writes ``out/text_tokenizer.json`` and
    ``out/trained_on.json`` (what it was trained on). ``keep_if_trained``: when ``out`` already holds a tokenizer
    trained on these very captions with this vocabulary size, keep it (training is not bit-for-bit repeatable:
    the trainer's parallel merges may order ties differently) and return its info with ``"kept": True``."""
    import hashlib

    from ..io import storage

    texts = list(caption_texts(root))
    if not texts:
        raise ValueError(f"{root}: no captions to train the text tokenizer on (label 'caption' first)")
    trained_on = {"captions_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(), "captions": len(texts),
                  "vocab_size_asked": vocab_size}
    url, record = storage.join(out, TOKENIZER_FILE), storage.join(out, TRAINED_ON_FILE)
    if keep_if_trained:
        try:
            if json.loads(storage.read_bytes(record)) == trained_on:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_str(storage.read_bytes(url).decode())
                return {"path": url, "vocab_size": tok.get_vocab_size(), "captions": len(texts),
                        "learned_pieces": tok.get_vocab_size() - len(fixed_tokens()), "kept": True}
        except (FileNotFoundError, OSError, ValueError):
            pass
    tok = train_text_tokenizer(texts, vocab_size=vocab_size)
    storage.write_bytes(url, tok.to_str().encode())
    storage.write_bytes(record, json.dumps(trained_on, indent=1, sort_keys=True).encode())
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


def det_to_text(value: dict, crop=None, image_hw: tuple[int, int] | None = None, threshold: float | None = None,
                rng: random.Random | None = None) -> str:
    """Detections as 4M's sequence, optionally for one crop (``top, left, h, w, hflip`` of the stored rgb); boxes
    scoring at least ``threshold`` (None: the record's detector's box threshold, 0.6 for ViTDet-H, 4M's)."""
    from ..labelers.detection import det_thresholds

    threshold = det_thresholds(value)[0] if threshold is None else threshold
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
        boxes.sort(key=lambda b: b[0] ** 2 + b[1] ** 2)  # stable: ties keep the stored order, as in 4M
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


def _pose_box(box_xyxy, original_size, crop, image_hw):
    """A person box as 4M's ``HumanPoseTransform`` cuts it to a crop: normalised by the image size, moved into the
    crop (albumentations' ``bbox_crop``), dropped when all its x (or all its y) lie below 0 or above 1, else
    clipped to [0, 1]. The crop's flip is ignored, as 4M ignores it for poses. None when dropped."""
    ow, oh = original_size
    b = np.array([box_xyxy[0] / ow, box_xyxy[1] / oh, box_xyxy[2] / ow, box_xyxy[3] / oh], dtype=float)
    if crop is not None:
        if image_hw is None:
            raise ValueError("human_poses: cutting boxes to a crop needs the stored rgb's size (image_hw)")
        top, left, h, w = (int(c) for c in crop[:4])
        rows, cols = image_hw
        b = np.array([(b[0] * cols - left) / w, (b[1] * rows - top) / h, (b[2] * cols - left) / w,
                      (b[3] * rows - top) / h])
    xs, ys = b[0::2], b[1::2]
    if (ys < 0).all() or (xs < 0).all() or (ys > 1).all() or (xs > 1).all():
        return None
    return np.clip(b, 0.0, 1.0)


def human_poses_to_text(value: Any, original_size: tuple[int, int], crop=None,
                        image_hw: tuple[int, int] | None = None, rng: random.Random | None = None) -> str:
    """4M-21's human-pose sequence (``HumanPoseTransform``); ``original_size`` is (width, height) of the image
    ``bbox_xyxy`` refers to, ``crop`` a ``crop_settings`` row in pixels of the stored rgb (``image_hw``).

    Per person (in stored order) ``human v0=xmin v1=ymin v2=xmax v3=ymax`` (box cut to the crop by
    :func:`_pose_box`, x 999) and four groups, shuffled with ``rng`` (canonical order without): ``pose`` + the 8
    ``pose_tokenized`` ids (``v0=id`` below 512, else ``v1=id-512``), ``global`` + 9 ``v0=round(499.5 g + 499.5)``,
    ``camera`` + 3 ``v0=round(49.95 c + 49.95)`` with c clipped to [-1, 19], ``shape`` + 10
    ``v0=round(166.5 b + 499.5)``; ``none`` when no person is left. One deliberate difference: values are clamped to
    0..999 (4M would emit tokens outside its vocabulary for betas beyond +-3).
    Needs ``pose_tokenized`` (the pose tokenizer's 8 ids per person: ``modalmill tokenize -m human_poses``)."""
    s = COORD_BINS - 1
    out = []
    for p in _people(value):
        b = _pose_box(p["bbox_xyxy"], original_size, crop, image_hw)
        if b is None:
            continue
        tokens = p.get("pose_tokenized")
        if tokens is None:
            raise ValueError("human_poses_to_text needs pose_tokenized (the pose tokenizer's ids) for every person")
        pose = ["pose"] + [_id_token(t) for t in tokens]
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


SAM_QUERY_POINTS = 7  # 4M-21's SAMInstanceTokTransform(points_per_side=7): 7 random points, or a 7x7 grid


def sam_query_points(crop_size: int = 224, rng: random.Random | None = None,
                     points_per_side: int = SAM_QUERY_POINTS) -> list[tuple[int, int]]:
    """4M's query points (x, y) in crop pixels: with ``rng`` ``points_per_side`` random points (x and y uniform in
    0..crop_size-1, 4M's ``point_order='random'``); without, the ``points_per_side`` x ``points_per_side`` grid of
    4M's ``point_order='grid'`` (``linspace(0, crop_size, n + 2)[1:-1]`` truncated, x-major)."""
    if rng is not None:
        return [(rng.randrange(crop_size), rng.randrange(crop_size)) for _ in range(points_per_side)]
    ticks = [int(v) for v in np.linspace(0, crop_size, points_per_side + 2)[1:-1]]
    return [(x, y) for x in ticks for y in ticks]


def sam_instance_to_text(entry: dict, crop_size: int = 224, rng: random.Random | None = None,
                         points: list[tuple[int, int]] | None = None) -> str:
    """One crop of a ``sam_instance`` file as 4M-21's ``SAMInstanceTokTransform`` writes it.

    ``entry``: ``points`` (per instance its OpenCV contours in the crop), ``bbox`` ``[N, 4]`` = ymin, xmin, ymax,
    xmax in crop pixels, ``token_ids`` ``[N, 16]``. For each query point (x, y) (:func:`sam_query_points`, or
    ``points``): ``point v0=<y> v1=<x>``, then every instance whose first contour contains the point
    (``cv2.pointPolygonTest >= 0``) as ``polygon v0=xmin v1=ymin v2=xmax v3=ymax`` (crop pixels as ints, not
    rescaled) and its 16 ids (``v0=id`` below 512, else ``v1=id-512``), or ``none`` when no instance contains
    it. With ``rng`` the points are random and their order and each point's instance order are shuffled, as in
    4M's training; without, the 7x7 grid in order and instances in stored order (canonical)."""
    import cv2

    boxes = np.asarray(entry.get("bbox", np.zeros((0, 4))), dtype=float).reshape(-1, 4)
    ids = np.asarray(entry.get("token_ids", np.zeros((0, 16))), dtype=np.int64).reshape(len(boxes), 16)
    contours = [np.asarray(c[0], dtype=np.int32).reshape(-1, 1, 2) for c in entry.get("points", [])]
    if len(contours) != len(boxes):
        raise ValueError(f"sam_instance: {len(contours)} contour lists for {len(boxes)} boxes")
    queries = list(dict.fromkeys(points if points is not None else sam_query_points(crop_size, rng)))
    if rng is not None:
        rng.shuffle(queries)
    parts: list[str] = []
    for x, y in queries:
        parts += ["point", f"v0={int(y)}", f"v1={int(x)}"]
        hits = [i for i, c in enumerate(contours)
                if cv2.pointPolygonTest(c, (float(x), float(y)), measureDist=True) >= 0]
        if rng is not None:
            rng.shuffle(hits)
        if not hits:
            parts.append("none")
        for i in hits:
            ymin, xmin, ymax, xmax = boxes[i].astype(np.int32)
            parts += ["polygon", f"v0={xmin}", f"v1={ymin}", f"v2={xmax}", f"v3={ymax}"]
            parts += [_id_token(t) for t in ids[i]]
    return " ".join(parts)


def encode_text(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    """``[SOS] pieces... [EOS]`` ids of ``text`` (truncated to ``max_length`` ids, ``[EOS]`` kept last)."""
    vocab = tokenizer.get_vocab()
    ids = [vocab["[SOS]"]] + tokenizer.encode(text, add_special_tokens=False).ids + [vocab["[EOS]"]]
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length - 1] + [vocab["[EOS]"]]
    return ids


# ---------------------------------------------------------------------- what the trainer-side loader uses

TEXT_MODALITIES = ("caption", "det", "metadata", "color_palette", "human_poses", "sam_instance")


def pick_caption(value: Any, crop_index: int | None = None, rng: random.Random | None = None) -> str:
    """4M's ``CaptionTransform`` (aligned captions): a string as is; from a list the entry of the crop (entry 0
    without a crop). A list shorter than the crop index holds captions to sample from: a random one with ``rng``
    (4M's unaligned mode), else the first. ``{"caption": str}`` entries give their string."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("caption: empty list")
        i = crop_index or 0
        value = value[i] if i < len(value) else (rng.choice(value) if rng is not None else value[0])
    if isinstance(value, dict):
        value = value.get("caption")
    if not isinstance(value, str):
        raise ValueError(f"caption: expected a string or a {{'caption': str}} entry, got {type(value).__name__}")
    return value


def serialise_label(modality: str, value: Any, *, crop: Any = None, crop_index: int | None = None,
                    image_hw: tuple[int, int] | None = None, rng: random.Random | None = None) -> str | list[str]:
    """The text 4M's transform makes of one decoded label (see the module docstring).

    ``crop``: the crop's ``(top, left, height, width, hflip)`` row of ``crop_settings`` (pixels of the stored rgb)
    or None for the whole image; ``crop_index``: its row number; ``image_hw``: (height, width) of the stored rgb,
    needed for ``det`` with a crop and for ``human_poses``; ``rng``: 4M's random choices (None: canonical)."""
    if modality == "caption":
        return pick_caption(value, crop_index, rng)
    if modality == "det":
        if crop is not None and image_hw is None:
            raise ValueError("det: cutting boxes to a crop needs the stored rgb's size (image_hw)")
        return det_to_text(value, crop=crop, image_hw=image_hw)  # 4M orders boxes by distance, never at random
    if modality == "metadata":
        return metadata_to_text(value, rng=rng, chunks=True)
    if modality == "color_palette":
        return color_palette_to_text(value, rng=rng)
    if modality == "human_poses":
        if image_hw is None:
            raise ValueError("human_poses: bbox_xyxy is in pixels of the stored rgb; its size (image_hw) is needed")
        return human_poses_to_text(value, original_size=(image_hw[1], image_hw[0]), crop=crop, image_hw=image_hw,
                                   rng=rng)
    if modality == "sam_instance":
        entries = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
        i = crop_index or 0
        if i >= len(entries):
            raise ValueError(f"sam_instance: no entry for crop {i} ({len(entries)} stored)")
        return sam_instance_to_text(entries[i], rng=rng)
    raise ValueError(f"{modality!r} is not a text-like modality ({', '.join(TEXT_MODALITIES)})")


def encode_sequence(tokenizer, text: str | list[str], max_tokens: int | None = None) -> list[int]:
    """Ids as 4M's masking makes them: ``encode(text).ids + [EOS]`` (no ``[SOS]``), truncated to ``max_tokens``.

    A list of chunks (``metadata``) is encoded chunk by chunk and concatenated, ``[EOS]`` as a last chunk, and
    truncated by dropping whole chunks from the end that pass ``max_tokens``, as 4M's chunked masking does."""
    eos = tokenizer.token_to_id("[EOS]")
    if isinstance(text, str):  # 4M's call: encode(sequence).ids (its tokenizer file has no post-processor)
        ids = tokenizer.encode(text).ids + [eos]
        return ids[:max_tokens] if max_tokens is not None else ids
    chunks = [tokenizer.encode(c).ids for c in text] + [[eos]]  # = 4M's encode_batch, without rayon threads
    out: list[int] = []
    for c in chunks:
        if max_tokens is not None and len(out) + len(c) > max_tokens:
            break
        out.extend(c)
    return out
