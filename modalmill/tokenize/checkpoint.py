"""Tokenizer checkpoints: ``safetensors`` weights + a JSON config, never pickles.

A trained tokenizer lives in a directory (local or ``s3://``)::

    model.safetensors     the exported weights; its safetensors metadata holds the full JSON config
    config.json           the same config, readable: architecture, quantizer, vocab size, input modality,
                          normalisation, training data and steps
    train_state.safetensors  resumable training state (all weights incl. the quantizer library's EMA buffers,
                          AdamW moments; step, optimizer groups and history as JSON metadata)
    report.json, reconstructions.png   evaluation on held-out samples

The *checkpoint* of a tokenizer is ``model.safetensors`` (a directory location means the file inside it); its
content hash identifies the tokens it makes. Exported weights hold only the wrapper-owned tensors (see
:mod:`modalmill.tokenize.quantizers`), so loading does not depend on the quantizer library's internals.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..labelers.weights import WeightsError, content_hash, resolve
from ..io import storage
from .quantizers import is_library_key

FORMAT = "modalmill-tokenizer/1"
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


def _export_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
            if not is_library_key(k)}


def save_tokenizer(model: torch.nn.Module, config: dict[str, Any], out_dir: str) -> str:
    """Write ``model.safetensors`` (+ ``config.json``) into ``out_dir``; returns the checkpoint's location."""
    from safetensors.torch import save

    meta = {"format": FORMAT, "config": json.dumps(config, sort_keys=True)}
    url = storage.join(out_dir, MODEL_FILE)
    storage.write_bytes(url, canonical_safetensors(save(_export_tensors(model), metadata=meta)))
    storage.write_bytes(storage.join(out_dir, CONFIG_FILE), json.dumps(config, indent=1, sort_keys=True).encode())
    return url


def read_config(location: str) -> dict[str, Any]:
    from safetensors import safe_open

    path = local_checkpoint(location)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or "config" not in meta:
        raise WeightsError(f"{location}: not a modalmill tokenizer checkpoint (no {FORMAT!r} metadata)")
    return json.loads(meta["config"])


def load_tokenizer(location: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the tokenizer a checkpoint describes and load its weights (eval mode); returns (model, config)."""
    from safetensors.torch import load_file

    from .models import build_model

    config = read_config(location)
    model = build_model(config["model"])
    state = load_file(local_checkpoint(location))
    own = {k for k in model.state_dict() if not is_library_key(k)}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    bad_shape = [k for k in own & set(state) if tuple(state[k].shape) != tuple(model.state_dict()[k].shape)]
    if missing or unexpected or bad_shape:
        raise WeightsError(f"{location}: checkpoint does not fit its config: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}, mis-shaped {bad_shape[:5]}")
    model.load_state_dict(state, strict=False)
    for m in model.modules():
        if hasattr(m, "after_load"):
            m.after_load()
    return model.to(device).eval(), config


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
