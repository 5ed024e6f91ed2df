"""The modality registry: every modality of 4M-21 by the folder name 4M's trainer reads.

Each :class:`ModalitySpec` says what kind of thing a label is, how it is stored (file extension and
codec), its raw shape and dtype, and for token modalities the vocabulary size and token count. Records
are validated against their spec before they are written; a mismatch raises :class:`RecordError` naming
the modality, the key and the field.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

# kinds
IMAGE = "image"  # the stored photograph (rgb)
PIXEL = "pixel"  # a per-pixel label at the geometry of the stored rgb image (depth, normal, edges, semseg)
FEATURE_MAP = "feature_map"  # a teacher's patch features per crop [n_crops, h, w, C], float16
GLOBAL = "global"  # a global embedding per crop [n_crops, C], float16
TEXT = "text"  # text-like / structured labels stored raw as JSON (tokenised by the trainer)
ARRAY = "array"  # other arrays (crop_settings, t5 embeddings, sam instances)
TOKENS = "tokens"  # discrete token ids [n_crops, n_tokens]


class RecordError(ValueError):
    """A label does not match its modality's spec."""

    def __init__(self, modality: str, key: str | None, field_name: str, message: str):
        self.modality, self.key, self.field = modality, key, field_name
        super().__init__(f"modality {modality!r}, key {key!r}, field {field_name!r}: {message}")


@dataclass(frozen=True)
class ModalitySpec:
    name: str  # also the folder name under the output root
    kind: str
    ext: str  # member extension inside the tar (no dot)
    dtype: str | None  # numpy dtype of the raw label (None for JSON)
    shape: tuple  # symbolic shape: ints are fixed, strings are free dims ("H", "W", "n_crops", ...)
    description: str
    vocab_size: int | None = None
    n_tokens: int | None = None
    value_range: tuple[float, float] | None = None
    source: str | None = None  # for tokens: the modality they encode
    extra_allowed_values: tuple[int, ...] = field(default=())

    @property
    def is_pixel_aligned(self) -> bool:
        return self.kind in (IMAGE, PIXEL)

    # ------------------------------------------------------------------ validation + codec
    def encode(self, value: Any, key: str | None = None, image_hw: tuple[int, int] | None = None) -> bytes:
        """Validate ``value`` against this spec and return the file bytes to store."""
        return _CODECS[self.ext][0](self, value, key, image_hw)

    def decode(self, data: bytes) -> Any:
        return _CODECS[self.ext][1](self, data)

    def _err(self, key, fld, msg):
        return RecordError(self.name, key, fld, msg)

    def check_array(self, arr: Any, key, image_hw=None) -> np.ndarray:
        if isinstance(arr, np.generic) and self.shape == ():  # a numpy scalar of a scalar modality
            arr = np.asarray(arr)
        if not isinstance(arr, np.ndarray):
            raise self._err(key, "type", f"expected a numpy array, got {type(arr).__name__}")
        if self.dtype is not None and arr.dtype != np.dtype(self.dtype):
            raise self._err(key, "dtype", f"expected {self.dtype}, got {arr.dtype}")
        if arr.ndim != len(self.shape):
            raise self._err(key, "shape", f"expected {len(self.shape)} dims {self.shape}, got shape {arr.shape}")
        for i, (want, got) in enumerate(zip(self.shape, arr.shape)):
            if isinstance(want, int) and want != got:
                raise self._err(key, "shape", f"dim {i} must be {want}, got shape {arr.shape}")
        if image_hw is not None and self.is_pixel_aligned and tuple(arr.shape[:2]) != tuple(image_hw):
            raise self._err(key, "shape", f"must match the stored rgb image {tuple(image_hw)}, got {arr.shape[:2]}")
        if arr.size and self.vocab_size is not None:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.vocab_size:
                raise self._err(key, "value", f"token ids must lie in [0, {self.vocab_size}), got [{lo}, {hi}]")
        if arr.size and self.value_range is not None and np.issubdtype(arr.dtype, np.number):
            lo, hi = self.value_range
            bad = (arr < lo) | (arr > hi)
            if self.extra_allowed_values:
                bad &= ~np.isin(arr, self.extra_allowed_values)
            if np.issubdtype(arr.dtype, np.floating):
                bad |= ~np.isfinite(arr)
            if bad.any():
                raise self._err(key, "value", f"values must lie in [{lo}, {hi}], got {arr[bad].ravel()[:3].tolist()}")
        return arr


# ---------------------------------------------------------------------- codecs


def _png_encode(spec: ModalitySpec, value, key, image_hw):
    arr = spec.check_array(value, key, image_hw)
    if arr.dtype == np.uint16:
        img = Image.fromarray(arr)  # 16-bit greyscale ("I;16")
    else:
        img = Image.fromarray(arr, mode="RGB" if arr.ndim == 3 else "L")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _png_decode(spec: ModalitySpec, data: bytes):
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img)
    return arr.astype(spec.dtype, copy=False) if spec.dtype else arr


def _jpg_encode(spec: ModalitySpec, value, key, image_hw):
    if isinstance(value, (bytes, bytearray)):
        if not bytes(value[:3]) == b"\xff\xd8\xff":
            raise spec._err(key, "format", "expected JPEG bytes")
        return bytes(value)
    arr = spec.check_array(value, key, image_hw)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _jpg_decode(spec: ModalitySpec, data: bytes):
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _npy_encode(spec: ModalitySpec, value, key, image_hw):
    arr = spec.check_array(value, key, image_hw)
    buf = io.BytesIO()
    if spec.dtype == "object":  # 4M's pickled object arrays (sam_instance): validated, then pickled by np.save
        _OBJECT_VALIDATORS[spec.name](spec, arr, key)
        np.save(buf, arr, allow_pickle=True)
        return buf.getvalue()
    # (np.ascontiguousarray would turn a 0-d array, a scalar modality's shape=(), into shape (1,))
    np.save(buf, arr if arr.flags.c_contiguous else np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _npy_decode(spec: ModalitySpec, data: bytes):
    if spec.dtype == "object":
        arr = load_object_npy(data)
        _OBJECT_VALIDATORS[spec.name](spec, arr, None)
        return arr
    return np.load(io.BytesIO(data), allow_pickle=False)


# what an object .npy may reference: numpy's array reconstruction and nothing else (no code runs on load)
_SAFE_PICKLE_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


def load_object_npy(data: bytes) -> np.ndarray:
    """Read a pickled object ``.npy`` (4M's ``sam_instance`` files) without running arbitrary pickles: the
    unpickler only resolves numpy's array/dtype/scalar reconstruction (plus dicts, lists, strings, numbers)."""
    import pickle

    class _Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in _SAFE_PICKLE_GLOBALS:
                raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an object .npy")
            return super().find_class(module, name)

    fp = io.BytesIO(data)
    version = np.lib.format.read_magic(fp)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, _fortran, dtype = read_header[version](fp)
    if not dtype.hasobject:
        return np.load(io.BytesIO(data), allow_pickle=False)
    arr = _Restricted(fp).load()
    if not isinstance(arr, np.ndarray) or arr.shape != tuple(shape):
        raise ValueError(f"object .npy holds {type(arr).__name__}, not an array of shape {tuple(shape)}")
    return arr


def _json_encode(spec: ModalitySpec, value, key, image_hw):
    validator = _JSON_VALIDATORS.get(spec.name)
    if validator is not None:
        validator(spec, value, key)
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise spec._err(key, "json", str(e)) from None


def _json_decode(spec: ModalitySpec, data: bytes):
    return json.loads(data)


def _npz_encode(spec: ModalitySpec, value, key, image_hw):
    if not isinstance(value, dict) or set(value) != {"emb", "mask_valid"}:
        raise spec._err(key, "type", "expected a dict with 'emb' and 'mask_valid'")
    buf = io.BytesIO()
    np.savez(buf, emb=value["emb"], mask_valid=value["mask_valid"])
    return buf.getvalue()


def _npz_decode(spec: ModalitySpec, data: bytes):
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


_CODECS: dict[str, tuple[Callable, Callable]] = {
    "png": (_png_encode, _png_decode),
    "jpg": (_jpg_encode, _jpg_decode),
    "npy": (_npy_encode, _npy_decode),
    "json": (_json_encode, _json_decode),
    "npz": (_npz_encode, _npz_decode),
}

# ---------------------------------------------------------------------- JSON validators


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _validate_metadata(spec, value, key):
    if not isinstance(value, dict):
        raise spec._err(key, "type", "metadata must be a flat JSON object")
    for name, v in value.items():
        if not _is_num(v):
            raise spec._err(key, name, f"metadata values must be numbers, got {type(v).__name__}")
        rng = METADATA_RANGES.get(name)
        if rng is not None and not (rng[0] <= v <= rng[1]):
            raise spec._err(key, name, f"{v} is outside 4M's range {rng}")


def _validate_color_palette(spec, value, key):
    if not (isinstance(value, list) and value and isinstance(value[0], dict)):
        raise spec._err(key, "type", "color_palette must be a list whose element 0 is a dict")
    pal = value[0]
    if sorted(pal) != [str(k) for k in range(1, 8)]:
        raise spec._err(key, "keys", f"expected keys '1'..'7', got {sorted(pal)}")
    for k, flat in pal.items():
        if len(flat) != 3 * int(k) or not all(isinstance(c, int) and 0 <= c <= 255 for c in flat):
            raise spec._err(key, k, f"expected {k} RGB triples of ints in 0..255 (flat list), got {flat}")


def _validate_det(spec, value, key):
    if not isinstance(value, dict) or not isinstance(value.get("instances"), list):
        raise spec._err(key, "instances", "det must be {'instances': [...]}")
    for i, inst in enumerate(value["instances"]):
        box = inst.get("boxes")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_num(c) and 0 <= c <= 1 for c in box)):
            raise spec._err(key, f"instances[{i}].boxes", f"expected 4 normalised coordinates, got {box}")
        if not isinstance(inst.get("class_name"), str) or not _is_num(inst.get("score")):
            raise spec._err(key, f"instances[{i}]", "needs a string class_name and a numeric score")


def _validate_caption(spec, value, key):
    items = value if isinstance(value, list) else [value]
    for i, c in enumerate(items):
        text = c.get("caption") if isinstance(c, dict) else c
        if not isinstance(text, str):
            raise spec._err(key, f"[{i}]", "captions must be strings or {'caption': str}")


def captions_for_crops(value: Any, n_crops: int, key: str | None = None) -> list:
    """The caption list 4M's trainer reads for a sample with ``n_crops`` rows of ``crop_settings``.

    4M's ``CaptionTransform(aligned_captions=True)`` returns ``val[rand_aug_idx]`` for a list (the entry of the crop
    row its augmenter picked) and then takes ``["caption"]`` of a dict entry. So the stored list holds one entry
    (a string or ``{"caption": str}``) per crop row: a string, or a one-entry list, is repeated for every row; a
    list with at least ``n_crops`` entries is kept as it is; a shorter list (which would make 4M's trainer raise
    IndexError) or an empty one is a RecordError."""
    spec = MODALITIES["caption"]
    items = value if isinstance(value, list) else [value]
    _validate_caption(spec, items, key)
    if not items:
        raise spec._err(key, "length", "an empty caption list")
    if len(items) == 1:
        return [items[0]] * max(1, int(n_crops))
    if len(items) < n_crops:
        raise spec._err(key, "length", f"{len(items)} captions for {n_crops} crop_settings rows: 4M's aligned "
                                       "captions need one entry per crop row")
    return list(items)


def fit_to_crops(modality: str, value: Any, n_crops: int, key: str | None = None) -> Any:
    """``value`` as stored for a sample with ``n_crops`` crop rows: the per-crop caption list for ``caption``;
    every other modality unchanged (their labelers already write one row / entry per crop where 4M indexes by
    crop)."""
    if modality == "caption":
        return captions_for_crops(value, n_crops, key)
    return value


_JSON_VALIDATORS = {
    "metadata": _validate_metadata,
    "color_palette": _validate_color_palette,
    "det": _validate_det,
    "caption": _validate_caption,
}

# 4M-21 metadata names and the trainer's binning ranges (docs/format.md).
METADATA_RANGES: dict[str, tuple[float, float]] = {
    "original_width": (1, 1e9),
    "original_height": (1, 1e9),
    "caption_n_chars": (0, 1e9),
    "caption_n_words": (0, 1e9),
    "caption_n_sentences": (0, 1e9),
    "n_humans": (0, 1e9),
    "n_sam_instances": (0, 1e9),
    "n_coco_instances": (0, 1e9),
    "coco_instance_diversity": (0, 1e9),
    "colorfulness": (0, 150),
    "brightness": (0, 255),
    "contrast": (0, 127),
    "saturation": (0, 255),
    "entropy": (0, 10),
    "walkability": (0, 1),
    "objectness": (0, 1),
    "semantic_diversity": (0, 1e9),
    "geometric_complexity": (0, 0.75),
    "occlusion_score": (0, 0.25),
    "watermark_score": (0, 1),
    "aesthetic_score": (0, 10),
}

# ---------------------------------------------------------------------- the registry

MODALITIES: dict[str, ModalitySpec] = {}


def register_modality(spec: ModalitySpec) -> ModalitySpec:
    if spec.name in MODALITIES and MODALITIES[spec.name] != spec:
        raise ValueError(f"modality {spec.name!r} is already registered with a different spec")
    if spec.ext not in _CODECS:
        raise ValueError(f"modality {spec.name!r}: unknown file extension {spec.ext!r}")
    MODALITIES[spec.name] = spec
    return spec


def find_modality(name: str) -> ModalitySpec | None:
    """The spec of ``name``, or None; a name not registered yet makes the installed plugins load first
    (:mod:`modalmill.schemas.plugins`), so a plugin's modality is known in any process."""
    spec = MODALITIES.get(name)
    if spec is None:
        from .plugins import load_plugins, plugins_loaded

        if not plugins_loaded():
            load_plugins()
            spec = MODALITIES.get(name)
    return spec


def get_modality(name: str) -> ModalitySpec:
    spec = find_modality(name)
    if spec is None:
        raise KeyError(f"unknown modality {name!r}; known: {', '.join(sorted(MODALITIES))}")
    return spec


_R = register_modality
_R(ModalitySpec("rgb", IMAGE, "jpg", "uint8", ("H", "W", 3), "the upright photograph, JPEG"))
_R(ModalitySpec("crop_settings", ARRAY, "npy", "int64", ("n_crops", 5),
                "(top, left, height, width, hflip) per crop in pixels of the stored rgb; crop 0 = centre square"))
_R(ModalitySpec("caption", TEXT, "json", None, (),
                "a JSON list with one caption per crop_settings row (strings or {'caption': str} entries)"))
_R(ModalitySpec("t5_caption", ARRAY, "npz", "float16", ("N", "L", "C"),
                "T5 encoder states of each caption (C = 4096 for 4M-21's T5-XXL)"))
_R(ModalitySpec("det", TEXT, "json", None, (), "detections: normalised xyxy boxes, class names, scores (unfiltered)"))
_R(ModalitySpec("depth", PIXEL, "png", "uint16", ("H", "W"), "relative depth scaled to 0..65535, 16-bit PNG"))
_R(ModalitySpec("normal", PIXEL, "png", "uint8", ("H", "W", 3), "surface normals, [-1, 1] mapped to 0..255"))
_R(ModalitySpec("semseg_coco", PIXEL, "png", "uint8", ("H", "W"), "COCO-panoptic class ids 0..132, 255 unlabelled",
                value_range=(0, 132), extra_allowed_values=(255,)))
_R(ModalitySpec("canny_edge", PIXEL, "png", "uint8", ("H", "W"), "Canny edge map (0 or 255)"))
_R(ModalitySpec("sam_edge", PIXEL, "png", "uint8", ("H", "W"), "boundaries of SAM's instance map (0 or 255)"))
# teacher features: row c is the teacher run on crop c of crop_settings (as 4M computes feature-map tokens)
for _teacher, _dim in (("clip", "C"), ("dinov2", "C"), ("imagebind", "C")):
    _R(ModalitySpec(_teacher, FEATURE_MAP, "npy", "float16", ("n_crops", "h", "w", _dim),
                    f"{_teacher} patch features of each crop [n_crops, h, w, C]"))
    _R(ModalitySpec(f"{_teacher}_global", GLOBAL, "npy", "float16", ("n_crops", _dim),
                    f"{_teacher} global embedding of each crop [n_crops, C]"))
_R(ModalitySpec("sam_instance", ARRAY, "npy", "object", ("n_crops",),
                "per crop: contours, token ids and boxes of SAM instances (4M's pickled object array)"))
_R(ModalitySpec("human_poses", TEXT, "json", None, (), "per person: bbox, SMPL params, camera, pose tokens"))
_R(ModalitySpec("color_palette", TEXT, "json", None, (), "k-means palettes for k = 1..7, 4M's JSON layout"))
_R(ModalitySpec("metadata", TEXT, "json", None, (), "flat {name: number} with 4M-21's metadata names"))
# quality scores as scalar modalities (modalmill/labelers/quality.py; docs/curation.md says why not manifest columns)
_R(ModalitySpec("aesthetic_score", ARRAY, "npy", "float32", (), "LAION aesthetic predictor score (0..10)",
                value_range=(0, 10)))
_R(ModalitySpec("watermark_score", ARRAY, "npy", "float32", (), "LAION watermark probability (0..1)",
                value_range=(0, 1)))
_R(ModalitySpec("clip_score", ARRAY, "npy", "float32", (), "image-caption cosine of CLIP ViT-L/14 (DataComp)",
                value_range=(-1, 1)))
_R(ModalitySpec("nsfw_score", ARRAY, "npy", "float32", (), "LAION CLIP-based NSFW detector probability (0..1)",
                value_range=(0, 1)))

# Token modalities: folder name, source modality, vocab size, tokens per crop (4M's tokenizers, for parity).
TOKEN_MODALITIES = {
    "tok_rgb@224": ("rgb", 16384, 196),
    "tok_depth@224": ("depth", 8192, 196),
    "tok_normal@224": ("normal", 8192, 196),
    "tok_semseg@224": ("semseg_coco", 4096, 196),
    "tok_clip@224": ("clip", 8192, 196),
    "tok_canny_edge@224": ("canny_edge", 8192, 196),
    "tok_sam_edge@224": ("sam_edge", 8192, 196),
    "tok_dinov2@224": ("dinov2", 8192, 256),
    "tok_imagebind@224": ("imagebind", 8192, 256),
    "tok_dinov2_global": ("dinov2_global", 8192, 16),
    "tok_imagebind_global": ("imagebind_global", 8192, 16),
}


def token_dtype(vocab_size: int) -> str:
    """4M stores token ids as int16; larger vocabularies need a wider type."""
    if vocab_size <= 32768:
        return "int16"
    if vocab_size <= 65536:
        return "uint16"
    return "int32"


for _name, (_src, _vocab, _n) in TOKEN_MODALITIES.items():
    _R(ModalitySpec(_name, TOKENS, "npy", token_dtype(_vocab), ("n_crops", _n),
                    f"{_src} tokens, vocab {_vocab}, {_n} per crop", vocab_size=_vocab, n_tokens=_n, source=_src))


def register_token_modality(name: str, source: str, vocab_size: int, n_tokens: int) -> ModalitySpec:
    """Register a token modality 4M does not have (e.g. ``tok_grayscale@224`` for a plugin's ``grayscale``):
    int ``[n_crops, n_tokens]`` ids of ``source`` from a vocabulary of ``vocab_size``. Idempotent."""
    get_modality(source)  # the source must be registered first
    spec = _R(ModalitySpec(name, TOKENS, "npy", token_dtype(vocab_size), ("n_crops", n_tokens),
                           f"{source} tokens, vocab {vocab_size}, {n_tokens} per crop", vocab_size=vocab_size,
                           n_tokens=n_tokens, source=source))
    TOKEN_MODALITIES[name] = (source, vocab_size, n_tokens)
    return spec


# ---------------------------------------------------------------------- SAM instances, human poses, 2D keypoints
# (modalmill/labelers/sam.py, humans.py, mediapipe_labelers.py write these)


def _int_list(v, n=None) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and all(isinstance(c, int) and not isinstance(c, bool)
                                                                    for c in v)


def _image_size_fields(spec, value, key) -> tuple[int, int]:
    h, w = value.get("height"), value.get("width")
    if not (isinstance(h, int) and isinstance(w, int) and h >= 1 and w >= 1):
        raise spec._err(key, "height/width", f"expected the stored rgb size as positive ints, got {h!r}, {w!r}")
    return h, w


def _validate_sam_mask(spec, value, key):
    """{"height", "width", "instances": [{"polygons", "bbox_xyxy", "area", "predicted_iou", "stability_score"}]}."""
    if not isinstance(value, dict) or not isinstance(value.get("instances"), list):
        raise spec._err(key, "instances", "sam_mask must be {'height', 'width', 'instances': [...]}")
    h, w = _image_size_fields(spec, value, key)
    for i, inst in enumerate(value["instances"]):
        where = f"instances[{i}]"
        if not isinstance(inst, dict):
            raise spec._err(key, where, "each instance is an object")
        polys = inst.get("polygons")
        if not (isinstance(polys, list) and polys):
            raise spec._err(key, f"{where}.polygons", "expected a non-empty list of polygons")
        for j, poly in enumerate(polys):
            if not (isinstance(poly, list) and poly and all(_int_list(p, 2) for p in poly)):
                raise spec._err(key, f"{where}.polygons[{j}]", "expected a non-empty list of [x, y] int points")
            pts = np.asarray(poly)
            if pts.min() < 0 or pts[:, 0].max() >= w or pts[:, 1].max() >= h:
                raise spec._err(key, f"{where}.polygons[{j}]", f"points must lie inside the {w}x{h} image")
        box = inst.get("bbox_xyxy")
        if not (_int_list(box, 4) and 0 <= box[0] <= box[2] < w and 0 <= box[1] <= box[3] < h):
            raise spec._err(key, f"{where}.bbox_xyxy", f"expected inclusive int [x0, y0, x1, y1] inside {w}x{h}, "
                                                       f"got {box}")
        area = inst.get("area")
        if not (isinstance(area, int) and 1 <= area <= h * w):
            raise spec._err(key, f"{where}.area", f"expected a pixel count in [1, {h * w}], got {area!r}")
        for f in ("predicted_iou", "stability_score"):
            if not _is_num(inst.get(f)):
                raise spec._err(key, f"{where}.{f}", f"expected a number, got {inst.get(f)!r}")


def _nested_shape(v) -> tuple | None:
    """The shape of a regular nested list of numbers, or None when ragged / not numbers."""
    try:
        arr = np.asarray(v, dtype=float)
    except (TypeError, ValueError):
        return None
    return arr.shape if np.isfinite(arr).all() else None


def _validate_human_poses(spec, value, key):
    """4M's layout: ``[]`` without people, else per-field lists with one entry per person."""
    if isinstance(value, list) and not value:
        return
    if not isinstance(value, dict):
        raise spec._err(key, "type", "human_poses is [] (no people) or {'bbox_xyxy': [...], 'pred_smpl_params': "
                                     "{...}, 'pred_cam': [...]} with one entry per person")
    params = value.get("pred_smpl_params")
    if not isinstance(params, dict):
        raise spec._err(key, "pred_smpl_params", "expected {'global_orient', 'body_pose', 'betas'}")
    fields = {"bbox_xyxy": (value.get("bbox_xyxy"), (4,)), "pred_cam": (value.get("pred_cam"), (3,)),
              "pred_smpl_params.global_orient": (params.get("global_orient"), (1, 3, 3)),
              "pred_smpl_params.body_pose": (params.get("body_pose"), (23, 3, 3)),
              "pred_smpl_params.betas": (params.get("betas"), (10,))}
    if "pose_tokenized" in value:
        fields["pose_tokenized"] = (value["pose_tokenized"], (8,))
    n = None
    for name, (v, per) in fields.items():
        shape = _nested_shape(v) if isinstance(v, list) and v else None
        if shape is None or tuple(shape[1:]) != per:
            raise spec._err(key, name, f"expected a non-empty list of {list(per)} numbers per person")
        if n is not None and shape[0] != n:
            raise spec._err(key, name, f"has {shape[0]} people, other fields have {n}")
        n = shape[0]
    if "pose_tokenized" in value and not all(0 <= t < 1024 for p in value["pose_tokenized"] for t in p):
        raise spec._err(key, "pose_tokenized", "pose token ids must lie in [0, 1024)")


def _validate_pose_keypoints(spec, value, key):
    """{"height", "width", "people": [{"keypoints": 33 x [x, y, z, visibility]}]}."""
    if not isinstance(value, dict) or not isinstance(value.get("people"), list):
        raise spec._err(key, "people", "pose_keypoints must be {'height', 'width', 'people': [...]}")
    _image_size_fields(spec, value, key)
    for i, person in enumerate(value["people"]):
        kp = person.get("keypoints") if isinstance(person, dict) else None
        shape = _nested_shape(kp) if isinstance(kp, list) else None
        if shape != (33, 4):
            raise spec._err(key, f"people[{i}].keypoints", "expected 33 x [x, y, z, visibility] numbers")
        vis = np.asarray(kp, dtype=float)[:, 3]
        if vis.min() < 0 or vis.max() > 1:
            raise spec._err(key, f"people[{i}].keypoints", "visibility must lie in [0, 1]")


def _validate_sam_instance(spec, arr, key):
    """4M's ``sam_instance`` file: an object array with one dict per crop, {"points": per instance a list of
    OpenCV contours ``(P, 1, 2)`` (x, y), "token_ids": ``[N, 16]`` ints in [0, 1024), "bbox": ``[N, 4]``
    (ymin, xmin, ymax, xmax)}, all in pixels of the crop."""
    if arr.dtype != object or arr.ndim != 1:
        raise spec._err(key, "type", f"expected a 1-d object array (one entry per crop), got {arr.dtype} {arr.shape}")
    for c, entry in enumerate(arr):
        where = f"[{c}]"
        if not isinstance(entry, dict) or not {"points", "token_ids", "bbox"} <= set(entry):
            raise spec._err(key, where, "each crop is a dict with 'points', 'token_ids' and 'bbox'")
        ids, box, points = entry["token_ids"], entry["bbox"], entry["points"]
        if not (isinstance(ids, np.ndarray) and ids.ndim == 2 and ids.shape[1] == 16
                and np.issubdtype(ids.dtype, np.integer)):
            raise spec._err(key, f"{where}.token_ids", f"expected an integer array [N, 16], got "
                                                       f"{getattr(ids, 'dtype', type(ids).__name__)} "
                                                       f"{getattr(ids, 'shape', '')}")
        if ids.size and (ids.min() < 0 or ids.max() >= 1024):
            raise spec._err(key, f"{where}.token_ids", f"ids must lie in [0, 1024), got [{ids.min()}, {ids.max()}]")
        n = ids.shape[0]
        if not (isinstance(box, np.ndarray) and box.shape == (n, 4) and np.issubdtype(box.dtype, np.number)):
            got = getattr(box, "shape", box)
            raise spec._err(key, f"{where}.bbox", f"expected a numeric array [{n}, 4], got {got}")
        if box.size and ((box[:, 2] < box[:, 0]).any() or (box[:, 3] < box[:, 1]).any()):
            raise spec._err(key, f"{where}.bbox", "boxes are [ymin, xmin, ymax, xmax] with min <= max")
        if not isinstance(points, (list, tuple)) or len(points) != n:
            raise spec._err(key, f"{where}.points", f"expected one list of contours per instance ({n})")
        for i, contours in enumerate(points):
            if not (isinstance(contours, (list, tuple)) and contours and all(
                    isinstance(ct, np.ndarray) and ct.ndim == 3 and ct.shape[1:] == (1, 2) and ct.shape[0] >= 1
                    for ct in contours)):
                raise spec._err(key, f"{where}.points[{i}]", "expected a non-empty list of OpenCV contours (P, 1, 2)")


def _validate_ocr(spec, value, key):
    """{"height", "width", "lines": [{"polygon": 4 x [x, y], "text": str, "score": [0, 1]}]}."""
    if not isinstance(value, dict) or not isinstance(value.get("lines"), list):
        raise spec._err(key, "lines", "ocr must be {'height', 'width', 'lines': [...]}")
    _image_size_fields(spec, value, key)
    for i, line in enumerate(value["lines"]):
        if not isinstance(line, dict) or not isinstance(line.get("text"), str):
            raise spec._err(key, f"lines[{i}]", "each line is {'polygon', 'text', 'score'} with text a string")
        poly = line.get("polygon")
        if not isinstance(poly, list) or _nested_shape(poly) != (4, 2):
            raise spec._err(key, f"lines[{i}].polygon", "expected 4 x [x, y] numbers (the text line's corners)")
        score = line.get("score")
        if not isinstance(score, (int, float)) or not 0.0 <= float(score) <= 1.0:
            raise spec._err(key, f"lines[{i}].score", f"expected a number in [0, 1], got {score!r}")


_OBJECT_VALIDATORS = {"sam_instance": _validate_sam_instance}

_JSON_VALIDATORS.update({"sam_mask": _validate_sam_mask, "human_poses": _validate_human_poses,
                         "pose_keypoints": _validate_pose_keypoints, "ocr": _validate_ocr})
_R(ModalitySpec("sam_mask", TEXT, "json", None, (),
                "raw SAM instances: outer-contour polygons, inclusive xyxy box, area, predicted IoU and stability "
                "score, in stored-rgb pixels (input of the SAM-instance tokenizer)"))
_R(ModalitySpec("pose_keypoints", TEXT, "json", None, (),
                "2D body keypoints per person: 33 MediaPipe pose landmarks [x, y, z, visibility], x/y/z in "
                "stored-rgb pixels"))
_R(ModalitySpec("person_mask", PIXEL, "png", "uint8", ("H", "W"), "person segmentation mask (0 or 255)"))
_R(ModalitySpec("ocr", TEXT, "json", None, (),
                "text lines read in the image: corner polygon in stored-rgb pixels, text, recognition score "
                "(not a 4M-21 modality)"))
