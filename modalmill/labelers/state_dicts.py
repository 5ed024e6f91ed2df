"""Load checkpoints into labelers' models safely: state dicts from ``.safetensors``, with
``torch.load(weights_only=True)``, or, for PyTorch-Lightning ``.ckpt`` files, with :func:`read_lightning_state_dict`
(the weights-only unpickler with plain stand-ins for Lightning's own objects): nothing is ever unpickled as
arbitrary objects. Finding and fetching the files is :mod:`modalmill.io.fetch`'s job."""

from __future__ import annotations

import re

from ..io.fetch import WeightsError


def read_lightning_state_dict(path: str) -> dict:
    """The ``state_dict`` of a PyTorch-Lightning checkpoint, read without running any code from the file.

    Lightning checkpoints pickle more than tensors (callbacks such as ``ModelCheckpoint``, configs such as yacs'
    ``CfgNode`` under ``hyper_parameters``), so a plain ``torch.load(weights_only=True)`` refuses them. They are
    read here with torch's weights-only unpickler all the same: every non-tensor global the file names (listed
    beforehand by ``torch.serialization.get_unsafe_globals_in_checkpoint``, or, for the legacy non-zip format, as
    the unpickler reports them) is read as a plain ``OrderedDict`` stand-in, so no class or function from the file
    is imported or called; only ``state_dict`` is kept.
    """
    from collections import OrderedDict

    import torch

    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except ValueError as e:  # not a zip: torch's legacy format (a pickle) or no checkpoint at all
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":  # every pickle of protocol >= 2 starts with PROTO
                raise WeightsError(f"{path}: not a torch checkpoint ({e})") from None
        names = []  # learn the names from the unpickler's refusals
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{path}: not a torch checkpoint ({type(e).__name__}: {e})") from None
    for _ in range(64):
        try:
            with torch.serialization.safe_globals([(OrderedDict, n) for n in names]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as e:  # noqa: BLE001
            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if m and m.group(1) not in names:
                names.append(m.group(1))
                continue
            raise WeightsError(f"{path}: cannot read it as a checkpoint with only tensors and plain containers "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})") from None
    else:
        raise WeightsError(f"{path}: names too many non-tensor objects to be a model checkpoint")
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        found = sorted(map(str, obj))[:10] if isinstance(obj, dict) else type(obj).__name__
        raise WeightsError(f"{path}: no 'state_dict' in the checkpoint (found: {found})")
    return dict(state)


def load_state_dict(path: str) -> dict:
    """A flat ``{name: tensor}`` from ``.safetensors``, a Lightning ``.ckpt`` (:func:`read_lightning_state_dict`)
    or a ``torch.save`` file (``weights_only=True``)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if path.endswith(".ckpt"):
        return read_lightning_state_dict(path)
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
