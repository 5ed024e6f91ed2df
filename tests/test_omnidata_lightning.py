"""Omnidata's official ``omnidata_dpt_{depth,normal}_v2.ckpt`` are PyTorch-Lightning checkpoints: besides the
``state_dict`` they pickle Lightning's ``ModelCheckpoint`` callback (the hub's pickle scan of the official files
lists ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``), which ``torch.load(weights_only=True)``
refuses. The labelers read them with the same Lightning-aware reader as HMR 2.0's: no object from the file is
built, no module it names is imported.

The checkpoint here is made the way Lightning makes one, with a stand-in ``pytorch_lightning`` module that exists
only while the file is written (Lightning is not a dependency), holding a tiny DPT-Hybrid in Omnidata's names.
"""

from __future__ import annotations

import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch

from modalmill.labelers import LabelInput, get_labeler
from modalmill.labelers.depth import transformers_to_omnidata
from modalmill.labelers.state_dicts import load_state_dict, read_lightning_state_dict
from tests.tiny_models import tiny_dpt

BUILT = []  # a ModelCheckpoint that is unpickled as itself would record itself here


def _fake_lightning():
    """A ``pytorch_lightning.callbacks.model_checkpoint`` module with a ``ModelCheckpoint`` class (names as in
    Lightning), registered in sys.modules while a checkpoint is written."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    mods = [types.ModuleType(n) for n in names]

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score, self.dirpath = "val_loss", torch.tensor(0.123), "/ckpts"

        def __setstate__(self, state):
            BUILT.append(self)  # an unrestricted unpickler would build the object and call this
            self.__dict__.update(state)

    ModelCheckpoint.__module__ = names[-1]
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mods[-1].ModelCheckpoint = ModelCheckpoint
    return names, mods, ModelCheckpoint


def save_lightning_omnidata(path, out_channels: int, seed: int = 0):
    model = tiny_dpt(out_channels, seed)
    state = OrderedDict(transformers_to_omnidata(model.state_dict()))  # "model."-prefixed Omnidata names
    names, mods, ModelCheckpoint = _fake_lightning()
    for n, m in zip(names, mods):
        sys.modules[n] = m
    try:
        torch.save({"epoch": 12, "global_step": 52000, "pytorch-lightning_version": "1.5.10",
                    "state_dict": state,
                    "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1)},
                                  "ModelCheckpoint{'monitor': 'val_loss'}": ModelCheckpoint()},
                    "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]}],
                    "lr_schedulers": [], "hparams_name": "kwargs",
                    "hyper_parameters": {"model_name": "dpt_hybrid", "num_channels": out_channels}}, path)
    finally:
        for n in names:
            sys.modules.pop(n, None)
    return str(path), model


@pytest.mark.parametrize("name,channels", [("omnidata_depth", 1), ("omnidata_normal", 3)])
def test_lightning_ckpt_loads_without_unpickling_objects(name, channels, tmp_path):
    path, model = save_lightning_omnidata(tmp_path / f"omnidata_dpt_{name.split('_')[1]}_v2.ckpt", channels)
    assert "pytorch_lightning" not in sys.modules
    with pytest.raises(Exception, match="ModelCheckpoint"):  # what a plain weights-only load says about it
        torch.load(path, weights_only=True)
    state = read_lightning_state_dict(path)
    assert state.keys() == transformers_to_omnidata(model.state_dict()).keys()
    assert load_state_dict(path).keys() == state.keys()  # load_state_dict takes the same route for .ckpt

    lab = get_labeler(name)({"weights": path})
    lab.setup()
    assert "pytorch_lightning" not in sys.modules and not BUILT  # nothing of the file was imported or built
    ours = lab.model.state_dict()
    assert ours.keys() == model.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())

    # labels from the .ckpt are those of the converted directory (`modalmill convert-weights`), on a 2:1 photo
    converted = get_labeler(name).convert_weights(path, str(tmp_path / "converted"))
    other = get_labeler(name)({"weights": converted})
    other.setup()
    img = (np.random.default_rng(0).random((48, 96, 3)) * 255).astype(np.uint8)
    inp = LabelInput(key="k", image=img, original_size=(96, 48), crops=np.zeros((1, 5), np.int64))
    (a,), (b,) = lab.process_batch([inp]), other.process_batch([inp])
    out = lab.outputs[0]
    assert a[out].shape[:2] == (48, 96) and np.array_equal(a[out], b[out])


def test_a_legacy_format_lightning_ckpt_is_read_too(tmp_path):
    """Checkpoints written by torch < 1.6 (no zip container): the globals are learnt from the unpickler itself."""
    names, mods, ModelCheckpoint = _fake_lightning()
    for n, m in zip(names, mods):
        sys.modules[n] = m
    try:
        path = str(tmp_path / "old.ckpt")
        torch.save({"state_dict": {"model.w": torch.ones(2)}, "callbacks": {"cb": ModelCheckpoint()}}, path,
                   _use_new_zipfile_serialization=False)
    finally:
        for n in names:
            sys.modules.pop(n, None)
    state = read_lightning_state_dict(path)
    assert list(state) == ["model.w"] and torch.equal(state["model.w"], torch.ones(2))
    assert "pytorch_lightning" not in sys.modules and not BUILT
