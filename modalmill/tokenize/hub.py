"""Loading tokenizers in 4M's hub layout: a folder with ``config.json`` (ml-4m's constructor arguments) and
``model.safetensors`` (ml-4m's parameter names).

A reference is a model-hub id (``EPFL-VILAB/4M_tokenizers_rgb_16k_224-448``: downloaded with
``huggingface_hub.snapshot_download`` when online and cached; with ``HF_HUB_OFFLINE=1`` only the local hub cache
is used), a local folder, or an ``s3://`` folder (both files downloaded once into the weights cache). Only the
encoder and quantizer are loaded unless decoding is asked for; decoder weights are then skipped.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from ..io import storage
from ..io.fetch import WeightsError, resolve

CONFIG_FILE, MODEL_FILE = "config.json", "model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
ENCODER_PREFIXES = ("encoder.", "quant_proj.", "quantize.", "cls_emb.")


def is_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not ref.startswith((".", "/")) and not os.path.exists(ref)


def folder(ref: str) -> str:
    """A local folder holding ``config.json`` and ``model.safetensors`` of the tokenizer at ``ref``."""
    ref = str(ref).rstrip("/")
    if ref.endswith(MODEL_FILE) or ref.endswith(CONFIG_FILE):
        ref = ref.rsplit("/", 1)[0]
    if is_hub_id(ref):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(ref, allow_patterns=[CONFIG_FILE, MODEL_FILE],
                                     local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
        except Exception as e:  # noqa: BLE001 - any hub failure means "not available here"
            off = " (HF_HUB_OFFLINE=1: only the local hub cache is used)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise WeightsError(f"cannot get tokenizer {ref!r} from the model hub{off}: {type(e).__name__}; "
                               f"download it where the hub is reachable and pass the folder") from None
    if storage.is_s3(ref):  # the whole folder, cached by the objects' versions
        local = resolve(ref, expected=f"a 4M tokenizer folder ({CONFIG_FILE} + {MODEL_FILE})")
        if not os.path.isdir(local):
            raise WeightsError(f"{ref}: expected a folder with {CONFIG_FILE} and {MODEL_FILE}, found one object")
        return local
    path = os.path.expanduser(ref[7:] if ref.startswith("file://") else ref)
    if not os.path.isdir(path):
        raise WeightsError(f"tokenizer {ref!r} not found: expected a hub id, or a local or s3:// folder with "
                           f"{CONFIG_FILE} and {MODEL_FILE}")
    return path


def read_config(ref: str) -> dict[str, Any]:
    path = os.path.join(folder(ref), CONFIG_FILE)
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{ref}: no {CONFIG_FILE} (a 4M tokenizer folder holds config.json and "
                           f"model.safetensors)") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{ref}: {CONFIG_FILE} is not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{ref}: {CONFIG_FILE} must hold a JSON object of constructor arguments")
    return cfg


def is_fourm_folder(ref: str) -> bool:
    """Whether ``ref`` is a tokenizer in 4M's layout (hub id, or a folder whose config.json has no modalmill
    format marker of the old checkpoint format)."""
    if is_hub_id(str(ref)):
        return True
    try:
        cfg = read_config(ref)
    except WeightsError:
        return False
    return "format" not in cfg or cfg.get("format") != "modalmill-tokenizer/1"


def load(ref: str, device: str | torch.device = "cpu", with_decoder: bool = False):
    """(model in eval mode, config) of the 4M-format tokenizer at ``ref``; ``with_decoder`` also loads the
    VQ-VAE decoder (DiVAE diffusion decoders are never loaded: tokenizing needs only the encoder)."""
    from safetensors.torch import load_file

    from .fourm import FourMTokenizer

    cfg = read_config(ref)
    try:
        model = FourMTokenizer(cfg, with_decoder=with_decoder)
    except (ValueError, TypeError, KeyError) as e:
        raise WeightsError(f"{ref}: config.json does not describe a 4M tokenizer modalmill can build: {e}") from None
    path = os.path.join(folder(ref), MODEL_FILE)
    if not os.path.exists(path):
        raise WeightsError(f"{ref}: no {MODEL_FILE}")
    state = load_file(path)
    own = model.state_dict()
    wanted = {k for k in own if with_decoder or k.startswith(ENCODER_PREFIXES)}
    missing = sorted(k for k in wanted if k not in state)
    bad = sorted(k for k in wanted if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or bad:
        raise WeightsError(f"{ref}: model.safetensors does not fit config.json: missing {missing[:4]}, "
                           f"mis-shaped {bad[:4]}")
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return model.to(device).eval(), cfg
