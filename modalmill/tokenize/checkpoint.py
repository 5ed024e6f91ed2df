"""Tokenizer checkpoints in 4M's hub layout: ``safetensors`` weights + a JSON config, never pickles.

A tokenizer lives in a directory (local or ``s3://``; or a model-hub id for 4M's published ones)::

    model.safetensors     the weights under ml-4m's parameter names (``encoder.*``, ``quant_proj.*``,
                          ``quantize.*``, ``post_quant_proj.*``, ``decoder.*``)
    config.json           ml-4m's constructor arguments (``VQVAE(**config)``); tokenizers trained by modalmill
                          add a ``modalmill`` entry (source modality, token modality, the MODALITY_INFO entry,
                          training data and steps) that ml-4m ignores
    train_state.safetensors  resumable training state (weights, AdamW moments; step and history as metadata)
    report.json, reconstructions.png   evaluation on held-out samples

The *checkpoint* of a tokenizer is ``model.safetensors`` (a directory location means the file inside it); its
content hash identifies the tokens it makes. Checkpoints of modalmill's previous format (``modalmill-tokenizer/1``)
are refused with the command that replaces them (their architecture cannot be converted).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..io.fetch import WeightsError, resolve
from ..io.hashes import content_hash
from ..io import storage
FORMAT = "modalmill-tokenizer/1"  # the previous format (refused with the command that replaces it)
MODEL_FILE, CONFIG_FILE, STATE_FILE = "model.safetensors", "config.json", "train_state.safetensors"
REPORT_FILE, PICTURE_FILE = "report.json", "reconstructions.png"

_HASH_CACHE: dict[tuple, str] = {}


def model_location(location: str) -> str:
    """The ``model.safetensors`` of a checkpoint location (a directory/prefix or the file itself)."""
    location = str(location)
    if location.endswith(".safetensors"):
        return location
    return storage.join(location.rstrip("/"), MODEL_FILE)


def local_checkpoint(location: str) -> str:
    """A local path of the checkpoint file (downloaded once and cached when it is on S3)."""
    if not location:
        raise WeightsError("no tokenizer checkpoint given")
    from . import hub

    if hub.is_hub_id(str(location)):  # a 4M tokenizer on the model hub
        return os.path.join(hub.folder(str(location)), MODEL_FILE)
    return resolve(model_location(location), expected="a modalmill tokenizer checkpoint (model.safetensors)",
                   how_to_get="train one with `modalmill train-tokenizer --modality M --data OUT`")


def checkpoint_hash(location: str) -> str:
    """Content hash (sha256, 16 hex) of a checkpoint; cached by (path, size, mtime)."""
    path = local_checkpoint(location)
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = content_hash(path)
    return _HASH_CACHE[key]


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors blob with its JSON header keys in sorted order.

    The safetensors writer keeps ``__metadata__`` in a hash map, so a file with several metadata entries can come
    out with them in any order: re-serialise the header deterministically (same length, so the tensor offsets do
    not move) to make identical checkpoints byte-identical."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    raw = header.encode()
    if len(raw) > n:  # cannot happen for a header written compactly; keep the original rather than break it
        return data
    return data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:]


OLD_FORMAT_HELP = ("it was written by an older modalmill (format {fmt!r}: its own ViT/FSQ architecture, which 4M's "
                   "code cannot read); retrain it in 4M's format: `modalmill train-tokenizer --modality {m} --data "
                   "OUT --force`")


def _old_format(location: str) -> dict | None:
    """The config of a checkpoint in modalmill's previous format (safetensors metadata ``modalmill-tokenizer/1``),
    or None."""
    from safetensors import safe_open

    try:
        path = local_checkpoint(location)
    except WeightsError:
        return None
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") == FORMAT and "config" in meta:
        return json.loads(meta["config"])
    return None


def _refuse_old(location: str) -> None:
    old = _old_format(location)
    if old is not None:
        raise WeightsError(f"{location}: " + OLD_FORMAT_HELP.format(fmt=FORMAT, m=old.get("modality", "M")))


def read_config(location: str) -> dict[str, Any]:
    """config.json of a tokenizer in 4M's layout (ml-4m's constructor arguments, + ``modalmill`` for tokenizers
    modalmill trained). Checkpoints of modalmill's previous format are refused with the command that replaces
    them."""
    from . import hub

    _refuse_old(location)
    return hub.read_config(_folder_of(location))


def _folder_of(location: str) -> str:
    location = str(location)
    return location.rsplit("/", 1)[0] if location.endswith(".safetensors") else location


def tokenizer_info(location: str) -> dict[str, Any]:
    """``{"codebook_size", "n_tokens", "modality", "token_modality"}`` of a tokenizer (the last two None for
    tokenizers made elsewhere, e.g. 4M's own)."""
    from .fourm import FourMSpec

    cfg = read_config(location)
    spec = FourMSpec.of(cfg)
    mine = cfg.get("modalmill") or {}
    return {"codebook_size": spec.codebook_size, "n_tokens": spec.n_tokens, "modality": mine.get("modality"),
            "token_modality": mine.get("token_modality")}


def load_tokenizer(location: str, device: str | torch.device = "cpu", with_decoder: bool = True
                   ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The 4M-format tokenizer at ``location`` (hub id, local or s3:// folder, or its model.safetensors) in eval
    mode, with its decoder unless ``with_decoder=False``; returns (model, config.json)."""
    from . import hub

    _refuse_old(location)
    return hub.load(_folder_of(location), device, with_decoder=with_decoder)


# ---------------------------------------------------------------------- resumable training state


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length, then a JSON header)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def save_train_state(out_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                     config: dict[str, Any], extra: dict[str, Any]) -> None:
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for name, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"optim.{idx}.{name}"] = t.detach().to("cpu").contiguous().clone()
    meta = {"format": FORMAT + "/train-state", "step": str(int(step)), "config": json.dumps(config, sort_keys=True),
            "param_groups": json.dumps(opt["param_groups"]), "extra": json.dumps(extra, sort_keys=True)}
    storage.write_bytes(storage.join(out_dir, STATE_FILE), canonical_safetensors(save(tensors, metadata=meta)))


def load_train_state(out_dir: str) -> dict[str, Any] | None:
    """``{"step", "config", "extra", "model": {...}, "optim": {...}}`` or None when there is no state yet."""
    from safetensors.torch import load

    url = storage.join(out_dir, STATE_FILE)
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        return None
    tensors = load(data)
    meta = safetensors_metadata(data)
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    return {"step": int(meta["step"]), "config": json.loads(meta["config"]), "extra": json.loads(meta["extra"]),
            "model": model, "optim": {"state": state, "param_groups": json.loads(meta["param_groups"])}}
