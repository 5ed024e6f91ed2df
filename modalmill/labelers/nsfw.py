"""LAION's CLIP-based NSFW detector (github.com/LAION-AI/CLIP-based-NSFW-Detector, ``clip_autokeras_binary_nsfw``):
``nsfw_score`` (float32, 0..1, 1 = NSFW) per sample, the detector LAION-5B's ``punsafe`` column comes from.

The released model is an AutoKeras (Keras 2.8) SavedModel on OpenAI CLIP ViT-L/14 image embeddings. Read from
its graph and variables (:func:`convert_keras_nsfw`, no TensorFlow needed), it is:

1. ``MultiCategoryEncoding``: the 768-d input (float64, cast to float32); NaN becomes 0, except in 5 columns
   (180, 316, 413, 440, 644) that AutoKeras took for categorical: each of those is formatted as a string
   (``tf.strings.as_string``: C's ``%f``, six decimals) and looked up in a vocabulary of 2,190 to 10,425
   strings (``StringLookup``: index 1..V, 0 for anything else), and the index is the feature;
2. ``Normalization``: ``(x - mean) / max(sqrt(variance), 1e-7)``;
3. ``Dense(64) - ReLU - Dense(512) - ReLU - Dense(256) - ReLU - Dense(1) - sigmoid``.

``NsfwHead`` (:func:`nsfw_head`) is that model in torch; the vocabularies are buffers of integer codes of the strings
(:func:`code`), so the lookup is exact. The detector was trained on, and is run by LAION on, the L2-normalised
float16 embeddings clip-retrieval stores; the labeler feeds it the same (the categorical columns' strings only
match float16 values). It is not fidelity-tested against TensorFlow (no TensorFlow 2.8 for this Python); the
conversion is tested on the released file itself (``tests/fixtures/laion_nsfw``): every variable and
vocabulary found, and the normalisation the graph folded into constants equal to the variables.

**A scalar modality, like the aesthetic score** (not a manifest column): it is a label made by a model, added
later with ``--only``, resumed and re-made when the weights change; ``--where "nsfw_score < 0.5"`` and
``load_dataset(where=)`` read it like any score. 4M-21's ``metadata`` has no NSFW field.
"""

from __future__ import annotations

import functools
import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.fetch import resolve
from .base import LabelFailure, register_labeler
from .clip import (build_open_clip_visual, find_checkpoint, visual_state_dict)
from .pins import Pin
from .quality import ClipL14Config, OpenAIClipL14Labeler
from .state_dicts import load_into, load_state_dict
from .tf_savedmodel import function_name, graph_nodes, read_bundle

__all__ = ["NSFW_URL", "LaionNsfwLabeler", "code", "convert_keras_nsfw", "load_nsfw_head", "nsfw_head"]

NSFW_URL = ("https://github.com/LAION-AI/CLIP-based-NSFW-Detector/raw/d6bb8fe31fd4aecbfed7dfb62df4fe5858bfc014/"
            "clip_autokeras_binary_nsfw.zip")
NSFW_PIN = Pin(sha256="905520bb0336accc73ee282c605d926aef90cf14248889d44b9cee50eef71f8a", size=1094585,
               source="computed from the file in the repository at commit d6bb8fe (git blob f970ee08)")
_VAR = "layer_with_weights-{}/{}/.ATTRIBUTES/VARIABLE_VALUE"


def code(s: str | bytes) -> int:
    """The integer code of a ``%f``-formatted number: its digits, times 2, plus 1 when negative ("-0.000000" and
    "0.000000" are different strings, so different codes)."""
    s = s.decode() if isinstance(s, bytes) else s
    neg = s.startswith("-")
    return 2 * int(s.lstrip("-").replace(".", "")) + int(neg)


def nsfw_head(dim: int = 768, hidden: tuple[int, ...] = (64, 512, 256), vocab: dict[int, int] | None = None):
    """An ``NsfwHead`` (random weights; vocabularies of the given sizes ``{column: size}``, all codes 0)."""
    return _head_class()(dim, tuple(hidden), dict(vocab or {}))


@functools.lru_cache(maxsize=None)
def _head_class():
    import torch
    import torch.nn as nn

    class NsfwHead(nn.Module):
        """The AutoKeras NSFW model in torch: :meth:`encode` (numpy: the categorical lookups), then ``forward``."""

        def __init__(self, dim: int, hidden: tuple[int, ...], vocab: dict[int, int]):
            super().__init__()
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("variance", torch.ones(dim))
            layers, d = [], dim
            for h in hidden:
                layers += [nn.Linear(d, h), nn.ReLU()]
                d = h
            self.layers = nn.Sequential(*layers, nn.Linear(d, 1))
            self.columns = tuple(sorted(vocab))
            for c in self.columns:  # the strings' codes, and the index each maps to
                self.register_buffer(f"vocab_{c}_codes", torch.zeros(vocab[c], dtype=torch.int64))
                self.register_buffer(f"vocab_{c}_index", torch.zeros(vocab[c], dtype=torch.int64))
            self._tables: dict[int, dict[int, int]] | None = None

        def tables(self) -> dict[int, dict[int, int]]:
            if self._tables is None:
                self._tables = {c: dict(zip(getattr(self, f"vocab_{c}_codes").tolist(),
                                            getattr(self, f"vocab_{c}_index").tolist())) for c in self.columns}
            return self._tables

        def encode(self, x: np.ndarray) -> np.ndarray:
            """Keras's ``MultiCategoryEncoding`` of float32 rows: NaN -> 0; categorical columns -> their index."""
            x = np.asarray(x, np.float32)
            out = np.where(np.isnan(x), np.float32(0), x)
            for c, table in self.tables().items():
                out[:, c] = [table.get(code("%f" % float(v)), 0) if np.isfinite(v) else 0 for v in x[:, c]]
            return out

        def forward(self, encoded):
            z = (encoded - self.mean) / torch.sqrt(self.variance).clamp_min(1e-7)
            return torch.sigmoid(self.layers(z)).squeeze(-1)

    return NsfwHead


def nsfw_head_from_state(state: dict):
    """An ``NsfwHead`` shaped as ``state`` says (dim, hidden sizes, vocabulary sizes), the weights loaded."""
    n_linear = len([k for k in state if k.startswith("layers.") and k.endswith(".weight")])
    dims = [int(state[f"layers.{2 * i}.weight"].shape[0]) for i in range(n_linear)]
    vocab = {int(k.split("_")[1]): int(v.shape[0]) for k, v in state.items() if k.endswith("_codes")}
    head = nsfw_head(int(state["mean"].shape[0]), tuple(dims[:-1]), vocab)
    load_into(head, state, where="LAION NSFW head")
    return head.eval()


def _vocabularies(saved_model: bytes) -> dict[int, tuple[list[bytes], np.ndarray]]:
    """``{column: (strings, indices)}`` of the categorical columns, read from the graph: each table's initializer
    call (table, keys Const, values Const), the order the serving signature passes the tables in, and the
    column (``split:output:N``) whose string the model function looks up in each."""
    nodes, functions = graph_nodes(saved_model)
    by_name = {n.name: n for n in nodes}
    init = {n.inputs[0]: (by_name[n.inputs[1]].tensor(), by_name[n.inputs[2]].tensor()) for n in nodes
            if n.op == "StatefulPartitionedCall" and len(n.inputs) == 3 and n.inputs[1] in by_name
            and by_name[n.inputs[1]].op == "Const"}
    serving = next(n for n in nodes if n.op == "StatefulPartitionedCall"
                   and function_name(n).startswith("__inference_signature_wrapper"))
    tables = [i for i in serving.inputs if i in init]
    model = next(nodes_ for args, nodes_ in functions.values()
                 if any(x.op == "LookupTableFindV2" for x in nodes_) and any(x.op == "AsString" for x in nodes_))
    fn_nodes = {x.name: x for x in model}
    out = {}
    for k, find in enumerate(x for x in model if x.op == "LookupTableFindV2"):
        as_string = fn_nodes[find.inputs[1].split(":")[0]]
        column = int(as_string.inputs[0].rsplit(":", 1)[1])
        keys, values = init[tables[k]]
        out[column] = (keys, np.asarray(values, np.int64))
    return out


def convert_keras_nsfw(path: str) -> dict:
    """LAION's ``clip_autokeras_binary_nsfw.zip`` (or its unpacked folder) -> an ``NsfwHead`` state dict."""
    import torch

    files = _savedmodel_files(path)
    bundle = read_bundle(files["variables/variables.index"], files["variables/variables.data-00000-of-00001"])
    state = {"mean": bundle[_VAR.format(1, "mean")], "variance": bundle[_VAR.format(1, "variance")]}
    for i in range(4):  # Keras kernels are [in, out]
        state[f"layers.{2 * i}.weight"] = bundle[_VAR.format(2 + i, "kernel")].T
        state[f"layers.{2 * i}.bias"] = bundle[_VAR.format(2 + i, "bias")]
    for column, (keys, values) in _vocabularies(files["saved_model.pb"]).items():
        state[f"vocab_{column}_codes"] = np.array([code(k) for k in keys], np.int64)
        state[f"vocab_{column}_index"] = values
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def _savedmodel_files(path: str) -> dict[str, bytes]:
    want = ("saved_model.pb", "variables/variables.index", "variables/variables.data-00000-of-00001")
    if os.path.isdir(path):
        return {w: open(os.path.join(path, w), "rb").read() for w in want}
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        out = {}
        for w in want:
            hit = [n for n in names if n == w or n.endswith("/" + w)]
            if not hit:
                raise ValueError(f"{path}: no {w} in the archive (not LAION's Keras NSFW model?)")
            out[w] = z.read(hit[0])
        return out


def load_nsfw_head(path: str):
    """The head from LAION's Keras zip / SavedModel folder, or from a state dict of ``NsfwHead``."""
    if path.endswith(".zip") or os.path.isdir(path):
        return nsfw_head_from_state(convert_keras_nsfw(path))
    return nsfw_head_from_state(load_state_dict(path))


@register_labeler
class LaionNsfwLabeler(OpenAIClipL14Labeler):
    """LAION's CLIP-based NSFW detector on CLIP ViT-L/14: ``nsfw_score`` (float32, 0..1) per sample."""

    name = "laion_nsfw"
    version = "1"
    outputs = ("nsfw_score",)
    architecture = ("OpenAI CLIP ViT-L/14 image tower (open_clip ViT-L-14-quickgelu) + LAION's AutoKeras NSFW MLP "
                    "(768 -> 64 -> 512 -> 256 -> 1, categorical lookups, normalisation) in torch")
    weights_help = ("open_clip's copy of OpenAI's CLIP ViT-L/14 (the model-hub repo timm/vit_large_patch14_clip_"
                    "224.openai) or any open_clip state dict of the configured arch; the head: config 'head' "
                    "(LAION's Keras .zip or folder, or an NsfwHead state dict)")
    license = "MIT (OpenAI CLIP weights); MIT (LAION CLIP-based-NSFW-Detector)"
    description = "LAION CLIP-based NSFW detector (CLIP ViT-L/14 + AutoKeras MLP): nsfw_score 0..1 per sample"

    @dataclass(frozen=True)
    class Config(ClipL14Config):
        head: str | None = None  # the NSFW model (None: LAION's clip_autokeras_binary_nsfw.zip, pinned)

    def build(self, path: str):
        where = f"labeler {self.name!r}"
        visual = build_open_clip_visual(self.config.arch, where=where)
        ckpt = find_checkpoint(path, where=where, how_to_get=self.weights_help)
        load_into(visual, visual_state_dict(load_state_dict(ckpt)), where=f"{where} ({self.config.arch}) from {ckpt}")
        head_path = resolve(self.config.head or NSFW_URL, expected="LAION NSFW detector (Keras zip)",
                            pin=None if self.config.head else NSFW_PIN)
        try:
            head = load_nsfw_head(head_path)
        except (KeyError, ValueError, RuntimeError) as e:
            raise RuntimeError(f"{where}: NSFW head from {head_path}: {e}") from e
        if int(head.mean.shape[0]) != int(visual.output_dim):
            raise RuntimeError(f"{where}: NSFW head takes {head.mean.shape[0]}-d embeddings, the CLIP tower gives "
                               f"{visual.output_dim}")
        return {"visual": visual, "head": head}

    def predict(self, batch: list) -> list[dict[str, Any] | LabelFailure]:
        import torch

        visual, head = self.model["visual"], self.model["head"]
        emb = self.unit_embeddings(visual, batch).half().float()  # clip-retrieval's float16
        encoded = torch.from_numpy(head.encode(emb.cpu().numpy())).to(head.mean.device)
        scores = head(encoded).float().cpu().numpy()
        return [{"nsfw_score": np.array(float(s), np.float32)} for s in scores]

