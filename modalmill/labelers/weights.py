"""Finding and loading model weights safely.

A weights location is a local file or directory, an ``s3://`` URL (file or prefix, downloaded once into a
local cache), or a model-hub id (``org/name``, only when online; with ``HF_HUB_OFFLINE=1`` it must already
be in the local hub cache). State dicts load from ``.safetensors`` or with ``torch.load(weights_only=True)``
only: nothing is ever unpickled as arbitrary objects.
"""

from __future__ import annotations

import hashlib
import os
import re

from ..pipeline import storage

CACHE_DIR = os.environ.get("MODALMILL_WEIGHTS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "modalmill",
                                                                   "weights"))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class WeightsError(RuntimeError):
    """Weights are missing or do not fit the model; the message says what was expected and where to get it."""


def resolve(location: str, *, expected: str = "", how_to_get: str = "") -> str:
    """A local path holding the weights at ``location`` (downloaded/cached when remote)."""
    hint = (f" Expected: {expected}." if expected else "") + (f" Get it: {how_to_get}." if how_to_get else "")
    if not location:
        raise WeightsError(f"no weights location given.{hint}")
    if storage.is_s3(location):
        return _from_s3(location, hint)
    path = os.path.expanduser(location[7:] if location.startswith("file://") else location)
    if os.path.exists(path):
        return path
    if _HUB_ID.match(location) and not location.startswith((".", "/")):
        return _from_hub(location, hint)
    raise WeightsError(f"weights not found at {location!r}.{hint}")


def _from_s3(url: str, hint: str) -> str:
    dest = os.path.join(CACHE_DIR, hashlib.sha256(url.encode()).hexdigest()[:24])
    done = os.path.join(dest, ".complete")
    if os.path.exists(done):
        return _single_or_dir(dest)
    files = [url] if _is_object(url) else storage.list_files(url)
    if not files:
        raise WeightsError(f"weights not found at {url!r} (no such object or prefix).{hint}")
    prefix = url.rstrip("/") + "/"
    for f in files:
        rel = os.path.basename(f) if f == url else f[len(prefix):]
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with storage.open_read(f) as src, storage.atomic_write(target) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
    storage.write_bytes(done, b"")
    return _single_or_dir(dest)


def _is_object(url: str) -> bool:
    try:
        storage.size(url)
        return True
    except (FileNotFoundError, IsADirectoryError, OSError):
        return False


def _single_or_dir(dest: str) -> str:
    entries = [e for e in os.listdir(dest) if not e.startswith(".")]
    return os.path.join(dest, entries[0]) if len(entries) == 1 and os.path.isfile(os.path.join(dest, entries[0])) \
        else dest


def _from_hub(repo_id: str, hint: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
    except Exception as e:  # noqa: BLE001 - any hub failure is "not available here"
        offline = " (HF_HUB_OFFLINE=1: only the local hub cache is used)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise WeightsError(f"cannot get {repo_id!r} from the model hub{offline}: {type(e).__name__}.{hint}") from None


def load_state_dict(path: str) -> dict:
    """A flat ``{name: tensor}`` from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{path}: cannot load as a weights-only torch checkpoint ({type(e).__name__}: {e}); "
                           "only tensors are accepted, never pickled objects") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def load_into(model, state: dict, *, where: str, strict: bool = True) -> None:
    """Load ``state`` into ``model``; a mismatch is a WeightsError listing missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    shape_bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                 if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if shape_bad or (strict and (missing or unexpected)):
        parts = []
        if shape_bad:
            parts.append("shape mismatch: " + "; ".join(shape_bad[:5]))
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:5]}")
        raise WeightsError(f"{where}: checkpoint does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=strict)


def content_hash(path: str) -> str:
    """sha256 (first 16 hex) over a weights file, or over every file of a weights directory (sorted)."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if not f.startswith("."))
    for f in files:
        h.update(os.path.relpath(f, path if os.path.isdir(path) else os.path.dirname(path)).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]
